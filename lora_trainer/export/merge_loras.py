"""Several kohya-format LoRAs merged into one LoRA (``merge --lora A:0.6 --lora B:0.4 --out AB.safetensors``, no
``--base``): the new file applies ``Σ weight · alpha / rank · up · down`` to every module, exactly, by concatenating
the ranks (module rank = the sum of the files' ranks, alpha = that rank, so the scale is 1; a rank the file's dtype
cannot hold, bf16's above 256, has its rounding taken by up: export.kohya.alpha_tensor); with ``--rank R`` each
module's sum is then cut to its best rank-R approximation by an SVD (export.resize.svd_resize, as kohya's
svd_merge_lora.py does). Linear and convolution (LoCon) modules; other types are refused by name.

The files must be for one model family (SD 1.x, SD 2.x, SDXL: from their metadata, else their keys and widths):
modules of two families would land side by side in one file that fits neither. A UNet module named the diffusers
way in one file (kohya's SD 1.x files) and the LDM way in another (ours, kohya's SDXL) is the same module: the
diffusers names are mapped to the LDM ones (the family's standard UNet layout tells how), so it is merged once.

The metadata keeps the facts the files agree on (family, v-prediction, resolution, ...), and names the family their
keys or widths tell where they do not all say it (family_metadata: the WebUI files it under SD 1.x otherwise); the
training facts of one file (steps, tags, ...) are not carried into a file that is no longer that training's; what was
merged with which weight is in ``lora_trainer_merged`` and ``ss_training_comment``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from lora_trainer.errors import LoraTrainerError
from lora_trainer.export.kohya import LdmUnetNames, alpha_tensor
from lora_trainer.export.merge import _DIFFUSERS_UNET, dtype_of, ldm_name, lora_files
from lora_trainer.export.resize import lora_out, modules_of, open_lora, svd_resize

# the metadata kept when every file says the same (what the model and the sampler need to know)
SHARED_KEYS = ("ss_network_module", "ss_base_model_version", "ss_v2", "ss_v_parameterization",
               "ss_zero_terminal_snr", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_resolution",
               "ss_clip_skip", "ss_network_train_unet_only")
SD1, SD2, SDXL = "SD 1.x", "SD 2.x", "SDXL"
# the families' UNet layouts, for mapping diffusers names to LDM ones (export.kohya.LdmUnetNames)
_LAYOUTS = {SD1: {"layers_per_block": 2, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
            SDXL: {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]}}
_LAYOUTS[SD2] = _LAYOUTS[SD1]
_CROSS_WIDTHS = {768: SD1, 1024: SD2, 2048: SDXL}  # the UNet's cross-attention (text) width
_TE_WIDTHS = {768: SD1, 1024: SD2}  # lora_te_'s hidden width
_LDM_UNET = re.compile(r"^lora_unet_(?:input_blocks|middle_block|output_blocks)_")
_VERSIONS = {SD1: "sd_v1", SD2: "sd_v2", SDXL: "sdxl_base_v1-0"}  # ss_base_model_version, as kohya writes it


def _balanced(down: torch.Tensor, up: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) whose product is ``scale · up · down``, the scale split so both factors reach the same largest
    magnitude: folded into ``up`` alone, a small scale (alpha 1 at rank 128) pushes up into fp16's subnormals, which
    keep few bits."""
    big_down, big_up = float(down.abs().max()), float(up.abs().max())
    if scale == 0 or big_down == 0 or big_up == 0:  # (a zero product: any split is exact)
        return down, up * scale
    to_up = math.sqrt(abs(scale) * big_down / big_up)
    return down * (abs(scale) / to_up), up * math.copysign(to_up, scale)


def _scaled(f, name: str, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one module with weight · alpha / rank in their product (_balanced), in float32."""
    down, up = f.get_tensor(name + ".lora_down.weight").float(), f.get_tensor(name + ".lora_up.weight").float()
    alpha = float(f.get_tensor(name + ".alpha")) if name + ".alpha" in f.keys() else float(down.shape[0])
    return _balanced(down, up, weight * alpha / down.shape[0])


def lora_family(meta: dict, f, keys: list[str]) -> tuple[frozenset[str] | None, str]:
    """The model families a LoRA can be for, and why (for the messages); None where nothing tells. The metadata
    first (ss_base_model_version, ss_v2), else SDXL's lora_te1_/lora_te2_ keys, the UNet's cross-attention width,
    the lora_te_ text encoder's width (SD 1.x: 768, SD 2.x: 1024)."""
    version = meta.get("ss_base_model_version", "")
    if version:
        known = next((fam for start, fam in (("sdxl", SDXL), ("sd_v2", SD2), ("sd_v1", SD1))
                      if version.startswith(start)), version)
        return frozenset({known}), f"ss_base_model_version {version}"
    if meta.get("ss_v2") == "True":
        return frozenset({SD2}), "ss_v2 True"
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return frozenset({SDXL}), "its lora_te1_/lora_te2_ text-encoder keys"
    for key in keys:
        if key.startswith("lora_unet_") and key.endswith("attn2_to_k.lora_down.weight"):
            width = f.get_slice(key).get_shape()[1]
            if width in _CROSS_WIDTHS:
                return frozenset({_CROSS_WIDTHS[width]}), f"its cross-attention width {width}"
    te = [k for k in keys if k.startswith("lora_te_") and k.endswith(".lora_down.weight")]
    if te:
        width = f.get_slice(te[0]).get_shape()[1]
        if width in _TE_WIDTHS:
            return frozenset({_TE_WIDTHS[width]}), f"its lora_te_ text-encoder width {width}"
        return frozenset({SD1, SD2}), "its lora_te_ text-encoder keys"
    return None, ""


def family_metadata(meta: dict, family: frozenset[str] | None) -> dict[str, str]:
    """``ss_base_model_version`` and ``ss_v2`` of ``family`` (one of SD 1.x, 2.x, SDXL) for a file whose metadata
    ``meta`` has no ss_base_model_version; else nothing. AUTOMATIC1111 takes a LoRA with metadata but neither key for
    SD 1.x (v1.10.1 ``extensions-builtin/Lora/network.py`` ``detect_version``) and hides it under an SDXL or SD 2.x
    model: a file that is written with our ss_* keys must say its family where its keys or widths told it."""
    if meta.get("ss_base_model_version") or not family or len(family) != 1 or next(iter(family)) not in _VERSIONS:
        return {}
    known = next(iter(family))
    v_pred = known != SDXL and meta.get("ss_v_parameterization") == "True"
    return {"ss_base_model_version": _VERSIONS[known] + ("_v" if v_pred else ""), "ss_v2": str(known == SD2)}


def _one_family(found: list[tuple[Path, frozenset[str] | None, str]]) -> frozenset[str] | None:
    """The families all files can be for; a LoraTrainerError naming two files of different families."""
    common = None
    for i, (path, family, why) in enumerate(found):
        for other, other_family, other_why in found[:i]:
            if family is not None and other_family is not None and not family & other_family:
                raise LoraTrainerError(
                    f"merge: {other} is a LoRA for {' or '.join(sorted(other_family))} ({other_why}) and {path} one "
                    f"for {' or '.join(sorted(family))} ({why}): LoRAs of different model families cannot be merged "
                    "into one (merge each into a model of its own family with --base)")
        if family is not None:
            common = family if common is None else common & family
    return common


def _one_naming(modules: dict[Path, list[str]], family: frozenset[str] | None) -> Callable[[str], str]:
    """module name → the name it has in the merged file: where some files name the UNet's modules the diffusers way
    and others the LDM way, the diffusers names become LDM ones (else one module would be in the file twice, and
    --rank would cut each copy alone); a LoraTrainerError where the family, whose UNet layout that needs, is not
    known, or a module has no LDM name."""
    diffusers = [(p, n) for p, names in modules.items() for n in names if _DIFFUSERS_UNET.match(n)]
    ldm = [(p, n) for p, names in modules.items() for n in names if _LDM_UNET.match(n)]
    if not diffusers or not ldm:
        return lambda name: name
    layouts = {str(_LAYOUTS.get(fam)) for fam in family or ()}
    if not family or len(layouts) != 1 or "None" in layouts:
        raise LoraTrainerError(
            f"merge: {diffusers[0][0]} names its UNet modules the diffusers way ({diffusers[0][1]}) and {ldm[0][0]} "
            f"the LDM way ({ldm[0][1]}); matching the two needs the model family's UNet layout, and the files' family "
            "(ss_base_model_version, else their widths) is not SD 1.x, 2.x or SDXL: merge each into the model with "
            "--base instead")
    names = LdmUnetNames(_LAYOUTS[next(iter(family))])
    unnamed = [n for _, n in diffusers if ldm_name(n, names) is None]
    if unnamed:
        raise LoraTrainerError(f"merge: {len(unnamed)} diffusers-named UNet modules have no LDM name (e.g. "
                               f"{', '.join(unnamed[:3])}) to match the LDM-named modules of the other files with")
    return lambda name: ldm_name(name, names) if _DIFFUSERS_UNET.match(name) else name


def merge_loras(loras: list[tuple[str, float]], out, rank: int | None = None, dtype: str = "auto") -> Path:
    """Write the LoRAs ``loras`` ((file, weight)) merged into one LoRA file ``out`` (never over an existing file:
    ``out_1``), in ``dtype`` (merge's --dtype: auto keeps each module's dtype in the first file that has it);
    returns the path written."""
    from lora_trainer.export.kohya import save_kohya_lora

    out = lora_out(out, "merge")
    if rank is not None and rank < 1:
        raise LoraTrainerError(f"merge: --rank {rank} must be 1 or more")
    files = lora_files(loras)
    if len(files) < 2 and rank is None:
        raise LoraTrainerError("merge: give --base CKPT to merge a LoRA into a model, or two or more --lora to merge "
                               "LoRAs into one (or --rank R with one, to scale and resize it)")
    metas, modules, found = [], {}, []
    for path, _ in files:
        with open_lora(path, "merge") as f:
            metas.append(dict(f.metadata() or {}))
            keys = list(f.keys())
            modules[path] = modules_of(keys, "merge", path, f)
            found.append((path, *lora_family(metas[-1], f, keys)))
    family = _one_family(found)
    rename = _one_naming(modules, family)
    parts: dict[str, list] = {}  # module → [(down, scaled up, dtype, file)]
    for path, weight in files:
        with open_lora(path, "merge") as f:
            for name in modules[path]:
                down, up = _scaled(f, name, weight)
                parts.setdefault(rename(name), []).append(
                    (down, up, f.get_slice(name + ".lora_down.weight").get_dtype(), path))
    if not parts:
        raise LoraTrainerError(f"merge: {', '.join(str(p) for p, _ in files)} hold no LoRA modules")
    cast = dtype_of(dtype)
    tensors, ranks = {}, set()
    for name, pieces in sorted(parts.items()):
        down0, up0 = pieces[0][0], pieces[0][1]
        for down, up, _, path in pieces[1:]:
            if down.shape[1:] != down0.shape[1:] or up.shape[0] != up0.shape[0] or up.shape[2:] != up0.shape[2:]:
                raise LoraTrainerError(f"merge: {name} has other shapes in {path} ({list(up.shape)} x "
                                       f"{list(down.shape)}) than in {pieces[0][3]} ({list(up0.shape)} x "
                                       f"{list(down0.shape)}): LoRAs of different models cannot be merged into one")
        down, up = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces], dim=1)
        alpha = float(down.shape[0])  # scale alpha / rank = 1: the weights and alphas are in up · down already
        if rank is not None:
            down, up, alpha, _ = svd_resize(down, up, alpha, rank, None)
        kind = cast or {"F16": torch.float16, "BF16": torch.bfloat16}.get(pieces[0][2], torch.float32)
        # alpha in the file's dtype, as kohya's tools write it; a rank bf16 cannot hold (above 256: 257 -> 256, a scale
        # of 256/257, -0.39%) or fp16 (above 2048) has the rounding taken by up, so the scale is the merged one
        written, factor = alpha_tensor(alpha, kind)
        tensors[name + ".lora_down.weight"] = down.to(kind).contiguous()
        tensors[name + ".lora_up.weight"] = (up * factor).to(kind).contiguous()
        tensors[name + ".alpha"] = written
        ranks.add(down.shape[0])
    return save_kohya_lora(out, tensors, _metadata(metas, files, ranks, rank, out.stem, family))


def _metadata(metas: list[dict], files: list[tuple[Path, float]], ranks: set[int], rank: int | None,
              name: str, family: frozenset[str] | None = None) -> dict:
    meta = {key: metas[0][key] for key in SHARED_KEYS if key in metas[0] and all(m.get(key) == metas[0][key]
                                                                                 for m in metas)}
    meta |= family_metadata(meta, family)  # (the files' family where they did not all say it alike)
    meta.setdefault("ss_network_module", "networks.lora")
    meta["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_alpha"] = meta["ss_network_dim"]
    merged = ", ".join(f"{p.name} x{w:g}" for p, w in files)
    meta["ss_training_comment"] = f"merged from {merged}" + (f", resized to rank {rank}" if rank else "")
    meta["ss_output_name"] = name
    meta["lora_trainer_merged"] = json.dumps([{"file": p.name, "weight": w} for p, w in files])
    return meta
