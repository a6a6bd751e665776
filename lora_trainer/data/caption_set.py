"""A dataset's captions as an editable set: what the caption grid of the tab works on.

Loads every image of a folder with its raw caption (markdown kept) without decoding an image, so a
thousand-image set opens at once. Batch tools change captions in memory; ``save`` writes them back
where each came from (metadata.csv or ``.txt`` sidecars; new captions go to the format the set already
uses), after copying the previous captions into ``.lora_trainer_backup/<time>/`` in the dataset folder.

Tags are the comma-separated parts of a caption. A bold span may hold commas (``**a, b**``): it stays
one part, and tag matching compares tags without their markdown, so ``remove_tag("b")`` also takes
``**b**`` out of ``**a, b**``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.data.captions import (
    _LINE_MARKUP,
    header_column,
    read_header,
    read_metadata_csv,
    split_tags,
    strip_markdown,
)
from lora_trainer.data.dataset import find_dataset_files, pick_caption, with_prefix
from lora_trainer.data.tokens import TOKEN_WINDOW, count_tokens
from lora_trainer.errors import LoraTrainerError
from lora_trainer.utils.fsio import atomic_write_text

log = logging.getLogger(__name__)
BACKUP_DIR = ".lora_trainer_backup"  # hidden: the scan never mistakes it for data


@dataclass
class CaptionItem:
    rel: str  # path relative to the dataset folder, as metadata.csv names it
    path: Path
    caption: str  # raw, markdown kept: what the user edits
    source: str  # where it was read from: "csv" | "txt" | "folder" (kohya's class tokens) | "none"
    saved: str = ""  # the caption as last read or saved (to know what changed)
    csv_name: str = ""  # the name its metadata.csv row uses, if it has one

    @property
    def changed(self) -> bool:
        return self.caption != self.saved


@dataclass(frozen=True)
class CaptionView:
    """What the trainer makes of one caption."""

    text: str  # markdown stripped, prefix applied: what is tokenized
    core_tags: tuple[str, ...]
    tokens: int

    @property
    def truncated(self) -> bool:
        return self.tokens > TOKEN_WINDOW


@dataclass
class SaveResult:
    written: list[Path] = field(default_factory=list)
    backup: Path | None = None
    changed: int = 0


def _split_parts(caption: str) -> list[str]:
    """Comma-separated parts, keeping a markdown span that holds commas (``**a, b**``) in one part."""
    parts: list[str] = []
    current = ""
    lines = (_LINE_MARKUP.sub("", line) for line in caption.splitlines())  # "# Title", "- tag": no markers
    for piece in ",".join(lines).split(","):
        current = f"{current},{piece}" if current else piece
        if current.count("**") % 2 == 0 and current.replace("**", "").count("*") % 2 == 0:
            parts.append(current.strip())
            current = ""
    if current.strip():
        parts.append(current.strip())
    return [p for p in parts if p]


def _plain(part: str) -> list[str]:
    """The tags of one part without markdown, lower-cased for matching."""
    return [t.lower() for t in split_tags(strip_markdown(part)[0])]


def _norm(tag: str) -> str:
    return " ".join(strip_markdown(tag)[0].split()).lower()


class CaptionSet:
    def __init__(self, root: Path, items: list[CaptionItem], csv_path: Path, caption_extension: str,
                 prefix: str = "", uses_csv: bool = False):
        self.root, self.items, self.csv_path = root, items, csv_path
        self.caption_extension, self.prefix, self.uses_csv = caption_extension, prefix, uses_csv

    @classmethod
    def load(cls, root, metadata_path=None, caption_extension: str = ".txt", caption_priority: str = "csv",
             prefix: str = "", recursive: bool = False) -> CaptionSet:
        files = find_dataset_files(root, metadata_path, caption_extension, recursive)
        if not files.images:
            raise LoraTrainerError(f"no images in {files.root} (accepted: .jpg .jpeg .png .webp .bmp)")
        items = []
        for rel in sorted(files.images):
            source, raw = pick_caption(files, rel, caption_priority)
            items.append(CaptionItem(rel, files.images[rel], raw.strip(), source, raw.strip(),
                                     files.csv_names.get(rel, "")))
        return cls(files.root, items, files.csv_path, files.caption_extension, prefix,
                   uses_csv=files.csv_path.is_file())

    def __len__(self) -> int:
        return len(self.items)

    def _targets(self, indices) -> list[CaptionItem]:
        return self.items if indices is None else [self.items[i] for i in indices]

    # --- what the trainer sees
    def view(self, i: int) -> CaptionView:
        return self.views([i])[0]

    def views(self, indices) -> list[CaptionView]:
        stripped = [strip_markdown(self.items[i].caption) for i in indices]
        texts = [with_prefix(self.prefix, text) for text, _ in stripped]
        return [CaptionView(t, tuple(core), n) for t, (_, core), n in zip(texts, stripped, count_tokens(texts))]

    # --- editing
    def set_caption(self, i: int, text: str) -> bool:
        text = (text or "").strip()
        changed = self.items[i].caption != text
        self.items[i].caption = text
        return changed

    def replace(self, find: str, repl: str, regex: bool = False, indices=None) -> int:
        """Find/replace in the raw captions; returns how many captions changed."""
        if not find:
            raise LoraTrainerError("find/replace: the text to find is empty")
        if regex:
            try:
                pattern = re.compile(find)
            except re.error as e:
                raise LoraTrainerError(f"find/replace: {find!r} is not a valid regular expression ({e})") from None
            edit = lambda c: pattern.sub(repl, c)  # noqa: E731
        else:
            edit = lambda c: c.replace(find, repl)  # noqa: E731
        return self._apply(edit, indices)

    def add_tag(self, tag: str, position: str = "front", indices=None) -> int:
        """Add ``tag`` (e.g. a trigger word) at the front or end of captions that lack it."""
        tag = tag.strip().strip(",").strip()
        if not tag:
            raise LoraTrainerError("add tag: the tag is empty")
        if position not in ("front", "end"):
            raise LoraTrainerError(f"add tag: position must be 'front' or 'end', not {position!r}")
        wanted = _plain(tag)

        def edit(caption: str) -> str:
            parts = _split_parts(caption)
            have = {t for p in parts for t in _plain(p)}
            if all(t in have for t in wanted):
                return caption
            return ", ".join([tag, *parts] if position == "front" else [*parts, tag])

        return self._apply(edit, indices)

    def remove_tag(self, tag: str, indices=None) -> int:
        """Remove a tag everywhere (matched without markdown and case), keeping the rest of its span."""
        target = _norm(tag)
        if not target:
            raise LoraTrainerError("remove tag: the tag is empty")

        def edit(caption: str) -> str:
            kept = []
            for part in _split_parts(caption):
                tags = _plain(part)
                if target not in tags:
                    kept.append(part)
                elif len(tags) > 1:  # a span holding several tags: drop only this one, keep its markers
                    marker = re.match(r"[*_]*", part).group(0)
                    marker = marker if marker and part.endswith(marker[::-1]) and len(part) > 2 * len(marker) else ""
                    inner = part[len(marker):len(part) - len(marker)]
                    rest = [t for t in split_tags(inner) if _norm(t) != target]
                    kept.append(f"{marker}{', '.join(rest)}{marker[::-1]}")
            return ", ".join(kept)

        return self._apply(edit, indices)

    def sort_tags(self, indices=None, keep_first: int = 0) -> int:
        """Order each caption's tags by how often they occur in the whole set (most frequent first).

        The first ``keep_first`` tags stay in place (a trigger word, as kohya's keep_tokens).
        """
        freq = dict(self.tag_table())

        def key(part: str) -> tuple[int, str]:
            tags = _plain(part)
            return (-max((freq.get(t, 0) for t in tags), default=0), tags[0] if tags else "")

        def edit(caption: str) -> str:
            parts = _split_parts(caption)
            return ", ".join(parts[:keep_first] + sorted(parts[keep_first:], key=key))

        return self._apply(edit, indices)

    def _apply(self, edit, indices) -> int:
        changed = 0
        for item in self._targets(indices):
            new = edit(item.caption)
            if new != item.caption:
                item.caption, changed = new, changed + 1
        return changed

    # --- looking
    def tag_table(self, indices=None) -> list[tuple[str, int]]:
        """(tag, number of captions holding it), most frequent first, then alphabetical."""
        counts: Counter[str] = Counter()
        for item in self._targets(indices):
            counts.update(set(_plain(item.caption)))
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def filter(self, has: str = "", has_not: str = "") -> list[int]:
        """Indices of captions holding every tag of ``has`` and none of ``has_not`` (comma-separated)."""
        need = [_norm(t) for t in split_tags(has or "")]
        avoid = [_norm(t) for t in split_tags(has_not or "")]
        out = []
        for i, item in enumerate(self.items):
            tags = set(_plain(item.caption))
            if all(t in tags for t in need) and not any(t in tags for t in avoid):
                out.append(i)
        return out

    @property
    def changed(self) -> list[CaptionItem]:
        return [item for item in self.items if item.changed]

    # --- saving
    def _format_for(self, item: CaptionItem) -> str:
        if item.source in ("csv", "txt"):  # (a kohya folder's class tokens, edited: written as a new caption)
            return item.source
        return "csv" if self.uses_csv else "txt"

    def save(self) -> SaveResult:
        """Write changed captions back where they came from, after a backup of what they replace."""
        result = SaveResult(changed=len(self.changed))
        if not result.changed:
            return result
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup, n = self.root / BACKUP_DIR / stamp, 1
        while backup.exists():
            backup, n = self.root / BACKUP_DIR / f"{stamp}_{n}", n + 1
        to_csv = [it for it in self.changed if self._format_for(it) == "csv"]
        to_txt = [it for it in self.changed if self._format_for(it) == "txt"]
        if to_csv:
            if self.csv_path.is_file():
                backup.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.csv_path, backup / self.csv_path.name)
            result.written.append(self._write_csv())
        for item in to_txt:
            sidecar = item.path.with_suffix(self.caption_extension)
            if sidecar.is_file():
                keep = backup / Path(item.rel).with_suffix(self.caption_extension)
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(sidecar, keep)
            result.written.append(atomic_write_text(sidecar, item.caption + "\n"))
        for item in to_csv + to_txt:
            item.saved, item.source = item.caption, self._format_for(item)
        if to_csv:
            self.uses_csv = True
        result.backup = backup if backup.exists() else None
        log.info("saved %d captions (%s)%s", result.changed, ", ".join(str(p.name) for p in result.written[:3]),
                 f"; previous captions in {result.backup}" if result.backup else "")
        return result

    def _write_csv(self) -> Path:
        """metadata.csv with the set's changed csv captions written in, and those it lacks; every other row is kept
        as the file has it now (edited elsewhere since the set was loaded: not reverted), and so are a table's other
        columns (``filename,width,prompt``: only the prompt is written)."""
        header, rows = ["filename", "prompt"], {}
        if self.csv_path.is_file():
            entries, _ = read_metadata_csv(self.csv_path)
            header = read_header(self.csv_path) or header
            rows = {name: [name, e.caption] if len(header) == 2 else list(e.cells) for name, e in entries.items()}
        column = header_column(header)

        def row(name: str, caption: str) -> list[str]:
            cells = rows.get(name, [name])[:len(header)]  # (cells past the header's: a caption cut at its commas)
            cells += [""] * (len(header) - len(cells))
            cells[column] = caption
            return cells

        for item in self.items:
            name, wanted = item.csv_name or item.rel, item.csv_name or item.caption
            if self._format_for(item) == "csv" and wanted and (item.changed or name not in rows):
                item.csv_name = name
                rows[name] = row(name, item.caption)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows.values())
        return atomic_write_text(self.csv_path, out.getvalue())
