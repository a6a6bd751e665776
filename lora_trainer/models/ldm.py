"""The LDM backend: train a CompVis LatentDiffusion model in place (the WebUI's ``shared.sd_model``).

Nothing is copied or reloaded: LoRA layers go into the loaded UNet (``model.diffusion_model``) and,
when asked, the text encoder (``cond_stage_model.wrapped.transformer``); ``engine.lora.remove_lora``
takes them out again. The noise schedule comes from the model's own betas. No WebUI import here: the
WebUI glue (``lora_trainer.webui``) passes the model and its hooks in, so this runs in tests on a tiny
LDM UNet too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lora_trainer.data.emphasis import escape_emphasis
from lora_trainer.models.attention import restore_ldm_attention, use_ldm_attention
from lora_trainer.models.base import TEXT_ENCODER, UNET, Backend
from lora_trainer.models.compiling import compile_for_run
from lora_trainer.models.conditioning import Conditioning
from lora_trainer.models.offload import IdleEncoders
from lora_trainer.models.prompts import WINDOW
from lora_trainer.utils.checkpointing import disable_lora_checkpointing, enable_lora_checkpointing

log = logging.getLogger(__name__)


def clip_embedder(sd_model):
    """The object holding the (first) HF CLIP text encoder as ``.transformer`` and its ``.tokenizer``: SD 1.x's
    cond_stage_model (A1111 wraps it once more), SDXL's first conditioner embedder (the same, inside sgm's)."""
    conditioner = getattr(sd_model, "conditioner", None)
    cond = conditioner.embedders[0] if conditioner is not None else sd_model.cond_stage_model
    return getattr(cond, "wrapped", cond)


def ldm_text_encoder(sd_model) -> nn.Module | None:
    """The HF CLIPTextModel inside the model's (first) text embedder; None for SD 2.x's OpenCLIP."""
    return getattr(clip_embedder(sd_model), "transformer", None)


def ldm_betas(sd_model) -> torch.Tensor:
    """The training noise schedule's betas: CompVis' ``betas``; sgm (SDXL) keeps ``alphas_cumprod`` only, which
    the WebUI may rescale for sampling (Settings → Noise schedule) and keeps the original of beside it."""
    betas = getattr(sd_model, "betas", None)
    if betas is not None:
        return betas.detach().float().cpu()
    cumprod = getattr(sd_model, "alphas_cumprod_original", None)
    cumprod = (sd_model.alphas_cumprod if cumprod is None else cumprod).detach().double().cpu()
    alphas = torch.cat([cumprod[:1], cumprod[1:] / cumprod[:-1]])
    return (1 - alphas).float()


def ldm_family(sd_model) -> str:
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False) or getattr(sd_model.cond_stage_model, "model", None) is not None:
        return "sd_v2"
    return "sd_v1"


@contextlib.contextmanager
def _instance_forward(module: nn.Module, forward: Callable):
    had, previous = "forward" in vars(module), vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


class LdmBackend(Backend):
    """TrainingBackend over a LatentDiffusion-like object.

    The object needs: ``model.diffusion_model`` (the UNet), ``cond_stage_model``, ``apply_model(x, t, cond)``,
    ``encode_first_stage`` + ``get_first_stage_encoding``, ``get_learned_conditioning(prompts)``, ``betas``
    and ``parameterization`` ("eps" or "v").
    """

    can_compile = True

    def __init__(self, sd_model, model_name: str, device: torch.device, weight_dtype: torch.dtype,
                 checkpointing: tuple[Callable[[], None], Callable[[], None]] | None = None,
                 upcast_attention: bool = False, host_attention: str | None = None,
                 hypernetworks: Sequence[str] = (), emphasis: str | None = None, prediction_type: str = "auto",
                 zero_terminal_snr: bool = False, clip_skip: int | None = None):
        from diffusers import DDPMScheduler

        self.sd_model = sd_model
        self.clip_skip = clip_skip  # the host's "Clip skip" (A1111: opts.CLIP_stop_at_last_layers), its encoding's
        self.model_name = model_name
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.family = ldm_family(sd_model)
        self.unet = sd_model.model.diffusion_model
        self.text_encoder = ldm_text_encoder(sd_model)
        if prediction_type == "auto":
            prediction_type = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        self.prediction_type = prediction_type
        betas = ldm_betas(sd_model).numpy()
        # zero_terminal_snr: the model was trained so (the WebUI's model.ztsnr, its noise schedule setting, or
        # the checkpoint's marker key); model.zero_terminal_snr "auto" reads it from this scheduler's config
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas,
                                             prediction_type=self.prediction_type, clip_sample=False,
                                             rescale_betas_zero_snr=zero_terminal_snr)
        self._checkpointing = checkpointing
        self._checkpointing_on = False
        self._upcast_attention = upcast_attention
        self._host_attention = host_attention  # the name of the host's own (the WebUI's optimization)
        self._hypernetworks = list(hypernetworks)  # the WebUI's loaded ones: its attention forwards apply them
        self._compiled_forward = None
        self._emphasis = emphasis  # the host's prompt emphasis mode (A1111: opts.emphasis); None: no parser
        self._idle = IdleEncoders()  # the VAE and text encoder, off the GPU while steps need neither
        for module in (self.unet, self.text_encoder):
            if module is not None:
                module.requires_grad_(False)

    def components(self) -> dict[str, nn.Module]:
        return {UNET: self.unet, TEXT_ENCODER: self.text_encoder}

    def use_clip_skip(self, layers: int) -> None:
        """The WebUI encodes captions as it encodes prompts, with its own "Clip skip" setting: the LoRA then fits
        the WebUI's generation. A config's other value is said, not applied."""
        if layers != (self.clip_skip or 1):
            log.warning("training.clip_skip %d: the WebUI's own Clip skip setting (%s) encodes the captions, as it "
                        "encodes prompts; set it in Settings → Stable Diffusion → Clip skip (it is the LoRA's "
                        "ss_clip_skip)", layers, self.clip_skip)

    def image_encoder(self) -> nn.Module:
        return self.sd_model.first_stage_model

    def _encode(self, pixels):
        vae = getattr(self.sd_model, "first_stage_model", None)
        dtype = next(vae.parameters()).dtype if vae is not None else self.weight_dtype  # A1111: --no-half-vae
        with torch.no_grad():
            return self.sd_model.encode_first_stage(pixels.to(self.device, dtype=dtype))

    def encode_images(self, pixels, generator):
        # LDM's DiagonalGaussianDistribution.sample takes no generator: the latent sample draws from the
        # global RNG, which the engine's checkpoints save and restore anyway.
        with torch.no_grad():
            return self.sd_model.get_first_stage_encoding(self._encode(pixels)).to(self.weight_dtype)

    @property
    def latent_scale(self) -> float:
        return float(self.sd_model.scale_factor)  # a float or a 0-d buffer (scale_by_std) in CompVis' LatentDiffusion

    def encode_image_dist(self, pixels):
        posterior = self._encode(pixels)  # SD 1.x/2.x: a DiagonalGaussianDistribution
        if isinstance(posterior, torch.Tensor):  # an encoder that gives the latent itself: no spread
            return posterior, torch.zeros_like(posterior)
        return posterior.mean, posterior.std

    def encode_prompts(self, captions, weighted: bool = False):
        """Each caption alone, as generation encodes a prompt (the WebUI's emphasis rescales by the mean of
        everything it encodes at once), literally unless ``weighted`` (data.weighted_captions), and cut to
        its first 77-token window as the command line cuts it."""
        return Conditioning(torch.cat([self.sd_model.get_learned_conditioning([p])[:, :WINDOW]
                                       for p in self._prompts(captions, weighted)]))

    def _prompts(self, captions, weighted: bool) -> list[str]:
        """The captions as the WebUI's prompt parser must see them: escaped unless ``weighted``."""
        literal = not weighted and self._emphasis not in (None, "None")
        return [escape_emphasis(c) if literal else c for c in captions]

    def explain_nonfinite_text(self, caption: str) -> str:
        """Why a caption's conditioning came out non-finite: the text encoder itself, or the WebUI's encoding."""
        try:
            wrapped = clip_embedder(self.sd_model)
            ids = wrapped.tokenizer([caption], padding="max_length", max_length=WINDOW, truncation=True,
                                    return_tensors="pt").input_ids
            with torch.no_grad():
                raw = self.text_encoder(ids.to(self.device))[0]
        except Exception:  # an encoder without an HF tokenizer and CLIPTextModel (SD 2.x's OpenCLIP)
            return "the text encoder or the WebUI's prompt encoding gave non-finite values"
        if not bool(torch.isfinite(raw).all()):
            return ("the text encoder itself gives non-finite values for it: an fp16 overflow (start the WebUI with "
                    "--no-half) or damaged weights" if raw.dtype == torch.float16
                    else "the text encoder itself gives non-finite values for it: damaged checkpoint weights?")
        mean = float(raw.float().mean())
        if self._emphasis == "Original" and abs(mean) <= 1e-6 * float(raw.float().abs().mean()):
            return (f"the WebUI's emphasis mode \"Original\" divides the text encoder's output by its mean, which is "
                    f"{mean:.1e} for this caption (degenerate text encoder weights: a final layer norm left at "
                    f"weight 1, bias 0?); Settings → Stable Diffusion → Emphasis mode \"No norm\" or \"None\" "
                    f"avoids the division")
        return ("the text encoder's own output is finite: the WebUI's prompt encoding (an extension's hook or a "
                "textual inversion embedding named in the caption) made it non-finite")

    def predict(self, noisy_latents, timesteps, cond):
        return self._apply(noisy_latents, timesteps, cond.context)

    def _apply(self, noisy_latents, timesteps, cond):
        """The WebUI model's ``apply_model`` through the compiled forward, if any."""
        if self._checkpointing_on:
            # reentrant checkpointing passes no gradient through blocks whose inputs need none; the first
            # blocks see only the (frozen) latents, so make them carry a gradient
            noisy_latents = noisy_latents.detach().requires_grad_(True)
        with (contextlib.nullcontext() if self._compiled_forward is None
              else _instance_forward(self.unet, self._compiled_forward)):
            return self.sd_model.apply_model(noisy_latents, timesteps, cond)

    def compile_unet(self, mode: str = "default") -> None:
        """Train through torch.compile of the UNet's forward. It is the UNet's forward only inside ``predict``
        (an instance attribute for the call): the WebUI's own calls, its samples and generation, stay as they
        were, and a forward another extension set on the instance is back after every step."""
        self._compiled_forward = compile_for_run(self.unet.forward, mode)

    def use_attention(self, kind: str) -> None:
        """Train with a memory-efficient attention kernel instead of the host's (models.attention)."""
        use_ldm_attention(self.unet, kind, upcast=self._upcast_attention)
        if self._host_attention:
            log.info("attention: the WebUI's cross attention optimization (%s) gives way while training, and is "
                     "back after it", self._host_attention)
        if self._hypernetworks:
            log.warning("hypernetworks %s are not applied while training (nor in its sample images): the "
                        "training's attention kernel does not run them", ", ".join(self._hypernetworks))

    def restore_attention(self) -> None:
        restore_ldm_attention(self.unet)

    def idle_encoders(self, text_encoder: bool) -> list[nn.Module]:
        """The WebUI's VAE and (captions cached, ``text_encoder``) its text encoder(s): SDXL's conditioner."""
        text = getattr(self.sd_model, "conditioner", None) or self.sd_model.cond_stage_model
        return [self.sd_model.first_stage_model] + ([text] if text_encoder else [])

    def offload_idle_encoders(self, text_encoder: bool) -> int:
        """On a GPU, the VAE and frozen text encoder(s) wait on the CPU while the UNet trains (models.offload);
        the WebUI keeps its references, the modules move in place; samples bring them back."""
        return self._idle.park(self.idle_encoders(text_encoder), self.device)

    def encoders_on_device(self):
        return self._idle.on_device(self.device)

    def restore_encoders(self) -> None:
        self._idle.restore(self.device)

    def enable_gradient_checkpointing(self, text_encoder: bool) -> None:
        if self._checkpointing is None:
            raise NotImplementedError("gradient checkpointing needs the host's checkpoint hooks")
        self._checkpointing[0]()
        self._checkpointing_on = True
        if text_encoder and self.text_encoder is not None:
            enable_lora_checkpointing(self.text_encoder)

    def disable_gradient_checkpointing(self) -> None:
        if self._checkpointing_on and self._checkpointing is not None:
            self._checkpointing[1]()
        self._checkpointing_on = False
        if self.text_encoder is not None:
            disable_lora_checkpointing(self.text_encoder)
