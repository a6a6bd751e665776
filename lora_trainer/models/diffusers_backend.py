"""The diffusers backend: a diffusers folder, a single-file SD 1.x checkpoint, or the tiny demo model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lora_trainer.errors import ConfigError, ModelLoadError
from lora_trainer.models.attention import use_diffusers_attention
from lora_trainer.models.base import TEXT_ENCODER, UNET, Backend
from lora_trainer.models.compat import dtype_kwargs
from lora_trainer.models.compiling import compile_for_run
from lora_trainer.models.conditioning import Conditioning
from lora_trainer.models.offload import IdleEncoders, waiting_on_cpu
from lora_trainer.models.prompts import encode_captions
from lora_trainer.utils.checkpointing import enable_lora_checkpointing

log = logging.getLogger(__name__)


class DiffusersBackend(Backend):
    """Wraps a StableDiffusionPipeline's parts for training; every base weight is frozen."""

    can_compile = can_channels_last = True

    def __init__(self, pipe, model_name: str, device: torch.device, weight_dtype: torch.dtype,
                 prediction_type: str = "auto", unet_waits: bool = False):
        """``unet_waits``: on a GPU the UNet stays on the CPU until the caches are built (``unet_waits_for_cache``
        brings it at their end): the set-up and the encoders' work never hold it on the GPU (models.offload)."""
        from diffusers import DDPMScheduler

        self.pipe = pipe  # for samples during training: it shares the modules the LoRA goes into
        self._compiled = None
        self._channels_last = False
        self._idle = IdleEncoders()  # encoders moved to the CPU while training needs none
        self.model_name = model_name
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.unet, self.vae = pipe.unet, pipe.vae
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if prediction_type != "auto":
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.family = "sd_v2" if self.unet.config.cross_attention_dim == 1024 else "sd_v1"
        # fp16 VAEs overflow on some images; keep the VAE in fp32 then (it runs without grad)
        vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype
        unet_device = "cpu" if unet_waits and self.device.type == "cuda" else self.device
        for module, dtype, where in ((self.unet, weight_dtype, unet_device), (self.text_encoder, weight_dtype,
                                     self.device), (self.vae, vae_dtype, self.device)):
            module.requires_grad_(False)
            module.to(where)
            if module.dtype != dtype:
                module.to(dtype=dtype)
        self.vae.eval()
        self.text_encoder.eval()

    def components(self) -> dict[str, nn.Module]:
        return {UNET: self.unet, TEXT_ENCODER: self.text_encoder}

    def encode_images(self, pixels, generator):
        pixels = pixels.to(self.device, dtype=self.vae.dtype)
        with torch.no_grad():
            dist = self.vae.encode(pixels).latent_dist
            latents = dist.sample(generator=generator) * self.vae.config.scaling_factor
        return latents.to(self.weight_dtype)

    def image_encoder(self) -> nn.Module:
        return self.vae

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def encode_image_dist(self, pixels):
        pixels = pixels.to(self.device, dtype=self.vae.dtype)
        with torch.no_grad():
            dist = self.vae.encode(pixels).latent_dist
        return dist.mean, dist.std

    def encode_prompts(self, captions, weighted: bool = False):
        return Conditioning(encode_captions(self.tokenizer, self.text_encoder, list(captions), self.device, weighted,
                                            self.clip_skip))

    def use_clip_skip(self, layers: int) -> None:
        total = self.text_encoder.config.num_hidden_layers
        if layers > total:
            raise ConfigError(f"training.clip_skip: {layers} is more than this text encoder's {total} layers")
        self.clip_skip = layers

    def explain_nonfinite_text(self, caption: str) -> str:
        """Why a caption's conditioning came out non-finite, as far as can be told."""
        if self.text_encoder.dtype == torch.float16:
            return "the text encoder runs in fp16 and overflowed: use mixed_precision bf16 or no"
        return "the text encoder's own weights give non-finite values for it: a damaged checkpoint?"

    def predict(self, noisy_latents, timesteps, cond):
        unet = self.unet if self._compiled is None else self._compiled
        if self._channels_last:
            noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
        return unet(noisy_latents, timesteps, cond.context).sample

    def use_attention(self, kind: str) -> None:
        use_diffusers_attention(self.unet, kind)

    def idle_encoders(self, text_encoder: bool) -> list[nn.Module]:
        """What training steps do not need with latents (and, ``text_encoder``, captions) cached."""
        return [self.vae] + ([self.text_encoder] if text_encoder else [])

    def offload_idle_encoders(self, text_encoder: bool) -> int:
        """With latents (and caption embeddings, ``text_encoder``) cached, training steps need neither the VAE nor
        the frozen text encoder: they wait on the CPU (models.offload) and their GPU memory goes to the UNet
        (``encoders_on_device`` brings them back for samples). Returns the bytes freed on the GPU: none on the CPU."""
        return self._idle.park(self.idle_encoders(text_encoder), self.device)

    @property
    def _offloaded(self) -> list[nn.Module]:
        return self._idle.modules

    def encoders_on_device(self):
        """The offloaded encoders on the GPU for the block (a sample image), then back on the CPU."""
        return self._idle.on_device(self.device)

    def restore_encoders(self) -> None:
        """Everything back on the training device, as before ``offload_idle_encoders``."""
        self._idle.restore(self.device)

    def unet_waits_for_cache(self):
        """The UNet (its LoRA in it) on the CPU while the VAE and text encoder(s) fill the caches, on a GPU, and on
        the GPU after: the encoders' work is the process's peak otherwise (SDXL at 1024²: models.offload). One loaded
        with ``unet_waits`` is on the CPU already: it moves once, at the end."""
        return waiting_on_cpu([self.unet], self.device, "while the caches are built")

    def compile_unet(self, mode: str = "default") -> None:
        """Train through torch.compile of the UNet; its parameters (and names) stay those of ``self.unet``."""
        self._compiled = compile_for_run(self.unet, mode)

    def use_channels_last(self) -> None:
        """Keep the UNet's weights and activations in NHWC layout (faster convolutions on GPUs)."""
        self.unet.to(memory_format=torch.channels_last)
        self._channels_last = True

    def enable_gradient_checkpointing(self, text_encoder: bool) -> None:
        self.unet.enable_gradient_checkpointing()
        if text_encoder:
            enable_lora_checkpointing(self.text_encoder)


PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_folder_parts(path: Path, parts=PARTS) -> None:
    """A diffusers folder missing a part it needs (a ``unet/`` folder, its ``config.json``): a ModelLoadError that
    names it, instead of the loader's "no file named config.json"."""
    missing = [p for p in parts if not (path / p).is_dir()]
    missing += [f"{p}/config.json" for p in ("unet", "vae", "text_encoder") if p in parts and (path / p).is_dir()
                and not (path / p / "config.json").is_file()]
    if missing:
        raise ModelLoadError(f"model.base_model: the diffusers folder {path} has no {', '.join(missing)}: copy the "
                             "whole model folder (every part model_index.json lists)")


def resolve_base_model(base_model: str) -> Path:
    """The folder or file a ``base_model`` value points to (the tiny demo model is built on first use)."""
    from lora_trainer.models.tiny import TINY_NAME, tiny_model_path

    if base_model == TINY_NAME:
        return tiny_model_path()
    return Path(base_model).expanduser().resolve()


def load_pipeline(base_model: str, weight_dtype: torch.dtype = torch.float32):
    """Load a StableDiffusionPipeline offline; returns (pipe, model name)."""
    from diffusers import StableDiffusionPipeline

    path = resolve_base_model(base_model)
    name = base_model if not Path(base_model).exists() else path.name
    if path.is_file():
        from lora_trainer.models.single_file import load_single_file_pipeline

        return load_single_file_pipeline(path, torch_dtype=weight_dtype), path.stem
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"model.base_model: {path} is not a diffusers folder (no model_index.json)")
    check_folder_parts(path)
    log.info("loading diffusers model from %s", path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, local_files_only=True, **dtype_kwargs(weight_dtype), safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.base_model: could not load {path}: {e}") from e
    return pipe, name


def load_diffusers_backend(base_model: str, device, weight_dtype: torch.dtype,
                           prediction_type: str = "auto", unet_waits: bool = False) -> DiffusersBackend:
    pipe, name = load_pipeline(base_model, weight_dtype)
    return DiffusersBackend(pipe, name, device, weight_dtype, prediction_type, unet_waits)
