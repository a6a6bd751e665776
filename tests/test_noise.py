"""The training noise, timesteps and losses kohya's users bring: pyramid (multi-resolution) noise, input perturbation,
a timestep range, L1 / Huber / smooth-L1 losses, debiased estimation (engine.loss)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lora_trainer.config import config_from_dict
from lora_trainer.engine.loss import LossSettings, NoiseSettings, diffusion_loss, draw_noise, sample_timesteps
from lora_trainer.engine.validation import Validator
from lora_trainer.errors import ConfigError

SHAPE = (64, 4, 32, 32)


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def test_without_the_new_settings_the_draw_is_the_one_before():
    """The noise, its offset and the timesteps are drawn in the order they always were: runs and resumes from before
    these settings draw the same."""
    s = scheduler()
    noise, timesteps, noised_with = draw_noise(s, SHAPE, torch.Generator().manual_seed(3), "cpu", torch.float32,
                                               NoiseSettings(offset=0.1))
    gen = torch.Generator().manual_seed(3)
    want = torch.randn(SHAPE, generator=gen)
    want = want + 0.1 * torch.randn((SHAPE[0], SHAPE[1], 1, 1), generator=gen)
    assert torch.equal(noise, want) and noised_with is noise
    assert torch.equal(timesteps, sample_timesteps(s, SHAPE[0], gen, "cpu"))


def test_pyramid_noise_has_unit_variance_and_low_frequencies():
    """Each image-and-channel's mean (its lowest frequency) varies far more than in white noise, whose mean over
    32×32 values has a standard deviation of 1/32."""
    gen = torch.Generator().manual_seed(0)
    white, _, _ = draw_noise(scheduler(), SHAPE, gen, "cpu", torch.float32)
    pyramid, _, _ = draw_noise(scheduler(), SHAPE, gen, "cpu", torch.float32, NoiseSettings(multires_iterations=6,
                                                                                            multires_discount=0.8))
    assert float(pyramid.std()) == pytest.approx(1.0, abs=1e-4)
    means = lambda x: x.mean(dim=(2, 3)).std()  # noqa: E731
    assert float(means(white)) == pytest.approx(1 / 32, rel=0.2) and float(means(pyramid)) > 8 * float(means(white))


def test_input_perturbation_noises_the_latents_with_more_than_the_target():
    noise, _, noised_with = draw_noise(scheduler(), SHAPE, torch.Generator().manual_seed(1), "cpu", torch.float32,
                                       NoiseSettings(input_perturbation=0.1))
    assert float((noised_with - noise).std()) == pytest.approx(0.1, rel=0.02)
    seen = {}

    def predict(noisy, t, cond):
        seen["noisy"] = noisy
        return torch.zeros_like(noisy)

    s = scheduler()
    backend = SimpleNamespace(noise_scheduler=s, prediction_type="epsilon", predict=predict)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    timesteps = torch.full((SHAPE[0],), 500)
    loss = diffusion_loss(backend, latents, None, None, noise=noise, timesteps=timesteps, noised_with=noised_with)
    assert torch.allclose(seen["noisy"], s.add_noise(latents, noised_with, timesteps))
    assert float(loss) == pytest.approx(float((noise**2).mean()), rel=1e-5)  # (the target is the noise itself)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights_each_timestep_as_kohya(prediction):
    """1/sqrt(SNR) (v-prediction: 1/(SNR+1)), the SNR capped at 1000, on each image's mean loss."""
    s = scheduler(prediction)
    backend = SimpleNamespace(noise_scheduler=s, prediction_type=prediction,
                              predict=lambda noisy, t, cond: torch.zeros_like(noisy))
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([0, 10, 500, 999])
    target = noise if prediction == "epsilon" else s.get_velocity(latents, noise, timesteps)
    per_image = (target**2).mean(dim=(1, 2, 3))
    snr = torch.clamp(compute_snr(s, timesteps), max=1000)
    weight = 1 / torch.sqrt(snr) if prediction == "epsilon" else 1 / (snr + 1)
    got = diffusion_loss(backend, latents, None, None, noise=noise, timesteps=timesteps,
                         loss_settings=LossSettings(debiased=True))
    assert float(got) == pytest.approx(float((per_image * weight).mean()), rel=1e-5)
    assert float(got) != pytest.approx(float(per_image.mean()), rel=1e-2)


def test_timesteps_are_drawn_from_the_range_only():
    """training.min_timestep / max_timestep (kohya's): [low, high), both ends reached; a range outside the schedule
    is refused by name."""
    s = scheduler()
    _, timesteps, _ = draw_noise(s, (4000, 1, 1, 1), torch.Generator().manual_seed(0), "cpu", torch.float32,
                                 NoiseSettings(min_timestep=200, max_timestep=300))
    assert int(timesteps.min()) == 200 and int(timesteps.max()) == 299
    for low, high in ((300, 300), (0, 1001), (-1, None)):
        with pytest.raises(ConfigError, match="min_timestep"):
            sample_timesteps(s, 2, None, "cpu", low, high)
    assert Validator.timesteps(s) == [125, 375, 625, 875]  # (the validation loss's, as before)
    assert Validator.timesteps(s, 200, 600) == [250, 350, 450, 550]


def _loss_of(kind, error, timesteps, **huber):
    """diffusion_loss with ``kind`` where the prediction is off from the target (the noise) by ``error``."""
    s = scheduler()
    noise = torch.zeros(len(timesteps), 1, 2, 2)
    backend = SimpleNamespace(noise_scheduler=s, prediction_type="epsilon",
                              predict=lambda noisy, t, cond: noise + error)
    return float(diffusion_loss(backend, torch.zeros_like(noise), None, None, noise=noise,
                                timesteps=torch.as_tensor(timesteps), loss_settings=LossSettings(kind, **huber)))


def test_l1_and_huber_losses_are_kohyas():
    """L1 is |error|; Huber with threshold c is 2c(sqrt(d² + c²) - c): about d² for |d| << c (as the squared
    error), about 2c|d| for |d| >> c (as L1, so an outlier pulls less); smooth L1 is that divided by c."""
    assert _loss_of("l1", -0.3, [500]) == pytest.approx(0.3)
    assert _loss_of("l2", -0.3, [500]) == pytest.approx(0.09)
    constant = {"huber_schedule": "constant", "huber_c": 0.1}
    small = _loss_of("huber", 0.01, [500], **constant)
    assert small == pytest.approx(2 * 0.1 * ((0.01**2 + 0.1**2) ** 0.5 - 0.1), rel=1e-3)
    assert small == pytest.approx(0.01**2, rel=1e-2)
    assert _loss_of("huber", 100.0, [500], **constant) == pytest.approx(2 * 0.1 * 100, rel=1e-2)
    assert _loss_of("smooth_l1", 100.0, [500], **constant) == pytest.approx(2 * 100, rel=1e-2)
    assert _loss_of("huber", 100.0, [500], huber_schedule="constant", huber_c=0.1, huber_scale=2.0) == \
        pytest.approx(2 * 0.2 * 100, rel=1e-2)


def huber(c, d):
    return 2 * c * ((d**2 + c**2) ** 0.5 - c)


def test_huber_schedules_move_the_threshold_from_1_to_c_over_the_timesteps():
    """snr: (1 - c)/(1 + σ)² + c, σ = sqrt((1 - ᾱ)/ᾱ), huber_scale not applied (kohya's quirk); exponential:
    scale·c^(t/T). At a large error the loss is about 2·threshold·|d| (more weight on outliers at low noise)."""
    s, c, d = scheduler(), 0.1, 10.0
    for t in (0, 999):
        alpha = float(s.alphas_cumprod[t])
        sigma = ((1 - alpha) / alpha) ** 0.5
        got = _loss_of("huber", d, [t], huber_schedule="snr", huber_c=c, huber_scale=3.0)
        assert got == pytest.approx(huber((1 - c) / (1 + sigma) ** 2 + c, d), rel=1e-4)
    assert _loss_of("huber", d, [0], huber_schedule="snr", huber_c=c) > 0.85 * 2 * d  # (low noise: near 1)
    assert _loss_of("huber", d, [999], huber_schedule="snr", huber_c=c) < 0.11 * 2 * d  # (high noise: near c)
    for t, want in ((0, 2.0), (500, 2.0 * c**0.5), (999, 2.0 * c ** (999 / 1000))):
        got = _loss_of("huber", d, [t], huber_schedule="exponential", huber_c=c, huber_scale=2.0)
        assert got == pytest.approx(huber(want, d), rel=1e-4)


def test_bad_loss_and_timestep_settings_are_named_before_anything_loads():
    base = {"train_data_dir": "x"}
    with pytest.raises(ConfigError, match=r"training.min_timestep: 500, max_timestep: 500: .*below max_timestep"):
        config_from_dict({**base, "min_timestep": 500, "max_timestep": 500})
    with pytest.raises(ConfigError, match="training.loss_type: 'mae' is not one of l2, l1, huber, smooth_l1"):
        config_from_dict({**base, "loss_type": "mae"})
    with pytest.raises(ConfigError, match="training.huber_c"):
        config_from_dict({**base, "huber_c": 0})
    cfg = config_from_dict({**base, "loss_type": "huber", "max_timestep": 800})
    assert LossSettings.of(cfg.training) == LossSettings("huber", "snr", 0.1, 1.0, None, False)
    assert NoiseSettings.of(cfg.training).max_timestep == 800
