"""Merge kohya-format LoRAs into a single-file checkpoint (``python -m lora_trainer merge --base CKPT --lora F[:W]``):
each adapted weight becomes ``W + weight · alpha / rank · up · down``, in the checkpoint's own key layout, so the
WebUIs and ComfyUI load the result as a normal checkpoint.

A LoRA module is found in the checkpoint by its kohya name: the UNet's LDM/sgm names (``lora_unet_input_blocks_…``,
ours and kohya's SDXL files) or the diffusers names kohya's SD 1.x/2.x files use (``lora_unet_down_blocks_…``, mapped
through export.kohya.LdmUnetNames with the block layout read from the checkpoint's keys); the text encoders' CLIP
names (``lora_te_``, ``lora_te1_``; with or without the ``text_model.`` level older SD 1.x checkpoints lack), and for
OpenCLIP encoders (SD 2.x's, SDXL's second) their fused q/k/v projection's slices. Linear and LoCon convolution
modules merge; a module of another kind, or one the checkpoint has no weight for, stops the merge with its name
(nothing is dropped silently). The checkpoint is read and the result written one tensor at a time (memory: a tensor
and the LoRAs); the file is written under a temporary name and renamed, never over an existing file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lora_trainer.errors import LoraTrainerError
from lora_trainer.export.kohya import LdmUnetNames, clip_text_model_path
from lora_trainer.export.resize import modules_of, open_lora

UNET = "model.diffusion_model."
CLIP_PREFIXES = {"cond_stage_model.transformer.": "lora_te_", "conditioner.embedders.0.transformer.": "lora_te1_"}
# SD 2.x's (SD 2.1 Turbo's, in the sgm layout: embedders.0), SDXL's second
OPEN_CLIP_PREFIXES = {"cond_stage_model.model.": "lora_te_", "conditioner.embedders.0.model.": "lora_te_",
                      "conditioner.embedders.1.model.": "lora_te2_"}
_OPEN_CLIP = {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1",
              "mlp.c_proj.weight": "mlp_fc2"}
_DIFFUSERS_UNET = re.compile(r"^lora_unet_(?P<block>(?:down|up)_blocks_\d+_(?:attentions|resnets|downsamplers|"
                             r"upsamplers)_\d+|mid_block_(?:attentions|resnets)_\d+)_(?P<rest>.+)$")
_HEADS = ("transformer_blocks", "proj_in", "proj_out", "norm1", "norm2", "norm", "conv1", "conv2", "conv_shortcut",
          "time_emb_proj", "conv")


@dataclass(frozen=True)
class Target:
    key: str  # the tensor changed
    part: int | None = None  # q, k, v (0, 1, 2) of a fused OpenCLIP in_proj_weight; None: the whole tensor
    file: str = ""  # the weight file that holds it, under a diffusers folder ("": the single-file checkpoint)


def checkpoint_targets(keys) -> dict[str, Target]:
    """kohya module name → the checkpoint tensor it changes, for a single-file checkpoint's keys."""
    out = {}
    for key in keys:
        if key.startswith(UNET) and key.endswith(".weight"):
            out["lora_unet_" + key[len(UNET):-len(".weight")].replace(".", "_")] = Target(key)
        for prefix, lora in CLIP_PREFIXES.items():
            # (older SD 1.x checkpoints lack CLIP's text_model. level, which the WebUI puts back on loading them)
            path = clip_text_model_path(key[len(prefix):-len(".weight")]) if key.startswith(prefix) else ""
            if path.startswith("text_model.") and key.endswith(".weight"):
                out[lora + path.replace(".", "_")] = Target(key)
        for prefix, lora in OPEN_CLIP_PREFIXES.items():
            m = re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$", key)
            if not m:
                continue
            layer = f"{lora}text_model_encoder_layers_{m[1]}_"
            if m[2] == "attn.in_proj_weight":
                for i, proj in enumerate("qkv"):
                    out[f"{layer}self_attn_{proj}_proj"] = Target(key, i)
            elif m[2] in _OPEN_CLIP:
                out[layer + _OPEN_CLIP[m[2]]] = Target(key)
    return out


def unet_layout(keys) -> dict | None:
    """The UNet's block layout read from its LDM keys (``layers_per_block``, ``up_block_types``: levels with
    attention), for export.kohya.LdmUnetNames; None without an LDM UNet."""
    ops = sorted(int(m[1]) for k in keys if (m := re.match(re.escape(UNET) + r"input_blocks\.(\d+)\.0\.op\.", k)))
    outs = [int(m[1]) for k in keys if (m := re.match(re.escape(UNET) + r"output_blocks\.(\d+)\.", k))]
    if not ops or not outs:
        return None
    per = ops[0] - 1
    levels = max(outs) // (per + 1) + 1
    attn = [any(k.startswith(f"{UNET}output_blocks.{(per + 1) * i}.1.proj_in.") for k in keys) for i in range(levels)]
    return {"layers_per_block": per, "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn]}


def ldm_name(name: str, names: LdmUnetNames | None) -> str | None:
    """A diffusers-named UNet module (kohya's SD 1.x files) under its LDM name, or None."""
    m = _DIFFUSERS_UNET.match(name)
    if names is None or not m:
        return None
    head = next((h for h in _HEADS if m["rest"] == h or m["rest"].startswith(h + "_")), None)
    if head is None:
        return None
    block = re.sub(r"^(down_blocks|up_blocks|mid_block)_", r"\1.", m["block"])  # down_blocks.1_attentions_0
    block = re.sub(r"[._](attentions|resnets|downsamplers|upsamplers)_", r".\1.", block)  # down_blocks.1.attentions.0
    tail = m["rest"][len(head):]
    try:
        path = names(f"{block}.{head}" + (f".{tail[1:]}" if tail else ""))
    except ValueError:
        return None
    return "lora_unet_" + path.replace(".", "_")


def _shape(f, name: str) -> tuple[int, int]:
    """(rows, columns) of a LoRA module's ``up · down``: its output features and its input's elements."""
    up, down = f.get_slice(name + ".lora_up.weight").get_shape(), f.get_slice(name + ".lora_down.weight").get_shape()
    return up[0], int(torch.Size(down[1:]).numel())


def _delta(f, name: str, shape: torch.Size, part: int | None, weight: float) -> torch.Tensor:
    down, up = f.get_tensor(name + ".lora_down.weight").float(), f.get_tensor(name + ".lora_up.weight").float()
    rank = down.shape[0]
    alpha = float(f.get_tensor(name + ".alpha")) if name + ".alpha" in f.keys() else float(rank)
    delta = weight * alpha / rank * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))
    rows = shape[0] // 3 if part is not None else shape[0]
    return delta.reshape(rows, *shape[1:])


def shapes_of(f, file: str = "") -> dict:
    """(file, key) → the (rows, columns) a module changes in that tensor: the whole weight (part None), or each third
    of a fused q/k/v (parts 0, 1, 2), for the open safetensors file ``f``."""
    shapes = {}
    for key in f.keys():
        rows, *rest = f.get_slice(key).get_shape() or [1]
        cols = int(torch.Size(rest).numel())
        shapes[(file, key)] = {None: (rows, cols), 0: (rows // 3, cols), 1: (rows // 3, cols), 2: (rows // 3, cols)}
    return shapes


Plan = dict  # (file, key) → [(LoRA file, module, fused part, weight)]: the changes to each tensor, in order


def plan_merge(base, lookup, shapes: dict, loras: list[tuple[Path, float]]) -> Plan:
    """The changes to each tensor of ``base``: ``lookup(module)`` lists the Targets a LoRA module changes (none: the
    base has no weight for it), ``shapes`` (shapes_of) their shapes. Every module of every file must find its
    weights, of its shape (else a LoraTrainerError naming them)."""
    plan: Plan = {}
    for path, weight in loras:
        with open_lora(path, "merge") as f:
            modules = modules_of(f.keys(), "merge", path, f)
            missing, wrong = [], []
            for module in modules:
                targets = lookup(module)
                if not targets:
                    missing.append(module)
                for target in targets:
                    want = shapes[(target.file, target.key)][target.part]
                    if _shape(f, module) != want:
                        wrong.append(f"{module} ({_shape(f, module)} for {want})")
                    else:
                        plan.setdefault((target.file, target.key), []).append((path, module, target.part, weight))
        if missing or wrong:
            listed = ", ".join((missing or wrong)[:3])
            what = "have no weight in" if missing else "do not fit the shapes of the weights they change in"
            raise LoraTrainerError(f"merge: {len(missing or wrong)} modules of {path} {what} {base} (e.g. {listed}): "
                                   "a LoRA for another model family?")
    return plan


def single_file_plan(base: Path, loras: list[tuple[Path, float]]) -> Plan:
    """plan_merge for a single-file checkpoint: its LDM/sgm UNet (LoRA modules with LDM or diffusers names) and its
    CLIP / OpenCLIP text encoders."""
    with open_lora(base, "merge", "--base") as f:
        keys = list(f.keys())
        shapes = shapes_of(f)
    targets = checkpoint_targets(keys)
    layout = unet_layout(keys)
    names = LdmUnetNames(layout) if layout else None

    def lookup(module):
        target = targets.get(module) or targets.get(ldm_name(module, names) or "")
        return [target] if target else []

    return plan_merge(base, lookup, shapes, loras)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def write_streamed(path: Path, entries: list[tuple[str, torch.dtype, list[int]]], tensors, metadata: dict) -> None:
    """A safetensors file written one tensor at a time: the header from ``entries`` (key, dtype, shape), then each
    tensor ``tensors`` yields, in that order (memory: one tensor)."""
    header, offset = {"__metadata__": metadata}, 0
    for key, dtype, shape in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # (the data starts 8-byte aligned, as safetensors writes it)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for (key, dtype, shape), tensor in zip(entries, tensors):
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise ValueError(f"{key}: {tensor.dtype} {list(tensor.shape)}, not the {dtype} {shape} announced")
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))  # (no copy)


def dtype_of(dtype: str) -> torch.dtype | None:
    """--dtype's torch dtype (None: auto, each tensor's own)."""
    return {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def merged_note(files: list[tuple[Path, float]]) -> dict:
    """The metadata that records what was merged, with which weight (added to the base file's own)."""
    return {"lora_trainer_merged": json.dumps([{"file": p.name, "weight": w} for p, w in files])}


def write_merged(src: Path, dst: Path, changes: dict, opened: dict, cast: torch.dtype | None, extra: dict) -> None:
    """``src`` (a safetensors file) written to ``dst`` one tensor at a time, each tensor in ``changes`` (key → the
    plan's changes) merged, floating-point weights cast to ``cast`` (not the schedule's buffers or EMA counters),
    ``extra`` added to the metadata. ``opened``: LoRA file → its open safetensors handle."""
    with safe_open(str(src), framework="pt") as f:
        entries = []
        for key in f.keys():
            part = f.get_slice(key)
            kind = _DTYPES.get(part.get_dtype())
            if kind is None:
                raise LoraTrainerError(f"merge: {src} holds {key} as {part.get_dtype()}, which is not merged here")
            weight = "." in key and not key.startswith("model_ema.")  # (not alphas_cumprod, betas, EMA counters)
            entries.append((key, cast if cast is not None and kind.is_floating_point and weight else kind,
                            part.get_shape()))
        # the largest elements first, as safetensors orders them, so each tensor's data starts aligned to its size
        entries.sort(key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[0]))

        def tensors():
            from tqdm.auto import tqdm

            # (a bar on a terminal only: the WebUI's console and the logs stay quiet)
            for key, want, _ in tqdm(entries, desc=f"merging {src.name}", unit="tensor", disable=None, leave=False):
                tensor = f.get_tensor(key)
                if key in changes:
                    merged = tensor.float()
                    for path, module, part, weight in changes[key]:
                        delta = _delta(opened[path], module, tensor.shape, part, weight)
                        if part is None:
                            merged += delta
                        else:
                            merged[part * delta.shape[0]:(part + 1) * delta.shape[0]] += delta
                    tensor = merged
                yield tensor.to(want)

        write_streamed(dst, entries, tensors(), {**(f.metadata() or {}), **extra})


def lora_files(loras: list[tuple[str, float]]) -> list[tuple[Path, float]]:
    """(path, weight) of each --lora, each an existing file with a finite weight (else a LoraTrainerError naming it:
    a NaN or infinite weight would write a model or LoRA full of NaN)."""
    files = [(Path(p).expanduser(), float(w)) for p, w in loras]
    for p, w in files:
        if not math.isfinite(w):
            raise LoraTrainerError(f"merge: --lora {p}:{w} has the weight {w}: a weight must be a finite number "
                                   "(e.g. 0.8, or -0.5 to subtract it)")
        if not p.is_file():
            raise LoraTrainerError(f"merge: --lora {p} does not exist")
        if p.suffix != ".safetensors":
            raise LoraTrainerError(f"merge: --lora {p} is not a .safetensors LoRA (other formats are never unpickled)")
    return files


def merge_into_checkpoint(base, loras: list[tuple[str, float]], out, dtype: str = "auto") -> Path:
    """Write ``base`` (a single-file checkpoint, or a diffusers folder: export.merge_diffusers) with ``loras``
    ((file, weight), in order) merged to ``out``; returns the path written."""
    from lora_trainer.utils.fsio import write_new

    base, out = Path(base).expanduser(), Path(out).expanduser()
    if base.is_dir():
        from lora_trainer.export.merge_diffusers import merge_into_folder

        return merge_into_folder(base, loras, out, dtype)
    if not base.is_file() or base.suffix != ".safetensors":
        raise LoraTrainerError(f"merge: --base {base} is not a single-file .safetensors checkpoint or a diffusers "
                               "folder")
    if out.suffix != ".safetensors":
        raise LoraTrainerError(f"merge: --out {out} must end in .safetensors (the WebUIs read a .ckpt as a pickle)")
    files = lora_files(loras)
    plan = single_file_plan(base, files)
    changes = {key: c for (_, key), c in plan.items()}
    opened = {p: open_lora(p, "merge") for p, _ in files}
    return write_new(out, lambda tmp: write_merged(base, tmp, changes, opened, dtype_of(dtype), merged_note(files)))


def merge_into_folder_of(base, lora, weight: float, folder) -> Path:
    """The tab's "Merge into checkpoint": ``lora`` at ``weight`` merged into ``base`` (a single file or a diffusers
    folder), written into ``folder`` as ``<base>-<lora>[-<weight>]`` (.safetensors for a file), never over anything
    there (``_1``, ``_2``, … where the name is taken); returns the path written."""
    from lora_trainer.utils.fsio import free_name

    base, lora = Path(base), Path(lora)
    name = f"{base.stem if base.is_file() else base.name}-{lora.stem}" + (f"-{weight:g}" if weight != 1 else "")
    out = Path(folder) / (name + ".safetensors" if base.is_file() else name)
    return merge_into_checkpoint(base, [(str(lora), weight)], out if base.is_file() else free_name(out))
