"""The small protocol between the training loop and a model.

The loop needs: where to inject LoRA layers, how to turn pixels into latents and captions into
conditioning, how to predict from noisy latents, and a few facts for the exported file. Two
backends implement it: diffusers models (a folder, a single-file checkpoint or the tiny demo model)
and, inside the WebUI, the LDM model the WebUI already has loaded.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

# kohya key prefixes of the components a LoRA may adapt (SD 1.x / 2.x)
UNET = "unet"
TEXT_ENCODER = "text_encoder"
KOHYA_PREFIXES = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te_"}


@runtime_checkable
class TrainingBackend(Protocol):
    family: str  # "sd_v1" | "sd_v2" — the ss_base_model_version of the exported LoRA
    model_name: str  # what the LoRA was trained on (ss_sd_model_name)
    device: torch.device
    weight_dtype: torch.dtype  # dtype of the frozen weights (fp32 on CPU, fp16/bf16 on GPUs)
    noise_scheduler: object  # a diffusers DDPMScheduler (add_noise, get_velocity, config)
    prediction_type: str  # "epsilon" | "v_prediction"

    def components(self) -> dict[str, nn.Module]:
        """The modules LoRA may be injected into, by component name (UNET, TEXT_ENCODER)."""

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Pixels in [-1, 1] (B×3×H×W) → scaled latents, sampled with ``generator``."""

    def image_encoder(self) -> nn.Module:
        """The VAE whose encoder makes the latents (its weights key the latent cache)."""

    latent_scale: float  # the VAE's scaling factor: a latent is a posterior sample times this

    def encode_image_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] → the VAE posterior's (mean, std), before ``latent_scale``, for the latent cache."""

    def encode_prompts(self, captions: list[str], weighted: bool = False) -> torch.Tensor:
        """Captions → conditioning (B×77×D); differentiable when the text encoder trains. Each caption's rows
        depend on that caption alone; literal text unless ``weighted`` (the WebUI's ``(word:1.2)`` syntax)."""

    def explain_nonfinite_text(self, caption: str) -> str:
        """Why ``caption``'s conditioning came out non-finite, as far as the backend can tell."""

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The model's prediction (noise or velocity) for noisy latents at timesteps."""

    def use_attention(self, kind: str) -> None:
        """Train the UNet with this attention kernel (training.attention: auto, sdpa, xformers)."""

    def enable_gradient_checkpointing(self, text_encoder: bool) -> None: ...
