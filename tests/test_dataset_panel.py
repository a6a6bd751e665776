"""The tab's dataset panel, event by event (the handlers the buttons call), in both gradio versions."""

from __future__ import annotations

import html

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from lora_trainer.data.augment import CaptionAugment  # noqa: E402
from lora_trainer.ui import dataset_panel as panel  # noqa: E402
from lora_trainer.ui.caption_grid import PER_PAGE  # noqa: E402

BLANK = [""] * PER_PAGE


def slots(out):
    """(visible, label, caption, info) of each slot in a render."""
    rest = out[4:]
    return [(rest[k + 1]["visible"], rest[k + 1].get("label"), rest[k + 1]["value"], rest[k + 2]["value"])
            for k in range(0, len(rest), 3)]


def captions_on_screen(out):
    """What the browser sends back: the text of every slot textbox (hidden ones too)."""
    return [caption for _, _, caption, _ in slots(out)]


def visible_captions(out):
    return [caption for visible, _, caption, _ in slots(out) if visible]


@pytest.fixture
def folder(tmp_path):
    for k in range(15):
        Image.new("RGB", (32, 32), (10 * k, 50, 90)).save(tmp_path / f"img_{k:02d}.png")
        if k % 5:
            (tmp_path / f"img_{k:02d}.txt").write_text(f"**mystyle**, shape {k % 3}, soft light")
    (tmp_path / "img_07.png").write_bytes(b"not a png")
    return tmp_path


def run(fn, state, captions, *args):
    return panel._handler(fn)(state, *captions, *args)


def test_load_page_edit_and_save(folder):
    out = run(panel.load_captions, None, BLANK, str(folder), "trig, ")
    state = out[0]
    assert "loaded 15 images" in out[1] and "3 have no caption" in out[1]
    assert "page 1/2" in out[2] and len(slots(out)) == PER_PAGE
    assert out[4]["value"].size == (32, 32) and out[4]["visible"]  # the first slot's thumbnail
    first = slots(out)[1]
    assert first[1] == "img_01.png" and first[2] == "**mystyle**, shape 1, soft light"
    assert "trig, mystyle, shape 1, soft light" in first[3] and "core: mystyle" in first[3]
    assert "tokens" in first[3]
    broken = [s for s in slots(out) if s[1] and s[1].startswith("img_07.png")]
    assert "cannot be read" in broken[0][1]

    # edit a caption on page 1, go to page 2: the edit travels with the event
    on_screen = captions_on_screen(out)
    on_screen[0] = "a new caption for zero"
    out = run(panel.turn_page(1), state, on_screen)
    assert "page 2/2" in out[2] and "1 unsaved" in out[2]
    assert sum(v for v, *_ in slots(out)) == 3  # 15 images: 12 + 3, the rest of the slots hidden
    out = run(panel.save_captions, state, captions_on_screen(out))
    assert "saved 1 captions" in out[1] and "img_00.txt" in out[1]
    assert (folder / "img_00.txt").read_text() == "a new caption for zero\n"


def test_batch_tools_filter_and_tag_table(folder):
    state = run(panel.load_captions, None, BLANK, str(folder), "")[0]
    out = run(panel.tag_tool("front"), state, captions_on_screen(panel.render(state)), "trig", "all images")
    assert "changed 15 captions" in out[1]
    out = run(panel.do_filter, state, captions_on_screen(out), "shape 1", "")
    assert "4 images match" in out[1] and "page 1/1" in out[2] and "filtered" in out[2]
    out = run(panel.do_replace, state, captions_on_screen(out), "soft", "hard", False, "the filtered images")
    assert "changed 4 captions" in out[1]
    assert all("hard light" in c for c in visible_captions(out))
    out = run(panel.clear_filter, state, captions_on_screen(out))
    assert sum("hard light" in c for c in visible_captions(out)) == 3  # only the filtered ones changed
    out = run(panel.tag_tool("remove"), state, captions_on_screen(out), "mystyle", "all images")
    assert "changed 12 captions" in out[1]
    assert "<td>trig</td><td>15</td>" in out[3]  # the tag-frequency table
    out = run(panel.do_replace, state, captions_on_screen(out), "(", "", True, "all images")
    assert "not a valid regular expression" in out[1]  # errors become a status message


def test_load_twice_to_discard_unsaved_edits(folder):
    state = run(panel.load_captions, None, BLANK, str(folder), "")[0]
    on_screen = captions_on_screen(panel.render(state))
    on_screen[1] = "edited"
    out = run(panel.load_captions, state, on_screen, str(folder), "")
    assert "unsaved caption edits" in out[1] and out[0] is state
    out = run(panel.load_captions, state, captions_on_screen(out), str(folder), "")
    assert out[0] is not state and captions_on_screen(out)[1] == "**mystyle**, shape 1, soft light"


def test_check_from_the_tab(folder):
    out = panel._handler(panel.run_check, extra_outputs=1)(None, *BLANK, str(folder), 64, "")
    assert "img_07.png" in out[0] and "fix:" in out[0] and "images have no caption" in out[0]
    out = panel._handler(panel.run_check, extra_outputs=1)(None, *BLANK, "", 64, "")
    assert len(out) == 1 + 4 + 3 * PER_PAGE and "dataset folder" in out[2]


def test_captions_show_an_augmented_draw_while_shuffling_is_on(folder):
    out = run(panel.load_captions, None, BLANK, str(folder), "trig, ")
    assert all("e.g. one epoch" not in info for *_, info in slots(out))  # augmentation off: no example
    state = out[0]
    # the tab's fields: shuffle on, keep 0 tags, tag dropout 0.5, caption dropout 0
    out = run(panel.set_augment, state, captions_on_screen(out), "trig, ", True, 0, 0.5, 0)
    examples = [info.split("e.g. one epoch: ", 1)[1].split("</div>")[0] for visible, _, caption, info in slots(out)
                if visible and caption]
    assert examples and all(e.startswith("trig, mystyle") for e in examples)  # prefix, then the **core** tag
    assert any(len(e.split(", ")) < 5 for e in examples)  # some tags dropped in this draw
    uncaptioned = [info for visible, _, caption, info in slots(out) if visible and not caption]
    assert uncaptioned and all("e.g. one epoch: trig</div>" in info for info in uncaptioned)  # (the prefix alone)
    # the draw is the run's: its seed (the tab's Seed field), as data.augment draws epoch 1 in training
    for seed in (0, 7):
        out = run(panel.set_augment, state, captions_on_screen(out), "trig, ", True, 0, 0.5, 0, seed)
        aug = CaptionAugment(True, tag_dropout_rate=0.5, prefix="trig, ", seed=seed)
        views = state.captions.views(state.on_page())
        drawn = [info.split("e.g. one epoch: ", 1)[1].split("</div>")[0] for visible, _, caption, info in slots(out)
                 if visible and caption]
        assert drawn == [html.escape(aug.caption(v.text, v.core_tags, i, 0))
                         for i, v in zip(state.on_page(), views) if v.text and state.captions.items[i].caption]
        assert seed == 0 or drawn != examples
    out = run(panel.set_augment, state, captions_on_screen(out), "ohwx, ", False, 0, 0, 0)
    assert all("e.g. one epoch" not in info for *_, info in slots(out))
    shown = [info for visible, _, caption, info in slots(out) if visible and caption]
    assert all("ohwx, mystyle" in info and "trig" not in info for info in shown)  # the new prefix, not the loaded one


def test_the_check_shows_the_bucket_histogram(tmp_path):
    for k, size in enumerate([(768, 512), (768, 512), (512, 512), (512, 1024)]):  # (buckets at 512: 256-1024)
        Image.new("RGB", size, (40 * k, 50, 90)).save(tmp_path / f"img_{k}.png")
        (tmp_path / f"img_{k}.txt").write_text("a picture")
    out = panel._handler(panel.run_check, extra_outputs=1)(None, *BLANK, str(tmp_path), 512, "", True)
    assert "aspect-ratio buckets (3;" in out[0] and "512×512</td><td>1<" in out[0]
    out = panel._handler(panel.run_check, extra_outputs=1)(None, *BLANK, str(tmp_path), 512, "", False)
    assert "aspect-ratio buckets" not in out[0]
    reg = tmp_path.parent / f"{tmp_path.name}_reg"
    reg.mkdir()
    for k in range(2):
        Image.new("RGB", (512, 512), (9, 9, 9 * k)).save(reg / f"r{k}.png")
    out = panel._handler(panel.run_check, extra_outputs=1)(None, *BLANK, str(tmp_path), 512, "", True, str(reg))
    assert f"regularization images of {reg.resolve()}: 2" in out[0].split("<ul>")[0]  # (in the header)


def test_actions_before_loading_say_what_to_do():
    out = run(panel.save_captions, None, BLANK)
    assert "load the captions first" in out[1]


class FakeHost:
    name = "standalone"

    def captioners(self):
        return {"fake": "fake"}

    def make_captioner(self, kind, model, download):
        assert (kind, model, download) == ("fake", None, False)

        class Captioner:
            def caption(self, images):
                return [f"seen {img.width}px" for img in images]

        return Captioner()


def test_auto_caption_from_the_tab_then_edit(folder):
    steps = list(panel._stream(lambda *a: panel.auto_caption(FakeHost(), *a))(
        None, *BLANK, str(folder), "fake", "", "**{caption}**, x", panel.MODES[0], False, ""))
    final = steps[-1]
    assert "captioned 3 images" in final[1] and "kept 12" in final[1]  # img_00, 05, 10 had none
    state = final[0]
    assert state.captions.items[0].caption == "**seen 32px**, x"
    assert state.captions.view(0).core_tags == ("seen 32px",)
    bad = list(panel._stream(lambda *a: panel.auto_caption(FakeHost(), *a))(
        None, *BLANK, str(folder), "fake", "", "no placeholder", panel.MODES[0], False, ""))
    assert "has no {caption}" in bad[-1][1]


def test_the_tab_builds_with_the_panel(tmp_path):
    from lora_trainer.ui.standalone_host import DiffusersHost
    from lora_trainer.ui.tab import create_tab

    with gr.Blocks():
        tab = create_tab(DiffusersHost(lora_dir=tmp_path))
    assert tab is not None


def test_the_check_covers_the_regularization_folder_field(tmp_path):
    """The tab's 'Regularization images folder' field goes into the panel's check: their findings are shown as the
    regularization images'."""
    subject, reg = tmp_path / "img", tmp_path / "reg" / "1_person"
    subject.mkdir()
    reg.mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (512, 512), (60 * k, 50, 90)).save(subject / f"img_{k}.png")
        (subject / f"img_{k}.txt").write_text("a picture")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(reg / "tiny.png")  # (too small: a finding of theirs)
    check = panel._handler(panel.run_check, extra_outputs=1)
    out = check(None, *BLANK, str(subject), 512, "", True, str(tmp_path / "reg"))
    assert "regularization images" in out[0] and "tiny.png" in out[0]
    assert "tiny.png" not in check(None, *BLANK, str(subject), 512, "", True, "")[0]
