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


class Timestep(nn.Module):
    """backend/nn/unet.py Timestep: SDXL's embedder of each size/crop number (Forge: Timestep(256))."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        from sgm_model import timestep_embedding

        return timestep_embedding(t, self.dim)


class Prompts(list):
    """modules/prompt_parser's SdConditioning: a list of prompts with the generation's width and height."""

    def __init__(self, prompts, width=None, height=None):
        super().__init__(prompts)
        self.width, self.height = width, height


class TinyForgeEngine:
    """backend/diffusion_engine/base.py ForgeDiffusionEngine, tiny: what SD 1.5's and SDXL's share."""

    is_sd1 = is_sd2 = is_sdxl = is_sd3 = is_inpaint = False
    prediction_type = "epsilon"

    def _assemble(self, unet, alphas_cumprod, encoders: dict, tokenizers: dict, vae, storage_dtype):
        self.linears = forge_linears(unet) + sum(forge_linears(te) for te in encoders.values())
        forge_blocks(unet)
        clip_model = nn.Module()
        for name, te in encoders.items():
            setattr(clip_model, name, nn.Module())
            getattr(clip_model, name).transformer = te
        kmodel = KModel(unet, alphas_cumprod, prediction_type=self.prediction_type, storage_dtype=storage_dtype)
        vae_model = VaeModel(vae)
        for m in (kmodel, clip_model, vae_model):
            m.eval()
            as_inference(m)
        vae_objects = types.SimpleNamespace(first_stage_model=vae_model, patcher=ModelPatcher(vae_model))
        clip = CLIP(clip_model, types.SimpleNamespace(**tokenizers))
        self.forge_objects = ForgeObjects(ModelPatcher(kmodel), clip, vae_objects)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.model_config = types.SimpleNamespace(ztsnr=False)
        self.sd_checkpoint_info = types.SimpleNamespace(model_name="tiny-forge", filename="tiny-forge.safetensors")

    def _hidden(self, name: str, prompt, layer=None):
        clip = self.forge_objects.clip
        ids = getattr(clip.tokenizer, name)(list(prompt), padding="max_length", max_length=77, truncation=True,
                                            return_tensors="pt").input_ids
        out = getattr(clip.cond_stage_model, name).transformer(ids, output_hidden_states=layer is not None)
        return out if layer is not None else out[0]

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
        cond = self.get_learned_conditioning(Prompts([prompt], 16, 16))
        torch.manual_seed(seed)
        x, t = torch.randn(1, 4, 16, 16), torch.tensor([100.0])
        unet = self.forge_objects.unet.model.diffusion_model
        if isinstance(cond, dict):
            return cond["vector"].clone(), unet(x, t, context=cond["crossattn"], y=cond["vector"],
                                                transformer_options={}).clone()
        return cond.clone(), unet(x, t, context=cond, transformer_options={}).clone()

    def parameters(self):
        """(for the tests) every parameter of the loaded model, by a stable name."""
        objects = self.forge_objects
        for top, prefix in ((objects.unet.model, "unet."), (objects.clip.cond_stage_model, "clip."),
                            (objects.vae.first_stage_model, "vae.")):
            for name, p in top.named_parameters():
                yield prefix + name, p


class TinyForgeSD15(TinyForgeEngine):
    """backend/diffusion_engine/sd15.py StableDiffusion, tiny."""

    is_sd1 = True
    encoder = "clip_l"

    def __init__(self, seed: int = 0, storage_dtype=torch.float32):
        ldm = TinyLatentDiffusion(seed)
        wrapped = ldm.cond_stage_model.wrapped
        self._assemble(ldm.model.diffusion_model, torch.cumprod(1 - ldm.betas.double(), 0),
                       {self.encoder: wrapped.transformer}, {self.encoder: wrapped.tokenizer}, ldm.first_stage_model,
                       storage_dtype)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self._hidden(self.encoder, prompt)  # clip skip 1, the final layer norm (HF's last_hidden_state)


class TinyForgeSD2(TinyForgeSD15):
    """backend/diffusion_engine/sd20.py StableDiffusion2, tiny: its text encoder is ``clip_h`` (OpenCLIP ViT-H as a
    Hugging Face CLIPTextModel), v-prediction (SD 2.x 768-v)."""

    is_sd1, is_sd2 = False, True
    encoder = "clip_h"
    prediction_type = "v_prediction"


class TinyForgeSDXL(TinyForgeEngine):
    """backend/diffusion_engine/sdxl.py StableDiffusionXL, tiny: both text encoders HF CLIP (penultimate hidden
    states side by side; the second's projected pooled output), the vector = pooled + six Timestep embeddings of the
    generation's height, width, crop top, crop left, target height, width (crop from the settings: 0, 0)."""

    is_sdxl = True

    def __init__(self, seed: int = 0):
        from sgm_model import OUTDIM, TinySgmDiffusion

        sgm = TinySgmDiffusion(seed)
        te1, te2 = (e.wrapped for e in sgm.conditioner.embedders[:2])
        self._assemble(sgm.model.diffusion_model, sgm.alphas_cumprod.double(), {"clip_l": te1.transformer,
                       "clip_g": te2.model}, {"clip_l": te1.tokenizer, "clip_g": te2.tokenizer},
                       sgm.first_stage_model, torch.float32)
        self.embedder = Timestep(OUTDIM)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        cond_l = self._hidden("clip_l", prompt, layer=-2).hidden_states[-2]
        out_g = self._hidden("clip_g", prompt, layer=-2)
        cond_g, pooled = out_g.hidden_states[-2], out_g.text_embeds
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        out = [self.embedder(torch.Tensor([v])) for v in (height, width, 0, 0, height, width)]
        flat = torch.flatten(torch.cat(out)).unsqueeze(dim=0).repeat(pooled.shape[0], 1).to(pooled)
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": torch.cat([pooled, flat], dim=1)}
