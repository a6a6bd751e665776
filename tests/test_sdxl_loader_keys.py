"""Every module of our SDXL kohya file is applied by AUTOMATIC1111's, Forge's and ComfyUI's loaders (issue 16).

Our side, the trainer's own code path: SDXL base's real shapes (bench/sdxl_shapes.py: the UNet, CLIP ViT-L and
OpenCLIP ViT-bigG) built on the meta device (nothing allocated), an ``SdxlBackend`` over them, LoRA layers put
in by ``engine.run.add_lora_layers`` and the file written by ``engine.outputs.export_lora`` (which names the
modules through the backend's ``kohya_prefixes`` and ``kohya_module_path``, i.e. ``LdmUnetNames``). Each LoRA's
down weight carries its layer's number, so the file tells which trained layer every key came from.

The loaders' side is written here from their source and never from our naming:
- the layers they match against: the LDM/sgm UNet's module tree (stable-diffusion-sdkit's ldm ``UNetModel``
  built with SDXL's config on the meta device, see ``ldm_sdxl_unet``) and the text encoders as the SDXL
  single-file checkpoint lays them out (``checkpoint_text_weights``: A1111 keeps that layout, Forge and ComfyUI
  convert the second encoder from open_clip's to Hugging Face's);
- AUTOMATIC1111 v1.10.1 (82a973c0) ``extensions-builtin/Lora``: networks.py ``load_network`` (its lookups),
  ``convert_diffusers_name_to_compvis``, ``assign_network_names_to_compvis_modules``, ``network_apply_weights``
  (the MultiheadAttention rule), network_lora.py ``NetworkModuleLora.create_module`` (the layer types it
  patches), network.py ``NetworkOnDisk.detect_version``;
- ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet``/``model_lora_keys_clip``/``load_lora`` (41444b52),
  ``comfy/utils.py`` ``unet_to_diffusers``/``transformers_convert``; Forge (dfdcbab6) vendors the same in
  ``packages_3rdparty/comfyui_lora_collection`` and calls it from ``extensions-builtin/sd_forge_lora/networks.py``
  ``load_lora_for_models`` (network.py ``detect_version`` for the family).
"Applied" means: the loader finds a layer for the key, of a type it patches, with the LoRA's shapes, and it is
the layer the LoRA was trained on (ComfyUI's diffusers→LDM map for the UNet; the checkpoint conversions for the
text encoders). A key that is not applied fails the test, named. The one module kind of the file no trained layer
is behind: the zero modules the exporter adds so that A1111 applies bigG's attention (it needs q, k, v and
out_proj together); they must be applied too, and change nothing.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple
from unittest import mock

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "bench"
RANK = 1  # the names do not depend on the rank; 1 keeps the file small


def _sdxl_shapes():
    spec = importlib.util.spec_from_file_location("sdxl_shapes", BENCH / "sdxl_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the layers the loaders see


class Layer(NamedTuple):
    kind: str  # linear | conv | mha (open_clip's fused attention) | mha_out (its out_proj) | other
    shape: tuple  # the weight's (mha: in_proj_weight's)


def _layer(module: nn.Module) -> Layer:
    kinds = {nn.Linear: "linear", nn.Conv2d: "conv"}  # A1111 compares type() exactly; ldm uses these classes
    kind = kinds.get(type(module), "other")
    return Layer(kind, tuple(module.weight.shape) if kind != "other" else ())


def ldm_sdxl_unet() -> nn.Module:
    """sgm's SDXL UNet tree (A1111 runs SDXL on sgm's ``UNetModel``; Forge's backend/nn/unet.py and ComfyUI's
    openaimodel keep its names), built with stable-diffusion-sdkit's ldm ``UNetModel`` on the meta device.

    sdkit's ldm (SD 2's code) lacks two things of sgm's constructor (sgm/modules/diffusionmodules/openaimodel.py):
    a transformer depth per level (SDXL: ``transformer_depth: [0, 2, 10]``, middle 10; sdkit takes one int) and
    ``num_classes: sequential`` with ``adm_in_channels: 2816`` (sdkit raises ValueError). So while the tree is
    built each SpatialTransformer gets its level's depth by its width (640: 2, 1280: 10), and ``label_emb`` is then
    set as sgm sets it. Everything else is SDXL's config as sgm takes it (configs/inference/sd_xl_base.yaml)."""
    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel",
                                      reason="the LDM UNet: pip install --no-deps stable-diffusion-sdkit==2.1.5")
    spatial_transformer = openaimodel.SpatialTransformer
    depth_by_width = {640: 2, 1280: 10}

    def with_sdxl_depth(channels, *args, context_dim, **kwargs):
        depth = depth_by_width[channels]
        return spatial_transformer(channels, *args, **{**kwargs, "depth": depth, "context_dim": [context_dim] * depth})

    with mock.patch.object(openaimodel, "SpatialTransformer", with_sdxl_depth), torch.device("meta"):
        unet = openaimodel.UNetModel(
            image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
            num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
            use_linear_in_transformer=True, transformer_depth=1, context_dim=2048, legacy=False)
        unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(2816, 1280), nn.SiLU(), nn.Linear(1280, 1280)))
    return unet


def checkpoint_text_weights() -> dict[str, tuple]:
    """The text encoders' weights in an SDXL single-file checkpoint (sgm's ``conditioner.embedders``), by shape:
    0 = CLIP ViT-L in Hugging Face's layout (12 layers, 768 wide), 1 = OpenCLIP ViT-bigG in open_clip's (32
    resblocks, 1280 wide, q/k/v fused in ``attn.in_proj_weight``; ``text_projection`` a bare parameter, x @ P).
    Biases left out: no LoRA names them."""
    weights = {}
    te1 = "conditioner.embedders.0.transformer.text_model."
    weights |= {te1 + "embeddings.token_embedding.weight": (49408, 768),
                te1 + "embeddings.position_embedding.weight": (77, 768), te1 + "final_layer_norm.weight": (768,)}
    for i in range(12):
        layer = f"{te1}encoder.layers.{i}."
        weights |= {f"{layer}self_attn.{p}_proj.weight": (768, 768) for p in ("q", "k", "v", "out")}
        weights |= {layer + "mlp.fc1.weight": (3072, 768), layer + "mlp.fc2.weight": (768, 3072),
                    layer + "layer_norm1.weight": (768,), layer + "layer_norm2.weight": (768,)}
    te2 = "conditioner.embedders.1.model."
    weights |= {te2 + "token_embedding.weight": (49408, 1280), te2 + "positional_embedding": (77, 1280),
                te2 + "text_projection": (1280, 1280), te2 + "ln_final.weight": (1280,), te2 + "logit_scale": ()}
    for i in range(32):
        block = f"{te2}transformer.resblocks.{i}."
        weights |= {block + "attn.in_proj_weight": (3840, 1280), block + "attn.out_proj.weight": (1280, 1280),
                    block + "mlp.c_fc.weight": (5120, 1280), block + "mlp.c_proj.weight": (1280, 5120),
                    block + "ln_1.weight": (1280,), block + "ln_2.weight": (1280,)}
    return weights


def a1111_text_layers(weights: dict[str, tuple]) -> dict[str, Layer]:
    """The text encoders' layers by their path under each embedder's ``wrapped`` (sgm's FrozenCLIPEmbedder:
    ``transformer.…``; FrozenOpenCLIPEmbedder2: ``model.…``), keyed by embedder index."""
    layers = {}
    for key, shape in weights.items():
        index, _, path = key.removeprefix("conditioner.embedders.").partition(".")
        if path.endswith(".attn.in_proj_weight"):  # nn.MultiheadAttention
            layers[(int(index), path.removesuffix(".in_proj_weight"))] = Layer("mha", shape)
        elif path.endswith(".attn.out_proj.weight"):  # used by MultiheadAttention.forward, never called itself
            layers[(int(index), path.removesuffix(".weight"))] = Layer("mha_out", shape)
        elif path.endswith(".weight"):
            linear = len(shape) == 2 and "embedding" not in path
            layers[(int(index), path.removesuffix(".weight"))] = Layer("linear" if linear else "other", shape)
    return layers


def a1111_layers(unet: nn.Module) -> dict[str, Layer]:
    """networks.py ``assign_network_names_to_compvis_modules`` for an SDXL model: f"{i}_{name}" for the modules of
    each text embedder's ``wrapped``, then those of ``sd_model.model`` (sgm's OpenAIWrapper: ``diffusion_model.…``),
    '.' → '_'."""
    layers = {f"{i}_{path.replace('.', '_')}": layer for (i, path), layer in
              a1111_text_layers(checkpoint_text_weights()).items()}
    for name, module in unet.named_modules(prefix="diffusion_model"):
        layers[name.replace(".", "_")] = _layer(module)
    return layers


# ComfyUI comfy/utils.py transformers_convert (called by clip_text_transformers_convert for SDXL's clip_g): the
# open_clip resblock names → Hugging Face's, and attn.in_proj_weight split in three
OPEN_CLIP_TO_HF = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
IN_PROJ_SPLIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight"}


def comfy_clip_weights(weights: dict[str, tuple]) -> dict[str, tuple]:
    """The CLIP state dict Forge and ComfyUI have for SDXL (comfy/supported_models.py ``SDXL.process_clip_state_dict``:
    embedders.0.transformer → ``clip_l.transformer.``, embedders.1.model → ``clip_g.`` then
    ``clip_text_transformers_convert(sd, "clip_g.", "clip_g.transformer.")``; Forge's IntegratedCLIP holds the same
    names: ``clip_g.transformer.text_model.…`` and a ``text_projection`` Linear)."""
    out = {}
    for key, shape in weights.items():
        if key.startswith("conditioner.embedders.0.transformer."):
            out["clip_l.transformer." + key.removeprefix("conditioner.embedders.0.transformer.")] = shape
            continue
        path = key.removeprefix("conditioner.embedders.1.model.")
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+?)[._]weight$", path)
        layer = f"clip_g.transformer.text_model.encoder.layers.{m[1]}." if m else ""
        if m and m[2] in OPEN_CLIP_TO_HF:
            out[f"{layer}{OPEN_CLIP_TO_HF[m[2]]}.weight"] = shape
        elif m and m[2] == "attn.in_proj":
            out |= {f"{layer}{part}.weight": (shape[0] // 3, shape[1]) for part in IN_PROJ_SPLIT}
        elif path == "text_projection":  # x @ P becomes a Linear: its weight is P transposed
            out["clip_g.transformer.text_projection.weight"] = shape[::-1]
        elif path in OPEN_CLIP_TOP:
            out["clip_g.transformer.text_model." + OPEN_CLIP_TOP[path]] = shape
    return out


# ---------------------------------------------------------------- AUTOMATIC1111 v1.10.1

A1111_SUFFIX_CONVERSION = {"attentions": {}, "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3",
                                                         "norm1": "in_layers_0", "norm2": "out_layers_0",
                                                         "time_emb_proj": "emb_layers_1",
                                                         "conv_shortcut": "skip_connection"}}
RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def a1111_convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """networks.py ``convert_diffusers_name_to_compvis``, line for line."""
    def match(regex):
        r = re.match(regex, key)
        return [int(x) if re.match(r"\d+", x) else x for x in r.groups()] if r else None

    if m := match(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if m := match(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_SUFFIX_CONVERSION.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            if "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def a1111_find_layer(name: str, layers: dict[str, Layer]) -> tuple[str, str] | None:
    """``load_network``'s lookups for one key (its part before the first '.'): (the key it files the weights
    under, the name of the layer found), or None (``keys_failed_to_match``, logged at debug level only).
    No ``diffusers_weight_map`` on an SDXL model (only SD3 has one); the OFT branches need oft_ keys."""
    is_sd2 = "model_transformer_resblocks" in layers
    key = a1111_convert_diffusers_name_to_compvis(name, is_sd2)
    found = key if key in layers else None
    if found is None and (m := RE_X_PROJ.match(key)):
        found = m.group(1) if m.group(1) in layers else None
    # "SDXL loras seem to already have correct compvis keys, so only need to replace "lora_unet" with ..."
    if found is None and "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        found = key if key in layers else None
    elif found is None and "lora_te1_text_model" in name:
        key = name.replace("lora_te1_text_model", "0_transformer_text_model")
        found = key if key in layers else None
        if found is None:  # "some SD1 Loras also have correct compvis keys"
            key = name.replace("lora_te1_text_model", "transformer_text_model")
            found = key if key in layers else None
    return (key, found) if found is not None else None


def fits(up: tuple, down: tuple, weight: tuple) -> bool:
    """up @ down has the layer's weight shape: [out, r(, 1, 1)] @ [r, in(, kh, kw)] against [out, in(, kh, kw)]."""
    return up[0] == weight[0] and up[1] == down[0] and tuple(down[1:]) == tuple(weight[1:])


def a1111_apply(tensors: dict[str, torch.Tensor], layers: dict[str, Layer]) -> tuple[dict, dict]:
    """What A1111 does with the file on an SDXL model: ({module name: the layer it changes}, {module name: why
    not}). ``load_network`` files each key's weights under the key it matched; network_lora's ``create_module``
    takes lora_up + lora_down for a Linear, NonDynamicallyQuantizableLinear or MultiheadAttention (linear) or a
    Conv2d layer and raises on any other type; ``network_apply_weights`` then changes a Linear/Conv2d whose
    network_layer_name is the key, and a MultiheadAttention (open_clip's attention, q/k/v fused in in_proj_weight)
    only when ``<name>_q_proj``, ``_k_proj``, ``_v_proj`` AND ``_out_proj`` are all there (out_proj's own forward is
    never run: MultiheadAttention.forward reads its weight)."""
    weights: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        weights.setdefault(name, {})[part] = tuple(tensor.shape)
    net, why = {}, {}
    for name, parts in weights.items():
        found = a1111_find_layer(name, layers)
        if found is None:
            why[name] = "no layer of the model has this name (load_network: keys_failed_to_match)"
        elif not {"lora_up.weight", "lora_down.weight"} <= set(parts):
            why[name] = "not a LoRA module (no lora_up/lora_down): load_network raises"
        elif layers[found[1]].kind not in ("linear", "conv", "mha", "mha_out"):
            why[name] = f"matched {found[1]}, a layer of a type it cannot patch: load_network raises"
        else:
            net[found[0]] = (name, found[1], parts)
    applied = {}
    for key, (name, layer_name, parts) in net.items():
        layer = layers[layer_name]
        if layer.kind in ("linear", "conv") and key == layer_name:
            target, shape = layer_name, layer.shape
        elif layer.kind in ("mha", "mha_out"):
            attention = key.rsplit("_", 2)[0]  # …_attn_q_proj → …_attn
            if not all(f"{attention}_{p}_proj" in net for p in ("q", "k", "v", "out")):
                why[name] = f"{attention}: A1111 changes this attention only with q, k, v and out_proj all present"
                continue
            part = key.rsplit("_", 2)[1]
            target = f"{attention}.{'out_proj' if part == 'out' else f'in_proj[{part}]'}"
            shape = layers[f"{attention}_out_proj"].shape if part == "out" else (layer.shape[0] // 3, layer.shape[1])
        else:
            why[name] = f"matched {layer_name} under another name ({key}): never applied"
            continue
        if fits(parts["lora_up.weight"], parts["lora_down.weight"], shape):
            applied[name] = target
        else:
            why[name] = f"{target}: weight {shape}, LoRA up {parts['lora_up.weight']} down {parts['lora_down.weight']}"
    return applied, why


def a1111_detect_version(metadata: dict) -> str:
    """network.py ``NetworkOnDisk.detect_version`` (the Lora tab hides a LoRA of another family)."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


# ---------------------------------------------------------------- ComfyUI and Forge

# comfy/utils.py: the names inside a transformer / ResBlock, diffusers → LDM
UNET_MAP_ATTENTIONS = {"proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm.weight", "norm.bias"}
TRANSFORMER_BLOCKS = {"norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
                      "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight",
                      "attn1.to_out.0.bias", "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight",
                      "attn2.to_out.0.weight", "attn2.to_out.0.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias",
                      "ff.net.2.weight", "ff.net.2.bias"}
UNET_MAP_RESNET = {"in_layers.2.weight": "conv1.weight", "in_layers.2.bias": "conv1.bias",
                   "emb_layers.1.weight": "time_emb_proj.weight", "emb_layers.1.bias": "time_emb_proj.bias",
                   "out_layers.3.weight": "conv2.weight", "out_layers.3.bias": "conv2.bias",
                   "skip_connection.weight": "conv_shortcut.weight", "skip_connection.bias": "conv_shortcut.bias",
                   "in_layers.0.weight": "norm1.weight", "in_layers.0.bias": "norm1.bias",
                   "out_layers.0.weight": "norm2.weight", "out_layers.0.bias": "norm2.bias"}
UNET_MAP_BASIC = {("label_emb.0.0.weight", "class_embedding.linear_1.weight"),
                  ("label_emb.0.0.bias", "class_embedding.linear_1.bias"),
                  ("label_emb.0.2.weight", "class_embedding.linear_2.weight"),
                  ("label_emb.0.2.bias", "class_embedding.linear_2.bias"),
                  ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
                  ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
                  ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
                  ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
                  ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
                  ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
                  ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
                  ("time_embed.0.weight", "time_embedding.linear_1.weight"),
                  ("time_embed.0.bias", "time_embedding.linear_1.bias"),
                  ("time_embed.2.weight", "time_embedding.linear_2.weight"),
                  ("time_embed.2.bias", "time_embedding.linear_2.bias")}
# what comfy/model_detection.py detect_unet_config reads from an SDXL checkpoint (transformer depth per ResBlock)
COMFY_SDXL_UNET_CONFIG = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                          "transformer_depth": [0, 0, 2, 2, 10, 10],
                          "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}


def unet_to_diffusers(unet_config: dict) -> dict[str, str]:
    """comfy/utils.py ``unet_to_diffusers``, line for line: diffusers weight name → LDM weight name."""
    num_res_blocks = unet_config["num_res_blocks"]
    transformer_depth = unet_config["transformer_depth"][:]
    transformer_depth_output = unet_config["transformer_depth_output"][:]
    num_blocks = len(unet_config["channel_mult"])
    out = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for b in UNET_MAP_RESNET:
                out[f"down_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"input_blocks.{n}.0.{b}"
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in UNET_MAP_ATTENTIONS:
                    out[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
            n += 1
        for k in ("weight", "bias"):
            out[f"down_blocks.{x}.downsamplers.0.conv.{k}"] = f"input_blocks.{n}.0.op.{k}"
    for b in UNET_MAP_ATTENTIONS:
        out[f"mid_block.attentions.0.{b}"] = f"middle_block.1.{b}"
    for t in range(unet_config["transformer_depth_middle"]):
        for b in TRANSFORMER_BLOCKS:
            out[f"mid_block.attentions.0.transformer_blocks.{t}.{b}"] = f"middle_block.1.transformer_blocks.{t}.{b}"
    for i, n in enumerate([0, 2]):
        for b in UNET_MAP_RESNET:
            out[f"mid_block.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"middle_block.{n}.{b}"
    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        length = num_res_blocks[x] + 1
        for i in range(length):
            c = 0
            for b in UNET_MAP_RESNET:
                out[f"up_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"output_blocks.{n}.0.{b}"
            c += 1
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in UNET_MAP_ATTENTIONS:
                    out[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
            if i == length - 1:
                for k in ("weight", "bias"):
                    out[f"up_blocks.{x}.upsamplers.0.conv.{k}"] = f"output_blocks.{n}.{c}.conv.{k}"
            n += 1
    for ldm, diffusers in UNET_MAP_BASIC:
        out[diffusers] = ldm
    return out


LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def comfy_unet_keys(unet_sd: dict, loader: str) -> dict[str, str]:
    """``model_lora_keys_unet`` (ComfyUI comfy/lora.py; Forge's vendored copy lacks the lora_prior_ names): LoRA
    name → the model's weight, from the UNet's state dict (``lora_unet_`` + the LDM path) and from
    ``unet_to_diffusers`` (``lora_unet_`` + the diffusers path, ``lycoris_``, ``unet.…processor.to_q``)."""
    key_map = {}
    for k in unet_sd:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{key_lora}"] = k
            if loader == "comfyui":
                key_map[f"lora_prior_unet_{key_lora}"] = k
            key_map[k[:-len(".weight")]] = k
        elif k.startswith("diffusion_model."):
            key_map[k] = k
    for k, ldm in unet_to_diffusers(COMFY_SDXL_UNET_CONFIG).items():
        if k.endswith(".weight"):
            unet_key = f"diffusion_model.{ldm}"
            key_lora = k[:-len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{key_lora}"] = unet_key
            key_map[f"lycoris_{key_lora}"] = unet_key
            for p in ("", "unet."):
                diffusers_lora_key = f"{p}{k[:-len('.weight')].replace('.to_', '.processor.to_')}"
                if diffusers_lora_key.endswith(".to_out.0"):
                    diffusers_lora_key = diffusers_lora_key[:-2]
                key_map[diffusers_lora_key] = unet_key
    return key_map


def comfy_clip_keys(clip_sd: dict, loader: str) -> dict[str, str]:
    """``model_lora_keys_clip`` for SDXL's clip_l + clip_g (the clip_h and t5xxl branches find nothing here)."""
    key_map = {f"text_encoders.{k[:-len('.weight')]}": k for k in clip_sd if k.endswith(".weight")} \
        if loader == "comfyui" else {}
    clip_l_present = False
    for b in range(32):
        for c in LORA_CLIP_MAP:
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in clip_sd:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k  # SDXL base
                clip_l_present = True
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in clip_sd:
                if clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k  # SDXL base
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
                    key_map[f"lora_prior_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
    if (k := "clip_g.transformer.text_projection.weight") in clip_sd:
        key_map["lora_prior_te_text_projection" if loader == "comfyui" else "text_encoder.text_projection"] = k
        key_map["lora_te2_text_projection"] = k
    if (k := "clip_l.transformer.text_projection.weight") in clip_sd:
        key_map["lora_te1_text_projection"] = k
    return key_map


def comfy_load_lora(tensors: dict, to_load: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """``load_lora``'s kohya branch: {LoRA name: the weight it patches} for each name with ``.lora_up.weight`` (and
    its ``.lora_down.weight``, ``.alpha``), and the file's keys it did not take."""
    patches, loaded = {}, set()
    for x, target in to_load.items():
        if f"{x}.lora_up.weight" in tensors:
            patches[x] = target
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"} | ({f"{x}.alpha"} & set(tensors))
    return patches, set(tensors) - loaded


def comfy_apply(tensors: dict, model_sd: dict, loader: str) -> tuple[dict, dict]:
    """What ComfyUI (``load_lora_for_models``: one key map, UNet's then CLIP's) or Forge (sd_forge_lora
    ``load_lora_for_models``: the UNet's map first, then the CLIP's on what is left; over 12 keys left and the
    whole LoRA is refused) does with the file: ({module name: the weight it patches}, {module name: why not})."""
    unet_keys = comfy_unet_keys(model_sd, loader)
    clip_keys = comfy_clip_keys(model_sd, loader)
    if loader == "comfyui":
        patches, left = comfy_load_lora(tensors, {**unet_keys, **clip_keys})
    else:
        patches, left = comfy_load_lora(tensors, unet_keys)
        clip_patches, left = comfy_load_lora({k: tensors[k] for k in left}, clip_keys)
        patches |= clip_patches
    why = {k.partition(".")[0]: "no key of the model's maps takes it (left unmatched)" for k in left}
    applied = {}
    for name, target in patches.items():
        up, down = tuple(tensors[f"{name}.lora_up.weight"].shape), tuple(tensors[f"{name}.lora_down.weight"].shape)
        if target in model_sd and fits(up, down, model_sd[target]):
            applied[name] = target
        else:
            why[name] = f"{target}: weight {model_sd.get(target)}, LoRA up {up} down {down}"
    return applied, why


def forge_detect_version(metadata: dict) -> str:
    """Forge extensions-builtin/sd_forge_lora/network.py ``NetworkOnDisk.detect_version``."""
    if str(metadata.get("modelspec.implementation", "")) == "https://github.com/black-forest-labs/flux":
        return "Flux"
    if str(metadata.get("modelspec.architecture", "")) == "flux-1-dev/lora":
        return "Flux"
    if str(metadata.get("modelspec.architecture", "")) == "stable-diffusion-xl-v1-base/lora":
        return "SDXL"
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    if str(metadata.get("modelspec.architecture", "")) == "stable-diffusion-v1/lora":
        return "SD1"
    return "Unknown"


# ---------------------------------------------------------------- our side: the trainer's own code path

KOHYA_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
KOHYA_TE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# with the ResBlocks' convs and time projections, the down/upsamplers, conv_in/out, time and added embeddings:
# every Linear and Conv2d of the UNet
EVERY_UNET = [*KOHYA_UNET, "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out",
              "linear_1", "linear_2"]
TARGET_SETS = {
    "defaults": {},  # the config's own: to_q/k/v/to_out.0, and q/k/v/out_proj in each text encoder
    # kohya's SDXL set (Linear and 1×1 conv in the transformers; q/k/v/out_proj, fc1, fc2) and the rest of the UNet
    "every layer": {"target_modules": EVERY_UNET, "text_encoder_target_modules": KOHYA_TE},
    # A1111 changes bigG's attention only with all four projections: the file gets zero modules for k and out
    "q and v": {"text_encoder_target_modules": ["q_proj", "v_proj"]},
}


def number_lora_layers(modules: dict[str, nn.Module]) -> dict[int, tuple[str, str]]:
    """Real weights for every LoRA layer (made on the meta device): down = the layer's number, up = 0.
    Returns number → (component, the adapted layer's path)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lora_trainer.engine.lora import ADAPTER

    sources = {}
    for component, module in modules.items():
        for path, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer):
                number = len(sources) + 1
                for part, value in ((layer.lora_A[ADAPTER], number), (layer.lora_B[ADAPTER], 0)):
                    part.weight = nn.Parameter(torch.full(part.weight.shape, float(value)))
                sources[number] = (component, path)
    return sources


def export_sdxl_lora(backend, folder: Path, training: dict):
    """The kohya file the trainer writes for SDXL with these training keys (both text encoders trained): its
    tensors, its metadata, and which layer each LoRA number was trained on."""
    from lora_trainer.config import config_from_dict, with_family_defaults
    from lora_trainer.data.dataset import DatasetScan
    from lora_trainer.engine.batches import Plan
    from lora_trainer.engine.lora import remove_lora
    from lora_trainer.engine.outputs import export_lora
    from lora_trainer.engine.run import add_lora_layers
    from lora_trainer.export.kohya import read_kohya_lora

    cfg = config_from_dict({
        "data": {"train_data_dir": str(folder)},
        "training": {"lora_rank": RANK, "train_text_encoder": True, "train_text_encoder_2": True, **training},
        "output": {"output_name": "sdxl_lora", "save_precision": "fp32", "save_diffusers_format": False}})
    cfg, _ = with_family_defaults(cfg, backend.family)
    modules, _ = add_lora_layers(cfg, backend)
    try:
        sources = number_lora_layers(modules)
        scan = DatasetScan(Path(folder))  # (no image: the file's keys are what is looked at)
        plan = Plan(num_images=1, batch_size=1, grad_accum=1, total_steps=1)
        path, _ = export_lora(folder, cfg, backend, modules, scan, time.time(), 1, plan)
    finally:
        for module in modules.values():
            remove_lora(module)
            vars(module).pop("peft_config", None)  # peft's record of the adapter, so the next set starts clean
    tensors, metadata = read_kohya_lora(path)
    return tensors, metadata, sources


DIFFUSERS_TO_LDM = unet_to_diffusers(COMFY_SDXL_UNET_CONFIG)
HF_TO_OPEN_CLIP = {hf: open_clip for open_clip, hf in OPEN_CLIP_TO_HF.items()}


def trained_on(loader: str, component: str, path: str) -> str:
    """The layer a LoRA trained at ``path`` of ``component`` must change, in the loader's terms. The UNet: by
    ComfyUI's diffusers → LDM map; the text encoders: by the checkpoint's layouts (A1111 keeps bigG's open_clip
    one: its attention is one MultiheadAttention, q/k/v thirds of in_proj_weight)."""
    a1111 = loader == "a1111"
    if component == "unet":
        ldm = DIFFUSERS_TO_LDM[f"{path}.weight"].removesuffix(".weight")
        return f"diffusion_model_{ldm.replace('.', '_')}" if a1111 else f"diffusion_model.{ldm}.weight"
    # transformers >= 5 builds CLIPTextModel without its text_model level; every checkpoint has it
    hf = path if path.startswith("text_model.") or path == "text_projection" else f"text_model.{path}"
    if component == "text_encoder":
        return f"0_transformer_{hf.replace('.', '_')}" if a1111 else f"clip_l.transformer.{hf}.weight"
    if not a1111:
        return f"clip_g.transformer.{hf}.weight"
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", hf)
    if not m:
        return f"(no open_clip layer for {hf})"
    block = f"1_model_transformer_resblocks_{m[1]}_"
    if m[2] in IN_PROJ_SPLIT:
        return f"{block}attn.in_proj[{m[2].removeprefix('self_attn.')[0]}]"
    if m[2] == "self_attn.out_proj":
        return f"{block}attn.out_proj"
    return block + HF_TO_OPEN_CLIP[m[2]].replace(".", "_")


def not_applied(tensors: dict, sources: dict, loaders: dict) -> list[str]:
    """Each module of the file that a loader does not apply, or applies to another layer than it was trained on."""
    names = sorted({key.partition(".")[0] for key in tensors})
    problems = []
    for loader, apply in loaders.items():
        applied, why = apply(tensors)
        for name in names:
            number = int(tensors[f"{name}.lora_down.weight"].flatten()[0])
            component, path = sources.get(number, ("(a zero module the exporter added)", ""))
            expected = trained_on(loader, component, path) if number else applied.get(name)
            if name not in applied:
                problems.append(f"{loader}: {name} ({component} {path}): {why.get(name, 'not applied')}")
            elif applied[name] != expected:
                problems.append(f"{loader}: {name} ({component} {path}) changes {applied[name]}, not {expected}")
    return problems


@pytest.fixture(scope="module")
def backend():
    """An SdxlBackend over SDXL base's real shapes, on the meta device."""
    from diffusers import AutoencoderKL

    from lora_trainer.models.sdxl_backend import SdxlBackend

    shapes = _sdxl_shapes()
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(shapes.VAE)
    scheduler = SimpleNamespace(config=shapes.SCHEDULER)
    pipe = SimpleNamespace(vae=vae, tokenizer=None, tokenizer_2=None, scheduler=scheduler,
                           **shapes.build_sdxl_models("meta"))
    return SdxlBackend(pipe, "sdxl-shape", torch.device("meta"), torch.float32)


@pytest.fixture(scope="module")
def exported(backend, tmp_path_factory):
    files = {}

    def get(name: str, training: dict | None = None):
        if name not in files:
            files[name] = export_sdxl_lora(backend, tmp_path_factory.mktemp("lora"), TARGET_SETS.get(name, training))
        return files[name]

    return get


@pytest.fixture(scope="module")
def ldm_unet():
    return ldm_sdxl_unet()


@pytest.fixture(scope="module")
def loaders(ldm_unet):
    """Each loader as a function: the file's tensors → ({module name: the layer it changes}, {module name: why not})."""
    model_sd = {f"diffusion_model.{k}": tuple(v.shape) for k, v in ldm_unet.state_dict().items()}
    model_sd |= comfy_clip_weights(checkpoint_text_weights())
    layers = a1111_layers(ldm_unet)
    return {"a1111": lambda tensors: a1111_apply(tensors, layers),
            "forge": lambda tensors: comfy_apply(tensors, model_sd, "forge"),
            "comfyui": lambda tensors: comfy_apply(tensors, model_sd, "comfyui")}


# ---------------------------------------------------------------- the tests


def test_both_sides_have_sdxls_real_shapes(backend, ldm_unet):
    # SDXL base 1.0's published counts: UNet 2,567,463,684; CLIP ViT-L 123,060,480; bigG + projection 694,659,840
    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(backend.unet) == count(ldm_unet) == 2_567_463_684
    assert count(backend.text_encoder) == 123_060_480 and count(backend.text_encoder_2) == 694_659_840
    assert all(p.device.type == "meta" for m in (backend.unet, ldm_unet) for p in m.parameters())


@pytest.mark.parametrize("target_set", list(TARGET_SETS))
def test_every_module_of_the_file_is_applied_by_every_loader(target_set, backend, exported, loaders):
    tensors, _, sources = exported(target_set)
    names = {key.partition(".")[0] for key in tensors}
    # one module in the file per trained layer, each whole; any other is a zero module (up = 0)
    assert set(tensors) == {f"{n}.{part}" for n in names for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    trained = {n for n in names if tensors[f"{n}.lora_down.weight"].flatten()[0] != 0}
    assert len(trained) == len(sources) and all(not tensors[f"{n}.lora_up.weight"].any() for n in names - trained)
    assert (names - trained) == ({f"lora_te2_text_model_encoder_layers_{i}_self_attn_{p}_proj"
                                  for i in range(32) for p in ("k", "out")}
                                 | {f"lora_te1_text_model_encoder_layers_{i}_self_attn_out_proj" for i in range(12)}
                                 if target_set == "q and v" else set())  # (te1's out_proj: for diffusers' loader)
    assert {c for c, _ in sources.values()} == {"unet", "text_encoder", "text_encoder_2"}
    if target_set == "every layer":
        every = [n for n, m in backend.unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
        assert sum(c == "unet" for c, _ in sources.values()) == len(every) == 794
    problems = not_applied(tensors, sources, loaders)
    assert not problems, (f"{len(problems)} (module, loader) pairs not applied as trained, of {len(names)} modules × "
                          f"{len(loaders)} loaders:\n" + "\n".join(problems[:60]))


def test_a_file_never_mixes_the_two_unet_namings(exported):
    ldm = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_")
    for target_set in TARGET_SETS:
        tensors, _, _ = exported(target_set)
        unet = {key.partition(".")[0] for key in tensors if key.startswith("lora_unet_")}
        assert unet and not [n for n in unet if not ldm.match(n)], target_set


def test_every_webui_files_it_as_an_sdxl_lora(exported):
    _, metadata, _ = exported("defaults")
    assert metadata["ss_base_model_version"].startswith("sdxl_")  # A1111's filter
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"  # Forge's detect_version
    assert a1111_detect_version(metadata) == forge_detect_version(metadata) == "SDXL"


def rank_one(modules: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """A file of rank-1 LoRA modules (name → the layer's (out, in)), tensors on the meta device."""
    parts = {"lora_up.weight": lambda o, i: (o, 1), "lora_down.weight": lambda o, i: (1, i), "alpha": lambda o, i: ()}
    return {f"{name}.{part}": torch.empty(shape(*size), device="meta")
            for name, size in modules.items() for part, shape in parts.items()}


def test_the_loader_rules_are_no_rubber_stamp(loaders):
    """What the loaders drop, they drop here too: a diffusers-named key is converted (all three), a name with no
    layer (SDXL's first level has no attention) and a LoRA of the wrong shape are refused; bigG's attention without
    out_proj and its text_projection are refused by A1111 alone (open_clip's text_projection is a bare parameter,
    no layer; A1111 only logs it at debug level), which is why the exporter completes q/k/v/out."""
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_"
    file = rank_one({"lora_unet_down_blocks_1_attentions_0_proj_in": (640, 640),
                     "lora_unet_input_blocks_1_1_proj_in": (320, 320),
                     "lora_unet_input_blocks_7_1_proj_in": (640, 640),  # the layer is 1280 wide
                     **{f"{te2}{p}_proj": (1280, 1280) for p in ("q", "k", "v")},
                     "lora_te2_text_projection": (1280, 1280)})
    comfy = {"lora_unet_down_blocks_1_attentions_0_proj_in": "diffusion_model.input_blocks.4.1.proj_in.weight",
             **{f"{te2}{p}_proj": f"clip_g.transformer.text_model.encoder.layers.0.self_attn.{p}_proj.weight"
                for p in ("q", "k", "v")},
             "lora_te2_text_projection": "clip_g.transformer.text_projection.weight"}
    expected = {"a1111": {"lora_unet_down_blocks_1_attentions_0_proj_in": "diffusion_model_input_blocks_4_1_proj_in"},
                "forge": comfy, "comfyui": comfy}
    names = {key.partition(".")[0] for key in file}
    for loader, apply in loaders.items():
        applied, why = apply(file)
        assert applied == expected[loader], loader
        assert set(why) == names - set(applied), loader
    why = loaders["a1111"](file)[1]
    assert "q, k, v and out_proj all present" in why[f"{te2}q_proj"]
    assert "no layer" in why["lora_te2_text_projection"] and "no layer" in why["lora_unet_input_blocks_1_1_proj_in"]
    assert "weight (1280, 1280), LoRA up (640, 1)" in why["lora_unet_input_blocks_7_1_proj_in"]


def test_the_exporter_completes_bigGs_attention_with_zero_modules():
    from lora_trainer.export.kohya import peft_to_kohya

    layer = "text_model.encoder.layers.3.self_attn"
    state = {f"{layer}.q_proj.lora_A.weight": torch.ones(2, 8), f"{layer}.q_proj.lora_B.weight": torch.ones(8, 2),
             f"{layer}.v_proj.lora_A.weight": torch.ones(2, 8), f"{layer}.v_proj.lora_B.weight": torch.ones(8, 2),
             "text_model.encoder.layers.4.mlp.fc1.lora_A.weight": torch.ones(2, 8),
             "text_model.encoder.layers.4.mlp.fc1.lora_B.weight": torch.ones(32, 2)}
    out = peft_to_kohya(state, "lora_te2_", 1.5, dtype=torch.float16)
    name = "lora_te2_text_model_encoder_layers_3_self_attn_"
    for proj in ("k", "out"):
        assert out[f"{name}{proj}_proj.lora_down.weight"].shape == (2, 8)
        assert not out[f"{name}{proj}_proj.lora_up.weight"].any()
        assert out[f"{name}{proj}_proj.alpha"].item() == 1.5 and out[f"{name}{proj}_proj.alpha"].dtype == torch.float16
    assert len(out) == 3 * 5  # q, v, k, out and layer 4's fc1 (no attention there: nothing added)
    assert set(peft_to_kohya(state, "lora_te1_", 1.5)) == {k.replace("te2", "te1") for k in out} - {
        f"lora_te1_text_model_encoder_layers_3_self_attn_{p}_proj.{part}" for p in ("k",)
        for part in ("lora_down.weight", "lora_up.weight", "alpha")}  # the first encoder is CLIP's own in A1111 (an
    # out_proj is added for diffusers, which reads a text-encoder LoRA only where it has one)
