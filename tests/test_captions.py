"""Captions: markdown stripping and core tags, tags, metadata.csv in the forms users write it."""

from __future__ import annotations

import pytest

from lora_trainer.data.captions import read_metadata_csv, split_tags, strip_markdown, tag_frequency
from lora_trainer.errors import DatasetError


@pytest.mark.parametrize("raw, clean, core", [
    ("**core style**, a red circle, *soft light*", "core style, a red circle, soft light", ["core style"]),
    ("__bold one__, _italic_, long_hair, 1_girl", "bold one, italic, long_hair, 1_girl", ["bold one"]),
    ("**a, b**, c, **b**", "a, b, c, b", ["a", "b"]),
    ("# Title\n- first tag\n* second tag\n1. third", "Title, first tag, second tag, third", []),
    ("`code`,, , trailing, ", "code, trailing", []),
    ("snake_case_tag, x_y", "snake_case_tag, x_y", []),
    ("2*3 is 6", "2*3 is 6", []),
    ("  spaced    out  ", "spaced out", []),
])
def test_strip_markdown(raw, clean, core):
    assert strip_markdown(raw) == (clean, core)


def test_tags_and_frequency():
    assert split_tags(" a, b ,, c ") == ["a", "b", "c"]
    assert tag_frequency(["a, b, a", "a, c"]) == {"a": 2, "b": 1, "c": 1}


def write(tmp_path, text, encoding="utf-8"):
    path = tmp_path / "metadata.csv"
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_with_header_quotes_and_blank_lines(tmp_path):
    rows, problems = read_metadata_csv(write(tmp_path, 'filename,prompt\n\n1.png,"a, b, c"\n2.png,plain\n'))
    assert {k: v.caption for k, v in rows.items()} == {"1.png": "a, b, c", "2.png": "plain"}
    assert rows["1.png"].line == 3 and problems == []


def test_csv_without_header_with_bom_and_unquoted_commas(tmp_path):
    rows, problems = read_metadata_csv(write(tmp_path, "\ufeff1.png,a, b, c\nfile_b.jpg,é ü\n"))
    assert rows["1.png"].caption == "a, b, c" and rows["file_b.jpg"].caption == "é ü"
    assert problems == []


def test_csv_header_variants_and_multiline_quoted(tmp_path):
    rows, _ = read_metadata_csv(write(tmp_path, 'file_name,text\n1.png,"line one\nline two"\n2.png,x\n'))
    assert rows["1.png"].caption == "line one\nline two" and rows["2.png"].line == 4


def test_csv_problems_name_file_and_line(tmp_path):
    rows, problems = read_metadata_csv(write(tmp_path, "a.png,first\nb.png\na.png,second\n"))
    assert rows["a.png"].caption == "second"
    assert "metadata.csv line 2: no caption column" in problems[0]
    assert "line 3" in problems[1] and "line 1" in problems[1]


def test_csv_not_utf8(tmp_path):
    with pytest.raises(DatasetError, match="metadata.csv.*not UTF-8.*re-save it as UTF-8"):
        read_metadata_csv(write(tmp_path, "a.png,caf\xe9 cr\xe8me\n", encoding="latin-1"))
