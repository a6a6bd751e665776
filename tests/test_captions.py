"""Captions: markdown stripping and core tags, tags, metadata.csv in the forms users write it."""

from __future__ import annotations

import pytest

from lora_trainer.data.captions import read_metadata_csv, split_tags, strip_markdown, tag_frequency
from lora_trainer.errors import DatasetError


@pytest.mark.parametrize("raw, clean, core", [
    ("**core style**, a red circle, *soft light*", "core style, a red circle, soft light", ["core style"]),
    ("__bold one__, _italic_, long_hair, 1_girl", "bold one, italic, long_hair, 1_girl", ["bold one"]),
    ("**a, b**, c, **b**", "a, b, c, b", ["a", "b"]),
    ("***both***, **a *b* c**", "both, a b c", ["both", "a b c"]),
    ("*italic **bold** more*", "italic bold more", ["bold"]),
    ("# Title\n- first tag\n* second tag\n1. third\n> quoted",
     "Title, first tag, second tag, third, quoted", []),
    ("`code`,, , trailing, ", "code, trailing", []),
    ("snake_case_tag, x_y, _long_hair_, foo__bar__baz", "snake_case_tag, x_y, long_hair, foo__bar__baz", []),
    (">_<, ^_^, @_@, -_-, x_", ">_<, ^_^, @_@, -_-, x_", []),
    ("2*3 is 6", "2*3 is 6", []),
    ("1,000 cats,,dogs , , birds", "1,000 cats,dogs, birds", []),
    ("  spaced    out  ", "spaced out", []),
    ("**x**\r\n\r\n**y,  x**,\n", "x, y, x", ["x", "y"]),
])
def test_strip_markdown(raw, clean, core):
    assert strip_markdown(raw) == (clean, core)


def test_tags_and_frequency():
    assert split_tags(" a, b ,, c ") == ["a", "b", "c"]
    assert tag_frequency(["a, b, a", "a, c"]) == {"a": 2, "b": 1, "c": 1}
    assert tag_frequency([]) == {}


def write(tmp_path, text, encoding="utf-8"):
    path = tmp_path / "metadata.csv"
    path.write_bytes(text.encode(encoding))
    return path


def captions(rows):
    return {k: v.caption for k, v in rows.items()}


def test_csv_with_header_quotes_and_blank_lines(tmp_path):
    text = '\nfilename,prompt\n\n1.png,"a, b, c"\n2.png,plain\n\n'
    rows, problems = read_metadata_csv(write(tmp_path, text))
    assert captions(rows) == {"1.png": "a, b, c", "2.png": "plain"}
    assert rows["1.png"].line == 4 and rows["2.png"].line == 5 and problems == []


def test_csv_without_header_with_bom_crlf_and_unquoted_commas(tmp_path):
    rows, problems = read_metadata_csv(write(tmp_path, "\ufeff1.png,a, b, c\r\nfile_b.jpg,é ü\r\n"))
    assert captions(rows) == {"1.png": "a, b, c", "file_b.jpg": "é ü"} and problems == []


def test_csv_header_variants_and_multiline_quoted(tmp_path):
    text = 'Image,CAPTION\n1.png,"line one\nline two"\n2.png,x\n'
    rows, problems = read_metadata_csv(write(tmp_path, text))
    assert rows["1.png"].caption == "line one\nline two"
    assert rows["1.png"].line == 2 and rows["2.png"].line == 4
    assert problems == []
    rows, _ = read_metadata_csv(write(tmp_path, "file,text\n"))
    assert rows == {}


def test_csv_problems_name_file_and_line(tmp_path):
    rows, problems = read_metadata_csv(write(tmp_path, "a.png,first\nb.png\na.png,second\n,orphan caption\n"))
    assert captions(rows) == {"a.png": "second"}
    assert problems[0] == "metadata.csv line 2: no caption column (expected filename,prompt)"
    assert problems[1] == "metadata.csv line 3: a.png is also on line 1; line 3 wins"
    assert problems[2] == "metadata.csv line 4: no file name in the first column"


def test_csv_unclosed_quote_is_reported(tmp_path):
    rows, problems = read_metadata_csv(write(tmp_path, 'a.png,"oops\nb.png,bee\nc.png,sea\n'))
    assert list(rows) == ["a.png"]
    assert len(problems) == 1 and "line 1" in problems[0] and "unclosed quote" in problems[0]


def test_csv_not_utf8(tmp_path):
    with pytest.raises(DatasetError, match=r"metadata\.csv.*not UTF-8.*re-save it as UTF-8"):
        read_metadata_csv(write(tmp_path, "a.png,caf\xe9 cr\xe8me\n", encoding="latin-1"))


def test_csv_unreadable_row_names_the_line(tmp_path):
    with pytest.raises(DatasetError, match=r"metadata\.csv line 2: field larger than field limit"):
        read_metadata_csv(write(tmp_path, 'a.png,ok\nb.png,"' + "x" * 200_000 + '"\n'))


def test_csv_of_semicolons_and_a_header_with_more_columns_than_a_row_fills(tmp_path):
    """Excel writes ';' between columns in many locales: read as such (it trained every image uncaptioned); with a
    header of three columns, a row whose unquoted caption has commas is cut to its first part: said, not silent."""
    rows, problems = read_metadata_csv(write(tmp_path, "file_name;text\na.png;red, blue\nb.png;green\n"))
    assert captions(rows) == {"a.png": "red, blue", "b.png": "green"}
    assert problems == ["metadata.csv: read with ';' between the columns (Excel's CSV in many locales)"]
    rows, _ = read_metadata_csv(write(tmp_path, "a.png;1girl, solo, smile\nb.png;green\n"))  # (no header)
    assert captions(rows) == {"a.png": "1girl, solo, smile", "b.png": "green"}
    rows, _ = read_metadata_csv(write(tmp_path, "a.png,red; blue\n"))  # (a ';' inside a caption)
    assert captions(rows) == {"a.png": "red; blue"}
    rows, problems = read_metadata_csv(write(tmp_path, "file_name,text,score\na.png,unquoted, with, commas\n"
                                                       "b.png,\"quoted, fine\",5\n"))
    assert captions(rows) == {"a.png": "unquoted", "b.png": "quoted, fine"}
    assert problems[1] == ("metadata.csv line 2: 4 cells, the header has 3: the caption of a.png was cut to "
                           "'unquoted'; quote a caption that holds the separator (',')")
