"""The diffusion training loss, following the diffusers training examples (train_text_to_image_lora.py).

DDPM noise at a random timestep, target epsilon or v from the scheduler's prediction type, optional
noise offset and min-SNR-gamma weighting; the scheduler and ``compute_snr`` come from diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(backend, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None,
                   noise_offset: float = 0.0, min_snr_gamma: float | None = None) -> torch.Tensor:
    scheduler = backend.noise_scheduler
    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator, device=latents.device,
                             dtype=latents.dtype)
        noise = noise + noise_offset * offset
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator,
                              device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)

    if backend.prediction_type == "epsilon":
        target = noise
    elif backend.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {backend.prediction_type!r}")

    pred = backend.predict(noisy, timesteps, cond)
    if min_snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    # Min-SNR weighting, https://arxiv.org/abs/2303.09556 (as in the diffusers examples)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=min_snr_gamma)
    weights = weights / snr if backend.prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
