"""The dataset check: what the trainer will see, and what is likely to hurt the LoRA.

Every finding names the files concerned and a fix. Nothing is changed on disk. The CLI's ``check``,
the tab's check panel and the training run (before it starts) print the same report. The regularization images
(data.reg_data_dir), where given, are checked too, read as the run reads them; their findings are labelled as theirs
(``Finding.dataset``), and none asks them for captions (kohya's layout: the folder's class tokens are theirs).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from lora_trainer.data.buckets import CROP_WARN, UPSCALE_WARN, BucketSpec, groups
from lora_trainer.data.captions import split_tags, tag_frequency
from lora_trainer.data.dataset import FIXES, KOHYA_FOLDER, DatasetScan, kind_of, scan_dataset
from lora_trainer.data.images import (
    SCAN_DRAFT_PX,
    ImageError,
    decode_threads,
    file_digest,
    is_image_name,
    open_image,
    strict_decoding,
)
from lora_trainer.data.phash import near_pairs, phash
from lora_trainer.data.regularization import balanced_repeats, scan_regularization
from lora_trainer.data.tokens import TOKEN_WINDOW, count_tokens
from lora_trainer.errors import DatasetError, LoraTrainerError

log = logging.getLogger(__name__)
GLOSSARY = Path(__file__).with_name("glossary.yaml")
SEVERITIES = ("error", "warning", "info")
MAX_ASPECT = 2.0  # without buckets the centre square crop then drops half the picture or more
NEAR_BITS = 6  # pHash distance for "near duplicate" (resized or re-encoded copies are 0-2 apart)
SIZE_GUIDE = (50, 200)  # images, for a style LoRA
SIDECARS = (".txt", ".caption")  # caption files as kohya's scripts and the tagging tools write them
# pictures in formats the trainer does not decode (data.images.IMAGE_EXTENSIONS are those it does)
OTHER_PICTURES = (".gif", ".heic", ".heif", ".avif", ".jxl", ".tif", ".tiff", ".jfif", ".psd", ".svg", ".raw",
                  ".cr2", ".nef", ".arw", ".dng")
# a negation that describes what is NOT in the image: it belongs in the negative prompt
_NEGATION = re.compile(r"\b(?:not|without|never|isn't|aren't|doesn't|don't|non)[\s-]+\w+"
                       r"|\bno\s+(?:blur\w*|watermarks?|text|signatures?|artifacts?|jpeg artifacts|noise|"
                       r"grain\w*|distortions?|deformed|deformities|bad \w+|extra \w+|logos?|lowres|"
                       r"low quality|worst quality|ugly|errors?|cropping|frames?|borders?)\b", re.IGNORECASE)


@dataclass
class Finding:
    check: str  # which check: unreadable, csv, small, aspect, duplicate, near-duplicate, ...
    severity: str  # error | warning | info
    message: str
    files: list[str] = field(default_factory=list)
    fix: str = ""
    # whose images: "training" (the dataset folder's) or "regularization" (data.reg_data_dir's; their files named
    # relative to that folder, their messages begin "regularization images: ")
    dataset: str = "training"


REG = "regularization"
REG_LABEL = "regularization images: "


@dataclass
class CheckReport:
    root: str
    images: int  # images the trainer will use
    findings: list[Finding] = field(default_factory=list)
    # the aspect-ratio buckets the images train in: [{"resolution": [w, h], "count": n}], sorted; [] without
    buckets: list[dict] = field(default_factory=list)
    reg_root: str = ""  # the regularization images' folder (data.reg_data_dir), "" where none is checked
    reg_images: int = 0  # regularization images the trainer can use

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict:
        return {"root": self.root, "images": self.images, "findings": [asdict(f) for f in self.findings],
                "buckets": self.buckets, "reg_root": self.reg_root or None, "reg_images": self.reg_images}

    def summary(self, max_files: int = 5) -> str:
        head = (f"dataset check of {self.root}: {self.images} images; {self.count('error')} errors, "
                f"{self.count('warning')} warnings, {self.count('info')} notes")
        lines = [head]
        if self.reg_root:
            lines.append(f"  regularization images (data.reg_data_dir) of {self.reg_root}: {self.reg_images} images; "
                         f"their findings begin '{REG_LABEL.strip()}'")
        if self.buckets:
            listed = ", ".join("{}×{} ×{}".format(*b["resolution"], b["count"]) for b in self.buckets)
            lines.append(f"  aspect-ratio buckets ({len(self.buckets)}; a batch holds one bucket's images): {listed}")
        for f in sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity)):
            files = ", ".join(f.files[:max_files]) + (f" (+{len(f.files) - max_files} more)"
                                                      if len(f.files) > max_files else "")
            lines.append(f"  [{f.severity}] {f.message}" + (f": {files}" if files else ""))
            if f.fix:
                lines.append(f"      fix: {f.fix}")
        if not self.findings:
            lines.append("  no problems found")
        return "\n".join(lines)


def _n(count: int, noun: str, verb: str = "") -> str:
    """'1 image is', '2 images are' (nouns here take a plain -s)."""
    verbs = {"is": "are", "has": "have", "looks": "look", "occurs": "occur"}
    words = [str(count), noun if count == 1 else noun + "s"]
    if verb:
        words.append(verb if count == 1 else verbs.get(verb, verb))
    return " ".join(words)


def load_glossary(root: Path | None = None, path=None) -> dict[str, list[str]]:
    """The built-in glossary, updated by ``<dataset>/glossary.yaml`` and then by ``path``."""
    if path is not None and not Path(path).is_file():
        raise LoraTrainerError(f"glossary {path} does not exist")
    groups: dict[str, list[str]] = {}
    for source in (GLOSSARY, root / "glossary.yaml" if root else None, Path(path) if path else None):
        if source is None or not source.is_file():
            continue
        try:
            data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise LoraTrainerError(f"glossary {source}: not valid YAML ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise LoraTrainerError(f"glossary {source}: expected 'idea: [phrase, phrase, ...]' entries")
        groups.update({str(k): [str(v).lower() for v in vs] for k, vs in data.items()})
    return groups


@dataclass
class _ImageInfo:
    size: tuple[int, int] | None = None
    phash: np.ndarray | None = None
    digest: str = ""
    error: str = ""


def image_facts(path: Path, img, size: tuple[int, int]) -> _ImageInfo:
    """Size, perceptual hash and file digest of a decoded image (``scan_dataset(inspect=image_facts)``)."""
    return _ImageInfo(size, phash(img), file_digest(path))


def _inspect(path: Path) -> _ImageInfo:
    try:
        return image_facts(path, *open_image(path, draft=SCAN_DRAFT_PX))
    except ImageError as e:  # changed since the scan
        return _ImageInfo(error=e.reason)


def _rel(scan: DatasetScan, path: Path) -> str:
    try:
        return path.relative_to(scan.root).as_posix()
    except ValueError:
        return str(path)


def _bucket_findings(names: list[str], infos: list[_ImageInfo], spec: BucketSpec) -> tuple[list[Finding], list[dict],
                                                                                           set[str]]:
    """With aspect-ratio buckets: the images that still lose more than CROP_WARN of the picture to the crop or are
    scaled up more than UPSCALE_WARN (warnings), the histogram, and the names scaled up less than that."""
    sized = [(n, i.size) for n, i in zip(names, infos) if i.size]
    fits = [spec.fit(*size) for _, size in sized]
    if not fits:
        return [], [], set()
    histogram = [{"resolution": list(reso), "count": len(members)} for reso, members in groups(fits).items()]
    out = []
    cropped = [(n, f) for (n, _), f in zip(sized, fits) if f.kept < 1 - CROP_WARN]
    if cropped:
        out.append(Finding("crop", "warning",
                           f"{_n(len(cropped), 'image')} still {'loses' if len(cropped) == 1 else 'lose'} more than "
                           f"{CROP_WARN:.0%} of the picture to the crop into {'its' if len(cropped) == 1 else 'their'} "
                           "bucket (a shape no bucket has)",
                           [f"{n} ({f.size[0]}×{f.size[1]} → {f.bucket[0]}×{f.bucket[1]}, keeps {f.kept:.0%})"
                            for n, f in cropped],
                           f"crop them by hand to the part that matters, or widen the buckets' range (data."
                           f"max_bucket_reso {spec.max_reso} up, min_bucket_reso {spec.min_reso} down)"))
    enlarged = [(n, f) for (n, _), f in zip(sized, fits) if f.scale > UPSCALE_WARN]
    if enlarged:
        out.append(Finding("upscale", "warning",
                           f"{_n(len(enlarged), 'image', 'is')} scaled up more than {UPSCALE_WARN:g}× into "
                           f"{'its' if len(enlarged) == 1 else 'their'} bucket (blurry)",
                           [f"{n} ({f.size[0]}×{f.size[1]} → {f.bucket[0]}×{f.bucket[1]}, ×{f.scale:.1f})"
                            for n, f in enlarged],
                           "use larger originals, or set data.bucket_no_upscale: true (small images then train at "
                           "their own size)"))
    upscaled = {n for (n, _), f in zip(sized, fits) if f.scale > 1.0 + 1e-9}
    return out, histogram, upscaled - {n for n, _ in enlarged}


def _images(scan: DatasetScan, names: list[str], infos: list[_ImageInfo], resolution: int,
            buckets: BucketSpec | None = None) -> tuple[list[Finding], list[dict]]:
    out, histogram, upscaled = _bucket_findings(names, infos, buckets) if buckets else ([], [], set())
    small = [(n, i.size) for n, i in zip(names, infos) if i.size and min(i.size) < resolution
             and (buckets is None or n in upscaled)]  # (with buckets: those scaled up into their bucket, up to 2×)
    if small:
        worst = min(min(s) for _, s in small)
        lower = max(64, worst // 64 * 64)
        out.append(Finding("small", "warning",
                           f"{_n(len(small), 'image', 'is')} smaller than the training resolution {resolution} px and "
                           f"get upscaled (the smallest side is {worst} px: ×{resolution / worst:.1f}, blurry)",
                           [f"{n} ({w}×{h})" for n, (w, h) in small],
                           "use larger originals" + (f", or lower data.resolution to {lower}" if lower < resolution
                                                     else f" ({resolution} px is the lowest resolution there is)")))
    wide = [(n, i.size) for n, i in zip(names, infos) if i.size and max(i.size) / min(i.size) > MAX_ASPECT]
    if wide and buckets is None:  # (with buckets: the crop finding names what still loses much)
        out.append(Finding("aspect", "warning",
                           f"{_n(len(wide), 'image', 'has')} an extreme aspect ratio (over {MAX_ASPECT:g}:1); "
                           "the centre square crop drops half the picture or more",
                           [f"{n} ({w}×{h}, keeps {min(w, h) / max(w, h):.0%})" for n, (w, h) in wide],
                           "crop them by hand to the part that matters, split a wide image into squares, or turn "
                           "on data.enable_bucket (each image trained in the shape nearest its own)"))
    groups: dict[str, list[int]] = {}
    for k, info in enumerate(infos):
        if info.digest:
            groups.setdefault(info.digest, []).append(k)
    exact = [g for g in groups.values() if len(g) > 1]
    for g in exact:
        out.append(Finding("duplicate", "warning", f"{len(g)} identical files (the same image trained "
                           f"{len(g)}× as often)", [names[k] for k in g], "keep one of them"))
    same = {k: g[0] for g in exact for k in g}
    hashed = [k for k, info in enumerate(infos) if info.phash is not None]
    parent = {k: k for k in hashed}

    def root_of(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    for a, b, _ in near_pairs(np.array([infos[k].phash for k in hashed]).reshape(len(hashed), -1), NEAR_BITS):
        ka, kb = hashed[a], hashed[b]
        if same.get(ka, -1) != same.get(kb, -2):
            parent[root_of(kb)] = root_of(ka)
    near: dict[int, list[int]] = {}
    for k in hashed:
        near.setdefault(root_of(k), []).append(k)
    for g in near.values():
        if len({same.get(k, k) for k in g}) > 1:
            out.append(Finding("near-duplicate", "warning",
                               f"{len(g)} images look the same (resized, re-encoded or lightly edited copies)",
                               [names[k] for k in g], "keep the largest, best-quality one"))
    return out, histogram


def _captions(scan: DatasetScan, names: list[str], prefix: str, glossary: dict[str, list[str]]) -> list[Finding]:
    out = []
    texts = [s.caption[len(prefix):] if prefix and s.caption.startswith(prefix) else s.caption
             for s in scan.samples]
    missing = [n for n, s, t in zip(names, scan.samples, texts) if s.caption_source == "none" or not t.strip()]
    if missing:
        fix = f"caption them: python -m lora_trainer label --input {scan.root} (or the tab's grid)"
        beside = Counter(ext for s in scan.samples if s.caption_source == "none" for ext in SIDECARS
                         if ext != scan.caption_extension and s.path.with_suffix(ext).is_file())
        if beside:  # (kohya's scripts read .caption files by default, as the tagging tools write .txt)
            ext, k = beside.most_common(1)[0]
            fix = (f"{k} of them {'has' if k == 1 else 'have'} a {ext} file beside {'it' if k == 1 else 'them'}, and "
                   f"{scan.caption_extension} files are read: set data.caption_extension: {ext} (check "
                   f"--caption-extension {ext}) to train those captions; or " + fix)
        out.append(Finding("no-caption", "warning", f"{_n(len(missing), 'image', 'has')} no caption (trained with "
                           f"{'the prefix only' if prefix else 'an empty prompt'})", missing, fix))
    tokens = count_tokens([s.caption for s in scan.samples])
    long = [(n, k) for n, k in zip(names, tokens) if k > TOKEN_WINDOW]
    if long:
        out.append(Finding("long-caption", "warning",
                           f"{_n(len(long), 'caption', 'is')} longer than the text encoder's "
                           f"{TOKEN_WINDOW}-token window; the words past it are cut off in training",
                           [f"{n} ({k} tokens)" for n, k in long],
                           "shorten them; put the most important tags first"))
    negative = [(n, m.group(0)) for n, t in zip(names, texts) for m in [_NEGATION.search(t)] if m]
    if negative:
        out.append(Finding("negative", "warning",
                           f"{_n(len(negative), 'caption')} {'describes' if len(negative) == 1 else 'describe'} "
                           "what is not there (a LoRA learns the words, so 'not blurry' teaches 'blurry')",
                           [f"{n} ('{p}')" for n, p in negative],
                           "remove these phrases; put them (without 'not') in the negative prompt when generating"))
    lowered = [t.lower() for t in texts]
    for idea, phrases in glossary.items():
        used = {p: [n for n, t in zip(names, lowered) if re.search(rf"(?<!\w){re.escape(p)}(?!\w)", t)]
                for p in phrases}
        used = {p: ns for p, ns in used.items() if ns}
        if len(used) > 1:
            main = max(used, key=lambda p: len(used[p]))
            counts = ", ".join(f"'{p}' ×{len(ns)}" for p, ns in sorted(used.items(), key=lambda kv: -len(kv[1])))
            others = [n for p, ns in used.items() if p != main for n in ns]
            out.append(Finding("synonyms", "warning", f"one idea ({idea}) is written several ways: {counts}",
                               others, f"use '{main}' everywhere (the grid's find/replace does it); "
                               "add your own groups in a glossary.yaml beside the images"))
    out.extend(_tag_outliers(names, texts))
    return out


def _tag_outliers(names: list[str], texts: list[str]) -> list[Finding]:
    if len(texts) < 10:
        return []
    freq = tag_frequency(t.lower() for t in texts)
    common = [t for t, n in freq.items() if n >= 3]
    variants, singles = [], []
    for tag, n in freq.items():
        if n != 1:
            continue
        close = difflib.get_close_matches(tag, common, n=1, cutoff=0.85)
        (variants if close else singles).append((tag, close[0] if close else ""))
    where = {t: n for n, text in zip(names, texts) for t in split_tags(text.lower())}
    out = []
    if variants:
        out.append(Finding("tag-variant", "warning",
                           f"{_n(len(variants), 'tag', 'occurs')} once and "
                           f"{'looks' if len(variants) == 1 else 'look'} like a variant of a common tag: " +
                           ", ".join(f"'{t}' (vs '{c}')" for t, c in variants[:8]),
                           [where[t] for t, _ in variants], "make them the same tag (the grid's find/replace)"))
    if singles and len(singles) > len(freq) // 2:
        out.append(Finding("rare-tags", "info",
                           f"{len(singles)} of {len(freq)} tags occur in one caption only (e.g. " +
                           ", ".join(f"'{t}'" for t, _ in singles[:6]) + "); the LoRA learns little from them",
                           [where[t] for t, _ in singles], "describe shared features with shared tags"))
    return out


def _unused(scan: DatasetScan) -> list[Finding]:
    """Pictures in the dataset folder the run does not read: in subfolders it does not look in (a stray image at the
    top of kohya's layout makes it a plain folder), or of a type it does not decode (.heic, .gif)."""
    kohya = scan.folders()
    seen = {_rel(scan, s.path) for s in scan.samples} | {s.path for s in scan.skipped}
    deeper, foreign = [], []
    for folder, dirs, files in os.walk(scan.root):  # (as the scan: hidden files and folders left out)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            rel = Path(folder, name).relative_to(scan.root).as_posix()
            parts = rel.split("/")
            read = scan.recursive or len(parts) == (2 if kohya else 1)
            if name.startswith(".") or rel in seen or (kohya and parts[0] not in kohya):
                continue  # (folders kohya's layout leaves out: its own warning says so)
            if is_image_name(name) and not read:
                deeper.append(rel)
            elif read and name.lower().endswith(OTHER_PICTURES):
                foreign.append(rel)
    out = []
    if deeper:
        tops = [n for n in sorted({r.split("/")[0] for r in deeper}) if KOHYA_FOLDER.fullmatch(n)]
        stray = [_rel(scan, s.path) for s in scan.samples if "/" not in _rel(scan, s.path)]
        if tops and stray and not kohya:
            out.append(Finding("unused", "warning",
                               f"{_n(len(deeper), 'image')} in sub-folders {'is' if len(deeper) == 1 else 'are'} "
                               f"not used: {', '.join(tops[:3])} {'is' if len(tops) == 1 else 'are'} named as in "
                               f"kohya's layout, but the {_n(len(stray), 'image')} at the top of the folder "
                               f"({', '.join(stray[:3])}) make it a plain folder of images", deeper,
                               "move the images at the top into a <repeats>_<name> folder (or out of the dataset), "
                               "or turn on data.recursive to train every sub-folder"))
        else:
            out.append(Finding("unused", "info", f"{_n(len(deeper), 'image')} in sub-folders "
                               f"{'is' if len(deeper) == 1 else 'are'} not used", deeper,
                               "turn on data.recursive (check --recursive) to train them"))
    if foreign:
        kinds = sorted({Path(r).suffix.lower() for r in foreign})
        out.append(Finding("unused", "warning", f"{_n(len(foreign), 'picture')} of a type the trainer does not read "
                           f"({', '.join(kinds)}) {'is' if len(foreign) == 1 else 'are'} not used", foreign,
                           "save them as PNG or JPEG (an animated GIF: its first frame), or remove them"))
    return out


def _size(n: int) -> list[Finding]:
    low, high = SIZE_GUIDE
    if n < 20:
        return [Finding("size", "warning", f"only {n} images: few for a style LoRA (usually {low}–{high}); "
                        "enough for a character or object (15–30) with more epochs", [],
                        "add varied images of the style, or train a few more epochs and watch the samples")]
    if n < low:
        return [Finding("size", "info", f"{n} images: below the usual {low}–{high} for a style LoRA", [],
                        "fine for a character or object; for a style, more varied images help")]
    if n > high:
        return [Finding("size", "info", f"{n} images: more than the usual {low}–{high} for a style LoRA", [],
                        "fine; fewer epochs reach the same number of steps")]
    return []


def _spec(buckets, resolution: int) -> BucketSpec | None:
    if buckets is True:
        return BucketSpec(resolution)
    return buckets or None


def _read(scan: DatasetScan, folders: bool = True) -> list[Finding]:
    """What the scan left out or found wrong in the files: skipped files, caption file problems, kohya's layout
    (``folders``: its folders and the images an epoch, as an info)."""
    out = [Finding("unreadable", "warning", f"skipped: {skipped.reason}", [skipped.path], skipped.fix)
           for skipped in scan.skipped]
    if scan.problems:
        out.append(Finding("csv", "warning", f"{len(scan.problems)} caption file problems: "
                           + "; ".join(scan.problems[:3]), [], "fix the lines named"))
    if folders and scan.folders():
        out.append(Finding("kohya-folders", "info", scan.folders_text()))
    if scan.folder_notes:
        out.append(Finding("kohya-folders", "warning", "; ".join(scan.folder_notes), [],
                           "name each folder of images <repeats>_<class tokens> (10_sks dog) to train it"))
    return out


def _decoded(scan: DatasetScan, progress: bool = False) -> tuple[list[str], list[_ImageInfo], list[Finding]]:
    """The images' names (relative to the scan's folder), their sizes and hashes (the scan's, or decoded now where
    it was made without ``inspect=image_facts``), and those that no longer decode."""
    names = [_rel(scan, s.path) for s in scan.samples]
    infos = [scan.facts.get(s.path) for s in scan.samples]
    todo = [k for k, info in enumerate(infos) if info is None]  # a scan made without inspect=image_facts
    if todo:
        with strict_decoding(), ThreadPoolExecutor(decode_threads()) as pool:
            results = pool.map(_inspect, [scan.samples[k].path for k in todo])
            if progress:
                from tqdm.auto import tqdm

                results = tqdm(results, total=len(todo), desc="checking images", unit="img")
            for k, info in zip(todo, results):
                infos[k] = info
    bad = [Finding("unreadable", "warning", f"skipped: {info.error}", [name], FIXES[kind_of(info.error)])
           for name, info in zip(names, infos) if info.error]
    return names, infos, bad


def _multiline(scan: DatasetScan, names: list[str]) -> list[Finding]:
    """Caption files written on several lines: joined with ", " here; kohya's scripts read only the first line."""
    spread = [(_rel(scan, s.path.with_suffix(scan.caption_extension)), s.caption_lines)
              for s in scan.samples if s.caption_source == "txt" and s.caption_lines > 1]
    if not spread:
        return []
    one = len(spread) == 1
    return [Finding("multi-line-caption", "info",
                    f"{_n(len(spread), 'caption file')} ({scan.caption_extension}) {'spans' if one else 'span'} "
                    f"several lines: here {'its' if one else 'their'} lines are joined with ', ' into one caption; "
                    "kohya's sd-scripts reads only the first line of a caption file (the rest is not trained there)",
                    [f"{name} ({k} lines)" for name, k in spread],
                    "nothing to do for this trainer; to train the same captions with kohya's scripts, write each "
                    "caption on one line (its tags separated by ', ')")]


def _shared_captions(scan: DatasetScan) -> list[Finding]:
    """Images of one name in two formats (a.png, a.jpg) read one caption file (a.txt), here as in kohya's scripts."""
    by_file: dict[Path, list[str]] = {}
    for s in scan.samples:
        if s.caption_source == "txt":
            by_file.setdefault(s.path.with_suffix(scan.caption_extension), []).append(_rel(scan, s.path))
    shared = {f: names for f, names in by_file.items() if len(names) > 1}
    if not shared:
        return []
    return [Finding("shared-caption", "info",
                    f"{_n(len(shared), 'caption file')} {'is' if len(shared) == 1 else 'are'} read by two or more "
                    "images of the same name in different formats (each trains with that caption, as in kohya's "
                    "scripts)", [f"{_rel(scan, f)}: {', '.join(names)}" for f, names in sorted(shared.items())],
                    "if they are one picture saved twice, keep one (it trains twice as often); if they differ, "
                    "rename one and give it its own caption")]


def _as_reg(finding: Finding) -> Finding:
    return replace(finding, message=REG_LABEL + finding.message, dataset=REG)


def _shared(subject: list[str], subject_infos: list[_ImageInfo], names: list[str],
            infos: list[_ImageInfo]) -> list[Finding]:
    """Regularization images that are training images too: the same file, or the same picture resized or
    re-encoded (a regularization image shows the class without the subject)."""
    by_digest = {i.digest: n for n, i in zip(subject, subject_infos) if i.digest}
    same = {k: by_digest[i.digest] for k, i in enumerate(infos) if i.digest in by_digest}
    out = []
    if same:
        one = len(same) == 1
        out.append(Finding("duplicate", "warning", f"{_n(len(same), 'image', 'is')} also "
                           f"{'a training image' if one else 'training images'} (identical files): the subject is "
                           "then taught as what the class looks like",
                           [f"{names[k]} (= {n})" for k, n in same.items()],
                           "remove them from the regularization folder (its images show the class without the "
                           "subject)"))
    a = [k for k, i in enumerate(subject_infos) if i.phash is not None]
    b = [k for k, i in enumerate(infos) if i.phash is not None]
    near: dict[int, str] = {}
    if a and b:
        hashes = np.array([subject_infos[k].phash for k in a] + [infos[k].phash for k in b]).reshape(len(a) + len(b),
                                                                                                    -1)
        for i, j, _ in near_pairs(hashes, NEAR_BITS):
            if i < len(a) <= j and b[j - len(a)] not in same:
                near.setdefault(b[j - len(a)], subject[a[i]])
    if near:
        one = len(near) == 1
        out.append(Finding("near-duplicate", "warning", f"{_n(len(near), 'image')} {'looks' if one else 'look'} "
                           f"the same as {'a training image' if one else 'training images'} (resized, re-encoded or "
                           "lightly edited copies)",
                           [f"{names[k]} (~ {n})" for k, n in sorted(near.items())],
                           "remove them from the regularization folder (its images show the class without the "
                           "subject)"))
    return out


def _balance(reg: DatasetScan, subject: DatasetScan) -> Finding:
    """How many regularization images an epoch trains beside the subject's (kohya's balance: balanced_repeats)."""
    target = sum(s.repeats for s in subject.samples)
    counts = balanced_repeats([s.repeats for s in reg.samples], target)
    used, per_epoch = sum(n > 0 for n in counts), sum(counts)
    folders = reg.folders()
    where = (" in kohya's folders " + ", ".join(f"{name} ({f['img_count']} × {f['n_repeats']})"
                                               for name, f in folders.items()) if folders else "")
    text = (f"{_n(len(reg.samples), 'image')}{where}; an epoch trains {per_epoch} beside the subject's {target} "
            "(kohya's balance: each folder's repeats, then one more each in turn)")
    if used < len(reg.samples):
        text += f"; {len(reg.samples) - used} left out (more than the subject's images need)"
    elif per_epoch > len(reg.samples):
        text += " (fewer images than the subject's: they are repeated)"
    return Finding(REG, "info", text)


def _regularization(reg: DatasetScan, resolution: int, spec: BucketSpec | None, progress: bool = False,
                    subject: DatasetScan | None = None, subject_facts=None) -> list[Finding]:
    """The findings of the regularization images (data.reg_data_dir), labelled as theirs: what cannot be read, small,
    cropped, duplicate images (among them, and of the training images: ``subject`` and its names and facts from
    ``_decoded``), captions; none is asked for where kohya's layout gives the class tokens (their caption)."""
    out = _read(reg, folders=False)
    names, infos, bad = _decoded(reg, progress)
    out += bad
    out += _images(reg, names, infos, resolution, spec)[0]
    untitled = [n for n, s in zip(names, reg.samples) if s.caption_source == "none" or not s.caption.strip()]
    if untitled:
        out.append(Finding("no-caption", "warning",
                           f"{_n(len(untitled), 'image', 'has')} no caption and no class tokens from a folder name "
                           "(trained with an empty prompt)", untitled,
                           "lay the folder out as kohya's: <repeats>_<class> sub-folders (1_dog, the class word "
                           "their caption), or caption them"))
    out += _multiline(reg, names)
    out += _unused(reg)
    if subject is not None:
        out += _shared(*subject_facts, names, infos)
        out.append(_balance(reg, subject))
    return [_as_reg(f) for f in out]


def check_scan(scan: DatasetScan, resolution: int = 512, caption_prefix: str = "", glossary=None,
               progress: bool = False, buckets: BucketSpec | bool | None = True,
               reg: DatasetScan | None = None) -> CheckReport:
    """Check the images and captions of a scan (the trainer's own view of the set).

    ``buckets``: the run's aspect-ratio buckets (data.buckets.BucketSpec; True: the default ones at
    ``resolution``; None or False: every image center-cropped to a square). Images are decoded again only if the
    scan was made without ``inspect=image_facts``. ``reg``: the regularization images (data.regularization's
    scan_regularization), checked too: their findings are labelled ``dataset="regularization"``.
    """
    report = CheckReport(str(scan.root), len(scan.samples))
    report.findings += _read(scan)
    names, infos, bad = _decoded(scan, progress)
    report.findings += bad
    spec = _spec(buckets, resolution)
    found, report.buckets = _images(scan, names, infos, resolution, spec)
    report.findings += found
    glossary = load_glossary(scan.root) if glossary is None else glossary
    report.findings += _captions(scan, names, caption_prefix, glossary)
    report.findings += _multiline(scan, names)
    report.findings += _shared_captions(scan)
    report.findings += _unused(scan)
    report.findings += _size(len(scan.samples))
    if reg is not None:
        report.reg_root, report.reg_images = str(reg.root), len(reg.samples)
        report.findings += _regularization(reg, resolution, spec, progress, scan, (names, infos))
    return report


def check_dataset(root, resolution: int = 512, metadata_path=None, caption_extension: str = ".txt",
                  caption_priority: str = "csv", caption_prefix: str = "", recursive: bool = False,
                  glossary_path=None, progress: bool = False, buckets: BucketSpec | bool | None = True,
                  reg_data_dir=None) -> CheckReport:
    """Scan and check a dataset folder; a folder the trainer cannot use at all is one error finding. ``buckets``:
    as check_scan's. ``reg_data_dir``: the regularization images' folder (data.reg_data_dir), read as the run reads
    it (the same caption_extension, caption_priority and recursive) and checked too (check_scan's ``reg``)."""
    glossary = load_glossary(Path(root).expanduser().resolve(), glossary_path)
    reg, reg_error = None, None
    if reg_data_dir:
        try:
            reg = scan_regularization(reg_data_dir, caption_extension, caption_priority, recursive,
                                      inspect=image_facts)
        except DatasetError as e:
            reg_error = Finding("unusable", "error", str(e), [], "point data.reg_data_dir at a folder of class "
                                "images (kohya's layout: <repeats>_<class> sub-folders, such as 1_dog), or leave it "
                                "empty to train without regularization images", dataset=REG)
    try:
        scan = scan_dataset(root, metadata_path, caption_extension, caption_priority, caption_prefix, recursive,
                            inspect=image_facts)
    except DatasetError as e:
        report = CheckReport(str(root), 0, [Finding("unusable", "error", str(e), [],
                                                    "point it at a folder of .jpg/.png/.webp images")])
        if reg is not None:  # (its own findings still: no balance, no duplicates of training images)
            report.reg_root, report.reg_images = str(reg.root), len(reg.samples)
            report.findings += _regularization(reg, resolution, _spec(buckets, resolution), progress)
    else:
        report = check_scan(scan, resolution, caption_prefix, glossary, progress, buckets, reg)
    if reg_error is not None:
        report.reg_root = str(Path(reg_data_dir).expanduser().resolve())
        report.findings.append(reg_error)
    return report
