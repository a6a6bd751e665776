"""The diffusion training loss, following the diffusers training examples (train_text_to_image_lora.py).

DDPM noise at a random timestep, target epsilon or v from the scheduler's prediction type, optional
noise offset and min-SNR-gamma weighting; the scheduler and ``compute_snr`` come from diffusers. With a
zero-terminal-SNR schedule (``zero_terminal_snr_schedule``, arXiv 2305.08891) the last timestep is pure
noise: its SNR is 0, the target must be v, and min-SNR takes its v form (the epsilon form divides by 0 there).
"""

from __future__ import annotations

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


def draw_noise(scheduler, shape, generator: torch.Generator | None, device, dtype, noise_offset: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise (with its offset) and the timesteps ``diffusion_loss`` draws for latents of ``shape``, in its order:
    a process of a multi-process run draws them for the whole micro-batch and takes its rows (engine.distributed)."""
    noise = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        offset = torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device, dtype=dtype)
        noise = noise + noise_offset * offset
    return noise, sample_timesteps(scheduler, shape[0], generator, device)


def diffusion_loss(backend, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None,
                   noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                   timesteps: torch.Tensor | None = None, scheduler=None, noise: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one batch; ``timesteps`` and ``noise`` fixed (a test, the validation loss) or else sampled with
    ``generator``; ``scheduler``: the run's noise schedule (``zero_terminal_snr_schedule``), else the backend's;
    ``sample_weights``: each image's weight (regularization images: training.prior_loss_weight), else all 1."""
    scheduler = backend.noise_scheduler if scheduler is None else scheduler
    bsz = latents.shape[0]
    if noise is None and timesteps is None:
        noise, timesteps = draw_noise(scheduler, latents.shape, generator, latents.device, latents.dtype, noise_offset)
        noise_offset = 0.0  # (in the noise already)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator, device=latents.device,
                             dtype=latents.dtype)
        noise = noise + noise_offset * offset
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, bsz, generator, latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    if backend.prediction_type == "epsilon":
        target = noise
    elif backend.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {backend.prediction_type!r}")

    pred = backend.predict(noisy, timesteps, cond)
    if min_snr_gamma is None and sample_weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if min_snr_gamma is not None:
        # Min-SNR weighting, https://arxiv.org/abs/2303.09556 (as in the diffusers examples); the v form
        # min(snr, γ) / (snr + 1) is 0, not NaN, at SNR 0
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=min_snr_gamma)
        loss = loss * (weights / snr if backend.prediction_type == "epsilon" else weights / (snr + 1))
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.dtype)
    return loss.mean()
