"""The dataset check: every check on generated images and captions, and nothing changed on disk."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.data.check import check_dataset, check_scan, load_glossary
from lora_trainer.data.dataset import scan_dataset
from lora_trainer.data.phash import near_pairs, phash
from lora_trainer.errors import LoraTrainerError


def picture(seed: int, w: int = 256, h: int = 256) -> Image.Image:
    """A smooth random picture: distinct seeds give perceptually distinct images."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)


def write_csv(root, rows):
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([["filename", "prompt"], *rows])
    (root / "metadata.csv").write_text(out.getvalue(), encoding="utf-8")


@pytest.fixture
def flawed(tmp_path):
    """A set with one of every problem the check should find, plus clean images."""
    root = tmp_path / "set"
    root.mkdir()
    rows = []
    for k in range(8):
        picture(k).save(root / f"clean_{k}.png")
        rows.append([f"clean_{k}.png", f"**mystyle**, a picture, tone {k}, anime style"])
    original = picture(100, 300, 300)
    original.save(root / "orig.png")
    original.resize((200, 200), Image.LANCZOS).save(root / "orig_small.png")  # a resized copy
    buf = io.BytesIO()
    original.save(buf, "JPEG", quality=70)
    (root / "orig_reencoded.jpg").write_bytes(buf.getvalue())  # a re-encoded copy
    (root / "orig_copy.png").write_bytes((root / "orig.png").read_bytes())  # the very same file
    buf = io.BytesIO()
    picture(101).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    picture(102, 64, 64).save(root / "tiny64.png")
    picture(103, 600, 200).save(root / "panorama.png")
    picture(104).save(root / "negative.png")
    picture(105).save(root / "uncaptioned.png")
    picture(106).save(root / "long.png")
    picture(107).save(root / "manga.png")
    rows += [["orig.png", "mystyle, a picture"], ["orig_small.png", "mystyle, a picture"],
             ["orig_reencoded.jpg", "mystyle, a picture"], ["orig_copy.png", "mystyle, a picture"],
             ["tiny64.png", "mystyle, a picture"], ["panorama.png", "mystyle, a picture"],
             ["negative.png", "mystyle, a portrait, not blurry, without text"],
             ["long.png", ", ".join(f"detail number {k}" for k in range(30))],
             ["manga.png", "mystyle, manga look, a pictrue"]]
    write_csv(root, rows)
    return root


def test_every_check_finds_its_files(flawed):
    before = {p.name: p.read_bytes() for p in flawed.iterdir()}
    report = check_dataset(flawed, resolution=128)
    checks = {f.check for f in report.findings}

    def files(check):
        return [name for f in report.by_check(check) for name in f.files]

    assert report.images == 18 and not report.has_errors
    assert files("unreadable") == ["truncated.jpg"]
    assert any("truncated or corrupt" in f.message for f in report.by_check("unreadable"))
    assert files("small") == ["tiny64.png (64×64)"]
    # (buckets on, as by default: at 128 px with the default min_bucket_reso the only bucket is the square)
    assert files("crop") == ["panorama.png (600×200 → 128×128, keeps 33%)"]
    assert [sorted(f.files) for f in report.by_check("duplicate")] == [["orig.png", "orig_copy.png"]]
    near = report.by_check("near-duplicate")
    assert len(near) == 1 and set(near[0].files) == {"orig.png", "orig_copy.png", "orig_small.png",
                                                      "orig_reencoded.jpg"}
    assert files("no-caption") == ["uncaptioned.png"]
    assert files("long-caption")[0].startswith("long.png (") and "tokens" in files("long-caption")[0]
    assert files("negative") == ["negative.png ('not blurry')"]
    synonyms = report.by_check("synonyms")
    assert len(synonyms) == 1 and "'anime style' ×8" in synonyms[0].message and synonyms[0].files == ["manga.png"]
    assert "use 'anime style' everywhere" in synonyms[0].fix
    assert [f.check for f in report.by_check("size")] == ["size"]  # 18 images: few for a style
    assert "pictrue" in report.by_check("tag-variant")[0].message
    assert checks >= {"unreadable", "small", "crop", "duplicate", "near-duplicate", "no-caption",
                      "long-caption", "negative", "synonyms", "size", "tag-variant"}
    assert all(f.fix for f in report.findings)  # every finding says what to do
    assert {p.name: p.read_bytes() for p in flawed.iterdir()} == before  # nothing changed on disk
    # the same report from a plain scan (images decoded again) as from the scan that inspected them
    assert check_scan(scan_dataset(flawed), resolution=128).to_dict() == report.to_dict()
    text = report.summary()
    assert "[warning]" in text and "fix:" in text and "tiny64.png" in text


def test_a_clean_set_has_no_warnings_but_its_size(tmp_path):
    for k in range(60):
        picture(k, 256, 256).save(tmp_path / f"{k}.png")
        (tmp_path / f"{k}.txt").write_text(f"mystyle, tone {k % 7}, a picture")
    report = check_dataset(tmp_path, resolution=256)
    assert report.findings == [] and report.images == 60
    assert "no problems found" in report.summary()


def test_small_images_at_the_lowest_resolution_are_not_told_to_lower_it(tmp_path):
    for k, side in enumerate((40, 48, 100)):
        Image.new("RGB", (side, side), (30 * k, 90, 60)).save(tmp_path / f"img_{k}.png")
        (tmp_path / f"img_{k}.txt").write_text("a square")
    at = {res: next(f for f in check_dataset(tmp_path, resolution=res).findings if f.check == "small")
          for res in (64, 128)}
    assert at[64].fix == "use larger originals (64 px is the lowest resolution there is)"
    assert at[128].fix == "use larger originals, or lower data.resolution to 64"


def test_pictures_the_run_does_not_read_are_named(tmp_path):
    """A stray image at the top of kohya's layout makes it a plain folder: the run would train that one image and
    none of the <repeats>_<name> folders'; and pictures of a type not read (an iPhone's .heic) are not silently
    left out."""
    root = tmp_path / "img"
    for k in range(3):
        (root / "10_sks dog").mkdir(parents=True, exist_ok=True)
        picture(k).save(root / "10_sks dog" / f"dog{k}.png")
    picture(9).save(root / "cover.png")
    (root / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(100))
    picture(8).save(root / "anim.gif")
    (root / ".hidden.gif").write_bytes(b"GIF89a")
    report = check_dataset(root, resolution=256)
    stray, foreign = report.by_check("unused")
    assert stray.severity == "warning" and stray.files == [f"10_sks dog/dog{k}.png" for k in range(3)]
    assert "10_sks dog is named as in kohya's layout, but the 1 image at the top" in stray.message
    assert "(cover.png)" in stray.message
    assert foreign.files == ["IMG_0001.HEIC", "anim.gif"] and "(.gif, .heic)" in foreign.message
    assert [f.files for f in check_dataset(root, resolution=256, recursive=True).by_check("unused")] == [
        foreign.files]  # (recursive: every sub-folder read)
    (root / "cover.png").unlink()  # kohya's layout now: its folders' images read, nothing unused but a .heic in one
    (root / "IMG_0001.HEIC").rename(root / "10_sks dog" / "IMG_0001.HEIC")
    report = check_dataset(root, resolution=256)
    assert report.images == 3 and [f.files for f in report.by_check("unused")] == [["10_sks dog/IMG_0001.HEIC"]]


def test_captions_in_another_sidecar_extension_are_pointed_at(tmp_path):
    """kohya's scripts read .caption files by default: a set captioned so, checked as .txt, has its captions beside
    its images; the check says how to train them rather than only to caption the images again."""
    for k in range(3):
        picture(k).save(tmp_path / f"{k}.png")
    (tmp_path / "0.caption").write_text("mystyle, a picture")
    (tmp_path / "1.caption").write_text("mystyle, another picture")
    (tmp_path / "2.txt").write_text("mystyle, a picture")
    (finding,) = check_dataset(tmp_path, resolution=256).by_check("no-caption")
    assert finding.files == ["0.png", "1.png"]
    assert finding.fix.startswith("2 of them have a .caption file beside them, and .txt files are read: set "
                                  "data.caption_extension: .caption")
    (finding,) = check_dataset(tmp_path, resolution=256, caption_extension=".caption").by_check("no-caption")
    assert finding.files == ["2.png"] and finding.fix.startswith("1 of them has a .txt file beside it")


def test_unusable_folder_is_one_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    report = check_dataset(tmp_path)
    assert report.has_errors and report.images == 0 and "no usable images" in report.findings[0].message


def test_glossary_from_the_dataset_folder_and_a_file(tmp_path):
    (tmp_path / "glossary.yaml").write_text("kitty: [cat, kitten]\n")
    assert load_glossary(tmp_path)["kitty"] == ["cat", "kitten"] and "anime style" in load_glossary(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(LoraTrainerError, match="bad.yaml"):
        load_glossary(None, bad)
    with pytest.raises(LoraTrainerError, match="does not exist"):
        load_glossary(None, tmp_path / "missing.yaml")
    for k in range(3):
        picture(k).save(tmp_path / f"{k}.png")
    write_csv(tmp_path, [["0.png", "a cat"], ["1.png", "a cat"], ["2.png", "a kitten"]])
    report = check_dataset(tmp_path, resolution=64)
    assert [f.files for f in report.by_check("synonyms")] == [["2.png"]]


def test_phash_survives_resize_and_jpeg_but_tells_pictures_apart():
    a = picture(1)
    buf = io.BytesIO()
    a.save(buf, "JPEG", quality=50)
    copies = [a.resize((90, 90)), Image.open(buf), a.convert("L")]
    assert all(int((phash(a) != phash(c)).sum()) <= 2 for c in copies)
    hashes = np.array([phash(picture(k)) for k in range(40)])
    assert near_pairs(hashes, 6) == []
    assert near_pairs(np.array([phash(a), phash(copies[0]), phash(picture(2))]), 6)[0][:2] == (0, 1)


def test_cli_check_prints_writes_json_and_sets_the_exit_code(flawed, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", str(flawed), "--resolution", "128", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny64.png" in printed and "near-duplicate" not in printed  # the summary speaks plainly
    data = json.loads(out.read_text())
    assert data["images"] == 18 and any(f["check"] == "negative" for f in data["findings"])
    assert main(["check", str(flawed), "--resolution", "128", "--strict"]) == 1
    capsys.readouterr()
    assert main(["check", str(tmp_path / "nothing")]) == 1
    assert "[error]" in capsys.readouterr().out
    assert main(["check"]) == 2  # no folder and no config


def test_large_jpegs_are_checked_at_a_reduced_scale_with_their_whole_size(tmp_path, monkeypatch):
    import lora_trainer.data.check as check_mod
    from lora_trainer.data.check import image_facts

    root = tmp_path / "set"
    root.mkdir()
    picture(1, 1024, 768).save(root / "wide.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90°: 600 wide, 800 high
    picture(2, 800, 600).save(root / "turned.jpg", quality=92, exif=exif.tobytes())
    decoded = {}

    def spy(path, img, size):
        decoded[path.name] = img.size
        return image_facts(path, img, size)

    scan = scan_dataset(root, inspect=spy)
    assert decoded == {"wide.jpg": (256, 192), "turned.jpg": (150, 200)}  # 1/4 scale: the smallest >= 128 px
    facts = {p.name: f for p, f in scan.facts.items()}
    assert facts["wide.jpg"].size == (1024, 768) and facts["turned.jpg"].size == (600, 800)
    full = phash(picture(1, 1024, 768))
    assert np.count_nonzero(full != facts["wide.jpg"].phash) <= 4  # the same picture to the duplicate check
    # the files' own sizes (square crops: with buckets 600×800 trains downscaled in 576×768, nothing is small)
    small = [f for f in check_scan(scan, 700, buckets=None).findings if f.check == "small"]
    assert small[0].files == ["turned.jpg (600×800)"]
    # a scan made without inspect: the check decodes them itself, the same way
    monkeypatch.setattr(check_mod, "phash", lambda img: decoded.setdefault("again", img.size) and full)
    small = [f for f in check_scan(scan_dataset(root), 700, buckets=None).findings if f.check == "small"]
    assert small[0].files == ["turned.jpg (600×800)"] and decoded["again"] in ((256, 192), (150, 200))


@pytest.fixture
def mid_sized(tmp_path):
    """Images of 600 px: large enough for SD 1.x's 512, too small for SDXL's 1024."""
    root = tmp_path / "mid"
    root.mkdir()
    for k in range(4):
        picture(k, 600, 600).save(root / f"img_{k}.png")
        (root / f"img_{k}.txt").write_text(f"mystyle, a picture, tone {k}", encoding="utf-8")
    return root


def test_the_check_uses_the_resolution_the_run_will_use_its_models_default(mid_sized, tmp_path, capsys):
    """An SDXL model's config that sets no resolution trains at 1024: the check says 1024, not the config's 512."""
    import yaml

    def check_with(base_model: str, **data) -> str:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({"data": {"train_data_dir": str(mid_sized), **data},
                                        "model": {"base_model": base_model}}))
        main(["check", "--config", str(path)])
        return capsys.readouterr().out

    assert "smaller than the training resolution 1024" in check_with("tiny-sdxl")
    assert "smaller than the training resolution" not in check_with("tiny-demo")
    assert "smaller than the training resolution" not in check_with("tiny-sdxl", resolution=512)  # set: it counts


def test_training_checks_at_the_resolution_the_run_will_use(mid_sized, tmp_path, monkeypatch, caplog):
    """train() prints the dataset check before the model loads: at the model family's resolution (read from the
    base model's files) where the config sets none."""
    import logging

    import lora_trainer.engine.trainer as trainer
    from lora_trainer.config import config_from_dict

    class Loaded(Exception):
        pass

    def no_load(cfg):
        raise Loaded

    monkeypatch.setattr(trainer, "load_backend", no_load)  # stop where the model would load
    for base_model, words in [("tiny-sdxl", "smaller than the training resolution 1024"), ("tiny-demo", None)]:
        cfg = config_from_dict({"train_data_dir": str(mid_sized), "base_model": base_model, "log_with": "none",
                                "output_dir": str(tmp_path / "out" / base_model)})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lora_trainer"), pytest.raises(Loaded):
            trainer.train(cfg, progress=False)
        assert "4 images" in caplog.text
        if words:
            assert words in caplog.text
        else:
            assert "smaller than the training resolution" not in caplog.text


# --- the regularization images (data.reg_data_dir) ---------------------------------------------------------

@pytest.fixture
def with_reg(tmp_path):
    """A subject set (4 images, captioned) and a regularization folder in kohya's layout (1_person: no captions,
    the class word is theirs) with a damaged, a small, a duplicated image and two copies of training images."""
    subject, reg = tmp_path / "img", tmp_path / "reg" / "1_person"
    subject.mkdir()
    reg.mkdir(parents=True)
    for k in range(4):
        picture(k).save(subject / f"s{k}.png")
        (subject / f"s{k}.txt").write_text(f"sks, a picture, tone {k}", encoding="utf-8")
    for k in range(5):
        picture(200 + k).save(reg / f"r{k}.png")
    (reg / "r_copy.png").write_bytes((reg / "r0.png").read_bytes())  # the same file twice
    (reg / "s0.png").write_bytes((subject / "s0.png").read_bytes())  # a training image among the class images
    picture(1).resize((200, 200), Image.LANCZOS).save(reg / "s1_small.png")  # and a resized copy of one
    picture(300, 64, 64).save(reg / "tiny.png")
    buf = io.BytesIO()
    picture(301).save(buf, "JPEG")
    (reg / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return subject, tmp_path / "reg"


def test_the_regularization_images_are_checked_and_labelled_as_theirs(with_reg, tmp_path):
    subject, reg = with_reg
    alone = check_dataset(subject, resolution=128)
    report = check_dataset(subject, resolution=128, reg_data_dir=reg)
    assert (report.reg_root, report.reg_images) == (str(reg.resolve()), 9)
    ours = [f for f in report.findings if f.dataset == "regularization"]
    # the training images' findings are the same as without them
    assert [f for f in report.findings if f.dataset == "training"] == alone.findings
    assert all(f.message.startswith("regularization images: ") for f in ours)

    def files(check):
        return [name for f in ours if f.check == check for name in f.files]

    assert files("unreadable") == ["1_person/broken.jpg"]
    assert files("small") == ["1_person/tiny.png (64×64)"]
    duplicates = [sorted(f.files) for f in ours if f.check == "duplicate"]
    assert ["1_person/r0.png", "1_person/r_copy.png"] in duplicates
    assert ["1_person/s0.png (= s0.png)"] in duplicates  # (one of the training images)
    assert files("near-duplicate") == ["1_person/s1_small.png (~ s1.png)"]  # (and one resized)
    assert not files("no-caption")  # (kohya's layout: the folder's class word is their caption)
    (balance,) = [f for f in ours if f.check == "regularization"]
    assert balance.severity == "info" and "1_person (9 × 1)" in balance.message
    assert "an epoch trains 4 beside the subject's 4" in balance.message and "5 left out" in balance.message
    text = report.summary()
    assert f"regularization images (data.reg_data_dir) of {reg.resolve()}: 9 images" in text
    assert "[warning] regularization images: skipped: " in text and "1_person/broken.jpg" in text
    out = tmp_path / "report.json"
    out.write_text(json.dumps(report.to_dict()))
    data = json.loads(out.read_text())
    assert data["reg_images"] == 9 and data["reg_root"] == str(reg.resolve())
    assert {f["dataset"] for f in data["findings"]} == {"training", "regularization"}
    assert alone.to_dict()["reg_root"] is None


def test_regularization_images_are_read_as_the_run_reads_them(with_reg):
    """The check's regularization images are the run's: data.regularization's scan (kohya's layout, no prefix)."""
    from lora_trainer.config import DataConfig
    from lora_trainer.data.check import image_facts
    from lora_trainer.data.regularization import scan_regularization, with_regularization

    subject, reg = with_reg
    report = check_dataset(subject, resolution=128, caption_prefix="sks, ", reg_data_dir=reg)
    d = DataConfig(reg_data_dir=str(reg), caption_prefix="sks, ")
    scan = scan_dataset(subject, caption_prefix="sks, ", inspect=image_facts)
    run = with_regularization(d, scan)
    assert report.reg_images == len({s.path for s in run.samples if s.is_reg}) + 5  # (5 left out by the balance)
    assert report.images == sum(not s.is_reg for s in run.samples)
    # a run can check its regularization images and train the same scan of them (decoded once)
    reg_scan = scan_regularization(reg, inspect=image_facts)
    assert check_scan(scan, 128, "sks, ", reg=reg_scan).to_dict() == report.to_dict()
    assert with_regularization(d, scan, reg=reg_scan).samples == run.samples


def test_a_plain_regularization_folder_without_captions_is_named(tmp_path):
    """Outside kohya's layout no folder name gives the class word: a captionless class image trains with an empty
    prompt. Images with a caption (and the subject's) are not named."""
    subject, reg = tmp_path / "img", tmp_path / "reg"
    subject.mkdir()
    reg.mkdir()
    for k in range(2):
        picture(k).save(subject / f"s{k}.png")
        (subject / f"s{k}.txt").write_text("sks, a picture")
        picture(10 + k).save(reg / f"r{k}.png")
    (reg / "r0.txt").write_text("a person")
    report = check_dataset(subject, resolution=128, reg_data_dir=reg)
    (untitled,) = report.by_check("no-caption")
    assert untitled.dataset == "regularization" and untitled.files == ["r1.png"]
    assert "no class tokens from a folder name" in untitled.message and "1_dog" in untitled.fix
    (balance,) = report.by_check("regularization")
    assert "an epoch trains 2 beside the subject's 2" in balance.message and "left out" not in balance.message


def test_an_unusable_regularization_folder_is_an_error_of_its_own(with_reg, tmp_path):
    subject, _ = with_reg
    (tmp_path / "empty").mkdir()
    report = check_dataset(subject, resolution=128, reg_data_dir=tmp_path / "empty")
    (error,) = [f for f in report.findings if f.severity == "error"]
    assert error.dataset == "regularization" and error.check == "unusable"
    assert error.message.startswith("data.reg_data_dir (the regularization images): no usable images")
    assert report.images == 4 and report.reg_images == 0 and report.reg_root == str((tmp_path / "empty").resolve())
    # an unusable training folder: the regularization images are still checked (nothing to compare them with)
    (tmp_path / "none").mkdir()
    report = check_dataset(tmp_path / "none", resolution=128, reg_data_dir=with_reg[1])
    assert [f.dataset for f in report.findings if f.severity == "error"] == ["training"]
    assert report.reg_images == 9 and not report.by_check("regularization")
    assert any(f.dataset == "regularization" for f in report.by_check("unreadable"))


# --- captions written on several lines -----------------------------------------------------------------------

def test_captions_on_several_lines_are_noted_as_kohya_reads_only_the_first(tmp_path, capsys):
    """Here a caption file's lines are joined with ", " (nothing written is dropped); kohya's sd-scripts trains only
    the first line. The check says so, as a note; a trailing newline is one line, a metadata.csv cell is not a
    caption file."""
    for k in range(5):
        picture(k).save(tmp_path / f"{k}.png")
    (tmp_path / "0.txt").write_text("mystyle, a picture\nred hair, smiling\n\n", encoding="utf-8")
    (tmp_path / "1.txt").write_text("mystyle, one line\n", encoding="utf-8")
    (tmp_path / "2.txt").write_text("\r\nmystyle, after a blank line", encoding="utf-8")
    (tmp_path / "3.txt").write_text("mystyle, one line", encoding="utf-8")
    write_csv(tmp_path, [["4.png", "mystyle\nin a csv cell"]])
    scan = scan_dataset(tmp_path)
    assert scan.samples[0].caption == "mystyle, a picture, red hair, smiling"  # (our reading: every line)
    report = check_scan(scan, resolution=128)
    (note,) = report.by_check("multi-line-caption")
    assert note.severity == "info" and note.dataset == "training"
    assert note.files == ["0.txt (2 lines)", "2.txt (2 lines)"]
    assert "joined with ', '" in note.message and "kohya's sd-scripts reads only the first line" in note.message
    assert note.fix
    assert main(["check", str(tmp_path), "--resolution", "128"]) == 0
    assert "[info] 2 caption files (.txt) span several lines" in capsys.readouterr().out
    (tmp_path / "0.txt").write_text("mystyle, a picture\n", encoding="utf-8")
    (tmp_path / "2.txt").unlink()
    assert not check_dataset(tmp_path, resolution=128).by_check("multi-line-caption")


def test_the_check_command_takes_the_regularization_folder(with_reg, tmp_path, capsys):
    """``check DIR --reg-dir REG`` (or a config's data.reg_data_dir): the report covers both sets."""
    import json

    import yaml

    from lora_trainer.cli import main

    subject, reg = with_reg
    assert main(["check", str(subject), "--resolution", "128", "--reg-dir", str(reg), "--json",
                 str(tmp_path / "a.json")]) == 0
    assert "regularization images (data.reg_data_dir) of" in capsys.readouterr().out
    by_flag = json.loads((tmp_path / "a.json").read_text())
    assert by_flag["reg_root"] == str(reg.resolve())
    assert any(f["dataset"] == "regularization" and f["check"] == "duplicate" for f in by_flag["findings"])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train_data_dir": str(subject), "reg_data_dir": str(reg), "resolution": 128}))
    assert main(["check", "--config", str(config), "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["findings"] == by_flag["findings"]


def test_images_of_one_name_in_two_formats_sharing_a_caption_are_noted(tmp_path):
    """a.png and a.jpg both read a.txt (here as in kohya's scripts): an info naming the file and the images."""
    picture(1).save(tmp_path / "a.png")
    picture(2).save(tmp_path / "a.jpg")
    picture(3).save(tmp_path / "b.png")
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"sks, {name}", encoding="utf-8")
    found = [f for f in check_dataset(tmp_path, resolution=128).findings if f.check == "shared-caption"]
    assert len(found) == 1 and found[0].severity == "info"
    assert found[0].files == ["a.txt: a.jpg, a.png"]
    assert "1 caption file is read by two or more images" in found[0].message
