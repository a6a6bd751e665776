"""The training noise and loss weightings kohya's users bring: pyramid (multi-resolution) noise, input perturbation,
debiased estimation (engine.loss)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lora_trainer.engine.loss import NoiseSettings, diffusion_loss, draw_noise, sample_timesteps

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
    got = diffusion_loss(backend, latents, None, None, noise=noise, timesteps=timesteps, debiased=True)
    assert float(got) == pytest.approx(float((per_image * weight).mean()), rel=1e-5)
    assert float(got) != pytest.approx(float(per_image.mean()), rel=1e-2)
