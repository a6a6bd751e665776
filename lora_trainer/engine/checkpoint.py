"""Resumable checkpoints: LoRA weights, optimizer, lr scheduler, scaler, RNG states and the step.

A checkpoint is a folder ``<run>/checkpoints/checkpoint-<step>`` built under a temp name and renamed
when complete, so a crash never leaves a half-written one that ``latest`` could pick.
The weights are safetensors; the rest is a torch file read back with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_trainer.config import FAMILY_DEFAULTS
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.utils.fsio import atomic_dir

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS, STATE, INFO = "lora_state.safetensors", "training_state.pt", "checkpoint.json"


@dataclass
class Restored:
    step: int
    weights: dict
    state: dict
    info: dict


def rng_state(generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in a run folder, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NAME.match(p.name)
            if m and (p / INFO).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, weights: dict, state: dict, info: dict, keep: int = 0) -> Path | None:
    """Write a checkpoint (skipped if one for this step exists) and prune to the ``keep`` newest."""
    final = checkpoint_dir(run_dir, step)
    if final.exists():
        return None
    # (built under a temp name: a failed write leaves the older checkpoints as they were, and no part of it)
    with stops_on_full_disk(run_dir, f"checkpoint {final}"), atomic_dir(final) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        (tmp / INFO).write_text(json.dumps(dict(info, step=step), indent=2, default=str), encoding="utf-8")
    log.info("saved checkpoint %s", final)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(LoraTrainerError):
    """No room on the disk for what the run writes (before it starts, or a write that failed)."""


@contextlib.contextmanager
def stops_on_full_disk(run_dir: Path, writing: str) -> Iterator[None]:
    """A write inside that fails on a full disk (ENOSPC, EDQUOT) raises DiskFull, which says what happened and
    where the last good state is (writes go to a temp name first: nothing older was touched)."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        found = list_checkpoints(run_dir)
        last = (f"the last good checkpoint, {found[-1][1]} (step {found[-1][0]}), is intact: free some space there "
                "and continue with training.resume_from_checkpoint: latest" if found else
                "no checkpoint had been saved before it: free some space and start the run again")
        raise DiskFull(f"the disk is full: writing {writing} failed ({e.strerror or e}); its temp file was removed "
                       f"and nothing older was replaced; {last}") from e


class CheckpointDamaged(ConfigError):
    """A checkpoint file that cannot be read back (truncated, not UTF-8, missing its step, not plain tensors)."""


def load_checkpoint(path: Path) -> Restored:
    """A checkpoint folder read back; CheckpointDamaged names the file that cannot be. The training state is read
    with ``weights_only=True``: a file that is not plain tensors and numbers is refused, never executed."""
    path = Path(path)
    if not (path / INFO).is_file():
        raise ConfigError(f"training.resume_from_checkpoint: {path} is not a complete checkpoint folder "
                          f"(no {INFO}); point it at a checkpoint-NNNNNN folder or use 'latest'")

    def damaged(name: str, e: BaseException) -> CheckpointDamaged:
        return CheckpointDamaged(f"training.resume_from_checkpoint: {path / name} is damaged ({type(e).__name__}: "
                                 f"{str(e)[:200]}); resume from another checkpoint of the run (its checkpoints/ "
                                 "folder), or use 'latest', which skips damaged ones")

    try:
        info = json.loads((path / INFO).read_text(encoding="utf-8"))
        step = int(info["step"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise damaged(INFO, e) from e
    try:
        # torch's own loader, not ``torch.load``: the WebUI (A1111, Forge: modules/safe.py) replaces that with a check
        # of its own that refuses files of a newer torch (their .format_version) and then returns None;
        # weights_only=True is the safety here (plain tensors and numbers; anything else is refused, never run)
        state = torch.serialization.load(path / STATE, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"optimizer", "lr_scheduler", "rng"} <= set(state):
            raise ValueError(f"not a training state (read as {type(state).__name__})")
    except Exception as e:  # noqa: BLE001 (UnpicklingError, a truncated zip, EOF, ...: each named the same way)
        raise damaged(STATE, e) from e
    try:
        weights = load_file(path / WEIGHTS)
    except Exception as e:  # noqa: BLE001 (SafetensorError on a truncated file, OSError)
        raise damaged(WEIGHTS, e) from e
    return Restored(step=step, weights=weights, state=state, info=info)


def latest_candidates(output_dir: Path) -> list[Path]:
    """Every checkpoint of the runs of one config, newest first: ``output_dir`` and the ``<output_dir>-<time>``
    folders beside it, where new runs of the same config went (by when each checkpoint was written)."""
    output_dir = Path(output_dir)
    later = re.compile(re.escape(output_dir.name) + r"-\d{8}-\d{6}(-\d+)?")  # (run_dir.prepare_run_dir's names only:
    runs = [output_dir] + [p for p in output_dir.parent.glob(f"{glob.escape(output_dir.name)}-*")  # not another
                           if later.fullmatch(p.name) and p.is_dir()]  # config's folder whose name starts the same
    found = [path for run in runs for _, path in list_checkpoints(run)]
    return sorted(found, key=lambda p: ((p / INFO).stat().st_mtime, p.name), reverse=True)


def find_latest(output_dir: Path) -> Path | None:
    """The newest checkpoint among the runs of one config (``latest_candidates``)."""
    found = latest_candidates(output_dir)
    return found[0] if found else None


def load_latest(output_dir: Path) -> tuple[Path, Restored] | None:
    """The newest intact checkpoint among the runs of one config and what it holds; damaged ones are skipped with a
    warning that names them. None: there is none."""
    for path in latest_candidates(output_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointDamaged as e:
            log.warning("%s; trying the next newest checkpoint", e)
    return None


def remove_leftovers(run_dir: Path) -> None:
    """Temp folders and files a kill during a write left in a run folder (checkpoints and LoRA files are written
    under a temp name and renamed when complete)."""
    run_dir = Path(run_dir)
    leftovers = [*(run_dir / CHECKPOINTS).glob(".checkpoint-*.tmp"), *run_dir.glob(".*.safetensors.*.tmp")]
    for p in leftovers:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if leftovers:
        log.info("removed %d unfinished write(s) an interrupted run left in %s", len(leftovers), run_dir)


# What a resumed run must share with the run that wrote the checkpoint: the LoRA's shape...
CAPTION_SETTINGS = ("shuffle_caption", "keep_tokens", "caption_tag_dropout_rate", "caption_dropout_rate",
                    "caption_dropout_every_n_epochs")  # (data.augment)
MUST_MATCH = ("lora_rank", "lora_alpha", "target_modules", "train_text_encoder", "text_encoder_target_modules",
              "train_text_encoder_2", "conv_rank", "conv_alpha", "loraplus_lr_ratio")
# ...and what decides the data order, the step count, the pixels and the base weights (fp8_base rounds them) (else it
# continues, but not as one run would); a checkpoint without fast_jpeg_decode, weighted_captions, train_text_encoder_2
# or fp8_base is from before they existed, when every image decoded fully, captions were read as written, one text
# encoder could train and the UNet kept its weights' dtype
SHOULD_MATCH = ("batch_size", "gradient_accumulation_steps", "seed", "num_images", "total_steps", "images_per_epoch",
                "fast_jpeg_decode", "weighted_captions", "zero_terminal_snr", "fp8_base", "enable_bucket",
                "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "random_crop",
                "clip_skip", *CAPTION_SETTINGS)
DATA_SETTINGS = ("fast_jpeg_decode", "weighted_captions", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                 "bucket_reso_steps", "bucket_no_upscale", "random_crop", *CAPTION_SETTINGS)
# what a checkpoint from before a setting existed was trained with (before aspect-ratio buckets: square crops)
BEFORE = {"fast_jpeg_decode": False, "weighted_captions": False, "train_text_encoder_2": False,
          "zero_terminal_snr": "false", "fp8_base": False, "enable_bucket": False, "min_bucket_reso": None,
          "max_bucket_reso": None, "bucket_reso_steps": 64, "bucket_no_upscale": False, "random_crop": False,
          "shuffle_caption": False, "keep_tokens": 0, "caption_tag_dropout_rate": 0.0, "caption_dropout_rate": 0.0,
          "caption_dropout_every_n_epochs": 0, "world_size": 1, "clip_skip": 1, "conv_rank": 0, "conv_alpha": None,
          "loraplus_lr_ratio": None}


def run_settings(training, num_images: int, total_steps: int, data, model, world_size: int = 1,
                 images_per_epoch: int | None = None) -> dict:
    """``world_size``: the processes of a multi-process run (training.batch_size is per process);
    ``images_per_epoch``: the images an epoch trains, repeats and regularization images counted (default:
    ``num_images``)."""
    settings = {k: getattr(training, k) for k in MUST_MATCH + SHOULD_MATCH[:3]}
    return dict(settings, num_images=num_images, total_steps=total_steps, optimizer=training.optimizer,
                optimizer_args=dict(training.optimizer_args), clip_skip=training.clip_skip,
                images_per_epoch=num_images if images_per_epoch is None else images_per_epoch,
                **{k: getattr(data, k) for k in DATA_SETTINGS}, zero_terminal_snr=model.zero_terminal_snr,
                fp8_base=training.fp8_base, world_size=world_size)


def left_to_the_model(cfg) -> tuple[str, ...]:
    """The settings whose value the loaded model decides (``auto``, or a family default where the config set
    nothing): a resume checks them once it is loaded."""
    family_keys = {k for defaults in FAMILY_DEFAULTS.values() for k in defaults} - set(cfg.explicit)
    pending = [k for k in MUST_MATCH + SHOULD_MATCH if k in family_keys]
    return tuple(pending) + (("zero_terminal_snr",) if cfg.model.zero_terminal_snr == "auto" else ())


# optimizer arguments that change what the optimizer keeps per weight (AdamW's amsgrad: max_exp_avg_sq; Adafactor's
# beta1: exp_avg; bitsandbytes' optim_bits): changed on a resume, its first step would miss that state
STATEFUL_ARGS = ("amsgrad", "beta1", "optim_bits")


def check_resume(restored: Restored, settings: dict, path: Path, keys=None) -> None:
    """Refuse a checkpoint whose LoRA has another shape; warn where the continuation will differ. ``keys``: check
    only these settings (the rest were checked before, or are checked once the model is loaded)."""
    saved = {**BEFORE, **restored.info.get("settings", {})}
    keys = set(settings if keys is None else keys)
    wrong = [f"{k}: {saved[k]!r} in the checkpoint, {settings[k]!r} now" for k in MUST_MATCH
             if k in keys and k in saved and saved[k] != settings[k]]
    if wrong:
        raise ConfigError(f"training.resume_from_checkpoint: {path} was trained with other LoRA settings ("
                          + "; ".join(wrong) + "); use the same settings or start a new run")
    if "optimizer" in keys and saved.get("optimizer", settings["optimizer"]) != settings["optimizer"]:
        raise ConfigError(f"training.optimizer: {path} was trained with {saved['optimizer']!r} and this run has "
                          f"{settings['optimizer']!r}; its state (the moments, the step size) cannot carry over to "
                          f"another optimizer: set optimizer: {saved['optimizer']}, or start a new run")
    if "optimizer_args" in keys and "optimizer_args" in saved:
        was, now = saved["optimizer_args"], settings["optimizer_args"]
        stateful = [f"{k}: {was.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in STATEFUL_ARGS
                    if was.get(k) != now.get(k)]
        if stateful:
            raise ConfigError(f"training.optimizer_args: {'; '.join(stateful)} ({path}): it changes what the "
                              "optimizer keeps for each weight, which the checkpoint does not hold; keep it as it was, "
                              "or start a new run")
    same_micro_batch = False
    if "batch_size" in keys and "world_size" in settings:  # (checked with batch_size, once it is known)
        same_micro_batch = _check_world_size(saved, settings, path)
    differ = [f"{k} {saved[k]!r} → {settings[k]!r}" for k in SHOULD_MATCH
              if k in keys and k in saved and saved[k] != settings[k] and not (k == "batch_size" and same_micro_batch)]
    if differ:
        log.warning("resuming with changed settings (%s): training continues, but not exactly as the "
                    "uninterrupted run would have", ", ".join(differ))


def _check_world_size(saved: dict, settings: dict, path: Path) -> bool:
    """A checkpoint of a run with another number of processes: it continues where the micro-batch over all processes
    (batch_size × processes) is the same, for then the image order, the steps per epoch and the step count are the
    same (returns True); else it is refused, naming both, for a step of the checkpoint would not be a step of this
    run. Returns False where the number of processes did not change."""
    old_world, new_world = saved.get("world_size", 1), settings["world_size"]
    if old_world == new_world:
        return False
    old, new = saved["batch_size"] * old_world, settings["batch_size"] * new_world
    if old != new:
        fix = (f"set training.batch_size: {old // new_world} (× {new_world} processes = {old} images a micro-batch, "
               "as the checkpoint's run)" if old % new_world == 0 else
               f"start {old_world} process(es) (or a number that divides {old})")
        raise ConfigError(f"training.resume_from_checkpoint: {path} was trained by {old_world} process(es) with "
                          f"batch_size {saved['batch_size']} ({old} images a micro-batch) and this run has "
                          f"{new_world} process(es) with batch_size {settings['batch_size']} ({new}): its steps, "
                          f"epochs and image order would not continue; {fix}, or start a new run")
    log.info("resuming a run of %d process(es) with %d: the micro-batch of %d images over all processes is the same, "
             "so the step count and the image order continue as they were", old_world, new_world, new)
    return True
