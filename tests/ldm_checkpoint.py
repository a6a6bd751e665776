"""Test helper: write a diffusers SD 1.x model as an original (LDM / A1111) single-file checkpoint.

The inverse of diffusers' single-file conversion, after the tables of diffusers' public script
``scripts/convert_diffusers_to_original_stable_diffusion.py``, generalised to any block count and
``layers_per_block`` so it covers the tiny test model.
"""

from __future__ import annotations

from safetensors.torch import save_file

RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
          ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _unet_prefixes(cfg) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for the blocks of a UNet2DConditionModel config."""
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    pairs = []
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(per):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.0."))
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.1."))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
    for i, kind in enumerate(cfg["up_block_types"]):
        attn = kind.startswith("CrossAttn")
        for j in range(per + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(per + 1) * i + j}.0."))
            if attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(per + 1) * i + j}.1."))
        if i < n - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{2 if attn else 1}."))
    pairs += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
              ("mid_block.resnets.1.", "middle_block.2.")]
    return pairs


def unet_to_ldm(unet) -> dict:
    pairs = _unet_prefixes(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        new = key
        for hf, sd in UNET_TOP.items():
            if key.startswith(hf + "."):
                new = sd + key[len(hf):]
        for hf, sd in pairs:
            if key.startswith(hf):
                new = sd + key[len(hf):]
                if "resnets" in hf:
                    for sd_part, hf_part in RESNET:
                        new = new.replace(hf_part, sd_part)
                break
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(vae) -> dict:
    n = len(vae.config.block_out_channels)
    pairs = [("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
             ("mid_block.attentions.0.", "mid.attn_1."), ("conv_norm_out.", "norm_out.")]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")]
        if i < n - 1:
            pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                      (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out.",
            "query.": "q.", "key.": "k.", "value.": "v.", "proj_attn.": "proj_out."}
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_shortcut", "nin_shortcut")
        for hf, sd in pairs:
            new = new.replace(hf, sd)
        if ".mid.attn_1." in new:
            for hf, sd in attn.items():
                new = new.replace(".mid.attn_1." + hf, ".mid.attn_1." + sd)
            if new.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention projections are 1×1 convolutions
        out["first_stage_model." + new] = value
    return out


def write_ldm_checkpoint(components: dict, path) -> None:
    """``components``: unet, vae, text_encoder (diffusers / transformers modules) → one safetensors file."""
    tensors = {**unet_to_ldm(components["unet"]), **vae_to_ldm(components["vae"])}
    for key, value in components["text_encoder"].state_dict().items():
        # transformers >= 5.6 dropped CLIPTextModel's "text_model." level; checkpoints always have it
        key = key if key.startswith("text_model.") else "text_model." + key
        tensors["cond_stage_model.transformer." + key] = value
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
