"""Several kohya-format LoRAs merged into one LoRA (``merge --lora A:0.6 --lora B:0.4 --out AB.safetensors``, no
``--base``): the new file applies ``Σ weight · alpha / rank · up · down`` to every module, exactly, by concatenating
the ranks (module rank = the sum of the files' ranks, alpha = that rank, so the scale is 1); with ``--rank R`` each
module's sum is then cut to its best rank-R approximation by an SVD (export.resize.svd_resize, as kohya's
svd_merge_lora.py does). Linear and convolution (LoCon) modules; other types are refused by name.

The metadata keeps the facts the files agree on (family, v-prediction, resolution, ...); the training facts of one
file (steps, tags, ...) are not carried into a file that is no longer that training's; what was merged with which
weight is in ``lora_trainer_merged`` and ``ss_training_comment``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lora_trainer.errors import LoraTrainerError
from lora_trainer.export.merge import lora_files
from lora_trainer.export.resize import modules_of, svd_resize

# the metadata kept when every file says the same (what the model and the sampler need to know)
SHARED_KEYS = ("ss_network_module", "ss_base_model_version", "ss_v2", "ss_v_parameterization",
               "ss_zero_terminal_snr", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_resolution",
               "ss_clip_skip", "ss_network_train_unet_only")


def _scaled(f, name: str, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up · weight · alpha / rank) of one module, in float32."""
    down, up = f.get_tensor(name + ".lora_down.weight").float(), f.get_tensor(name + ".lora_up.weight").float()
    alpha = float(f.get_tensor(name + ".alpha")) if name + ".alpha" in f.keys() else float(down.shape[0])
    return down, up * (weight * alpha / down.shape[0])


def merge_loras(loras: list[tuple[str, float]], out, rank: int | None = None) -> Path:
    """Write the LoRAs ``loras`` ((file, weight)) merged into one LoRA file ``out`` (never over an existing file:
    ``out_1``); returns the path written."""
    from lora_trainer.export.kohya import save_kohya_lora

    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise LoraTrainerError(f"merge: --out {out} must end in .safetensors (merging LoRAs writes a LoRA file)")
    if rank is not None and rank < 1:
        raise LoraTrainerError(f"merge: --rank {rank} must be 1 or more")
    files = lora_files(loras)
    if len(files) < 2 and rank is None:
        raise LoraTrainerError("merge: give --base CKPT to merge a LoRA into a model, or two or more --lora to merge "
                               "LoRAs into one (or --rank R with one, to scale and resize it)")
    parts: dict[str, list] = {}  # module → [(down, scaled up, dtype, file)]
    metas = []
    for path, weight in files:
        with safe_open(str(path), framework="pt") as f:
            metas.append(dict(f.metadata() or {}))
            for name in modules_of(f.keys(), "merge"):
                down, up = _scaled(f, name, weight)
                parts.setdefault(name, []).append((down, up, f.get_slice(name + ".lora_down.weight").get_dtype(), path))
    if not parts:
        raise LoraTrainerError(f"merge: {', '.join(str(p) for p, _ in files)} hold no LoRA modules")
    tensors, ranks = {}, set()
    for name, pieces in sorted(parts.items()):
        down0, up0 = pieces[0][0], pieces[0][1]
        for down, up, _, path in pieces[1:]:
            if down.shape[1:] != down0.shape[1:] or up.shape[0] != up0.shape[0] or up.shape[2:] != up0.shape[2:]:
                raise LoraTrainerError(f"merge: {name} has other shapes in {path} ({list(up.shape)} x "
                                       f"{list(down.shape)}) than in {pieces[0][3]} ({list(up0.shape)} x "
                                       f"{list(down0.shape)}): LoRAs of different models cannot be merged into one")
        down, up = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces], dim=1)
        alpha = float(down.shape[0])  # scale alpha / rank = 1: the weights and alphas are in up already
        if rank is not None:
            down, up, alpha, _ = svd_resize(down, up, alpha, rank, None)
        dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(pieces[0][2], torch.float32)
        tensors[name + ".lora_down.weight"] = down.to(dtype).contiguous()
        tensors[name + ".lora_up.weight"] = up.to(dtype).contiguous()
        tensors[name + ".alpha"] = torch.tensor(alpha, dtype=dtype)
        ranks.add(down.shape[0])
    return save_kohya_lora(out, tensors, _metadata(metas, files, ranks, rank, out.stem))


def _metadata(metas: list[dict], files: list[tuple[Path, float]], ranks: set[int], rank: int | None,
              name: str) -> dict:
    meta = {key: metas[0][key] for key in SHARED_KEYS if key in metas[0] and all(m.get(key) == metas[0][key]
                                                                                 for m in metas)}
    meta.setdefault("ss_network_module", "networks.lora")
    meta["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_alpha"] = meta["ss_network_dim"]
    merged = ", ".join(f"{p.name} x{w:g}" for p, w in files)
    meta["ss_training_comment"] = f"merged from {merged}" + (f", resized to rank {rank}" if rank else "")
    meta["ss_output_name"] = name
    meta["lora_trainer_merged"] = json.dumps([{"file": p.name, "weight": w} for p, w in files])
    return meta
