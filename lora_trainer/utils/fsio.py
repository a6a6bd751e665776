"""Safe file writing: write to a temp file beside the target, then move it into place.

Two ways to land a file:
- ``atomic_write`` replaces the target (for files the run owns: checkpoints, summaries).
- ``write_new`` never replaces anything: if the name is taken it picks ``name_1.ext``, ``name_2.ext``…
  (for results a user keeps: LoRA files), and the link step is atomic, so two writers cannot clash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the user's usual mode
    try:
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result over ``path`` in one step."""
    path = Path(path)
    with _temp_beside(path) as tmp:
        write(tmp)
        os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def free_name(path: str | os.PathLike) -> Path:
    """``path`` if nothing is there, else the first free ``stem_N.suffix`` beside it."""
    path = Path(path)
    if not path.exists():
        return path
    n = 1
    while True:
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        if not candidate.exists():
            return candidate
        n += 1


def write_new(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a new file at ``path`` or, if taken, at the next free ``stem_N.suffix``; return where.

    Never overwrites: the finished temp file is hard-linked to the final name, which fails if another
    file appeared there meanwhile (then the next free name is tried).
    """
    path = Path(path)
    with _temp_beside(path) as tmp:
        write(tmp)
        while True:
            target = free_name(path)
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
            except OSError:  # file systems without hard links: exclusive create, then copy
                try:
                    with open(target, "xb") as out, open(tmp, "rb") as src:
                        shutil.copyfileobj(src, out)
                    return target
                except FileExistsError:
                    continue
                except BaseException:  # (a full disk mid-copy, say): no half-written file under the final name
                    target.unlink(missing_ok=True)
                    raise


def atomic_dir(final: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Build a folder under a temp name, then rename it to ``final`` (which must not exist)."""

    @contextlib.contextmanager
    def _cm() -> Iterator[Path]:
        target = Path(final)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            yield tmp
            if target.exists():
                raise FileExistsError(f"{target} already exists; refusing to replace it")
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    return _cm()
