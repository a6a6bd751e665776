"""Merge kohya-format LoRAs into a diffusers folder (``merge --base FOLDER --lora F[:W] --out NEW_FOLDER``): the new
folder is the base's copy with each adapted weight ``W + weight · alpha / rank · up · down``, loadable by
``from_pretrained`` (and the standalone app) like the base.

The UNet's modules are found by either kohya naming: the diffusers one (``lora_unet_down_blocks_0_attentions_0_…``,
kohya's SD 1.x/2.x files) or the LDM one (``lora_unet_input_blocks_1_1_…``, ours and kohya's SDXL), through
export.kohya.LdmUnetNames on the UNet's config. The text encoders are transformers CLIP models (``lora_te_``, or
``lora_te1_``/``lora_te2_`` beside a ``text_encoder_2``). Every weight file of a component is merged (sharded files
and ``.fp16`` variants alike); a component stored as pickles (``.bin``) is refused, never unpickled. Each file is
written one tensor at a time; the folder is built under a temp name and renamed (``--out`` must not exist).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from lora_trainer.errors import LoraTrainerError
from lora_trainer.export.kohya import LdmUnetNames
from lora_trainer.export.merge import (
    Target,
    dtype_of,
    lora_files,
    merged_note,
    plan_merge,
    shapes_of,
    write_merged,
)
from lora_trainer.export.resize import open_lora
from lora_trainer.utils.fsio import atomic_dir

log = logging.getLogger(__name__)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _unet_names(folder: Path) -> LdmUnetNames | None:
    """The UNet's diffusers → LDM module names, None where its config has no LDM layout (e.g. per-level depths)."""
    try:
        return LdmUnetNames(json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError):
        return None


def _kohya_names(component: str, path: str, names: LdmUnetNames | None, sdxl: bool) -> list[str]:
    """The kohya module names a diffusers module path of ``component`` has."""
    if component == "unet":
        out = ["lora_unet_" + path.replace(".", "_")]
        if names is not None:
            try:
                out.append("lora_unet_" + names(path).replace(".", "_"))
            except ValueError:  # (a module the LDM UNet has no name for: its diffusers name only)
                pass
        return out
    prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    if not path.startswith(("text_model.", "text_projection")):  # (a file saved from the inner CLIPTextTransformer)
        path = "text_model." + path
    return [prefix + path.replace(".", "_")]


def weight_files(base: Path) -> dict[str, list[Path]]:
    """component → its safetensors weight files (all shards and variants); a LoraTrainerError for a component with
    pickled weights only."""
    out = {}
    for component in COMPONENTS:
        folder = base / component
        if not folder.is_dir():
            continue
        files = sorted(folder.glob("*.safetensors"))
        if not files and any(folder.glob("*.bin")):
            raise LoraTrainerError(f"merge: {folder} holds its weights as .bin (pickles), which are never loaded here: "
                                   "convert the folder to safetensors first")
        out[component] = files
    if "unet" not in out:
        raise LoraTrainerError(f"merge: --base {base} has no unet/ with .safetensors weights: not a diffusers folder "
                               "of a Stable Diffusion model")
    return out


def merge_into_folder(base: Path, loras: list[tuple[str, float]], out: Path, dtype: str = "auto") -> Path:
    """Write the diffusers folder ``base`` with ``loras`` ((file, weight), in order) merged as the new folder
    ``out``; returns it."""
    if not (base / "model_index.json").is_file():
        raise LoraTrainerError(f"merge: --base {base} is a folder without model_index.json: not a diffusers model")
    if out.exists():
        raise LoraTrainerError(f"merge: --out {out} already exists; not overwriting it (choose a new folder)")
    if out.resolve().is_relative_to(base.resolve()):
        raise LoraTrainerError(f"merge: --out {out} is inside --base {base}: choose a folder outside it (the base is "
                               "copied into the new folder, which must not copy itself)")
    if out.suffix == ".safetensors":
        raise LoraTrainerError(f"merge: --out {out}: a diffusers folder is merged into a new folder, not a "
                               ".safetensors file")
    files = lora_files(loras)
    weights = weight_files(base)
    names, sdxl = _unet_names(base), "text_encoder_2" in weights
    targets: dict[str, list[Target]] = {}
    shapes: dict = {}
    for component, paths in weights.items():
        for path in paths:
            rel = path.relative_to(base).as_posix()
            with open_lora(path, "merge", "--base file") as f:
                shapes |= shapes_of(f, rel)
                for key in f.keys():
                    if key.endswith(".weight"):
                        for name in _kohya_names(component, key[: -len(".weight")], names, sdxl):
                            targets.setdefault(name, []).append(Target(key, file=rel))
    plan = plan_merge(base, lambda module: targets.get(module, []), shapes, files)
    by_file: dict[str, dict] = {}
    for (rel, key), changes in plan.items():
        by_file.setdefault(rel, {})[key] = changes
    opened = {p: open_lora(p, "merge") for p, _ in files}
    with atomic_dir(out) as tmp:
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=lambda d, names_: [
            n for n in names_ if (Path(d) / n).relative_to(base).as_posix() in by_file])
        for rel, changes in by_file.items():
            log.info("merging %d weights of %s", len(changes), rel)
            write_merged(base / rel, tmp / rel, changes, opened, dtype_of(dtype), merged_note(files))
        if dtype != "auto":  # the unchanged files too (the VAE's), so the whole model has the dtype asked for
            for path in base.rglob("*.safetensors"):
                rel = path.relative_to(base).as_posix()
                if rel not in by_file:
                    write_merged(path, tmp / rel, {}, opened, dtype_of(dtype), {})
    log.info("merged %d LoRA(s) into %s: %s", len(files), base, out)
    return out
