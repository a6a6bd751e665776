"""Forge's loaded model, trained in place (``ForgeBackend``), and the two things Forge's weights need first.

Forge (lllyasviel/stable-diffusion-webui-forge) keeps the model in its own objects: ``shared.sd_model`` is a
``ForgeDiffusionEngine`` (not an nn.Module) whose ``forge_objects`` hold the UNet (``unet.model.diffusion_model``:
LDM module names, called ``(x, t, context=, y=)``), the text encoders (``clip.cond_stage_model.clip_l``, SD 2.x's
``clip_h``, SDXL's ``clip_l`` and ``clip_g``, each ``.transformer`` a Hugging Face CLIPTextModel) and the VAE
(``vae.first_stage_model``: encoder, quant_conv, scaling/shift factors). What differs from A1111's model, and what
this module does about it:
- Forge loads and generates under ``torch.inference_mode()``: its weights are inference tensors, which autograd
  cannot save. ``ordinary_tensors`` swaps each for an ordinary copy (one tensor at a time, no second model) and
  ``inference_tensors`` swaps them back after training: the same values, the same kind of tensor.
- Its Linear is ``backend.operations.ForgeOperations.Linear``, an ``nn.Module`` (not ``nn.Linear``) with
  ``in_features``, ``out_features``, ``weight`` and ``bias``: peft's LoRA Linear wraps it through peft's custom
  module mapping (``forge_lora_layers``). Its Conv2d/LayerNorm/GroupNorm are torch's subclasses.
- Its transformer blocks add to their input in place, which autograd refuses after a layer norm saved it:
  ``copy_norm_inputs`` gives those norms a copy while training.
- Its UNet refuses its own gradient checkpointing: sgm's instance-level wrapping of the transformer blocks and
  ResBlocks (the same class names) is used.
- Its attention is Forge's own ``attention_function`` (PyTorch SDPA, xformers or sliced, by Forge's flags): it
  stays as Forge set it.
- Its ``get_learned_conditioning`` and ``encode_first_stage`` run under inference mode too: their outputs are
  copied outside it; a text encoder that trains is run through the undecorated function.
No Forge import here: ``lora_trainer.webui.forge_host`` passes the model, its Linear class and its loader in, so
the tests run this on a stand-in.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lora_trainer.errors import LoraTrainerError
from lora_trainer.models.base import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from lora_trainer.models.conditioning import Conditioning
from lora_trainer.models.ldm import LdmBackend
from lora_trainer.models.prompts import WINDOW
from lora_trainer.models.sgm import checkpoint_blocks, restore_forwards, uncheckpoint_blocks, vae_posterior
from lora_trainer.utils.checkpointing import disable_lora_checkpointing, enable_lora_checkpointing

log = logging.getLogger(__name__)
SIZE_EMBED = 256  # Forge SDXL's Timestep(256) embedder's width, one per size/crop value (its ``dim``)
TRAINABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- inference tensors
def ordinary_tensors(modules) -> list[tuple[nn.Module, str, str, bool]]:
    """Replace every inference-tensor parameter and buffer of ``modules`` by an ordinary copy, one tensor at a time
    (the peak is one tensor, not a model), outside inference mode; returns what was replaced, for
    ``inference_tensors``. Idempotent: ordinary tensors are left alone."""
    done = []
    with torch.inference_mode(False):
        for module in modules:
            for m in module.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None and p.is_inference():
                        m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                        done.append((m, "p", name, p.requires_grad))
                for name, b in list(m._buffers.items()):
                    if b is not None and b.is_inference():
                        m._buffers[name] = b.clone()
                        done.append((m, "b", name, False))
    return done


def inference_tensors(replaced: list[tuple[nn.Module, str, str, bool]]) -> None:
    """Undo ``ordinary_tensors`` (one or more calls' lists, in order): each tensor they replaced is an inference tensor
    again, with the same values, and a parameter's ``requires_grad`` as it was before the first replacement."""
    first = {}
    for m, kind, name, requires_grad in replaced:
        first.setdefault((id(m), kind, name), (m, kind, name, requires_grad))
    with torch.inference_mode():
        for m, kind, name, requires_grad in first.values():
            if kind == "p":
                p = m._parameters.get(name)
                if p is not None:
                    m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=requires_grad)
            else:
                b = m._buffers.get(name)
                if b is not None:
                    m._buffers[name] = b.clone()


_NORM_COPY = "_lora_trainer_norm_copy"
_NORMS = ("norm_in", "norm1", "norm2", "norm3")


def _copying_forward(forward):
    def run(x, *args, **kwargs):
        return forward(x.clone() if torch.is_grad_enabled() else x, *args, **kwargs)

    return run


def copy_norm_inputs(unet: nn.Module) -> int:
    """Forge's BasicTransformerBlock adds to its input in place (``n = attn1(norm1(x)); x += n``, from ComfyUI): once
    the layer norm has saved ``x`` for its backward, autograd refuses the modified tensor ("modified by an inplace
    operation"). Each norm of each such block gets an instance forward that normalises a copy while gradients are
    on (generation, under inference mode, runs as before); ``restore_norm_inputs`` takes them out. Returns how many."""
    count = 0
    for block in unet.modules():
        if type(block).__name__ != "BasicTransformerBlock":
            continue
        for name in _NORMS:
            norm = getattr(block, name, None)
            if isinstance(norm, nn.Module) and _NORM_COPY not in vars(norm):
                setattr(norm, _NORM_COPY, vars(norm).get("forward"))
                norm.forward = _copying_forward(norm.forward)
                count += 1
    return count


def restore_norm_inputs(unet: nn.Module) -> None:
    restore_forwards(unet, _NORM_COPY)


def forge_lora_layers(linear_cls: type) -> dict[type, type]:
    """peft's custom-module mapping for Forge's Linear: peft's own LoRA Linear, which computes ``base(x)`` and adds
    ``B(A(x)) * scale``; the base layer runs Forge's forward (its manual cast, its online LoRAs) unchanged."""
    from peft.tuners.lora import Linear as LoraLinear

    class ForgeLoraLinear(LoraLinear):
        def __init__(self, base_layer, adapter_name, **kwargs):
            with warnings.catch_warnings():  # peft warns of any layer class it does not know; this one is known
                warnings.filterwarnings("ignore", message="Unsupported layer type")
                super().__init__(base_layer, adapter_name, **kwargs)

    return {linear_cls: ForgeLoraLinear}


# --- what the loaded model is
def forge_family(sd_model) -> str | None:
    """sd_v1, sd_v2 or sdxl, as Forge marks its engines (``is_sd1``, ``is_sd2``, ``is_sdxl``); None for others."""
    if sd_model is None:
        return None
    for flag, family in (("is_sdxl", "sdxl"), ("is_sd2", "sd_v2"), ("is_sd1", "sd_v1")):
        if getattr(sd_model, flag, False):
            return family
    return None


def forge_text_encoders(sd_model, family: str) -> tuple[nn.Module, nn.Module | None]:
    """(the text encoder, SDXL's second or None): Hugging Face CLIP models in Forge, named by what they are:
    ``clip_l`` (SD 1.x, SDXL's first), ``clip_h`` (SD 2.x's OpenCLIP ViT-H), ``clip_g`` (SDXL's second). Forge's Lora
    loader reads a file's ``lora_te_``/``lora_te1_`` keys for the first (clip_h on SD 2.x) and ``lora_te2_`` for
    clip_g, as kohya writes them."""
    encoders = sd_model.forge_objects.clip.cond_stage_model
    first = encoders.clip_h if family == "sd_v2" else encoders.clip_l
    return first.transformer, encoders.clip_g.transformer if family == "sdxl" else None


def forge_prediction_type(sd_model) -> str:
    """epsilon or v_prediction, from Forge's k-diffusion predictor."""
    kind = getattr(sd_model.forge_objects.unet.model.predictor, "prediction_type", "epsilon")
    return "v_prediction" if kind == "v_prediction" else "epsilon"


def forge_betas(sd_model) -> torch.Tensor:
    """The training noise schedule's betas, from the predictor's ``alphas_cumprod`` (Forge keeps no betas)."""
    cumprod = sd_model.forge_objects.unet.model.predictor.alphas_cumprod.detach().double().cpu()
    alphas = torch.cat([cumprod[:1], cumprod[1:] / cumprod[:-1]])
    return (1 - alphas).float()


def refuse_untrainable_forge(sd_model, cfg) -> str:
    """The loaded model's family, or LoraTrainerError saying why Forge's loaded model cannot be trained."""
    if sd_model is None:
        raise LoraTrainerError("no model is loaded: choose a Stable Diffusion 1.x, 2.x or SDXL checkpoint at the top "
                               "of the page")
    family = forge_family(sd_model)
    if family is None:
        raise LoraTrainerError(f"the loaded model ({type(sd_model).__name__}) is not Stable Diffusion 1.x, 2.x or SDXL "
                               f"(Flux, SD3 and others are not trained here): load one of those at the top of the "
                               f"page")
    if getattr(sd_model, "is_inpaint", False):
        raise LoraTrainerError("the loaded model is an inpainting model; LoRAs are trained on text-to-image models: "
                               "load the base model it was made from")
    kmodel = sd_model.forge_objects.unet.model
    storage = getattr(kmodel, "storage_dtype", torch.float32)
    if storage not in TRAINABLE_DTYPES:
        raise LoraTrainerError(f"the loaded model's UNet is stored as {storage} (Forge's 'Diffusion in Low Bits'): "
                               f"nf4/fp4/gguf/fp8 weights are not supported for training; set Diffusion in Low Bits "
                               f"to Automatic (or a 16-bit type) with a 16/32-bit checkpoint, then train")
    t = cfg.training
    if t.train_text_encoder_2 and family != "sdxl":
        raise LoraTrainerError(f"training.train_text_encoder_2: the loaded model ({family}) has one text encoder; "
                               f"set train_text_encoder_2: false (train_text_encoder trains its text encoder)")
    return family


class ForgeBackend(LdmBackend):
    """TrainingBackend over a ForgeDiffusionEngine (SD 1.x, 2.x, SDXL), in place.

    ``load(patcher)``: Forge's ``memory_management.load_model_gpu`` (the VAE is brought to the device with it before
    the latent cache reads its posterior); ``linear_cls``: Forge's Linear, for peft.
    """

    can_compile = True

    def __init__(self, sd_model, model_name: str, device: torch.device, *, linear_cls: type | None = None,
                 load: Callable | None = None, emphasis: str | None = None, prediction_type: str = "auto",
                 zero_terminal_snr: bool = False, clip_skip: int | None = None):
        from diffusers import DDPMScheduler

        self.sd_model = sd_model
        self.clip_skip = clip_skip  # Forge's "Clip skip" (opts.CLIP_stop_at_last_layers), its encoding's
        self.model_name = model_name
        self.device = torch.device(device)
        self.family = forge_family(sd_model)
        objects = sd_model.forge_objects
        self.kmodel = objects.unet.model
        self.unet = self.kmodel.diffusion_model
        self.weight_dtype = self.kmodel.storage_dtype
        self.compute_dtype = getattr(self.kmodel, "computation_dtype", self.weight_dtype)
        self.text_encoder, self.text_encoder_2 = forge_text_encoders(sd_model, self.family)
        self.vae = objects.vae.first_stage_model
        self._vae_patcher = getattr(objects.vae, "patcher", None)
        self._load = load
        self.prediction_type = forge_prediction_type(sd_model) if prediction_type == "auto" else prediction_type
        betas = forge_betas(sd_model).numpy()
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas,
                                             prediction_type=self.prediction_type, clip_sample=False,
                                             rescale_betas_zero_snr=zero_terminal_snr)
        self.lora_custom_modules = forge_lora_layers(linear_cls) if linear_cls is not None else None
        if self.family == "sdxl":
            from lora_trainer.models.sdxl_backend import SDXL_KOHYA_PREFIXES

            self.kohya_prefixes = SDXL_KOHYA_PREFIXES
            self.uses_time_ids = True
        self._checkpointing = None
        self._checkpointing_on = False
        self._compiled_forward = None
        self._emphasis = emphasis
        self._hypernetworks = []
        from lora_trainer.models.offload import IdleEncoders

        self._idle = IdleEncoders()
        # frozen: Forge makes its weights Parameters that require grad; a text encoder that does not train (SDXL's
        # second) would otherwise be recorded by autograd, with its inference tensors, while the first one trains
        for module in (self.unet, objects.clip.cond_stage_model, self.vae):
            module.requires_grad_(False)
        copy_norm_inputs(self.unet)

    def release(self) -> None:
        """Take out what this backend put into Forge's UNet (the host's release_backend calls it)."""
        restore_norm_inputs(self.unet)
        self.disable_gradient_checkpointing()

    def components(self) -> dict[str, nn.Module]:
        second = {TEXT_ENCODER_2: self.text_encoder_2} if self.text_encoder_2 is not None else {}
        return {UNET: self.unet, TEXT_ENCODER: self.text_encoder, **second}

    def text_encoders(self) -> list[nn.Module]:
        return [te for te in (self.text_encoder, self.text_encoder_2) if te is not None]

    def modules(self) -> list[nn.Module]:
        """Every module of the loaded model: UNet (with its predictor), text encoders, VAE."""
        objects = self.sd_model.forge_objects
        return [self.kmodel, objects.clip.cond_stage_model, self.vae]

    def image_encoder(self) -> nn.Module:
        return self.vae

    # --- images
    def _vae_on_device(self) -> None:
        if self._load is not None and self._vae_patcher is not None:
            self._load(self._vae_patcher)

    def encode_images(self, pixels, generator):
        """Forge's own encoding (a posterior sample, shifted and scaled), copied out of inference mode."""
        with torch.no_grad():
            latents = self.sd_model.encode_first_stage(pixels.to(self.device))
        return latents.clone().to(self.weight_dtype)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.scaling_factor)

    def encode_image_dist(self, pixels):
        self._vae_on_device()
        if float(getattr(self.vae, "shift_factor", 0.0) or 0.0):
            raise LoraTrainerError("the loaded model's VAE has a shift factor (not SD 1.x/2.x/SDXL's): not supported")
        vae_param = next(self.vae.parameters())
        with torch.no_grad():
            mean, std = vae_posterior(self.vae, pixels.to(vae_param.device, dtype=vae_param.dtype))
        return mean.to(self.device), std.to(self.device)

    # --- text
    def _conditioning(self, prompts: list[str]):
        """Forge's ``get_learned_conditioning``: under inference mode (outputs copied out of it) unless the text
        encoder trains and gradients are on; then its undecorated function, so the gradient reaches the LoRA."""
        trains = torch.is_grad_enabled() and any(p.requires_grad for te in self.text_encoders()
                                                 for p in te.parameters())
        if trains:
            fn = type(self.sd_model).get_learned_conditioning
            return getattr(fn, "__wrapped__", fn)(self.sd_model, prompts)
        out = self.sd_model.get_learned_conditioning(prompts)
        if isinstance(out, dict):
            return {k: v.clone() for k, v in out.items()}
        return out.clone()

    def encode_prompts(self, captions, weighted: bool = False):
        """Each caption alone through Forge (literal unless ``weighted``), cut to its first 77-token window; on SDXL
        the pooled embedding too, without Forge's size/crop part of the vector (``predict`` makes it per image)."""
        rows = [self._conditioning([p]) for p in self._prompts(captions, weighted)]
        if self.family != "sdxl":
            return Conditioning(torch.cat([r[:, :WINDOW] for r in rows]))
        pooled_width = rows[0]["vector"].shape[1] - 6 * int(getattr(self.sd_model.embedder, "dim", SIZE_EMBED))
        return Conditioning(torch.cat([r["crossattn"][:, :WINDOW] for r in rows]),
                            pooled=torch.cat([r["vector"][:, :pooled_width] for r in rows]))

    def explain_nonfinite_text(self, caption: str) -> str:
        return "Forge's text encoder or its prompt encoding gave non-finite values for it"

    def size_vector(self, time_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's size/crop part of the vector for each image's (orig h, w, crop top, left, target h, w), through
        Forge's own embedder (``sd_model.embedder``, Timestep(256)), as its get_learned_conditioning makes it."""
        ids = time_ids.float().cpu()
        with torch.no_grad():
            parts = [self.sd_model.embedder(ids[:, i]) for i in range(ids.shape[1])]
        return torch.cat(parts, dim=1).to(self.device, dtype=dtype)

    # --- the UNet
    def predict(self, noisy_latents, timesteps, cond):
        self._check_unet_place()
        extra = {}
        if self.family == "sdxl":
            if cond.pooled is None or cond.time_ids is None:
                raise ValueError("SDXL needs the pooled text embedding and each image's size/crop ids")
            extra["y"] = torch.cat([cond.pooled, self.size_vector(cond.time_ids, cond.pooled.dtype)],
                                   dim=1).to(self.compute_dtype)
        x = noisy_latents.to(self.compute_dtype)
        if self._checkpointing_on:  # (see LdmBackend._apply: the first blocks' inputs must carry a gradient)
            x = x.detach().requires_grad_(True)
        forward = self.unet.forward if self._compiled_forward is None else self._compiled_forward
        out = forward(x, timesteps.float(), context=cond.context.to(self.compute_dtype), transformer_options={},
                      **extra)
        return out.to(noisy_latents.dtype)

    def _check_unet_place(self) -> None:
        """Forge's memory manager may move the UNet off the device to make room for the VAE or text encoders (a GPU
        short of memory); training on would fail somewhere deep in a layer: say what happened instead."""
        weight = self._probe_weight
        if weight.device.type != self.device.type or (
                self.device.index is not None and weight.device.index != self.device.index):
            raise LoraTrainerError(f"Forge's memory manager moved the UNet to {weight.device} during training (not "
                                   f"enough free memory on {self.device} for it beside the VAE or text encoders); "
                                   f"lower the resolution or batch size, or free GPU memory, and train again")

    @property
    def _probe_weight(self) -> torch.Tensor:
        return next(p for p in self.unet.parameters() if not p.requires_grad)

    def compile_unet(self, mode: str = "default") -> None:
        from lora_trainer.models.compiling import compile_for_run

        self._compiled_forward = compile_for_run(self.unet.forward, mode)

    def use_attention(self, kind: str) -> None:
        from lora_trainer.models.attention import resolve_attention

        resolve_attention(kind)  # (a ConfigError for a kernel that cannot run here)
        log.info("attention: Forge's own attention function, as Forge set it (its command-line flags choose it); "
                 "training.attention '%s' is not applied in Forge", kind)

    def restore_attention(self) -> None:
        pass

    def idle_encoders(self, text_encoder: bool) -> list[nn.Module]:
        return [self.vae] + ([self.sd_model.forge_objects.clip.cond_stage_model] if text_encoder else [])

    def enable_gradient_checkpointing(self, text_encoder: bool, text_encoder_2: bool = False) -> None:
        """torch's non-reentrant checkpoint around each transformer block and ResBlock (Forge's own raises); a
        transformer block gets a copy of its input, which it changes in place. Each text encoder that trains, its
        layers checkpointed too."""
        checkpoint_blocks(self.unet, copy_inputs=("BasicTransformerBlock",))
        self._checkpointing_on = True
        if text_encoder:
            enable_lora_checkpointing(self.text_encoder)
        if text_encoder_2 and self.text_encoder_2 is not None:
            enable_lora_checkpointing(self.text_encoder_2)

    def disable_gradient_checkpointing(self) -> None:
        uncheckpoint_blocks(self.unet)
        self._checkpointing_on = False
        for te in self.text_encoders():
            disable_lora_checkpointing(te)
