"""The diffusers-format LoRA (``pytorch_lora_weights.safetensors``), for ``pipe.load_lora_weights(folder)``.

The alpha trap: this file carries no alpha in older diffusers (0.30 has nowhere to put it), and
``load_lora_weights`` then takes alpha = rank (scale 1). So alpha / rank is folded into lora_B here:
the file gives the same output as the kohya file (true alpha) whatever alpha the loader assumes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lora_trainer.export.kohya import clip_text_model_path, split_peft_key
from lora_trainer.utils.fsio import write_new

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def fold_alpha(state: dict, rank: int, alpha: float, dtype: torch.dtype | None = None,
               text_encoder: bool = False, alphas: dict[str, float] | None = None) -> dict:
    """peft LoRA weights with lora_B scaled by alpha / rank, keys as ``<module>.lora_A.weight``; a module of
    ``alphas`` (path → alpha: kohya's conv_alpha) by its own alpha / its own rank (lora_B's second dimension).

    For a text encoder, paths get CLIP's ``text_model.`` level back where transformers >= 5 dropped it,
    so the file reads the same under every transformers version.
    """
    scale = float(alpha) / float(rank)
    out = {}
    for key, tensor in state.items():
        module, ab = split_peft_key(key)
        if text_encoder:
            module = clip_text_model_path(module)
        t = tensor.detach().to("cpu", torch.float32)
        if ab == "B":
            t = t * (float(alphas[module]) / t.shape[1] if alphas and module in alphas else scale)
        out[f"{module}.lora_{ab}.weight"] = t.to(dtype or tensor.dtype).contiguous()
    return out


def one_rank(state: dict) -> dict:
    """A folded state whose layers have ranks of their own (training.conv_rank), each padded with zeros to the largest
    (the same product B·A): diffusers before 0.31 reads one alpha, the most common rank, for every layer of this
    file, which would scale a layer of another rank wrongly; of one rank, every version reads scale 1, as folded."""
    ranks = {t.shape[1] for k, t in state.items() if k.endswith(".lora_B.weight")}
    if len(ranks) < 2:
        return state
    top, out = max(ranks), {}
    for key, t in state.items():
        dim = 1 if key.endswith(".lora_B.weight") else 0
        pad = list(t.shape)
        pad[dim] = top - t.shape[dim]
        out[key] = torch.cat([t, t.new_zeros(pad)], dim=dim).contiguous() if pad[dim] else t
    return out


def save_diffusers_lora(output_dir, unet_state: dict, text_encoder_state: dict | None = None, *,
                        rank: int, alpha: float, dtype: torch.dtype | None = None,
                        text_encoder_2_state: dict | None = None, unet_alphas: dict[str, float] | None = None) -> Path:
    """Write ``<output_dir>/pytorch_lora_weights.safetensors`` and return its path.

    ``unet_state`` / ``text_encoder_state`` / ``text_encoder_2_state`` (SDXL's second encoder): peft state dicts
    (``get_peft_model_state_dict``). Written by diffusers' own ``save_lora_weights`` (the SDXL pipeline's when
    there is a second encoder: its keys go under ``text_encoder_2.``, where ``StableDiffusionXLPipeline.
    load_lora_weights`` reads them), then moved into place without replacing an existing file
    (``pytorch_lora_weights_1.safetensors`` if the name is taken). ``unet_alphas``: the UNet's modules with an alpha of
    their own (``fold_alpha``'s ``alphas``).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    def folded(state, text_encoder=True):
        return one_rank(fold_alpha(state, rank, alpha, dtype, text_encoder=text_encoder,
                                   alphas=None if text_encoder else unet_alphas)) if state else None

    layers = {"unet_lora_layers": folded(unet_state, text_encoder=False),
              "text_encoder_lora_layers": folded(text_encoder_state)}
    pipeline = StableDiffusionPipeline
    if text_encoder_2_state:
        pipeline, layers["text_encoder_2_lora_layers"] = StableDiffusionXLPipeline, folded(text_encoder_2_state)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".diffusers-lora-") as tmp:
        pipeline.save_lora_weights(tmp, **layers, safe_serialization=True)
        data = (Path(tmp) / WEIGHT_NAME).read_bytes()
    return write_new(output_dir / WEIGHT_NAME, lambda p: p.write_bytes(data))
