"""The diffusion training loss, following the diffusers training examples (train_text_to_image_lora.py).

DDPM noise at a random timestep, target epsilon or v from the scheduler's prediction type, optional offset,
pyramid and input-perturbation noise (NoiseSettings) and min-SNR-gamma or debiased-estimation weighting; the
scheduler and ``compute_snr`` come from diffusers. With a zero-terminal-SNR schedule (``zero_terminal_snr_schedule``,
arXiv 2305.08891) the last timestep is pure noise: its SNR is 0, the target must be v, and min-SNR takes its v form
(the epsilon form divides by 0 there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_trainer.errors import ConfigError


def has_zero_terminal_snr(scheduler) -> bool:
    """Whether a diffusers scheduler's betas are rescaled to zero terminal SNR (its config says so)."""
    return bool(scheduler.config.get("rescale_betas_zero_snr", False))


def zero_terminal_snr_schedule(scheduler, setting: str, prediction_type: str):
    """The training noise schedule for ``model.zero_terminal_snr`` (auto: as the model's scheduler says; true:
    betas rescaled to zero terminal SNR, via the scheduler's own ``rescale_betas_zero_snr``; false: not), and
    whether it has zero terminal SNR. Zero terminal SNR with an epsilon target is refused: at the last step the
    noisy latent is the noise itself, so predicting it teaches nothing and its min-SNR weight divides by 0."""
    from diffusers import DDPMScheduler

    wanted = has_zero_terminal_snr(scheduler) if setting == "auto" else setting == "true"
    if wanted and prediction_type != "v_prediction":
        why = "the model's scheduler has rescale_betas_zero_snr: true" if setting == "auto" else "it is set"
        raise ConfigError(f"model.zero_terminal_snr: {setting} ({why}) needs the v-prediction target, but the model "
                          f"predicts {prediction_type}: set model.prediction_type: v_prediction, or "
                          "model.zero_terminal_snr: false")
    if wanted != has_zero_terminal_snr(scheduler):
        scheduler = DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=wanted)
    if wanted and float(scheduler.alphas_cumprod[-1]) != 0.0:
        raise RuntimeError("the installed diffusers did not rescale the betas to zero terminal SNR")
    return scheduler, wanted


def sample_timesteps(scheduler, bsz: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform over every training timestep, the last one (SNR 0 with zero terminal SNR) included."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=device).long()


@dataclass(frozen=True)
class NoiseSettings:
    """How the training noise is drawn (training.noise_offset, multires_noise_*, ip_noise_gamma), as kohya's
    sd-scripts draws it: ``offset`` adds one value per image and channel (crosslabs' offset noise);
    ``multires_iterations`` adds lower-resolution noise, each level ``multires_discount`` times the one before, then
    rescales to unit variance (pyramid noise); ``input_perturbation`` noises the latents with noise + γ·ξ while the
    target stays the noise (input perturbation, arXiv 2301.11706)."""

    offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    input_perturbation: float = 0.0

    @classmethod
    def of(cls, t) -> NoiseSettings:
        return cls(t.noise_offset, t.multires_noise_iterations, t.multires_noise_discount, t.ip_noise_gamma)


def _pyramid(noise: torch.Tensor, iterations: int, discount: float, generator) -> torch.Tensor:
    """kohya's pyramid_noise_like: noise at ever lower resolutions (each side divided by r^i, r drawn from [2, 4)),
    upsampled bilinearly and added with weight discount^i; then scaled to unit standard deviation."""
    b, c, h, w = noise.shape
    ratios = (torch.rand(iterations, generator=generator, device=noise.device) * 2 + 2).tolist()  # (one host sync)
    for i, r in enumerate(ratios):
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((b, c, hn, wn), generator=generator, device=noise.device, dtype=noise.dtype)
        noise = noise + F.interpolate(low.float(), size=(h, w), mode="bilinear").to(noise.dtype) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def draw_noise(scheduler, shape, generator: torch.Generator | None, device, dtype,
               settings: NoiseSettings | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the noise: the target; the timesteps; the noise the latents are noised with: the noise itself, or perturbed
    with ``settings.input_perturbation``) as ``diffusion_loss`` draws them for latents of ``shape``, in its order: a
    process of a multi-process run draws them for the whole micro-batch and takes its rows (engine.distributed)."""
    settings = settings or NoiseSettings()
    noise = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if settings.offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        offset = torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device, dtype=dtype)
        noise = noise + settings.offset * offset
    if settings.multires_iterations:
        noise = _pyramid(noise, settings.multires_iterations, settings.multires_discount, generator)
    timesteps = sample_timesteps(scheduler, shape[0], generator, device)
    noised_with = noise
    if settings.input_perturbation:
        noised_with = noise + settings.input_perturbation * torch.randn(tuple(shape), generator=generator,
                                                                         device=device, dtype=dtype)
    return noise, timesteps, noised_with


DEBIASED_SNR_CAP = 1000.0  # (kohya's apply_debiased_estimation: the SNR is clamped here before 1/sqrt(snr))


def diffusion_loss(backend, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None,
                   noise_settings: NoiseSettings | None = None, min_snr_gamma: float | None = None,
                   timesteps: torch.Tensor | None = None, scheduler=None, noise: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None, noised_with: torch.Tensor | None = None,
                   debiased: bool = False) -> torch.Tensor:
    """The loss of one batch; ``timesteps`` and ``noise`` fixed (a test, the validation loss, a process's rows of
    the micro-batch's ``draw_noise``, whose third part is ``noised_with``) or else drawn with ``generator`` as
    ``noise_settings`` say; ``scheduler``: the run's noise schedule (``zero_terminal_snr_schedule``), else the
    backend's; ``sample_weights``: each image's weight (regularization images: training.prior_loss_weight), else all
    1; ``debiased``: each timestep's loss weighted by 1/sqrt(SNR) (v: 1/(SNR+1); kohya's debiased_estimation_loss,
    arXiv 2310.08442)."""
    scheduler = backend.noise_scheduler if scheduler is None else scheduler
    bsz = latents.shape[0]
    if noise is None and timesteps is None:
        noise, timesteps, noised_with = draw_noise(scheduler, latents.shape, generator, latents.device,
                                                   latents.dtype, noise_settings)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, bsz, generator, latents.device)
    noisy = scheduler.add_noise(latents, noise if noised_with is None else noised_with, timesteps)

    if backend.prediction_type == "epsilon":
        target = noise
    elif backend.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {backend.prediction_type!r}")

    pred = backend.predict(noisy, timesteps, cond)
    if min_snr_gamma is None and sample_weights is None and not debiased:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    v = backend.prediction_type != "epsilon"
    if min_snr_gamma is not None or debiased:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
    if min_snr_gamma is not None:
        # Min-SNR weighting, https://arxiv.org/abs/2303.09556 (as in the diffusers examples); the v form
        # min(snr, γ) / (snr + 1) is 0, not NaN, at SNR 0
        weights = torch.clamp(snr, max=min_snr_gamma)
        loss = loss * (weights / (snr + 1) if v else weights / snr)
    if debiased:  # (after min-SNR where both are on, as kohya applies them)
        capped = torch.clamp(snr, max=DEBIASED_SNR_CAP)
        loss = loss * (1 / (capped + 1) if v else 1 / torch.sqrt(capped))
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.dtype)
    return loss.mean()
