"""Checks of where a run writes, before any model loads: the output folder can be made and written, and the LoRA's
name is a file name this system takes once every suffix is added. The tab's LoRA name field applies ``name_problem``
too, so both say the same."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from lora_trainer.errors import ConfigError

# bytes a written name adds to output_name at most: ".<name>-step123456_99.safetensors.abcdefgh.tmp" (a temp file
# beside the final name, an interim export's step, a free-name counter)
SUFFIX_BYTES = 40
FORBIDDEN = set('/\\:*?"<>|')  # separators, and what Windows refuses (a LoRA is shared across systems)


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def name_problem(name: str, folder: Path | None = None) -> str | None:
    """What is wrong with ``name`` as the LoRA's file name (None: nothing): empty, a separator or a character
    Windows refuses, a control character (NUL), '.' or '..', a trailing dot or space, or too long in bytes."""
    if not name or not name.strip():
        return "is empty: give the LoRA a name (it becomes <lora:name:0.7>)"
    bad = sorted({c for c in name if c in FORBIDDEN or ord(c) < 32})
    if bad:
        shown = ", ".join("NUL" if c == "\0" else repr(c) for c in bad)
        return f"{name!r} contains {shown}: use letters, digits, spaces, '-', '_' or '.' (no / \\ : * ? \" < > |)"
    if name.strip() in (".", "..") or name != name.rstrip(". "):
        return f"{name!r} ends with a dot or a space (or is '.' / '..'), which some systems drop: remove it"
    limit = _name_max(Path(folder) if folder else Path.cwd()) - SUFFIX_BYTES
    size = len(name.encode("utf-8"))
    if size > limit:
        return f"is {size} bytes long in UTF-8; at most {limit} fit this file system with the suffixes added"
    return None


def folder_problem(path: str | os.PathLike) -> str | None:
    """What stops a run from writing in ``path`` (None: nothing): it is a file, it lies under a file, or the
    nearest folder that exists cannot be written (read-only file system, no permission)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder: choose a folder (it is made if missing)"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{path} lies under {existing}, which is a file: choose a folder path"
    try:
        fd, probe = tempfile.mkstemp(prefix=".lora_trainer_probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = {errno.EROFS: "a read-only file system", errno.EACCES: "no permission to write there",
               errno.EPERM: "no permission to write there"}.get(e.errno, e.strerror or str(e))
        return f"cannot write in {existing} ({why}): choose a folder you can write to"
    return None


def check_output(output_dir: str, output_name: str) -> None:
    """Both checks; a ConfigError naming the keys, before anything is loaded or written."""
    problems = []
    folder = folder_problem(output_dir)
    if folder:
        problems.append(f"output.output_dir: {folder}")
    name = name_problem(output_name, Path(output_dir).expanduser())
    if name:
        problems.append(f"output.output_name: {name}")
    if problems:
        raise ConfigError("; ".join(problems))
