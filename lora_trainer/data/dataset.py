"""Scan a dataset folder into usable samples (with captions) and skipped files (with reasons)."""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import posixpath
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_trainer.data.buckets import BucketSpec, Fit, bucket_info, groups
from lora_trainer.data.captions import read_metadata_csv, strip_markdown, tag_frequency
from lora_trainer.data.images import (
    IMAGE_EXTENSIONS,
    SCAN_DRAFT_PX,
    ImageError,
    center_crop_box,
    decode_threads,
    draft_scale,
    is_image_name,
    load_image,
    open_image,
    resize_center_crop,
    resize_crop,
    shown_sizes,
    strict_decoding,
    to_tensor,
)
from lora_trainer.errors import DatasetError

log = logging.getLogger(__name__)
ACCEPTED = ", ".join(IMAGE_EXTENSIONS)
# reason text -> the kind counted in the summary (first match wins; anything else is "corrupt")
_KINDS = (("not found", "missing"), ("escapes", "outside the folder"), ("not a supported", "not an image"),
          ("not an image", "not an image"), ("empty file", "empty"), ("too large", "too large"),
          ("cannot read", "unreadable"), ("loops or points nowhere", "broken link"), ("a folder", "not an image"),
          ("layout leaves it out", "left out"))
# what to do about a skipped file, by its kind
FIXES = {
    "missing": "correct the name in the caption file (metadata.csv), or put the image back",
    "outside the folder": "copy the image into the dataset folder and name it relative to that folder",
    "not an image": "remove it from the folder (or, if it is a picture in another format, save it as PNG or JPEG)",
    "empty": "the file has no data (an interrupted copy?): copy it again, or remove it",
    "too large": "scale the picture down (4096 px a side is plenty) and save it again, or remove it",
    "unreadable": "give yourself read permission on the file (chmod), or remove it",
    "broken link": "remove the link, or point it at an image",
    "corrupt": "re-save the file as PNG or JPEG (open it in an image editor), or remove it",
    "left out": "move the image into a <repeats>_<name> folder (such as 10_sks dog), or its row out of metadata.csv",
}


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str  # what the trainer tokenizes: prefix + caption without markdown
    core_tags: tuple[str, ...]
    caption_source: str  # "csv" | "txt" | "folder" (kohya's class tokens) | "none"
    repeats: int = 1  # times an epoch trains it (kohya's "<repeats>_<name>" folders)
    folder: str = ""  # the kohya folder it is in ("" where the dataset is not laid out so)
    is_reg: bool = False  # a regularization image (data.reg_data_dir; data.regularization)
    # the lines the caption is written on, up to its last non-blank one (joined with ", " into ``caption``; kohya's
    # scripts read only the first line of a caption file: the dataset check says so)
    caption_lines: int = 1


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to the dataset folder, or the name as written in metadata.csv
    reason: str

    @property
    def kind(self) -> str:
        return kind_of(self.reason)

    @property
    def fix(self) -> str:
        return FIXES[self.kind]


def kind_of(reason: str) -> str:
    """The kind of a reason a file is skipped for (a key of FIXES)."""
    return next((kind for key, kind in _KINDS if key in reason), "corrupt")


@dataclass
class DatasetScan:
    root: Path
    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # metadata.csv / caption file warnings
    folder_notes: list[str] = field(default_factory=list)  # kohya's layout: the folders left out, and why
    reg_dirs: dict = field(default_factory=dict)  # the regularization folders, all their images (data.regularization)
    csv_name: str = "metadata.csv"
    caption_extension: str = ".txt"
    facts: dict[Path, object] = field(default_factory=dict)  # image path -> what scan_dataset's inspect made
    recursive: bool = False  # subfolders were read (data.recursive)

    def tag_frequency(self) -> dict[str, int]:
        return tag_frequency(s.caption for s in self.samples)

    def folders(self) -> dict[str, dict[str, int]]:
        """kohya's folders of the images used: name → {"n_repeats", "img_count"} (kohya's ss_dataset_dirs); {} where
        the dataset is not laid out so."""
        return folder_counts(s for s in self.samples if not s.is_reg)

    def tag_frequencies(self) -> dict[str, dict[str, int]]:
        """kohya's ss_tag_frequency ``{folder: {tag: count}}``: an entry per kohya folder, else one for the dataset."""
        trained = [s for s in self.samples if not s.is_reg]
        if not any(s.folder for s in trained):
            return {self.root.name: tag_frequency(s.caption for s in trained)}
        return {name: tag_frequency(s.caption for s in trained if s.folder == name) for name in self.folders()}

    def summary(self) -> str:
        kinds = Counter(s.kind for s in self.skipped)
        skipped = f"{len(self.skipped)} skipped"
        if kinds:
            skipped += " (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")"
        sources = Counter(s.caption_source for s in self.samples)
        text = (f"dataset {self.root}: {len(self.samples)} images used, {skipped}; captions: "
                f"{sources['csv']} from {self.csv_name}, {sources['txt']} from {self.caption_extension}, "
                + (f"{sources['folder']} from their folder's name, " if sources["folder"] else "")
                + f"{sources['none']} without caption")
        return text + (f"; {self.folders_text()}" if self.folders() else "")

    def folders_text(self) -> str:
        """"kohya folders: 10_sks dog (12 × 10), … = N images an epoch"."""
        return ("kohya folders: " + ", ".join(f"{name} ({f['img_count']} × {f['n_repeats']})"
                                             for name, f in self.folders().items())
                + f" = {sum(s.repeats for s in self.samples if not s.is_reg)} images an epoch")


def folder_counts(samples) -> dict[str, dict[str, int]]:
    """kohya's folders of ``samples``: name → {"n_repeats", "img_count"} (ss_dataset_dirs)."""
    out: dict[str, dict[str, int]] = {}
    for s in samples:
        if s.folder:
            out.setdefault(s.folder, {"n_repeats": s.repeats, "img_count": 0})["img_count"] += 1
    return out


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):  # (RuntimeError: a symlink loop, Python < 3.13)
        return False


LOOP = "a link that loops or points nowhere: remove it, or point it at an image"
# a link to a file outside the folder is not followed: a dataset made by someone else (an archive with links in it)
# must not train a file of this machine into a LoRA that may be shared
OUTSIDE = ("escapes the dataset folder (a link to a file outside it, not followed: copy the file in, or make the "
           "folder it is in the dataset)")


def _resolves(path: Path) -> bool:
    try:
        path.resolve(strict=True)
        return True
    except (OSError, RuntimeError):
        return False


def _find_files(root: Path, recursive: bool) -> tuple[dict[str, Path], Counter]:
    """Image files by relative path (hidden files and folders left out), and the other suffixes seen."""
    images: dict[str, Path] = {}
    others: Counter[str] = Counter()
    for folder, dirs, files in os.walk(root):  # does not follow links to folders
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        for name in files:
            if name.startswith("."):
                continue
            path = Path(folder, name)
            if is_image_name(name):
                images[path.relative_to(root).as_posix()] = path
            else:
                others[path.suffix.lower() or "(no extension)"] += 1
    return images, others


KOHYA_FOLDER = re.compile(r"(\d+)(?:_(.*))?")  # as kohya's scripts read it: the words after the first "_" as written
YEAR_LIKE = 1000  # repeats from here on are more likely a folder named for a year ("2023_trip"): said so


def kohya_folders(root: Path) -> tuple[dict[str, tuple[int, str]], list[str]] | None:
    """kohya's layout: a dataset folder that holds no image itself, only sub-folders named ``<repeats>_<class
    tokens>`` ("10_sks dog": each of its images 10 times an epoch; one without a caption trained as "sks dog").
    Returns the usable folders (name → (repeats, class tokens)) and what is said of the rest (left out, as kohya's
    scripts leave them: another name, 0 repeats); None where ``root`` is not laid out so."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return None
    if any(e.is_file() and not e.name.startswith(".") and is_image_name(e.name) for e in entries):
        return None
    subfolders = [e.name for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    named = {n: KOHYA_FOLDER.fullmatch(n) for n in subfolders}
    if not any(named.values()):
        return None
    folders, notes = {}, []
    for name, match in named.items():
        if match is None:
            notes.append(f"folder {name}: left out (kohya's layout: a folder of images is named <repeats>_<name>, "
                         "such as 10_sks dog)")
        elif int(match[1]) < 1:
            notes.append(f"folder {name}: left out (0 repeats)")
        else:
            folders[name] = (int(match[1]), (match[2] or "").strip())
            if int(match[1]) >= YEAR_LIKE:
                notes.append(f"folder {name}: read as {int(match[1])} repeats an epoch (kohya's <repeats>_<name>); "
                             "rename it if that is not meant")
    return folders, notes


def _find_images(root: Path, recursive: bool) -> tuple[dict[str, Path], Counter, dict[str, tuple[int, str]], list]:
    """``_find_files``, and kohya's folders where ``root`` is laid out so (then only their images, each folder's
    sub-folders too where ``recursive``), with what is said of that layout (``kohya_folders``)."""
    layout = kohya_folders(root)
    if layout is None:
        return (*_find_files(root, recursive), {}, [])
    folders, notes = layout
    images: dict[str, Path] = {}
    others: Counter[str] = Counter()
    for name in folders:
        found, other = _find_files(root / name, recursive)
        images.update({f"{name}/{rel}": path for rel, path in found.items()})
        others.update(other)
        if not found:
            notes.append(f"folder {name}: no images in it")
    return images, others, folders, notes


def _csv_target(root: Path, name: str) -> tuple[str, Path] | str:
    """(relative path, path) for a file name in metadata.csv, or why it cannot be used."""
    p = Path(name.replace("\\", "/"))  # a csv written on Windows
    if p.is_absolute():
        try:
            p = p.relative_to(root)
        except ValueError:
            return "escapes the dataset folder (an absolute path elsewhere)"
    rel = posixpath.normpath(p.as_posix())
    if rel == ".." or rel.startswith("../"):
        return "escapes the dataset folder"
    if not _inside(root, root / rel):
        return OUTSIDE
    return rel, root / rel


def _did_you_mean(rel: str, images: dict[str, Path]) -> str:
    stem = posixpath.splitext(rel.lower())[0]
    near = [r for r in images if r.lower() == rel.lower() or posixpath.splitext(r.lower())[0] == stem]
    return f" (did you mean {near[0]}?)" if near else ""


def _check(root: Path, path: Path, inspect=None) -> tuple[str | None, object]:
    """(why the image cannot be used or None, what ``inspect(path, image, size)`` made of the image)."""
    if not _resolves(path):
        return LOOP, None
    if not _inside(root, path):
        return OUTSIDE, None
    try:  # every byte is decoded (a damaged file fails), a large JPEG at 1/8 scale: the check needs no more
        img, size = open_image(path, draft=SCAN_DRAFT_PX)
    except ImageError as e:
        return e.reason, None
    return None, inspect(path, img, size) if inspect else None


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False also where the name cannot be a file's (too long for the file system: a caption in
    metadata.csv's file name column)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _same_file(a: Path, b: Path) -> bool:
    """Whether two names are one file: on a case-insensitive file system (Windows', macOS's) metadata.csv's
    "IMG_1.jpg" is the folder's "IMG_1.JPG", to be trained once, with that row's caption."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _read_sidecar(path: Path, problems: list[str], root: Path | None = None) -> str | None:
    if not _is_file(path):
        return None
    name = path.relative_to(root).as_posix() if root else path.name
    if root and not _inside(root, path):  # (as an image linked from outside: not read into a LoRA's metadata)
        problems.append(f"{name}: caption file {OUTSIDE}; ignored")
        log.warning("%s", problems[-1])
        return None
    try:
        raw = path.read_bytes()
        # (Windows Notepad's "Unicode" is UTF-16 with a byte order mark; everything else is read as UTF-8)
        text = raw.decode("utf-16") if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else \
            raw.decode("utf-8-sig")
        if "\0" in text:
            problems.append(f"{name}: NUL characters removed from the caption")
            log.warning("%s", problems[-1])
            text = text.replace("\0", "")
        return text
    except UnicodeDecodeError:
        problems.append(f"{name}: caption file is not UTF-8 text; ignored (re-save it as UTF-8)")
    except OSError as e:
        problems.append(f"{name}: caption file cannot be read ({e.strerror or e}); ignored")
    log.warning("%s", problems[-1])
    return None


@dataclass
class DatasetFiles:
    """What a dataset folder holds, before any image is decoded: image files and their raw captions."""

    root: Path
    csv_path: Path
    caption_extension: str
    images: dict[str, Path]  # relative path -> file: images in the folder and images metadata.csv names
    csv_captions: dict[str, str]  # relative path -> raw caption (markdown kept) from metadata.csv
    csv_names: dict[str, str]  # relative path -> the file name as its metadata.csv row writes it
    csv_skipped: list[Skipped]  # metadata.csv rows that cannot be used
    problems: list[str]  # metadata.csv warnings
    in_folder: int  # image files found in the folder itself
    others: Counter  # other suffixes seen
    folders: dict[str, tuple[int, str]] = field(default_factory=dict)  # kohya's: name → (repeats, class tokens)
    folder_notes: list[str] = field(default_factory=list)  # kohya's layout: the folders left out, and why

    def sidecar(self, rel: str) -> Path:
        return self.images[rel].with_suffix(self.caption_extension)

    def folder(self, rel: str) -> str:
        """The kohya folder image ``rel`` is in ("" where none)."""
        top = rel.split("/", 1)[0]
        return top if "/" in rel and top in self.folders else ""


def find_dataset_files(root, metadata_path=None, caption_extension: str = ".txt",
                       recursive: bool = False) -> DatasetFiles:
    """List a dataset folder's images and metadata.csv captions (no image is opened)."""
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} is not an existing folder")
    csv_path = Path(metadata_path).expanduser().resolve() if metadata_path else root / "metadata.csv"
    if metadata_path and csv_path.is_dir():
        raise DatasetError(f"data.metadata_path: {csv_path} is a folder; give the metadata.csv file itself")
    if metadata_path and not csv_path.is_file():
        raise DatasetError(f"data.metadata_path: metadata file {csv_path} does not exist")
    rows, problems = read_metadata_csv(csv_path) if csv_path.is_file() else ({}, [])
    for problem in problems:
        log.warning("%s", problem)
    candidates, others, folders, notes = _find_images(root, recursive)
    for note in notes:
        log.warning("%s: %s", root, note)
    files = DatasetFiles(root, csv_path, ext, candidates, {}, {}, [], problems, len(candidates), others, folders,
                         notes)
    found = dict(candidates)
    by_lower = {}
    for rel in found:
        by_lower.setdefault(rel.lower(), []).append(rel)
    listed: dict[str, int] = {}  # the line each image is listed on
    for name, entry in rows.items():
        where = f"listed in {csv_path.name} line {entry.line}"
        target = _csv_target(root, name)
        if entry.raw != name:  # (a name with spaces at its ends: the file of that exact name first)
            exact = _csv_target(root, entry.raw)
            if not isinstance(exact, str) and _is_file(exact[1]):
                target, name = exact, entry.raw
        if not isinstance(target, str) and target[0] not in found:  # (the same file under another spelling?)
            target = next(((r, found[r]) for r in by_lower.get(target[0].lower(), ())
                           if _same_file(found[r], target[1])), target)
        if isinstance(target, str):
            reason = f"{where}: {target}"
        elif not _is_file(target[1]):
            reason = f"{where} but not found{_did_you_mean(target[0], found)}"
        elif not is_image_name(target[0]):
            reason = f"{where}: not a supported image type (use {ACCEPTED})"
        elif folders and not files.folder(target[0]):
            reason = f"{where}: outside the <repeats>_<name> folders (kohya's layout leaves it out)"
        else:
            if target[0] in listed:  # (./a.png and a.png, IMG.JPG and img.jpg: one file)
                problems.append(f"{csv_path.name} line {entry.line}: {name} is {target[0]}, also listed as "
                                f"{files.csv_names[target[0]]} on line {listed[target[0]]}; line {entry.line} wins")
                log.warning("%s", problems[-1])
            listed[target[0]] = entry.line
            candidates.setdefault(*target)
            files.csv_captions[target[0]] = entry.caption
            files.csv_names[target[0]] = name
            continue
        files.csv_skipped.append(Skipped(name, reason))
        log.debug("skipped %s: %s", name, reason)  # (the dataset check lists them, with a fix each)
    return files


def pick_caption(files: DatasetFiles, rel: str, caption_priority: str = "csv",
                 problems: list[str] | None = None) -> tuple[str, str]:
    """(source, raw caption) of one image: "csv" | "txt" | "none", by ``caption_priority``; an image in a kohya
    folder without either: "folder", the folder's class tokens (as kohya's scripts train it)."""
    sidecar = _read_sidecar(files.sidecar(rel), files.problems if problems is None else problems, files.root)
    choices = [("csv", files.csv_captions.get(rel)), ("txt", sidecar)]
    if caption_priority == "txt":
        choices.reverse()
    folder = files.folder(rel)
    if folder:
        choices.append(("folder", files.folders[folder][1]))
    return next(((s, c) for s, c in choices if c and c.strip()), ("none", ""))


_NEWLINE = re.compile(r"\r\n|\r|\n")  # (the lines of a file as Python's text mode reads them: kohya's scripts)


def caption_lines(raw: str) -> int:
    """The lines a caption is written on, up to its last non-blank one (a trailing newline makes none): more than 1
    where kohya's scripts, reading ``lines[0]`` of a caption file, would train a part of it (a blank first line:
    nothing)."""
    return max(1, len(_NEWLINE.split(raw.rstrip())))


def with_prefix(prefix: str, caption: str) -> str:
    """The caption with data.caption_prefix before it, a space between as kohya joins them ("sks" + "a dog" → "sks a
    dog", not "sksa dog"); none where the prefix ends in one or the caption is empty."""
    if not prefix or not caption or prefix[-1].isspace():
        return prefix + caption
    return f"{prefix} {caption}"


def scan_dataset(root, metadata_path=None, caption_extension: str = ".txt", caption_priority: str = "csv",
                 caption_prefix: str = "", recursive: bool = False, inspect=None) -> DatasetScan:
    """Find the images, check each one opens, attach captions; raise DatasetError if none is usable.

    ``inspect(path, image, size)``, if given, sees every usable image while it is decoded anyway (the
    dataset check's sizes and hashes; ``image`` may be a JPEG decoded at a reduced scale, ``size`` is the
    whole picture's); its results are in ``scan.facts``.
    """
    if caption_priority not in ("csv", "txt"):
        raise ValueError(f"caption_priority must be 'csv' or 'txt', not {caption_priority!r}")
    files = find_dataset_files(root, metadata_path, caption_extension, recursive)
    root, candidates = files.root, files.images
    scan = DatasetScan(root, csv_name=files.csv_path.name, caption_extension=files.caption_extension,
                       problems=files.problems, skipped=list(files.csv_skipped), folder_notes=files.folder_notes,
                       recursive=recursive)

    def skip(rel: str, reason: str) -> None:
        scan.skipped.append(Skipped(rel, reason))
        log.debug("skipped %s: %s", rel, reason)  # (the dataset check lists them, with a fix each)

    order = sorted(candidates)
    with strict_decoding(), ThreadPoolExecutor(decode_threads()) as pool:
        checked = list(pool.map(lambda rel: _check(root, candidates[rel], inspect), order))
    for rel, (reason, fact) in zip(order, checked):
        if reason:
            skip(rel, reason)
            continue
        if inspect:
            scan.facts[candidates[rel]] = fact
        source, raw = pick_caption(files, rel, caption_priority)
        text, core = strip_markdown(raw)
        folder = files.folder(rel)
        scan.samples.append(Sample(candidates[rel], with_prefix(caption_prefix, text), tuple(core), source,
                                   files.folders[folder][0] if folder else 1, folder,
                                   caption_lines=caption_lines(raw)))

    no_caption = sum(s.caption_source == "none" for s in scan.samples)
    if no_caption:
        log.warning("%d images have no caption (no %s row, no %s file): trained with the prefix only",
                    no_caption, files.csv_path.name, files.caption_extension)
    if not scan.samples:
        raise DatasetError(_nothing_usable(scan, files.in_folder, files.others, recursive))
    return scan


def _nothing_usable(scan: DatasetScan, n_images: int, others: Counter, recursive: bool) -> str:
    msg = (f"no usable images in {scan.root}: looked at {n_images + sum(others.values())} file(s), "
           f"{n_images} with an image extension")
    if scan.skipped:
        first = "; ".join(f"{s.path}: {s.reason}" for s in scan.skipped[:3])
        msg += f"; skipped {len(scan.skipped)}: {first}"
        msg += "; …" if len(scan.skipped) > 3 else ""
    if others:
        top = sorted(others.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        msg += "; other files: " + ", ".join(f"{n} {ext}" for ext, n in top)
    if scan.folder_notes:  # (kohya's layout)
        msg += "; " + "; ".join(scan.folder_notes)
    deeper = 0 if recursive or scan.folder_notes else len(_find_files(scan.root, True)[0]) - n_images
    if deeper:
        msg += f"; {deeper} image file(s) are in subfolders (turn on recursive to use them)"
    return msg + f". Accepted types: {ACCEPTED}"


class ImageDataset(torch.utils.data.Dataset):
    """Samples → pixel tensors in [-1, 1] and their captions: each image scaled and cropped into its aspect-ratio
    bucket (``buckets``, data.buckets; centred, or at a seeded random place with ``random_crop``), or, without
    buckets, resized and center-cropped to a ``resolution`` square.

    ``fast_jpeg_decode``: JPEGs decode at a reduced scale (libjpeg's DCT scaling), at least twice the size they
    are resized to, so the resize that follows still filters down from more pixels than it keeps. ``sizes``: each
    picture's (w, h) as shown where already known (the dataset scan's); else read from the file headers.
    An item is ``dataset[i]``, or ``dataset[(i, epoch)]`` for the random crop of that epoch (``(i, epoch, repeat)``:
    of that repeat of the image in the epoch).
    """

    def __init__(self, samples: list[Sample], resolution: int, fast_jpeg_decode: bool = False,
                 buckets: BucketSpec | None = None, sizes: list | None = None, random_crop: bool = False,
                 seed: int = 0):
        self.samples, self.resolution, self.fast_jpeg_decode = list(samples), resolution, fast_jpeg_decode
        self.buckets, self.random_crop, self.seed = buckets, random_crop and buckets is not None, seed
        self._sizes = list(sizes) if sizes is not None else None
        self._fits: list[Fit] | None = None
        self._geometry: dict[int, tuple[int, int, int, int, int]] = {}  # image → (h, w, top, left, scaled w)

    def __len__(self) -> int:
        return len(self.samples)

    def _shown(self, i: int, draft=None) -> tuple[tuple[int, int], tuple[int, int]]:
        try:
            return shown_sizes(self.samples[i].path, draft)
        except OSError as e:
            raise DatasetError(f"{self.samples[i].path}: cannot read it ({e}) (it changed after the dataset "
                               "scan)") from None

    @property
    def fits(self) -> list[Fit]:
        """Each image's bucket (data.buckets.Fit); computed once, from the sizes or the file headers."""
        if self.buckets is None:
            raise ValueError("this dataset crops squares (data.enable_bucket is off): it has no buckets")
        if self._fits is None:
            sizes = self._sizes or [None] * len(self)
            self._fits = [self.buckets.fit(*(size or self._shown(i)[0])) for i, size in enumerate(sizes)]
        return self._fits

    def groups(self) -> list[list[int]]:
        """Image indices by bucket (one group of all images without buckets): a batch holds one group's images."""
        if self.buckets is None:
            return [list(range(len(self)))]
        return list(groups(self.fits).values())

    def epoch_groups(self) -> list[list[int]]:
        """``groups()`` with each image as many times as an epoch trains it (its ``repeats``: kohya's folders)."""
        return [[i for i in group for _ in range(self.samples[i].repeats)] for group in self.groups()]

    def bucket_info(self) -> dict | None:
        """kohya's ss_bucket_info of these images, or None without buckets."""
        return bucket_info(self.fits) if self.buckets is not None else None

    def _draft(self, i: int):
        if not self.fast_jpeg_decode:
            return None
        if self.buckets is None:
            return 2 * self.resolution
        w, h = self.fits[i].resized
        return 2 * w, 2 * h

    def decode_scale(self, i: int) -> int:
        """1, or the 2, 4, 8 that image ``i`` is shrunk by as it decodes (a large JPEG, fast_jpeg_decode)."""
        return draft_scale(self.samples[i].path, self._draft(i)) if self.fast_jpeg_decode else 1

    def crop(self, i: int, epoch: int | None = None, repeat: int = 0) -> tuple[int, int]:
        """(top, left) of image ``i``'s crop in its resized picture: centred, or with random_crop a place drawn
        from (seed, epoch, image, repeat) for ``epoch`` (so a resume cuts the same), anew for each ``repeat`` (the
        times the epoch cut the image before: kohya's folders train an image several times an epoch)."""
        fit = self.fits[i]
        if not self.random_crop or epoch is None:
            return fit.centre()
        rows, cols = fit.slack
        digest = hashlib.sha256((f"{self.seed}|{epoch}|{i}" + (f"|{repeat}" if repeat else "")).encode()).hexdigest()
        return int(digest[:15], 16) % (rows + 1), int(digest[15:30], 16) % (cols + 1)

    def geometry(self, i: int) -> tuple[int, int, int, int, int]:
        """Image ``i``'s (height, width) as shown, the (top, left) where its centred training crop is cut out of the
        resized picture, and that picture's width. From the file's header (no decode), once."""
        if i not in self._geometry:
            if self.buckets is not None:
                fit = self.fits[i]
                (width, height), (top, left) = fit.size, fit.centre()
                self._geometry[i] = (height, width, top, left, fit.resized[0])
            else:
                (width, height), decoded = self._shown(i, self._draft(i))
                w, _, left, top = center_crop_box(*decoded, self.resolution)
                self._geometry[i] = (height, width, top, left, w)
        return self._geometry[i]

    def target(self, i: int) -> tuple[int, int]:
        """The (width, height) image ``i`` trains at: its bucket, or the resolution square."""
        return self.fits[i].bucket if self.buckets is not None else (self.resolution, self.resolution)

    def time_ids(self, indices, flip: torch.Tensor | None = None, crops: torch.Tensor | None = None) -> torch.Tensor:
        """SDXL's size conditioning of images ``indices`` (mirrored where ``flip``): B×6 float32, per image
        (original height, width, crop top, left, target height, width) as the SDXL paper and diffusers' SDXL
        training define them: the whole picture's size, the crop's offset in the resized picture (``crops``: the
        batch's (top, left) where it was cut at random; measured from the mirrored side when flipped), and the
        size trained at (the bucket)."""
        rows = []
        flips = [False] * len(indices) if flip is None else [bool(f) for f in flip.tolist()]
        for k, (i, flipped) in enumerate(zip([int(i) for i in indices], flips)):
            height, width, top, left, scaled_w = self.geometry(i)
            if crops is not None:
                top, left = (int(v) for v in crops[k].tolist())
            target_w, target_h = self.target(i)
            if flipped:
                left = scaled_w - target_w - left
            rows.append((height, width, top, left, target_h, target_w))
        return torch.tensor(rows, dtype=torch.float32)

    def __getitem__(self, key) -> dict:
        i, epoch, repeat = (*key, 0)[:3] if isinstance(key, tuple) else (key, None, 0)
        s = self.samples[i]
        try:
            img = load_image(s.path, draft=self._draft(i))
        except ImageError as e:  # it was fine when the dataset was scanned
            raise DatasetError(f"{s.path}: {e.reason} (it changed after the dataset scan); put it back, or "
                               "start again so the scan leaves it out") from None
        if self.buckets is None:
            return {"pixel_values": to_tensor(resize_center_crop(img, self.resolution)), "caption": s.caption,
                    "index": i}
        fit = self.fits[i]
        top, left = self.crop(i, epoch, repeat)
        pixels = to_tensor(resize_crop(img, fit.resized, (left, top, left + fit.bucket[0], top + fit.bucket[1])))
        return {"pixel_values": pixels, "caption": s.caption, "index": i, "crop": (top, left)}


def collate(batch: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "captions": [b["caption"] for b in batch],
        "indices": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        **({"crops": torch.tensor([b["crop"] for b in batch], dtype=torch.long)} if "crop" in batch[0] else {}),
    }
