"""Where a run writes: never into a folder that holds another run, and a log file inside it."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

from lora_trainer.engine.checkpoint import (
    CHECKPOINTS,
    Restored,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    remove_leftovers,
)

log = logging.getLogger(__name__)
LOGS = "logs"
LATENT_CACHE = "latent_cache"  # in the configured output_dir, shared by every run made from it


def latent_cache_dir(output_dir: str) -> Path:
    return Path(output_dir).expanduser().resolve() / LATENT_CACHE


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` has anything in it besides the shared latent cache."""
    return folder.exists() and any(p.name != LATENT_CACHE for p in folder.iterdir())


def remove_run(run_dir: Path) -> None:
    """Delete a run folder that holds nothing worth keeping; the shared latent cache in it stays."""
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        if p.name == LATENT_CACHE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # empty now, unless the cache stays
        run_dir.rmdir()


@contextlib.contextmanager
def dropped_on_error(run_dir: Path, fresh: bool):
    """A refusal inside takes away the folder made for the run where it holds nothing yet (``fresh``: a new run or a
    branch of an earlier checkpoint)."""
    try:
        yield
    except BaseException:
        if fresh:
            remove_run(run_dir)
        raise


def prepare_run_dir(output_dir: str, resume: str | None) -> tuple[Path, Path | None, Restored | None]:
    """Return (run folder, checkpoint to resume from or None, what it holds).

    Resuming continues in the run folder that holds the checkpoint; ``latest`` takes the newest intact checkpoint of
    ``output_dir`` and the ``<output_dir>-<time>`` folders beside it, and says which. A new run uses ``output_dir``
    when it is empty or absent; if it already holds anything (a finished or an interrupted run), the
    new run goes to ``<output_dir>-<YYYYmmdd-HHMMSS>`` beside it, and the log says so (the latent
    cache in ``output_dir`` alone does not count as a run).
    """
    out = Path(output_dir).expanduser().resolve()
    checkpoint = restored = None
    if resume == "latest":
        found = load_latest(out)
        if found is None:
            log.warning("resume_from_checkpoint: latest: no checkpoint under %s or %s-*; starting a new run", out,
                        out.name)
        else:
            checkpoint, restored = found
            log.info("resume_from_checkpoint: latest is %s (step %d)", checkpoint, restored.step)
    elif resume:
        checkpoint = Path(resume).expanduser().resolve()
        restored = load_checkpoint(checkpoint)
    if checkpoint is not None:
        run = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent
        remove_leftovers(run)
        later = [step for step, _ in list_checkpoints(run) if step > restored.step]
        if not later:
            return run, checkpoint, restored
        # an earlier checkpoint of a run that went on: a branch, in a folder of its own (its checkpoints would
        # otherwise mix with the run's later ones, and pruning to the newest few would delete those)
        branch = _new_run_folder(out)
        log.warning("%s is step %d of the run in %s, which went on to step %d: continuing from it in %s (the run "
                    "stays as it is)", checkpoint, restored.step, run, later[-1], branch)
        branch.mkdir(parents=True)
        return branch, checkpoint, restored
    if holds_a_run(out):
        new = _new_run_folder(out)
        log.warning("%s already holds a run; this run goes to %s (nothing is overwritten)", out, new)
        out = new
    out.mkdir(parents=True, exist_ok=True)
    return out, None, None


def _new_run_folder(out: Path) -> Path:
    """A folder for a new run beside ``out``, ``<out>-<YYYYmmdd-HHMMSS>[-N]`` (checkpoint.latest_candidates finds
    these)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    new = out.with_name(f"{out.name}-{stamp}")
    n = 1
    while new.exists():
        new = out.with_name(f"{out.name}-{stamp}-{n}")
        n += 1
    return new


LIBRARIES = ("transformers", "diffusers", "peft")  # their loggers' records go to train.log too


@contextlib.contextmanager
def run_log_file(run_dir: Path):
    """Copy the package's log records into ``<run>/logs/train.log`` while the run lasts."""
    (run_dir / LOGS).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / LOGS / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("lora_trainer")
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    # Python warnings (where the CLI captures them) and the libraries' notices (where the CLI keeps them off the
    # terminal: they do not reach the root logger then)
    others = [logging.getLogger(name) for name in ("py.warnings", *LIBRARIES)]
    for other in others:
        other.addHandler(handler)
    try:
        yield run_dir / LOGS
    finally:
        for other in others:
            other.removeHandler(handler)
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
