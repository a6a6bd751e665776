"""Images and the dataset scan: what users' folders really hold, each bad file skipped with its reason."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.data.dataset import ImageDataset, collate, scan_dataset
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.data.images import ImageError, load_image, resize_center_crop, to_tensor
from lora_trainer.errors import DatasetError


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def rgb(w=32, h=32, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


# --- images -------------------------------------------------------------------------------------

def test_exif_orientation_applied(tmp_path):
    img = rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    path = save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


def test_alpha_and_palette_flattened_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert load_image(save(rgba, tmp_path / "a.png")).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (8, 8), (0, 0))
    assert load_image(save(la, tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert load_image(save(p, tmp_path / "p.png", transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_scaled_not_clipped(tmp_path):
    arr = np.array([[65535, 32768, 0]], dtype=np.uint16)
    path = save(Image.fromarray(arr), tmp_path / "deep.png")  # uint16 → mode I;16
    px = [load_image(path).getpixel((x, 0))[0] for x in range(3)]
    assert px[0] == 255 and abs(px[1] - 128) <= 1 and px[2] == 0


def test_cmyk_converted(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    r, g, b = load_image(path).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("size, expected", [((200, 100), (64, 64)), ((50, 300), (64, 64)), ((10, 10), (64, 64))])
def test_resize_center_crop(size, expected):
    assert resize_center_crop(rgb(*size), 64).size == expected


def test_center_crop_keeps_the_middle():
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # red middle third
    assert resize_center_crop(img, 50).getpixel((25, 25))[0] > 200


def test_to_tensor_range():
    t = to_tensor(Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8)))
    assert t.shape == (3, 1, 1) and t[0].item() == -1.0 and t[1].item() == 1.0 and abs(t[2].item()) < 0.01


# --- the scan ---------------------------------------------------------------------------------

@pytest.fixture
def messy(tmp_path):
    """A folder with two good images and every kind of bad input."""
    root = tmp_path / "set"
    root.mkdir()
    save(rgb(), root / "good1.png")
    save(rgb(color=(0, 200, 0)), root / "good2.jpg", quality=90)
    (root / "good2.txt").write_text("**green**, from txt", encoding="utf-8")
    buf = io.BytesIO()
    rgb(256, 256).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("this is text")
    (root / "corrupt.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPjunkjunk")
    (root / ".hidden.png").write_bytes(b"")
    (root / "readme.md").write_text("ignored: not an image type")
    (tmp_path / "outside.png").write_bytes(b"")
    save(rgb(), tmp_path / "outside.png")
    (root / "metadata.csv").write_text(
        "filename,prompt\ngood1.png,\"**red**, from csv\"\ngood2.jpg,green from csv\nmissing.png,gone\n"
        "../outside.png,sneaky\nreadme.md,not an image\n", encoding="utf-8")
    return root


def test_every_bad_file_skipped_with_its_reason(messy, caplog):
    caplog.set_level(logging.WARNING)
    scan = scan_dataset(messy)
    assert [s.path.name for s in scan.samples] == ["good1.png", "good2.jpg"]
    reasons = {s.path: s.reason for s in scan.skipped}
    assert "truncated or corrupt" in reasons["truncated.jpg"]
    assert reasons["empty.png"] == "empty file"
    assert "not an image" in reasons["notes.png"]
    assert "corrupt.webp" in reasons
    assert "line 4 but not found" in reasons["missing.png"]
    assert "escapes the dataset folder" in reasons["../outside.png"]
    assert "not a supported image type" in reasons["readme.md"]
    assert not any(".hidden" in p for p in reasons)
    for name in reasons:
        assert f"skipped {name}: " in caplog.text
    summary = scan.summary()
    assert "2 images used, 7 skipped" in summary and "1 missing" in summary and "1 empty" in summary


def test_caption_priority_both_ways(messy):
    csv_first = {s.path.name: s for s in scan_dataset(messy).samples}
    assert csv_first["good2.jpg"].caption == "green from csv" and csv_first["good2.jpg"].caption_source == "csv"
    assert csv_first["good1.png"].core_tags == ("red",)
    txt_first = {s.path.name: s for s in scan_dataset(messy, caption_priority="txt").samples}
    assert txt_first["good2.jpg"].caption == "green, from txt" and txt_first["good2.jpg"].core_tags == ("green",)
    assert txt_first["good1.png"].caption_source == "csv"  # no .txt: the csv row is used


def test_prefix_sidecars_and_no_caption(tmp_path, caplog):
    root = tmp_path / "s"
    root.mkdir()
    save(rgb(), root / "a.png")
    save(rgb(), root / "b.png")
    (root / "a.caption").write_text("\ufeffhello *world*", encoding="utf-8")
    scan = scan_dataset(root, caption_extension=".caption", caption_prefix="trig, ")
    by = {s.path.name: s for s in scan.samples}
    assert by["a.png"].caption == "trig, hello world" and by["a.png"].caption_source == "txt"
    assert by["b.png"].caption == "trig, " and by["b.png"].caption_source == "none"
    assert "1 images have no caption" in caplog.text


def test_recursive(tmp_path):
    root = tmp_path / "r"
    (root / "sub").mkdir(parents=True)
    save(rgb(), root / "top.png")
    save(rgb(), root / "sub" / "deep.png")
    assert len(scan_dataset(root).samples) == 1
    assert {s.path.name for s in scan_dataset(root, recursive=True).samples} == {"top.png", "deep.png"}


def test_zero_usable_images_is_a_clear_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "x.png").write_text("text")
    with pytest.raises(DatasetError) as e:
        scan_dataset(root)
    msg = str(e.value)
    assert str(root) in msg and "looked at 1" in msg and "x.png: not an image" in msg and ".jpg" in msg
    with pytest.raises(DatasetError, match="not an existing folder"):
        scan_dataset(tmp_path / "nowhere")


def test_dataset_and_collate(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", n=5, resolution=48)
    scan = scan_dataset(data)
    assert len(scan.samples) == 5 and all(s.core_tags == ("demo style",) for s in scan.samples)
    assert scan.tag_frequency()["demo style"] == 5
    ds = ImageDataset(scan.samples, 32)
    batch = collate([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["captions"][0].startswith("demo style")
    assert batch["indices"].tolist() == [0, 1, 2] and batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0


def test_demo_set_is_idempotent_and_refuses_other_folders(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", n=3)
    first = (data / "demo_000.png").read_bytes()
    make_demo_dataset(data, n=3)
    assert (data / "demo_000.png").read_bytes() == first
    (data / "mine.jpg").write_bytes(b"user file")
    with pytest.raises(DatasetError, match="not a demo set"):
        make_demo_dataset(data, n=3)
