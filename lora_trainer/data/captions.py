"""Captions: metadata.csv rows, markdown structure, tags.

Captions may carry markdown (``**core style**, a red circle, *soft light*``). The markers are stripped
before tokenizing; the bold spans are the image's core tags.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import DatasetError

# Emphasis follows CommonMark's flanking rules closely enough for captions: `_x_` only at word
# boundaries, so booru tags such as long_hair or 1_girl keep their underscores.
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|(?<![\w])__(?=\S)(.+?)(?<=\S)__(?![\w])")
_ITALIC = re.compile(r"\*(?=\S)(.+?)(?<=\S)\*|(?<![\w])_(?=\S)(.+?)(?<=\S)_(?![\w])")
_LINE_MARKUP = re.compile(r"^\s*(?:#{1,6}\s+|[-*+]\s+|\d+[.)]\s+|>\s*)")
_HEADER_FILE = {"filename", "file_name", "file", "image"}
_HEADER_TEXT = {"prompt", "caption", "text"}


def split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def strip_markdown(text: str) -> tuple[str, list[str]]:
    """Return (caption without markdown, core tags from the bold spans)."""
    core: list[str] = []

    def bold(m: re.Match) -> str:
        inner = m.group(1) or m.group(2)
        core.extend(t for t in split_tags(inner) if t not in core)
        return inner

    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = _LINE_MARKUP.sub("", line).replace("`", "")
        line = _BOLD.sub(bold, line)
        line = _ITALIC.sub(lambda m: m.group(1) or m.group(2), line)
        line = " ".join(line.split())
        if line:
            lines.append(line)
    clean = ", ".join(split_tags(", ".join(lines)))
    # tags kept as written: split/join only normalises commas and spaces between them
    core = [" ".join(t.split()) for t in core]
    return clean, list(dict.fromkeys(core))


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How many captions contain each tag (kohya's ss_tag_frequency counts a tag once per caption)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(set(split_tags(caption)))
    return dict(counts.most_common())


@dataclass(frozen=True)
class CsvEntry:
    caption: str
    line: int


def read_metadata_csv(path) -> tuple[dict[str, CsvEntry], list[str]]:
    """Read ``filename,prompt`` rows; returns (entries by filename, one-line problems)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    entries: dict[str, CsvEntry] = {}
    problems: list[str] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    for index, row in enumerate(reader):
        line = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if index == 0 and row[0].strip().lower() in _HEADER_FILE and len(row) > 1 and row[1].strip().lower() in _HEADER_TEXT:
            continue
        name = row[0].strip()
        if len(row) < 2:
            problems.append(f"{path.name} line {line}: no caption column (expected filename,prompt)")
            continue
        caption = ",".join(row[1:]).strip()  # an unquoted caption with commas still counts
        if name in entries:
            problems.append(f"{path.name} line {line}: {name} is also on line {entries[name].line}; line {line} wins")
        entries[name] = CsvEntry(caption, line)
    return entries, problems
