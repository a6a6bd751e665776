"""A language model's training rows read from files: *.jsonl, *.json, *.csv and *.txt.

A row is ``{"prompt", "completion"}``, ``{"messages": [{"role", "content"}, ...]}`` or ``{"text"}`` (CSV: those
columns); a .txt file is one document. A bad row stops the run with one line naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import DatasetError

SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
ROW_FORMS = '{"prompt", "completion"}, {"messages": [{"role", "content"}, ...]} or {"text"}'


@dataclass(frozen=True)
class Row:
    source: str  # "file:line", for messages about the row
    prompt: str | None = None
    completion: str | None = None
    messages: tuple | None = None  # ((role, content), ...)
    text: str | None = None


def _row(obj, where: str) -> Row:
    """One row object checked: which form it has, each field's type."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: a row must be an object ({ROW_FORMS}), got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DatasetError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                shown = repr(m)[:200]
                raise DatasetError(f"{where}: messages[{i}] must be {{\"role\": text, \"content\": text}}, got {shown}")
        if not any(role == "assistant" for role in (m["role"] for m in msgs)):
            raise DatasetError(f"{where}: the messages have no \"assistant\" turn: nothing to learn")
        return Row(where, messages=tuple((m["role"], m["content"]) for m in msgs))
    if "prompt" in obj or "completion" in obj:
        p, c = obj.get("prompt"), obj.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            raise DatasetError(f"{where}: \"prompt\" and \"completion\" must both be text, got prompt={p!r}, "
                               f"completion={c!r}"[:300])
        if not c:
            raise DatasetError(f"{where}: \"completion\" is empty: nothing to learn")
        return Row(where, prompt=p, completion=c)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DatasetError(f"{where}: \"text\" must be non-empty text, got {obj['text']!r}"[:300])
        return Row(where, text=obj["text"])
    raise DatasetError(f"{where}: a row needs {ROW_FORMS}; this one has keys {sorted(obj)}"[:300])


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # (not splitlines: JSON strings may hold U+2028, U+0085 raw)
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DatasetError(f"{path}:{n}: not valid JSON ({e})") from None
        rows.append(_row(obj, f"{path}:{n}"))
    return rows


def _json(path: Path, text: str) -> list[Row]:
    """A JSON array of rows (each named by the line it starts on), one object (a file of one row, however laid out),
    or JSON lines. An array must close, with nothing after it: a file cut off mid-way loses rows unnoticed."""
    if not text.lstrip().startswith("["):
        try:
            obj = json.loads(text)
        except ValueError:
            return _jsonl(path, text)
        return [_row(obj, f"{path}:1")] if isinstance(obj, dict) else _jsonl(path, text)
    decoder, rows = json.JSONDecoder(), []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        line = text.count("\n", 0, i) + 1
        if i >= len(text):
            raise DatasetError(f"{path}:{line}: the JSON array has no closing ']' (the file was cut off?); "
                               f"{len(rows)} row(s) read before it")
        if text[i] == "]":
            rest = text[i + 1:].strip()
            if rest:
                after = text.count("\n", 0, text.index(rest, i + 1)) + 1
                raise DatasetError(f"{path}:{after}: text after the JSON array's closing ']' ({rest[:30]!r})")
            return rows
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError as e:
            raise DatasetError(f"{path}:{line}: not valid JSON ({e.args[0].split(':')[0]})") from None
        rows.append(_row(obj, f"{path}:{line}"))


def _csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # (a quoted field keeps its line breaks)
    cols = set(reader.fieldnames or ())
    if not ({"prompt", "completion"} <= cols or "text" in cols):
        raise DatasetError(f"{path}:1: a CSV needs a header with the columns prompt,completion or text; it has "
                           f"{sorted(cols)}")
    rows = []
    for obj in reader:
        where = f"{path}:{reader.line_num}"
        if None in obj:
            raise DatasetError(f"{where}: more fields than the header has columns")
        keep = ("prompt", "completion") if {"prompt", "completion"} <= cols else ("text",)
        rows.append(_row({k: obj[k] for k in keep}, where))
    return rows


def read_file(path: Path) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Row(f"{path}:1", text=text)] if text.strip() else []
    return {".jsonl": _jsonl, ".json": _json, ".csv": _csv}[suffix](path, text)


def data_files(train_data_dir: str, metadata_path: str | None, recursive: bool = False) -> list[Path]:
    """The files to read: ``metadata_path`` alone, else every supported file in the folder (sorted)."""
    if metadata_path:
        path = Path(metadata_path).expanduser()
        if not path.is_file():
            raise DatasetError(f"data.metadata_path: {path.resolve()} is not an existing file")
        if path.suffix.lower() not in SUFFIXES:
            raise DatasetError(f"data.metadata_path: {path} is not one of {', '.join(SUFFIXES)}")
        return [path]
    folder = Path(train_data_dir).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"data.train_data_dir: {folder.resolve()} is not an existing folder")
    found = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                   if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
    if not found:
        raise DatasetError(f"data.train_data_dir: {folder.resolve()} holds no {' / '.join(SUFFIXES)} files")
    return found


def read_rows(train_data_dir: str, metadata_path: str | None = None, recursive: bool = False) -> list[Row]:
    rows = [row for path in data_files(train_data_dir, metadata_path, recursive) for row in read_file(path)]
    if not rows:
        raise DatasetError(f"no training rows in {metadata_path or train_data_dir}")
    return rows
