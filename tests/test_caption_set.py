"""The caption set behind the grid: every batch tool, the trainer's view, and saving with a backup."""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image

from lora_trainer.data.caption_set import BACKUP_DIR, CaptionSet
from lora_trainer.data.captions import read_metadata_csv
from lora_trainer.data.dataset import scan_dataset
from lora_trainer.errors import LoraTrainerError


def image(path):
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


@pytest.fixture
def csv_set(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        image(tmp_path / name)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([
        ["file_name", "prompt"],
        ["a.png", "**core style, red**, a circle, *soft light*"],
        ["b.png", "a square, Red, soft light"],
        ["c.png", 'a "quoted", circle'],
        ["gone.png", "a row for a file that is not there"],
    ])
    (tmp_path / "metadata.csv").write_text(out.getvalue())
    return tmp_path


def test_load_keeps_markdown_and_lists_uncaptioned(csv_set):
    cs = CaptionSet.load(csv_set, prefix="trig, ")
    assert [i.rel for i in cs.items] == ["a.png", "b.png", "c.png", "d.png"]
    assert cs.items[0].caption == "**core style, red**, a circle, *soft light*"
    assert [i.source for i in cs.items] == ["csv", "csv", "csv", "none"]
    v = cs.view(0)  # what the trainer tokenizes
    assert v.text == "trig, core style, red, a circle, soft light"
    assert v.core_tags == ("core style", "red") and 5 < v.tokens < 20 and not v.truncated
    assert v.text == scan_dataset(csv_set, caption_prefix="trig, ").samples[0].caption
    cs.set_caption(3, ", ".join(["word"] * 80))
    assert cs.view(3).truncated and cs.view(3).tokens > 75


def test_find_replace_plain_and_regex(csv_set):
    cs = CaptionSet.load(csv_set)
    assert cs.replace("circle", "disc") == 2
    assert cs.items[2].caption == 'a "quoted", disc'
    assert cs.replace(r"\bsoft (\w+)", r"hard \1", regex=True) == 2
    assert cs.items[0].caption == "**core style, red**, a disc, *hard light*"
    assert cs.replace("square", "box", indices=[0]) == 0  # only the selection is touched
    with pytest.raises(LoraTrainerError, match="regular expression"):
        cs.replace("(", "x", regex=True)
    with pytest.raises(LoraTrainerError, match="empty"):
        cs.replace("", "x")


def test_add_tag_front_and_end_once(csv_set):
    cs = CaptionSet.load(csv_set)
    assert cs.add_tag("mytrigger", "front") == 4  # the uncaptioned image gets it too
    assert cs.items[1].caption == "mytrigger, a square, Red, soft light"
    assert cs.items[3].caption == "mytrigger"
    assert cs.add_tag("mytrigger", "front") == 0  # already there
    assert cs.add_tag("red", "end") == 2  # a.png has it inside its bold span, b.png as "Red"
    assert cs.items[2].caption.endswith(", red")
    with pytest.raises(LoraTrainerError, match="front' or 'end"):
        cs.add_tag("x", "middle")


def test_remove_tag_everywhere_markdown_aware(csv_set):
    cs = CaptionSet.load(csv_set)
    assert cs.remove_tag("red") == 2
    assert cs.items[0].caption == "**core style**, a circle, *soft light*"
    assert cs.items[1].caption == "a square, soft light"
    assert cs.remove_tag("soft light") == 2
    assert cs.items[0].caption == "**core style**, a circle"
    assert cs.view(0).core_tags == ("core style",)


def test_tools_on_multi_line_markdown(csv_set):
    cs = CaptionSet.load(csv_set)
    cs.set_caption(3, "# **Core look**\n- a circle, red\n- *soft light*")
    before = cs.view(3).text
    assert cs.add_tag("trig", indices=[3]) == 1
    assert cs.items[3].caption == "trig, **Core look**, a circle, red, *soft light*"
    assert cs.view(3).text == "trig, " + before and cs.view(3).core_tags == ("Core look",)
    assert cs.remove_tag("red", indices=[3]) == 1 and "red" not in cs.view(3).text


def test_filter_tag_table_and_sort(csv_set):
    cs = CaptionSet.load(csv_set)
    assert cs.filter(has="soft light") == [0, 1]
    assert cs.filter(has="soft light", has_not="a square") == [0]
    assert cs.filter(has_not="red") == [2, 3]
    table = dict(cs.tag_table())
    assert table["soft light"] == 2 and table["red"] == 2 and table["a circle"] == 1
    assert cs.tag_table()[0][1] == 2  # most frequent first
    cs.set_caption(2, "rare, soft light, red")
    assert cs.sort_tags(indices=[2]) == 1
    assert cs.items[2].caption in ("red, soft light, rare", "soft light, red, rare")
    cs.set_caption(2, "trig, rare, red")
    cs.sort_tags(indices=[2], keep_first=1)
    assert cs.items[2].caption == "trig, red, rare"


def test_save_csv_keeps_other_rows_header_and_backs_up(csv_set):
    before = (csv_set / "metadata.csv").read_text()
    cs = CaptionSet.load(csv_set)
    assert cs.save().changed == 0  # nothing changed: nothing written, no backup
    assert not (csv_set / BACKUP_DIR).exists()
    cs.replace("circle", "disc, with a comma")
    cs.set_caption(3, "new caption")
    result = cs.save()
    assert result.changed == 3 and result.written == [csv_set / "metadata.csv"]
    assert (result.backup / "metadata.csv").read_text() == before
    text = (csv_set / "metadata.csv").read_text()
    assert text.splitlines()[0] == "file_name,prompt"
    rows, problems = read_metadata_csv(csv_set / "metadata.csv")
    assert not problems
    assert rows["c.png"].caption == 'a "quoted", disc, with a comma'
    assert rows["d.png"].caption == "new caption"
    assert rows["gone.png"].caption == "a row for a file that is not there"  # not ours to drop
    again = CaptionSet.load(csv_set)
    assert [i.caption for i in again.items] == [i.caption for i in cs.items] and not again.changed
    assert len(scan_dataset(csv_set).samples) == 4  # the backup folder is not taken for data


def test_save_keeps_a_tables_other_columns(tmp_path):
    """A metadata.csv with more columns than file and caption (a dataset tool's export): saving writes the caption
    column only; the other columns, and the header naming them, are the user's."""
    for name in ("a.png", "b.png", "c.png"):
        image(tmp_path / name)
    (tmp_path / "metadata.csv").write_text("file_name;width;text;source\na.png;64;cap a;web\n"
                                           "b.png;64;cap b, with a comma;camera\n", encoding="utf-8")
    cs = CaptionSet.load(tmp_path)
    cs.set_caption(0, "new a")
    cs.set_caption(2, "new c")
    cs.save()
    table = list(csv.reader(io.StringIO((tmp_path / "metadata.csv").read_text(encoding="utf-8"))))
    assert table == [["file_name", "width", "text", "source"], ["a.png", "64", "new a", "web"],
                     ["b.png", "64", "cap b, with a comma", "camera"], ["c.png", "", "new c", ""]]
    rows, _ = read_metadata_csv(tmp_path / "metadata.csv")
    assert {n: e.caption for n, e in rows.items()} == {"a.png": "new a", "b.png": "cap b, with a comma",
                                                        "c.png": "new c"}  # (no header row read as a file)


def test_save_does_not_revert_rows_edited_elsewhere_since_loading(csv_set):
    """The grid open while metadata.csv is edited elsewhere (a spreadsheet, a label run): saving one caption writes
    that caption, not the grid's stale copy of every other row."""
    cs = CaptionSet.load(csv_set)
    rows, _ = read_metadata_csv(csv_set / "metadata.csv")
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([["file_name", "prompt"], ["a.png", rows["a.png"].caption],
                                                    ["b.png", "edited in a spreadsheet"], ["d.png", "labelled"]])
    (csv_set / "metadata.csv").write_text(out.getvalue(), encoding="utf-8")
    cs.set_caption(0, "changed in the grid")
    cs.save()
    rows, _ = read_metadata_csv(csv_set / "metadata.csv")
    assert {n: e.caption for n, e in rows.items()} == {
        "a.png": "changed in the grid", "b.png": "edited in a spreadsheet", "d.png": "labelled",
        "c.png": 'a "quoted", circle'}  # (a row the file lost is the set's to write back, as before)


def test_save_sidecars_writes_txt_with_backup(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        image(tmp_path / name)
    (tmp_path / "a.txt").write_text("one, two\n")
    (tmp_path / "b.txt").write_text("two, three\n")
    cs = CaptionSet.load(tmp_path)
    assert [i.source for i in cs.items] == ["txt", "txt", "none"]
    cs.remove_tag("two")
    cs.set_caption(2, "fresh")
    result = cs.save()
    assert result.changed == 3 and not (tmp_path / "metadata.csv").exists()  # the set's own format
    assert (tmp_path / "a.txt").read_text() == "one\n" and (tmp_path / "c.txt").read_text() == "fresh\n"
    assert (result.backup / "a.txt").read_text() == "one, two\n"
    assert not (result.backup / "c.txt").exists()  # there was nothing to back up
    cs.set_caption(0, "again")
    assert cs.save().backup != result.backup  # a second save never overwrites the first backup


def test_a_thousand_images_load_without_decoding(tmp_path):
    image(tmp_path / "seed.png")
    data = (tmp_path / "seed.png").read_bytes()
    for k in range(1000):
        (tmp_path / f"{k:04d}.png").write_bytes(data)
        (tmp_path / f"{k:04d}.txt").write_text(f"tag{k % 10}, common")
    cs = CaptionSet.load(tmp_path)
    assert len(cs) == 1001 and dict(cs.tag_table())["common"] == 1000
    assert len(cs.views(range(24))) == 24  # one page of the grid
