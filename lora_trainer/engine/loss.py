"""The diffusion training loss, following the diffusers training examples (train_text_to_image_lora.py).

DDPM noise at a random timestep (of all, or of a range), target epsilon or v from the scheduler's prediction type,
optional offset, pyramid and input-perturbation noise (NoiseSettings); the squared error, or kohya's L1 / scheduled
Huber / smooth-L1, with min-SNR-gamma or debiased-estimation weighting (LossSettings); the scheduler and
``compute_snr`` come from diffusers. With a zero-terminal-SNR schedule (``zero_terminal_snr_schedule``,
arXiv 2305.08891) the last timestep is pure noise: its SNR is 0, the target must be v, and min-SNR takes its v form
(the epsilon form divides by 0 there).
"""

from __future__ import annotations

import math
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


def timestep_range(scheduler, low: int = 0, high: int | None = None) -> tuple[int, int]:
    """The timesteps training draws from, [low, high) (training.min_timestep, max_timestep; kohya's): every one of
    the schedule's by default. Raises ConfigError where the range is empty or past the schedule's end."""
    total = scheduler.config.num_train_timesteps
    high = total if high is None else high
    if not 0 <= low < high <= total:
        raise ConfigError(f"training.min_timestep: {low}, max_timestep: {high}: expected 0 <= min_timestep < "
                          f"max_timestep <= {total} (this model's schedule has {total} timesteps)")
    return low, high


def sample_timesteps(scheduler, bsz: int, generator: torch.Generator | None, device,
                     low: int = 0, high: int | None = None) -> torch.Tensor:
    """Uniform over the training timesteps in [low, high) (default: every one, the last one, SNR 0 with zero terminal
    SNR, included)."""
    low, high = timestep_range(scheduler, low, high)
    return torch.randint(low, high, (bsz,), generator=generator, device=device).long()


@dataclass(frozen=True)
class NoiseSettings:
    """How the training noise is drawn (training.noise_offset, multires_noise_*, ip_noise_gamma), as kohya's
    sd-scripts draws it: ``offset`` adds one value per image and channel (crosslabs' offset noise);
    ``multires_iterations`` adds lower-resolution noise, each level ``multires_discount`` times the one before, then
    rescales to unit variance (pyramid noise); ``input_perturbation`` noises the latents with noise + γ·ξ while the
    target stays the noise (input perturbation, arXiv 2301.11706); the timesteps are drawn from [min_timestep,
    max_timestep) (None: the schedule's end)."""

    offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    input_perturbation: float = 0.0
    min_timestep: int = 0
    max_timestep: int | None = None

    @classmethod
    def of(cls, t) -> NoiseSettings:
        return cls(t.noise_offset, t.multires_noise_iterations, t.multires_noise_discount, t.ip_noise_gamma,
                   t.min_timestep, t.max_timestep)


@dataclass(frozen=True)
class LossSettings:
    """How the prediction's error becomes the loss (training.loss_type, huber_*, min_snr_gamma,
    debiased_estimation_loss), as kohya's sd-scripts computes it: ``kind`` l2 (the squared error), l1, huber or
    smooth_l1; the Huber threshold per timestep by ``huber_schedule`` (snr, exponential, constant) from ``huber_c``
    and ``huber_scale``; then each image's loss weighted by min-SNR-γ and/or debiased estimation."""

    kind: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    debiased: bool = False

    @classmethod
    def of(cls, t) -> LossSettings:
        return cls(t.loss_type, t.huber_schedule, t.huber_c, t.huber_scale, t.min_snr_gamma,
                   t.debiased_estimation_loss)

    @property
    def per_image(self) -> bool:
        """Whether the loss is weighted per image (so reduced per image first)."""
        return self.min_snr_gamma is not None or self.debiased


def huber_threshold(scheduler, timesteps: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """kohya's get_huber_threshold_if_needed: each timestep's Huber threshold. snr: (1 - c) / (1 + σ)² + c, σ =
    sqrt((1 - ᾱ) / ᾱ), so 1 at low noise and c at high noise (huber_scale not applied, as kohya); exponential:
    scale · exp(ln(c) · t / T), 1 at t = 0 and c at T; constant: c · scale."""
    c = settings.huber_c
    if settings.huber_schedule == "exponential":
        total = scheduler.config.num_train_timesteps
        return torch.exp(math.log(c) / total * timesteps.float()) * settings.huber_scale
    if settings.huber_schedule == "snr":
        alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    if settings.huber_schedule == "constant":
        return torch.full(timesteps.shape, c * settings.huber_scale, device=timesteps.device)
    raise ValueError(f"unknown huber_schedule {settings.huber_schedule!r}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, settings: LossSettings,
                     threshold: torch.Tensor | None = None) -> torch.Tensor:
    """kohya's conditional_loss with reduction none: (pred - target)², |pred - target|, 2c(sqrt(d² + c²) - c)
    (huber) or 2(sqrt(d² + c²) - c) (smooth_l1), c each image's ``threshold``."""
    if settings.kind == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if settings.kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = threshold.view(-1, *([1] * (pred.ndim - 1))).to(pred.dtype)
    smooth = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    if settings.kind == "huber":
        return c * smooth
    if settings.kind == "smooth_l1":
        return smooth
    raise ValueError(f"unknown loss_type {settings.kind!r}")


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
    timesteps = sample_timesteps(scheduler, shape[0], generator, device, settings.min_timestep, settings.max_timestep)
    noised_with = noise
    if settings.input_perturbation:
        noised_with = noise + settings.input_perturbation * torch.randn(tuple(shape), generator=generator,
                                                                         device=device, dtype=dtype)
    return noise, timesteps, noised_with


DEBIASED_SNR_CAP = 1000.0  # (kohya's apply_debiased_estimation: the SNR is clamped here before 1/sqrt(snr))


def diffusion_loss(backend, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None,
                   noise_settings: NoiseSettings | None = None, loss_settings: LossSettings | None = None,
                   timesteps: torch.Tensor | None = None, scheduler=None, noise: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None, noised_with: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one batch; ``timesteps`` and ``noise`` fixed (a test, the validation loss, a process's rows of
    the micro-batch's ``draw_noise``, whose third part is ``noised_with``) or else drawn with ``generator`` as
    ``noise_settings`` say; ``loss_settings``: the error's form and weighting (default: the mean squared error);
    ``scheduler``: the run's noise schedule (``zero_terminal_snr_schedule``), else the backend's; ``sample_weights``:
    each image's weight (regularization images: training.prior_loss_weight), else all 1. Debiased estimation
    weights by 1/sqrt(SNR) (v: 1/(SNR+1); kohya's debiased_estimation_loss, arXiv 2310.08442)."""
    scheduler = backend.noise_scheduler if scheduler is None else scheduler
    ls = loss_settings or LossSettings()
    ns = noise_settings or NoiseSettings()
    bsz = latents.shape[0]
    if noise is None and timesteps is None:
        noise, timesteps, noised_with = draw_noise(scheduler, latents.shape, generator, latents.device,
                                                   latents.dtype, ns)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, bsz, generator, latents.device, ns.min_timestep, ns.max_timestep)
    noisy = scheduler.add_noise(latents, noise if noised_with is None else noised_with, timesteps)

    if backend.prediction_type == "epsilon":
        target = noise
    elif backend.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {backend.prediction_type!r}")

    pred = backend.predict(noisy, timesteps, cond)
    if ls.kind == "l2" and not ls.per_image and sample_weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    threshold = huber_threshold(scheduler, timesteps, ls) if ls.kind in ("huber", "smooth_l1") else None
    loss = elementwise_loss(pred.float(), target.float(), ls, threshold)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if sample_weights is not None:  # (before the SNR weights, as kohya applies them; a product either way)
        loss = loss * sample_weights.to(loss.dtype)
    v = backend.prediction_type != "epsilon"
    if ls.per_image:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
    if ls.min_snr_gamma is not None:
        # Min-SNR weighting, https://arxiv.org/abs/2303.09556 (as in the diffusers examples); the v form
        # min(snr, γ) / (snr + 1) is 0, not NaN, at SNR 0
        weights = torch.clamp(snr, max=ls.min_snr_gamma)
        loss = loss * (weights / (snr + 1) if v else weights / snr)
    if ls.debiased:  # (after min-SNR where both are on, as kohya applies them)
        capped = torch.clamp(snr, max=DEBIASED_SNR_CAP)
        loss = loss * (1 / (capped + 1) if v else 1 / torch.sqrt(capped))
    return loss.mean()
