"""kohya's dataset layout: a folder of sub-folders named ``<repeats>_<class tokens>`` ("10_sks dog"), each image
trained ``repeats`` times an epoch, one without a caption trained with its folder's class tokens, as kohya's scripts
(and the GUIs built on them) read it; what the LoRA's metadata says of it (ss_num_train_images, ss_dataset_dirs,
ss_tag_frequency by folder)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image
from safetensors import safe_open
from test_train import make_cfg

from lora_trainer.data.caption_set import CaptionSet
from lora_trainer.data.check import check_scan
from lora_trainer.data.dataset import ImageDataset, scan_dataset
from lora_trainer.engine.batches import Plan, schedule
from lora_trainer.engine.trainer import train
from lora_trainer.errors import DatasetError


def image(path, color=(200, 30, 30), size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def kohya_set(root):
    """10_sks dog: three images, one with its own caption; 2_style_art: two, one of them wide; and what kohya's
    scripts leave out: a folder named otherwise, one of 0 repeats, a hidden one."""
    for k in range(3):
        image(root / "10_sks dog" / f"dog{k}.png", (200, 30 + 40 * k, 30))
    (root / "10_sks dog" / "dog0.txt").write_text("sks dog, sitting on grass", encoding="utf-8")
    image(root / "2_style_art" / "a.png", (20, 20, 200))
    image(root / "2_style_art" / "b.png", (20, 200, 20), size=(128, 64))
    image(root / "notes" / "x.png")
    image(root / "0_off" / "y.png")
    image(root / ".cache" / "z.png")
    return root


def test_a_kohya_layout_is_read_as_kohya_reads_it(tmp_path):
    scan = scan_dataset(kohya_set(tmp_path / "img"))
    by_name = {s.path.name: s for s in scan.samples}
    assert sorted(by_name) == ["a.png", "b.png", "dog0.png", "dog1.png", "dog2.png"]
    assert [by_name[n].repeats for n in ("dog0.png", "dog1.png", "a.png")] == [10, 10, 2]
    assert (by_name["dog0.png"].caption, by_name["dog0.png"].caption_source) == ("sks dog, sitting on grass", "txt")
    assert (by_name["dog1.png"].caption, by_name["dog1.png"].caption_source) == ("sks dog", "folder")
    assert by_name["a.png"].caption == "style_art"  # (the words after the first "_" as written, as kohya's)
    assert scan.folders() == {"10_sks dog": {"n_repeats": 10, "img_count": 3},
                              "2_style_art": {"n_repeats": 2, "img_count": 2}}
    assert any("folder notes: left out" in p for p in scan.folder_notes)
    assert any("folder 0_off: left out (0 repeats)" in p for p in scan.folder_notes)
    report = check_scan(scan, resolution=64).summary()
    assert "[info] kohya folders: 10_sks dog (3 × 10), 2_style_art (2 × 2) = 34 images an epoch" in report
    assert "folder notes: left out" in report and "caption file problems" not in report
    summary = scan.summary()
    assert "4 from their folder's name" in summary
    assert "kohya folders: 10_sks dog (3 × 10), 2_style_art (2 × 2) = 34 images an epoch" in summary
    assert set(scan.tag_frequencies()) == {"10_sks dog", "2_style_art"}
    assert scan.tag_frequencies()["10_sks dog"]["sks dog"] == 3


def test_a_folder_with_images_of_its_own_is_not_a_kohya_layout(tmp_path):
    root = tmp_path / "data"
    image(root / "top.png")
    image(root / "10_sub" / "deeper.png")
    assert [(s.path.name, s.repeats, s.folder) for s in scan_dataset(root).samples] == [("top.png", 1, "")]
    assert sorted(s.path.name for s in scan_dataset(root, recursive=True).samples) == ["deeper.png", "top.png"]
    assert all(s.repeats == 1 for s in scan_dataset(root, recursive=True).samples)


def test_a_kohya_layout_without_a_usable_folder_trains_nothing_and_says_why(tmp_path):
    """Folders of 0 repeats and folders named otherwise are left out, even with data.recursive; an empty folder is
    named; the error lists them (not the plain layout's "turn on recursive")."""
    root = tmp_path / "img"
    image(root / "0_sks" / "x.png")
    image(root / "photos" / "y.png")
    (root / "10_empty").mkdir()
    for recursive in (False, True):
        with pytest.raises(DatasetError) as error:
            scan_dataset(root, recursive=recursive)
        text = str(error.value)
        assert "folder 0_sks: left out (0 repeats)" in text and "folder photos: left out" in text
        assert "folder 10_empty: no images in it" in text and "turn on recursive" not in text


def test_a_metadata_row_outside_the_kohya_folders_is_left_out_with_its_reason(tmp_path):
    root = kohya_set(tmp_path / "img")
    (root / "metadata.csv").write_text("filename,prompt\n0_off/y.png,off\n2_style_art/a.png,from the csv\n")
    scan = scan_dataset(root)
    assert "y.png" not in {s.path.name for s in scan.samples}
    assert [s.caption for s in scan.samples if s.path.name == "a.png"] == ["from the csv"]
    (left,) = [s for s in scan.skipped if s.path == "0_off/y.png"]
    assert "kohya's layout leaves it out" in left.reason and "<repeats>_<name> folder" in left.fix


def test_a_year_in_a_folder_name_is_said(tmp_path):
    image(tmp_path / "d" / "2023_trip" / "a.png")
    scan = scan_dataset(tmp_path / "d")
    assert scan.samples[0].repeats == 2023
    assert any("read as 2023 repeats" in p and "rename it" in p for p in scan.folder_notes)


def test_an_epoch_trains_each_image_its_repeats(tmp_path):
    """With aspect-ratio buckets and without: each image as often as its folder says, every epoch."""
    scan = scan_dataset(kohya_set(tmp_path / "img"))
    for buckets in (True, False):
        cfg = make_cfg(tmp_path / "img", tmp_path / "out", batch_size=4, epochs=2, max_train_steps=None)
        cfg.data.enable_bucket = buckets
        from lora_trainer.engine.run import training_dataset

        dataset = training_dataset(cfg, scan)
        plan = Plan.from_config(cfg, len(scan.samples), dataset.epoch_groups())
        assert plan.num_images == 5 and plan.images_per_epoch == 34
        seen = [Counter(), Counter()]
        for epoch, _, batch in schedule(plan, seed=3, step=0):
            seen[epoch].update(batch)
        repeats = {i: s.repeats for i, s in enumerate(scan.samples)}
        assert seen[0] == Counter(repeats) and seen[1] == Counter(repeats), buckets
    plain = ImageDataset(scan.samples, 64)  # (no buckets: one group)
    assert sorted(Counter(plain.epoch_groups()[0]).values()) == [2, 2, 10, 10, 10]


def test_a_run_on_a_kohya_layout_writes_kohyas_metadata(tmp_path):
    root = kohya_set(tmp_path / "img")
    cfg = make_cfg(root, tmp_path / "out", batch_size=2, max_train_steps=2, gradient_accumulation_steps=1)
    result = train(cfg, progress=False)
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "34"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 3},
                                                   "2_style_art": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"])["2_style_art"] == {"style_art": 2}
    assert meta["ss_num_epochs"] == "1"  # (2 steps of the 17 an epoch of 34 images at batch 2 has)


def test_editing_a_folder_caption_writes_the_images_own_caption_file(tmp_path):
    root = kohya_set(tmp_path / "img")
    captions = CaptionSet.load(root)
    i = next(k for k, item in enumerate(captions.items) if item.rel == "10_sks dog/dog1.png")
    assert captions.items[i].source == "folder" and captions.items[i].caption == "sks dog"
    captions.set_caption(i, "sks dog, running")
    captions.save()
    assert (root / "10_sks dog" / "dog1.txt").read_text(encoding="utf-8").strip() == "sks dog, running"
    assert scan_dataset(root).samples[1].caption_source == "txt"
