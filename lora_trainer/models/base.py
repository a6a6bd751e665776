"""The small protocol between the training loop and a model.

The loop needs: where to inject LoRA layers, how to turn pixels into latents and captions into
conditioning, how to predict from noisy latents, and a few facts for the exported file. Two
backends implement it: diffusers models (a folder, a single-file checkpoint or the tiny demo model)
and, inside the WebUI, the LDM model the WebUI already has loaded.
"""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lora_trainer.errors import ConfigError
from lora_trainer.models.conditioning import Conditioning

# kohya key prefixes of the components a LoRA may adapt (SD 1.x / 2.x; SDXL's are in models.sdxl_backend)
UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second text encoder (CLIP ViT-bigG)
KOHYA_PREFIXES = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te_"}


@runtime_checkable
class TrainingBackend(Protocol):
    family: str  # "sd_v1" | "sd_v2" — the ss_base_model_version of the exported LoRA
    model_name: str  # what the LoRA was trained on (ss_sd_model_name)
    device: torch.device
    weight_dtype: torch.dtype  # dtype of the frozen weights (fp32 on CPU, fp16/bf16 on GPUs)
    noise_scheduler: object  # a diffusers DDPMScheduler (add_noise, get_velocity, config)
    prediction_type: str  # "epsilon" | "v_prediction"
    kohya_prefixes: dict[str, str]  # component name → key prefix in the kohya file
    latent_scale: float  # the VAE's scaling factor: a latent is a posterior sample times this
    # optional abilities (Backend below gives each a default): what the loop may ask for
    can_compile: bool  # compile_unet works
    can_channels_last: bool  # use_channels_last works
    uses_time_ids: bool  # predict needs each image's size/crop ids in cond.time_ids (SDXL)
    can_fp8_base: bool  # training.fp8_base works: the UNet's frozen weights can be stored in float8 (models.fp8)

    def components(self) -> dict[str, nn.Module | None]:
        """The modules LoRA may be injected into, by component name (UNET, TEXT_ENCODER)."""

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Pixels in [-1, 1] (B×3×H×W) → scaled latents, sampled with ``generator``."""

    def image_encoder(self) -> nn.Module:
        """The VAE whose encoder makes the latents (its weights key the latent cache)."""

    def encode_image_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] → the VAE posterior's (mean, std), before ``latent_scale``, for the latent cache."""

    def encode_prompts(self, captions: list[str], weighted: bool = False) -> Conditioning:
        """Captions → conditioning; differentiable when the text encoder trains. Each caption's rows depend on
        that caption alone; literal text unless ``weighted`` (the WebUI's ``(word:1.2)`` syntax)."""

    def explain_nonfinite_text(self, caption: str) -> str:
        """Why ``caption``'s conditioning came out non-finite, as far as the backend can tell."""

    def kohya_module_path(self, component: str, path: str) -> str:
        """The module path a LoRA layer at ``path`` of ``component`` gets in the kohya file (before the prefix
        and ``.``→``_``): the path itself, or the original model's name for it (SDXL's UNet: LDM block names)."""

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's prediction (noise or velocity) for noisy latents at timesteps."""

    def use_attention(self, kind: str) -> None:
        """Train the UNet with this attention kernel (training.attention: auto, sdpa, xformers)."""

    def enable_gradient_checkpointing(self, text_encoder: bool) -> None: ...

    def compile_unet(self, mode: str) -> None: ...

    def use_channels_last(self) -> None: ...

    def offload_idle_encoders(self, text_encoder: bool) -> int:
        """With everything cached, park the VAE (and the frozen text encoder) off the GPU; bytes freed."""

    def restore_encoders(self) -> None:
        """Undo ``offload_idle_encoders``."""

    def unet_waits_for_cache(self) -> contextlib.AbstractContextManager:
        """While the encoders fill the caches: the UNet off the GPU where the run owns its model."""


class Backend:
    """The defaults of a TrainingBackend's optional abilities: a backend overrides what it can do."""

    kohya_prefixes = KOHYA_PREFIXES
    can_compile = False
    can_channels_last = False
    uses_time_ids = False
    clip_skip: int | None = 1  # the CLIP layer the conditioning comes from, from the end (ss_clip_skip); None: unknown

    def use_clip_skip(self, layers: int) -> None:
        """Encode captions from the CLIP layer ``layers`` from the end (training.clip_skip)."""
        raise ConfigError(f"training.clip_skip: {type(self).__name__} encodes captions its own way; leave clip_skip "
                          "at 1")

    @property
    def can_fp8_base(self) -> bool:
        """Where the UNet is a diffusers model (the command line's and the standalone app's backends): models.fp8
        stores it through diffusers' layerwise casting. The WebUI's LDM UNet is not one."""
        from lora_trainer.models.fp8 import is_diffusers_model

        return is_diffusers_model(self.components().get(UNET))

    def explain_nonfinite_text(self, caption: str) -> str:
        return "the text encoder gave non-finite values for it"

    def kohya_module_path(self, component: str, path: str) -> str:
        return path

    def compile_unet(self, mode: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot compile its UNet")

    def use_channels_last(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot change its memory layout")

    def offload_idle_encoders(self, text_encoder: bool) -> int:
        return 0

    def restore_encoders(self) -> None:
        pass

    def unet_waits_for_cache(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # (a host's model: where it lives is the host's to decide)
