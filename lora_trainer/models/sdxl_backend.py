"""The SDXL backend: a diffusers SDXL folder (base or a finetune, epsilon or v-prediction), or the tiny SDXL model.

What differs from SD 1.x (``DiffusersBackend``, whose image side, offload, compile and checkpointing it
keeps): two text encoders, and the UNet's added conditioning. As diffusers' SDXL pipeline and kohya do,
the cross-attention context is both encoders' penultimate hidden states side by side (768 + 1280 = 2048 in
SDXL), the pooled embedding is the second encoder's projected ``text_embeds``, and each image adds six
size/crop ids (``Conditioning.time_ids``: original height, width, crop top, left, target height, width),
which the loop fills per batch from the images (``uses_time_ids``). The kohya file names the UNet's modules
as the original SDXL UNet does (``lora_unet_input_blocks_4_1_…``) and the encoders ``lora_te1_``/``lora_te2_``
with Hugging Face CLIP names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from lora_trainer.errors import ConfigError, ModelLoadError
from lora_trainer.export.kohya import LdmUnetNames
from lora_trainer.models.base import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from lora_trainer.models.compat import dtype_kwargs
from lora_trainer.models.conditioning import Conditioning
from lora_trainer.models.diffusers_backend import DiffusersBackend
from lora_trainer.models.prompts import WINDOW, apply_weights, weighted_tokens
from lora_trainer.utils.checkpointing import enable_lora_checkpointing

log = logging.getLogger(__name__)

SDXL_FAMILY = "sdxl"  # export.metadata writes it as ss_base_model_version sdxl_base_v1-0
SDXL_KOHYA_PREFIXES = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te1_", TEXT_ENCODER_2: "lora_te2_"}


def _token_ids(tokenizer, captions: list[str], weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """B×77 ids of one window per caption, and with ``weighted`` the emphasis weight of every token
    (models.prompts: the same tokenization the SD 1.x backend uses)."""
    if not weighted:
        return tokenizer(captions, padding="max_length", max_length=WINDOW, truncation=True,
                         return_tensors="pt").input_ids, None
    pairs = [weighted_tokens(tokenizer, caption) for caption in captions]
    return torch.tensor([ids for ids, _ in pairs]), torch.tensor([w for _, w in pairs])


def _weighted(z: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Emphasis per caption (the rescale is over the caption's own output), per encoder as the WebUI does."""
    if weights is None:
        return z
    return torch.cat([apply_weights(z[i : i + 1], weights[i : i + 1].to(z.device)) for i in range(len(z))])


def check_clip_skip(layers: int) -> None:
    """training.clip_skip for an SDXL model: 1 only."""
    if layers != 1:
        raise ConfigError(f"training.clip_skip: {layers} is for SD 1.x/2.x; SDXL takes its text encoders' penultimate "
                          "layers by design (kohya's --clip_skip does not apply to it either): leave clip_skip at 1")


class SdxlBackend(DiffusersBackend):
    """Wraps a StableDiffusionXLPipeline's parts for training; every base weight is frozen."""

    kohya_prefixes = SDXL_KOHYA_PREFIXES
    uses_time_ids = True

    def __init__(self, pipe, model_name: str, device: torch.device, weight_dtype: torch.dtype,
                 prediction_type: str = "auto", unet_waits: bool = False):
        super().__init__(pipe, model_name, device, weight_dtype, prediction_type, unet_waits)
        self.family = SDXL_FAMILY
        self.text_encoder_2, self.tokenizer_2 = pipe.text_encoder_2, pipe.tokenizer_2
        self.text_encoder_2.requires_grad_(False)
        self.text_encoder_2.to(self.device, dtype=weight_dtype)
        self.text_encoder_2.eval()
        self._ldm_names = LdmUnetNames(self.unet.config)

    def components(self) -> dict[str, nn.Module]:
        return {UNET: self.unet, TEXT_ENCODER: self.text_encoder, TEXT_ENCODER_2: self.text_encoder_2}

    def kohya_module_path(self, component: str, path: str) -> str:
        return self._ldm_names(path) if component == UNET else path

    clip_skip = None  # (SDXL's conditioning is its encoders' penultimate layers by design: ss_clip_skip None)

    def use_clip_skip(self, layers: int) -> None:
        check_clip_skip(layers)

    def encode_prompts(self, captions, weighted: bool = False) -> Conditioning:
        captions = list(captions)
        ids_1, weights_1 = _token_ids(self.tokenizer, captions, weighted)
        ids_2, weights_2 = _token_ids(self.tokenizer_2, captions, weighted)
        # hidden_states[-2]: the penultimate layer's output, before the final layer norm (SDXL's "penultimate")
        hidden_1 = self.text_encoder(ids_1.to(self.device), output_hidden_states=True).hidden_states[-2]
        out_2 = self.text_encoder_2(ids_2.to(self.device), output_hidden_states=True)
        context = torch.cat([_weighted(hidden_1, weights_1), _weighted(out_2.hidden_states[-2], weights_2)], dim=-1)
        return Conditioning(context, pooled=out_2.text_embeds)

    def explain_nonfinite_text(self, caption: str) -> str:
        if torch.float16 in (self.text_encoder.dtype, self.text_encoder_2.dtype):
            return "the text encoders run in fp16 and overflowed: use mixed_precision bf16 or no"
        return "the text encoders' own weights give non-finite values for it: a damaged checkpoint?"

    def predict(self, noisy_latents, timesteps, cond):
        if cond.pooled is None or cond.time_ids is None:
            raise ValueError("SDXL needs the pooled text embedding and each image's size/crop ids "
                             "(Conditioning.pooled and .time_ids)")
        unet = self.unet if self._compiled is None else self._compiled
        if self._channels_last:
            noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids.to(noisy_latents.device)}
        return unet(noisy_latents, timesteps, cond.context, added_cond_kwargs=added).sample

    def enable_gradient_checkpointing(self, text_encoder: bool, text_encoder_2: bool = False) -> None:
        super().enable_gradient_checkpointing(text_encoder)
        if text_encoder_2:
            enable_lora_checkpointing(self.text_encoder_2)

    def idle_encoders(self, text_encoder: bool) -> list[nn.Module]:
        """As for SD 1.x, with both text encoders (SDXL's second is 695 M parameters) when captions are cached."""
        return [self.vae] + ([self.text_encoder, self.text_encoder_2] if text_encoder else [])


def _model_index(path: Path) -> dict | None:
    try:
        return json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_sdxl_model(base_model: str) -> bool:
    """Whether ``base_model`` is an SDXL diffusers folder (its pipeline class, or a second text encoder), a
    single-file SDXL ``.safetensors`` checkpoint (its key names), or a tiny SDXL model's name."""
    from lora_trainer.models.single_file import is_sdxl_file
    from lora_trainer.models.tiny_sdxl import TINY_SDXL_NAMES

    if base_model in TINY_SDXL_NAMES:
        return True
    path = Path(base_model).expanduser()
    if path.is_file():
        return is_sdxl_file(path)
    index = _model_index(path) if path.is_dir() else None
    if not index:
        return False
    return str(index.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in index


def resolve_sdxl_model(base_model: str) -> Path:
    from lora_trainer.models.tiny_sdxl import TINY_SDXL_NAMES, tiny_sdxl_model_path

    if base_model in TINY_SDXL_NAMES:
        return tiny_sdxl_model_path(base_model)
    return Path(base_model).expanduser().resolve()


def load_sdxl_pipeline(base_model: str, weight_dtype: torch.dtype = torch.float32):
    """Load a StableDiffusionXLPipeline from a diffusers folder or a single-file checkpoint, offline; returns
    (pipe, model name)."""
    from diffusers import StableDiffusionXLPipeline

    path = resolve_sdxl_model(base_model)
    if path.is_file():
        from lora_trainer.models.single_file import load_single_file_pipeline

        return load_single_file_pipeline(path, torch_dtype=weight_dtype), path.stem
    index = _model_index(path) or {}
    if not (index.get("text_encoder") or [None])[0] or not (index.get("unet") or [None])[0]:
        raise ModelLoadError(f"model.base_model: {path} has no first text encoder or no UNet (an SDXL refiner?); "
                             "only SDXL base models and their finetunes are trained")
    from lora_trainer.models.diffusers_backend import PARTS, check_folder_parts

    check_folder_parts(path, (*PARTS, "text_encoder_2", "tokenizer_2"))
    name = base_model if not Path(base_model).exists() else path.name
    log.info("loading diffusers SDXL model from %s", path)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, **dtype_kwargs(weight_dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.base_model: could not load {path}: {e}") from e
    if pipe.unet.config.in_channels != 4:
        raise ModelLoadError(f"model.base_model: {path} is an inpainting model ({pipe.unet.config.in_channels} input "
                             "channels); only text-to-image SDXL models are trained")
    return pipe, name


def load_sdxl_backend(base_model: str, device, weight_dtype: torch.dtype, prediction_type: str = "auto",
                      unet_waits: bool = False) -> SdxlBackend:
    pipe, name = load_sdxl_pipeline(base_model, weight_dtype)
    return SdxlBackend(pipe, name, device, weight_dtype, prediction_type, unet_waits)
