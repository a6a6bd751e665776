"""Test helper: a tiny stand-in of the SD 1.5 model Forge loads (a ``ForgeDiffusionEngine``), around a REAL LDM UNet.

What it keeps of Forge (main dfdcbab6), because the Forge host depends on it:
- not an nn.Module; ``forge_objects`` / ``forge_objects_original`` / ``forge_objects_after_applying_lora``
  (ForgeObjects: unet, clip, vae), ``current_lora_hash``, ``is_sd1``/``is_sd2``/``is_sdxl``, ``model_config.ztsnr``;
- ``forge_objects.unet``: a ModelPatcher whose ``.model`` is a KModel (``diffusion_model``: ldm's UNetModel with LDM
  names, ``predictor.alphas_cumprod``/``prediction_type``, ``storage_dtype``, ``computation_dtype``); patchers share
  the model's LoraLoader, which merges a prompt's LoRA into the weights under inference mode (new Parameters, backups
  kept) and restores them when refreshed with no patches; ``clone``, ``add_patches``, ``refresh_loras``;
- ``forge_objects.clip.cond_stage_model.clip_l.transformer``: an HF CLIPTextModel; ``forge_objects.vae``:
  ``first_stage_model`` with ``encoder``, ``quant_conv``, ``scaling_factor``, ``shift_factor``;
- its transformer blocks add to their input in place (``x += n``), as Forge's;
- every Linear is ``backend.operations.ForgeOperations.Linear`` (tests/forge_stub), and every weight an inference
  tensor (Forge loads under ``torch.inference_mode()``); ``get_learned_conditioning`` and ``encode_first_stage`` run
  under inference mode and load their model through ``backend.memory_management`` first.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn

STUB = Path(__file__).resolve().parent / "forge_stub"
sys.path.insert(0, str(STUB))

from backend import memory_management  # noqa: E402
from backend.operations import ForgeOperations  # noqa: E402
from ldm_model import TinyLatentDiffusion  # noqa: E402


def forge_linears(module: nn.Module) -> int:
    """Every nn.Linear of ``module`` becomes a ForgeOperations.Linear with the same weights, as Forge builds them."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = ForgeOperations.Linear(child.in_features, child.out_features)
                new.weight = nn.Parameter(child.weight.detach().clone())
                new.bias = None if child.bias is None else nn.Parameter(child.bias.detach().clone())
                setattr(parent, name, new)
                count += 1
    return count


def forge_block_forward(self, x, context=None):
    """backend/nn/unet.py BasicTransformerBlock._forward (from ComfyUI), without its patches: it adds to its input in
    place, where ldm's makes new tensors."""
    n = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
    x += n
    n = self.attn2(self.norm2(x), context=context)
    x += n
    x_skip = x
    x = self.ff(self.norm3(x))
    x += x_skip
    return x


def forge_blocks(unet: nn.Module) -> int:
    """ldm's transformer blocks compute as Forge's (``forge_block_forward``)."""
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        block._forward = types.MethodType(forge_block_forward, block)
    return len(blocks)


def as_inference(module: nn.Module) -> None:
    """Every parameter and buffer an inference tensor (``nn.Parameter(t)`` made in inference mode, as Forge loads)."""
    with torch.inference_mode():
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = nn.Parameter(p.detach().clone())
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.clone()


class LoraLoader:
    """backend/patcher/lora.py LoraLoader: merges patches (here: weight deltas by parameter path) in place."""

    def __init__(self, model):
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=None, force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        for key, w in self.backup.items():
            self._set(key, w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False))
        self.backup = {}
        for patches in lora_patches.values():
            for key, delta in patches.items():
                parent, _, attr = key.rpartition(".")
                weight = getattr(self.model.get_submodule(parent), attr, None) if parent else None
                if not isinstance(weight, nn.Parameter):
                    raise ValueError(f"Wrong LoRA Key: {key}")
                self.backup.setdefault(key, weight)
                self._set(key, nn.Parameter(weight + delta, requires_grad=False))
        self.loaded_hash = hashes

    def _set(self, key, value):
        parent, _, attr = key.rpartition(".")
        setattr(self.model.get_submodule(parent), attr, value)


class ModelPatcher:
    def __init__(self, model, load_device=None):
        self.model, self.offload_device = model, torch.device("cpu")
        self.load_device = load_device or self.offload_device
        self.lora_patches = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = ModelPatcher(self.model, self.load_device)
        n.lora_patches = self.lora_patches.copy()
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = patches
        return list(patches)

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)


class CLIP:
    def __init__(self, cond_stage_model, tokenizer, patcher=None):
        self.cond_stage_model, self.tokenizer = cond_stage_model, tokenizer
        self.patcher = patcher or ModelPatcher(cond_stage_model)

    def clone(self):
        return CLIP(self.cond_stage_model, self.tokenizer, self.patcher.clone())


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class KModel(nn.Module):
    def __init__(self, diffusion_model, alphas_cumprod, prediction_type="epsilon", storage_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = nn.Module()
        self.predictor.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.predictor.prediction_type = prediction_type
        self.storage_dtype = storage_dtype
        self.computation_dtype = torch.float32


class VaeModel(nn.Module):
    """backend/nn/vae.py IntegratedAutoencoderKL's encoding half (encoder, quant_conv, scaling/shift factors)."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self.scaling_factor, self.shift_factor = float(vae.config.scaling_factor), 0.0


class TinyForgeSD15:
    """backend/diffusion_engine/sd15.py StableDiffusion, tiny."""

    def __init__(self, seed: int = 0, storage_dtype=torch.float32):
        ldm = TinyLatentDiffusion(seed)
        unet, te = ldm.model.diffusion_model, ldm.cond_stage_model.wrapped.transformer
        self.linears = forge_linears(unet) + forge_linears(te)
        forge_blocks(unet)
        clip_model = nn.Module()
        clip_model.clip_l = nn.Module()
        clip_model.clip_l.transformer = te
        kmodel = KModel(unet, torch.cumprod(1 - ldm.betas.double(), 0), storage_dtype=storage_dtype)
        vae_model = VaeModel(ldm.first_stage_model)
        for m in (kmodel, clip_model, vae_model):
            m.eval()
            as_inference(m)
        vae = types.SimpleNamespace(first_stage_model=vae_model, patcher=ModelPatcher(vae_model))
        clip = CLIP(clip_model, ldm.cond_stage_model.wrapped.tokenizer)
        self.forge_objects = ForgeObjects(ModelPatcher(kmodel), clip, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3, self.is_inpaint = True, False, False, False, False
        self.model_config = types.SimpleNamespace(ztsnr=False)
        self.sd_checkpoint_info = types.SimpleNamespace(model_name="tiny-forge", filename="tiny-forge.safetensors")

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        clip = self.forge_objects.clip
        ids = clip.tokenizer(list(prompt), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return clip.cond_stage_model.clip_l.transformer(ids)[0]

    @torch.inference_mode()
    def encode_first_stage(self, x):
        memory_management.load_model_gpu(self.forge_objects.vae.patcher)
        vae = self.forge_objects.vae.first_stage_model
        mean, logvar = torch.chunk(vae.quant_conv(vae.encoder(x)), 2, dim=1)
        sample = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)
        return (sample - vae.shift_factor) * vae.scaling_factor

    @torch.inference_mode()
    def generate(self, prompt: str, seed: int = 3):
        """One UNet call as Forge's sampling makes it: the patchers loaded (LoRAs merged), under inference mode."""
        memory_management.load_models_gpu([self.forge_objects.unet])
        cond = self.get_learned_conditioning([prompt])
        torch.manual_seed(seed)
        x, t = torch.randn(1, 4, 16, 16), torch.tensor([100.0])
        return cond.clone(), self.forge_objects.unet.model.diffusion_model(x, t, context=cond,
                                                                           transformer_options={}).clone()

    def parameters(self):
        """(for the tests) every parameter of the loaded model, by a stable name."""
        objects = self.forge_objects
        for top, prefix in ((objects.unet.model, "unet."), (objects.clip.cond_stage_model, "clip."),
                            (objects.vae.first_stage_model, "vae.")):
            for name, p in top.named_parameters():
                yield prefix + name, p
