"""The scheduler sample images are made with: the model's own sampler on the noise schedule the LoRA trained on.

A pipeline samples with the scheduler its model folder names (PNDM, Euler, DDIM, ...), configured as the model
says. The run may train otherwise: ``model.prediction_type`` can override the model's target, and
``model.zero_terminal_snr`` can rescale the betas (``engine.loss.zero_terminal_snr_schedule``). Samples of such a
run made on the model's own schedule would not show what the LoRA learned. Here the sampler takes the run's
prediction type and, with zero terminal SNR, the rescaled betas with "trailing" timestep spacing (so the first
sampling step is the pure-noise timestep the model was trained on) and a guidance rescale of 0.7, as the paper
(Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891, sections 3.3-3.4)
and diffusers' documentation of ``rescale_betas_zero_snr`` advise. A scheduler kind that cannot rescale its betas
(PNDM, LMS) is replaced by DDIM, which the paper uses.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from lora_trainer.engine.loss import has_zero_terminal_snr

ZERO_SNR_GUIDANCE_RESCALE = 0.7  # arXiv 2305.08891 §3.4; diffusers' pipelines take it as guidance_rescale


def sampling_settings(scheduler, prediction_type: str, zero_snr: bool) -> dict:
    """The scheduler config values a sampler needs to follow the training: the prediction type, and the zero
    terminal SNR schedule on or off (on: trailing timesteps too)."""
    wanted = {"prediction_type": prediction_type}
    if zero_snr:
        wanted.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    elif has_zero_terminal_snr(scheduler):
        wanted["rescale_betas_zero_snr"] = False  # the run turned the model's rescaling off (zero_terminal_snr: false)
    return wanted


def sampling_scheduler(scheduler, prediction_type: str, zero_snr: bool):
    """``scheduler`` (a pipeline's) as a sampler for a run that trained with ``prediction_type`` and, if
    ``zero_snr``, zero terminal SNR; ``scheduler`` itself where it already is one."""
    wanted = sampling_settings(scheduler, prediction_type, zero_snr)
    if all(scheduler.config.get(key) == value for key, value in wanted.items()):
        return scheduler
    kind = type(scheduler)
    if not set(wanted) <= set(inspect.signature(kind.__init__).parameters):
        from diffusers import DDIMScheduler

        kind = DDIMScheduler
        wanted.setdefault("clip_sample", scheduler.config.get("clip_sample", False))  # (DDIM clips by default)
    return kind.from_config(scheduler.config, **wanted)


def guidance_rescale(prediction_type: str, zero_snr: bool) -> float:
    """The pipelines' ``guidance_rescale`` for samples of such a run: 0.7 with zero terminal SNR (v-prediction),
    else 0 (off)."""
    return ZERO_SNR_GUIDANCE_RESCALE if zero_snr and prediction_type == "v_prediction" else 0.0


def trained_schedule(metadata: dict | None, scheduler) -> tuple[str, bool]:
    """(prediction type, zero terminal SNR) a LoRA was trained with, from its kohya metadata
    (``ss_v_parameterization``, ``ss_zero_terminal_snr``: ours and kohya's); what ``scheduler`` (the base model's)
    says where the file does not."""
    metadata = metadata or {}
    prediction = scheduler.config.get("prediction_type") or "epsilon"
    v_param = str(metadata.get("ss_v_parameterization", "")).lower()
    if v_param in ("true", "false"):
        prediction = "v_prediction" if v_param == "true" else "epsilon"
    zero = str(metadata.get("ss_zero_terminal_snr", "")).lower()
    zero_snr = zero == "true" if zero in ("true", "false") else has_zero_terminal_snr(scheduler)
    return prediction, zero_snr and prediction == "v_prediction"


@contextlib.contextmanager
def evaluating(modules):
    """``modules`` in eval mode inside (no LoRA dropout: a sample or a validation loss is the same every time), in
    their own mode again after; the global RNG (which dropout in training draws from) is left as it was."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            for m in modules:
                m.eval()
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)


@contextlib.contextmanager
def with_scheduler(pipe, scheduler):
    """``pipe`` samples with ``scheduler`` inside, with its own again after."""
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = own


def sample_image(backend, prompt: str, seed: int, steps: int, scheduler, rescale: float, negative: str | None = None,
                 size: tuple[int, int] | None = None, guidance_scale: float | None = None):
    """One image from a diffusers backend's pipeline as the model is now (the LoRA being trained in it), sampled with
    ``scheduler`` (``sampling_scheduler``: the run's noise schedule) and ``rescale`` (``guidance_rescale``); ``size``
    (width, height), else the model's own. The command line's samples and the standalone app's are made here."""
    pipe = backend.pipe
    native = backend.unet.config.sample_size * pipe.vae_scale_factor
    width, height = size or (native, native)
    generator = torch.Generator(backend.device).manual_seed(seed)
    extra = {"guidance_rescale": rescale} if rescale else {}
    if negative:
        extra["negative_prompt"] = negative
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    if (getattr(backend, "clip_skip", None) or 1) > 1:  # (diffusers counts the layers skipped: 1 = the one before)
        extra["clip_skip"] = backend.clip_skip - 1
    with torch.no_grad(), backend.encoders_on_device(), with_scheduler(pipe, scheduler):
        return pipe(prompt, num_inference_steps=steps, height=height, width=width, generator=generator,
                    **extra).images[0]
