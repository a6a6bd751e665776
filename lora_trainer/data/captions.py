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

from lora_trainer.data.images import IMAGE_EXTENSIONS
from lora_trainer.errors import DatasetError

# Emphasis after CommonMark's flanking rules, closely enough for captions: a marker must touch the
# text it wraps, and `_` never opens or closes inside a word, so booru tags such as long_hair and
# 1_girl keep their underscores (`*` may be intraword, as in CommonMark). Stricter than CommonMark:
# `_` emphasis must wrap a letter or digit at both ends, so kaomoji tags (>_<, ^_^, @_@) survive.
_W = r"[^\W_]"  # a letter or digit
_STRONG_EM = re.compile(rf"\*\*\*(?=\S)(.+?)(?<=\S)\*\*\*|(?<!\w)___(?={_W})(.+?)(?<={_W})___(?!\w)")
_BOLD = re.compile(rf"\*\*(?=\S)(.+?)(?<=\S)\*\*|(?<!\w)__(?={_W})(.+?)(?<={_W})__(?!\w)")
_ITALIC = re.compile(rf"\*(?=\S)(.+?)(?<=\S)\*|(?<!\w)_(?={_W})(.+?)(?<={_W})_(?!\w)")
_LINE_MARKUP = re.compile(r"^\s*(?:#{1,6}\s+|[-*+]\s+|\d+[.)]\s+|>\s+)")  # heading, bullet, quote
_EMPTY_TAGS = re.compile(r"\s*,(?:\s*,)*")  # "a , ,b" -> "a,b"; "a, b" keeps its space
_HEADER_FILE = {"filename", "file_name", "file", "image"}
_HEADER_TEXT = {"prompt", "caption", "text"}
_LOOKS_LIKE_ROW = re.compile(r"^\s*[^,\s]+\.(?:jpe?g|png|webp|bmp)\s*,", re.IGNORECASE | re.MULTILINE)


def split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _inner(m: re.Match) -> str:
    return m.group(1) if m.group(1) is not None else m.group(2)


def strip_markdown(text: str) -> tuple[str, list[str]]:
    """Return (caption without markdown, core tags from the bold spans)."""
    core: list[str] = []

    def bold(m: re.Match) -> str:
        inner = _ITALIC.sub(_inner, _inner(m))
        core.extend(" ".join(t.split()) for t in split_tags(inner))
        return inner

    lines = []
    for line in text.splitlines():
        line = _LINE_MARKUP.sub("", line).replace("`", "")
        line = _STRONG_EM.sub(lambda m: f"**{_inner(m)}**", line)
        line = _ITALIC.sub(_inner, _BOLD.sub(bold, line))
        line = " ".join(line.split())
        if line:
            lines.append(line)
    clean = _EMPTY_TAGS.sub(",", ", ".join(lines)).strip(", ")
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
    line: int  # where the row starts (1-based)
    raw: str = ""  # the file name as the row writes it (spaces at its ends kept)
    cells: tuple[str, ...] = ()  # the whole row as read (a table's other columns: kept when a caption is written)


def _separator(first_line: str) -> str:
    """',' (filename,prompt), or ';' where the first line has no ',' before its first ';' and what comes before
    that ';' is a file name or a header word (Excel writes ';' in many locales, and leaves a tag list's commas
    unquoted: "a.png;1girl, solo")."""
    head, semicolon, _ = first_line.partition(";")
    if not semicolon or "," in head:
        return ","
    head = head.strip().strip('"').lower()
    return ";" if head in _HEADER_FILE or head.endswith(IMAGE_EXTENSIONS) else ","


def header_column(row: list[str]) -> int | None:
    """The caption column of a metadata.csv header row (``filename,prompt``, ``file_name,width,text``), or None
    where ``row`` is no header."""
    header = [cell.strip().lower() for cell in row]
    if len(row) > 1 and header[0] in _HEADER_FILE:
        return next((i for i, h in enumerate(header) if i and h in _HEADER_TEXT), None)
    return None


def read_header(path) -> list[str] | None:
    """The header row of a metadata.csv (read with the separator it uses), or None where it has none."""
    text = Path(path).read_text(encoding="utf-8-sig")
    separator = _separator(next((line for line in text.splitlines() if line.strip()), ""))
    row = next((row for row in csv.reader(io.StringIO(text, newline=""), delimiter=separator)
                if any(cell.strip() for cell in row)), [])
    return row if header_column(row) is not None else None


def read_metadata_csv(path) -> tuple[dict[str, CsvEntry], list[str]]:
    """Read ``filename,prompt`` rows; returns (entries by filename, one-line problems)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                           "re-save it as UTF-8 (in Excel: 'CSV UTF-8')") from None
    entries: dict[str, CsvEntry] = {}
    separator = _separator(next((line for line in text.splitlines() if line.strip()), ""))
    problems = [f"{path.name}: read with ';' between the columns (Excel's CSV in many locales)"] * (separator == ";")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    seen_row, end, text_column, extra = False, 0, None, []
    while True:
        start = end + 1
        try:
            row = next(reader, None)
        except csv.Error as e:
            raise DatasetError(f"{path} line {start}: {e}") from None
        if row is None:
            break
        end = reader.line_num
        where = f"{path.name} line {start}"
        if not any(cell.strip() for cell in row):
            continue
        first, seen_row = not seen_row, True
        if first and header_column(row) is not None:
            if len(row) > 2:  # more columns than file and caption: only the caption column is a caption
                text_column, header_row = header_column(row), row
                extra = [row[i].strip() for i in range(1, len(row)) if i != text_column]
                problems.append(f"{path.name}: column(s) {', '.join(repr(c) for c in extra)} are not captions and "
                                f"are ignored; the caption is column {row[text_column].strip()!r}")
            continue
        name = row[0].strip()
        if len(row) < 2:
            problems.append(f"{where}: no caption column (expected filename,prompt)")
            continue
        if not name:
            problems.append(f"{where}: no file name in the first column")
            continue
        if text_column is not None:
            caption = row[text_column].strip() if text_column < len(row) else ""
            if len(row) > len(header_row):  # (a caption's unquoted commas made more cells than the header has)
                problems.append(f"{where}: {len(row)} cells, the header has {len(header_row)}: the caption of {name} "
                                f"was cut to {caption!r}; quote a caption that holds the separator ({separator!r})")
        else:
            caption = separator.join(row[1:]).strip()  # an unquoted caption with commas is still usable
        if "\0" in caption:
            caption = caption.replace("\0", "")
            problems.append(f"{where}: NUL characters removed from the caption of {name}")
        if end > start and _LOOKS_LIKE_ROW.search(caption):
            problems.append(f"{where}: the caption of {name} runs to line {end} and holds other rows "
                            "(an unclosed quote?)")
        if name in entries:
            problems.append(f"{where}: {name} is also on line {entries[name].line}; line {start} wins")
        entries[name] = CsvEntry(caption, start, row[0], tuple(row))
    return entries, problems
