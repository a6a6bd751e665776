"""Images and the dataset scan: what users' folders really hold, each bad file skipped with its reason."""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from lora_trainer.data.dataset import ImageDataset, collate, scan_dataset
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.data.images import ImageError, load_image, resize_center_crop, to_tensor
from lora_trainer.errors import DatasetError

RED, BLUE = (220, 20, 20), (20, 20, 220)


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def rgb(w=32, h=32, color=RED):
    return Image.new("RGB", (w, h), color)


def near(px, color, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(px, color))


def png16_rgb(path, values):
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): one row of gray pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + b"".join(struct.pack(">3H", v, v, v) for v in values)
    header = struct.pack(">IIBBBBB", len(values), 1, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 = RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row))
                     + chunk(b"IEND", b""))
    return path


def reason(path) -> str:
    with pytest.raises(ImageError) as e:
        load_image(path)
    return e.value.reason


# --- images -------------------------------------------------------------------------------------

def test_exif_orientation_applied(tmp_path):
    img = rgb(40, 20, RED)
    img.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: the left half ends up on top
    out = load_image(save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40) and out.mode == "RGB"
    assert near(out.getpixel((10, 5)), RED) and near(out.getpixel((10, 35)), BLUE)


def test_alpha_and_palette_flattened_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    out = load_image(save(rgba, tmp_path / "a.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    la = Image.new("LA", (8, 8), (0, 0))
    assert load_image(save(la, tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30] * 256)
    assert load_image(save(p, tmp_path / "p.png", transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    key = rgb(8, 8, (10, 20, 30))  # an RGB PNG with a transparent colour key (tRNS)
    out = load_image(save(key, tmp_path / "key.png", transparency=(10, 20, 30)))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    opaque_p = Image.new("P", (8, 8), 0)
    opaque_p.putpalette([10, 20, 30] * 256)
    assert load_image(save(opaque_p, tmp_path / "op.png")).getpixel((0, 0)) == (10, 20, 30)


def test_16bit_scaled_not_clipped(tmp_path):
    arr = np.array([[65535, 32768, 0]], dtype=np.uint16)
    path = save(Image.fromarray(arr), tmp_path / "deep.png")  # uint16 gray → mode I;16
    px = [load_image(path).getpixel((x, 0)) for x in range(3)]
    assert px[0] == (255, 255, 255) and abs(px[1][0] - 128) <= 1 and px[2] == (0, 0, 0)
    deep_rgb = load_image(png16_rgb(tmp_path / "deep_rgb.png", [65535, 32768, 0]))
    px = [deep_rgb.getpixel((x, 0)) for x in range(3)]
    assert px[0] == (255, 255, 255) and abs(px[1][0] - 128) <= 1 and px[2] == (0, 0, 0)


def test_cmyk_and_gray_converted(tmp_path):
    cmyk = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    r, g, b = load_image(cmyk).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    assert load_image(save(Image.new("L", (8, 8), 77), tmp_path / "l.png")).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(save(Image.new("1", (8, 8), 1), tmp_path / "1.bmp")).getpixel((0, 0)) == (255, 255, 255)


def test_unusable_files_say_why(tmp_path, monkeypatch):
    (tmp_path / "empty.png").write_bytes(b"")
    assert reason(tmp_path / "empty.png") == "empty file"
    assert reason(tmp_path / "gone.png") == "file not found"
    (tmp_path / "text.png").write_text("hello")
    assert reason(tmp_path / "text.png") == "not an image (a text file)"
    (tmp_path / "page.jpg").write_text("<!DOCTYPE html><html><body>403</body></html>")
    assert reason(tmp_path / "page.jpg") == "not an image (an HTML page, perhaps a failed download)"
    (tmp_path / "phone.jpg").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    assert reason(tmp_path / "phone.jpg").startswith("not an image (a HEIC/AVIF")
    buf = io.BytesIO()
    rgb(128, 128).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert reason(tmp_path / "cut.jpg").startswith("truncated or corrupt: ")
    big = save(rgb(64, 64), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert reason(big).startswith("too large to load safely (decompression-bomb guard")


@pytest.mark.parametrize("size", [(200, 100), (50, 300), (10, 10), (64, 64), (64, 65)])
def test_resize_center_crop(size):
    assert resize_center_crop(rgb(*size), 64).size == (64, 64)


def test_center_crop_keeps_the_middle():
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # red middle third
    out = resize_center_crop(img, 50)
    assert out.getpixel((25, 25))[0] > 200 and out.getpixel((25, 5))[0] > 200
    tall = Image.new("RGB", (100, 300), (0, 0, 255))
    tall.paste((255, 0, 0), (0, 100, 100, 200))
    assert resize_center_crop(tall, 50).getpixel((25, 25))[0] > 200


def test_to_tensor_range():
    t = to_tensor(Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8)))
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    assert t[0].item() == -1.0 and t[1].item() == 1.0 and abs(t[2].item()) < 0.01


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
    save(rgb(), tmp_path / "outside.png")
    (root / "metadata.csv").write_text(
        "filename,prompt\ngood1.png,\"**red**, from csv\"\ngood2.jpg,green from csv\nmissing.png,gone\n"
        f"../outside.png,sneaky\nreadme.md,not an image\n{tmp_path / 'outside.png'},absolute\n",
        encoding="utf-8")
    return root


def test_every_bad_file_skipped_with_its_reason(messy, caplog):
    caplog.set_level(logging.WARNING)
    scan = scan_dataset(messy)
    assert [s.path.name for s in scan.samples] == ["good1.png", "good2.jpg"]
    reasons = {s.path: s.reason for s in scan.skipped}
    assert reasons["truncated.jpg"].startswith("truncated or corrupt: ")
    assert reasons["empty.png"] == "empty file"
    assert reasons["notes.png"] == "not an image (a text file)"
    assert reasons["missing.png"] == "listed in metadata.csv line 4 but not found"
    assert reasons["../outside.png"] == "listed in metadata.csv line 5: escapes the dataset folder"
    assert reasons["readme.md"] == ("listed in metadata.csv line 6: not a supported image type "
                                    "(use .jpg, .jpeg, .png, .webp, .bmp)")
    absolute = str(messy.parent / "outside.png")
    assert reasons[absolute].startswith("listed in metadata.csv line 7: escapes the dataset folder")
    assert len(reasons) == 8 and not any(".hidden" in p for p in reasons)
    # each is listed once, by the dataset check, with a fix for its own kind (not "re-save as PNG" for all)
    assert "skipped" not in caplog.text
    from lora_trainer.data.check import check_scan

    listed = {f.files[0]: f for f in check_scan(scan, resolution=64).findings if f.check == "unreadable"}
    assert listed.keys() == reasons.keys() and all(listed[n].message == f"skipped: {why}" for n, why in reasons.items())
    fixes = {name: f.fix for name, f in listed.items()}
    assert fixes["missing.png"].startswith("correct the name in the caption file")
    assert fixes["../outside.png"] == fixes[absolute] and fixes[absolute].startswith("copy the image into the dataset")
    assert fixes["empty.png"].startswith("the file has no data") and fixes["readme.md"].startswith("remove it")
    assert fixes["notes.png"].startswith("remove it") and fixes["truncated.jpg"].startswith("re-save the file as PNG")
    assert reasons["corrupt.webp"] == "truncated or corrupt: starts like a WebP file but cannot be decoded"
    assert scan.summary() == (
        f"dataset {messy}: 2 images used, 8 skipped (2 corrupt, 1 empty, 1 missing, 2 not an image, "
        "2 outside the folder); captions: 2 from metadata.csv, 0 from .txt, 0 without caption")


def test_truncated_files_fail_even_if_someone_allowed_them(messy, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some WebUI extensions do
    assert "truncated.jpg" in {s.path for s in scan_dataset(messy).skipped}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the host's setting is given back


def test_caption_priority_both_ways(messy):
    csv_first = {s.path.name: s for s in scan_dataset(messy).samples}
    assert csv_first["good2.jpg"].caption == "green from csv"
    assert csv_first["good2.jpg"].caption_source == "csv"
    assert csv_first["good1.png"].caption == "red, from csv" and csv_first["good1.png"].core_tags == ("red",)
    txt_first = {s.path.name: s for s in scan_dataset(messy, caption_priority="txt").samples}
    assert txt_first["good2.jpg"].caption == "green, from txt"
    assert txt_first["good2.jpg"].core_tags == ("green",)
    assert txt_first["good2.jpg"].caption_source == "txt"
    assert txt_first["good1.png"].caption_source == "csv"  # no .txt: the csv row is used
    with pytest.raises(ValueError, match="caption_priority"):
        scan_dataset(messy, caption_priority="both")


def test_prefix_sidecars_and_no_caption(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    root = tmp_path / "s"
    root.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        save(rgb(), root / name)
    (root / "a.caption").write_text("\ufeffhello *world*", encoding="utf-8")
    (root / "c.caption").write_bytes("caf\xe9".encode("latin-1"))
    (root / "d.caption").write_text("  \n", encoding="utf-8")
    scan = scan_dataset(root, caption_extension="caption", caption_prefix="trig, ")
    by = {s.path.name: s for s in scan.samples}
    assert by["a.png"].caption == "trig, hello world" and by["a.png"].caption_source == "txt"
    assert by["b.png"].caption == "trig, " and by["b.png"].caption_source == "none"
    assert by["c.png"].caption_source == "none" and by["d.png"].caption_source == "none"
    assert scan.problems == ["c.caption: caption file is not UTF-8 text; ignored (re-save it as UTF-8)"]
    assert caplog.text.count("images have no caption") == 1 and "3 images have no caption" in caplog.text
    assert scan.summary().endswith("captions: 0 from metadata.csv, 1 from .caption, 3 without caption")
    # a prefix without its own separator is joined with a space, as kohya joins them (not "triga dog")
    joined = {s.path.name: s.caption for s in scan_dataset(root, caption_extension="caption",
                                                            caption_prefix="trig").samples}
    assert (joined["a.png"], joined["b.png"]) == ("trig hello world", "trig")


def test_csv_elsewhere_subfolder_rows_and_hints(tmp_path, caplog):
    root = tmp_path / "s"
    (root / "sub").mkdir(parents=True)
    save(rgb(), root / "Photo.PNG")
    save(rgb(), root / "sub" / "deep.png")
    save(rgb(), root / "other.jpg")
    meta = tmp_path / "captions.csv"
    meta.write_text("photo.png,wrong case\nsub\\deep.png,from a windows csv\nother.png,converted\n"
                    "Photo.PNG,\n", encoding="utf-8")
    (root / "Photo.txt").write_text("from txt", encoding="utf-8")
    scan = scan_dataset(root, metadata_path=meta)
    by = {s.path.relative_to(root).as_posix(): s for s in scan.samples}
    assert by["sub/deep.png"].caption == "from a windows csv"  # listed rows are used even when not recursive
    assert by["Photo.PNG"].caption == "from txt"  # an empty csv caption falls through to the .txt
    reasons = {s.path: s.reason for s in scan.skipped}
    assert reasons["photo.png"] == "listed in captions.csv line 1 but not found (did you mean Photo.PNG?)"
    assert reasons["other.png"] == "listed in captions.csv line 3 but not found (did you mean other.jpg?)"
    with pytest.raises(DatasetError, match="metadata file .*nope.csv does not exist"):
        scan_dataset(root, metadata_path=tmp_path / "nope.csv")


def test_a_csv_name_in_another_case_is_the_same_image_on_windows(tmp_path, monkeypatch):
    """On a case-insensitive file system (Windows', macOS's) metadata.csv's "IMG_1.jpg" is the folder's "IMG_1.JPG":
    one image, with the row's caption (not that image twice, once without its caption)."""
    from lora_trainer.data import dataset

    def named(path):  # the file a case-insensitive file system opens for this name
        path = Path(path)
        return next((p for p in path.parent.iterdir() if p.name.lower() == path.name.lower()), None) \
            if path.parent.is_dir() else None

    monkeypatch.setattr(dataset, "_is_file", lambda p: named(p) is not None and named(p).is_file())
    monkeypatch.setattr(os.path, "samefile", lambda a, b: named(a) is not None and named(a) == named(b))
    root = tmp_path / "s"
    root.mkdir()
    save(rgb(), root / "IMG_1.JPG", format="JPEG")
    save(rgb(), root / "b.png")
    (root / "metadata.csv").write_text("IMG_1.jpg,from the csv\nb.png,bee\n", encoding="utf-8")
    scan = scan_dataset(root)
    assert [(s.path.name, s.caption) for s in scan.samples] == [("IMG_1.JPG", "from the csv"), ("b.png", "bee")]
    assert scan.skipped == []


def test_two_csv_rows_for_one_image_are_named_and_the_later_wins(tmp_path):
    """``./a.png`` and ``a.png`` are one file: its caption is the later row's, and the dataset check says so (as it
    says for a name written twice alike)."""
    root = tmp_path / "s"
    root.mkdir()
    save(rgb(), root / "a.png")
    (root / "metadata.csv").write_text("file_name,text\n./a.png,first\na.png,second\n", encoding="utf-8")
    scan = scan_dataset(root)
    assert [(s.path.name, s.caption) for s in scan.samples] == [("a.png", "second")]
    assert scan.problems == ["metadata.csv line 3: a.png is a.png, also listed as ./a.png on line 2; line 3 wins"]


def test_a_caption_file_saved_as_windows_unicode_is_read(tmp_path):
    """Notepad's "Unicode" (UTF-16 with a byte order mark) is read, not skipped as not UTF-8."""
    root = tmp_path / "s"
    root.mkdir()
    for name in ("le.png", "be.png"):
        save(rgb(), root / name)
    (root / "le.txt").write_bytes("\ufeffcafé, **zxq** style".encode("utf-16-le"))
    (root / "be.txt").write_bytes("\ufeffnaïve, red".encode("utf-16-be"))
    scan = scan_dataset(root)
    by = {s.path.name: s for s in scan.samples}
    assert (by["le.png"].caption, by["le.png"].core_tags) == ("café, zxq style", ("zxq",))
    assert by["be.png"].caption == "naïve, red" and scan.problems == []


def test_a_caption_on_several_lines_is_joined_and_its_lines_counted(tmp_path):
    """Every line of a caption file is trained, joined with ", " (nothing written is dropped); the lines up to the
    last non-blank one are counted (kohya's scripts read only the first: the dataset check says so)."""
    from lora_trainer.data.dataset import caption_lines

    root = tmp_path / "s"
    root.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        save(rgb(), root / name)
    (root / "a.txt").write_text("zxq style, red\n**blue sky**\n\n", encoding="utf-8")
    (root / "b.txt").write_text("one line\r\n", encoding="utf-8")
    (root / "c.txt").write_bytes(b"\r\nafter a blank line\rand an old Mac line")
    (root / "d.txt").write_text("  \n", encoding="utf-8")
    by = {s.path.name: s for s in scan_dataset(root).samples}
    assert (by["a.png"].caption, by["a.png"].core_tags) == ("zxq style, red, blue sky", ("blue sky",))
    assert by["c.png"].caption == "after a blank line, and an old Mac line"
    assert {n: s.caption_lines for n, s in by.items()} == {"a.png": 2, "b.png": 1, "c.png": 3, "d.png": 1,
                                                         "e.png": 1}
    assert [caption_lines(t) for t in ("", "a", "a\n", "a\nb", "\na", "a\r\n\r\nb\n")] == [1, 1, 1, 2, 2, 3]


def test_recursive_and_hidden(tmp_path):
    root = tmp_path / "r"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    save(rgb(), root / "top.png")
    save(rgb(), root / "sub" / "deep.png")
    save(rgb(), root / "sub" / "deeper" / "deepest.JPG", format="JPEG")
    save(rgb(), root / ".cache" / "hidden.png")
    save(rgb(), root / ".hidden.png")
    assert [s.path.name for s in scan_dataset(root).samples] == ["top.png"]
    deep = scan_dataset(root, recursive=True).samples
    assert [s.path.relative_to(root).as_posix() for s in deep] == [
        "sub/deep.png", "sub/deeper/deepest.JPG", "top.png"]


def test_links_out_of_the_folder_are_skipped(tmp_path):
    root = tmp_path / "l"
    root.mkdir()
    save(rgb(), root / "in.png")
    outside = save(rgb(), tmp_path / "secret.png")
    try:
        os.symlink(outside, root / "link.png")
        os.symlink(root / "in.png", root / "alias.png")
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    scan = scan_dataset(root)
    assert [s.path.name for s in scan.samples] == ["alias.png", "in.png"]
    assert scan.skipped[0].path == "link.png" and "escapes the dataset folder" in scan.skipped[0].reason


def test_a_caption_file_linked_from_outside_the_folder_is_not_read(tmp_path):
    """As an image linked from outside: a file of this machine must not become a caption (and so the LoRA's
    ss_tag_frequency) because a dataset someone else made links to it."""
    root = tmp_path / "l"
    (root / "sub").mkdir(parents=True)
    save(rgb(), root / "a.png")
    save(rgb(), root / "sub" / "b.png")
    (root / "own.txt").write_text("own caption", encoding="utf-8")
    (tmp_path / "secret.txt").write_text("api_key=hunter2", encoding="utf-8")
    try:
        os.symlink(tmp_path / "secret.txt", root / "a.txt")
        os.symlink(root / "own.txt", root / "sub" / "b.txt")  # (a link inside the folder is followed)
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    scan = scan_dataset(root, recursive=True)
    by = {s.path.name: s for s in scan.samples}
    assert by["a.png"].caption == "" and by["a.png"].caption_source == "none"
    assert by["b.png"].caption == "own caption"
    assert len(scan.problems) == 1 and scan.problems[0].startswith("a.txt: caption file escapes the dataset folder")


def test_a_file_name_too_long_in_metadata_csv_is_skipped_not_a_crash(tmp_path):
    """A caption in the file name column (columns swapped) makes a name longer than a file system allows."""
    root = tmp_path / "s"
    root.mkdir()
    save(rgb(), root / "a.png")
    (root / "metadata.csv").write_text("a long caption of a red square, " * 12 + ",a.png\na.png,red\n" +
                                       " " + "x" * 300 + ".png ,spaced\n", encoding="utf-8")
    scan = scan_dataset(root)
    assert [s.caption for s in scan.samples] == ["red"]
    assert [s.reason for s in scan.skipped] == ["listed in metadata.csv line 1 but not found",
                                                "listed in metadata.csv line 3 but not found"]


def test_zero_usable_images_is_a_clear_error(tmp_path):
    root = tmp_path / "bad"
    (root / "10_concept").mkdir(parents=True)
    (root / "x.png").write_text("text")
    (root / "photo.heic").write_bytes(b"\x00")
    (root / "photo.gif").write_bytes(b"\x00")
    save(rgb(), root / "10_concept" / "a.png")
    with pytest.raises(DatasetError) as e:
        scan_dataset(root)
    msg = str(e.value)
    assert msg.startswith(f"no usable images in {root}: looked at 3 file(s), 1 with an image extension")
    assert "x.png: not an image (a text file)" in msg and "other files: 1 .gif, 1 .heic" in msg
    assert "1 image file(s) are in subfolders (turn on recursive" in msg
    assert msg.endswith("Accepted types: .jpg, .jpeg, .png, .webp, .bmp")
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="looked at 0 file"):
        scan_dataset(root / "empty")
    with pytest.raises(DatasetError, match="not an existing folder"):
        scan_dataset(tmp_path / "nowhere")


def test_dataset_and_collate(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", n=5, resolution=48)
    scan = scan_dataset(data)
    assert len(scan.samples) == 5 and all(s.core_tags == ("demo style",) for s in scan.samples)
    assert all(s.caption_source == "csv" and "*" not in s.caption for s in scan.samples)
    assert scan.tag_frequency()["demo style"] == 5 and scan.skipped == [] and scan.problems == []
    ds = ImageDataset(scan.samples, 32)
    assert len(ds) == 5
    batch = collate([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["captions"][0].startswith("demo style, a red")
    assert batch["indices"].tolist() == [0, 1, 2] and batch["indices"].dtype == torch.long
    assert batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert [b["pixel_values"].shape[0] for b in loader] == [2, 2, 1]


def test_demo_set_is_idempotent_and_refuses_other_folders(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", n=4)
    first = (data / "demo_000.png").read_bytes()
    mtime = (data / "demo_000.png").stat().st_mtime_ns
    assert make_demo_dataset(data, n=4) == data
    assert (data / "demo_000.png").read_bytes() == first
    assert (data / "demo_000.png").stat().st_mtime_ns == mtime  # unchanged files are not rewritten
    make_demo_dataset(data, n=2)  # a smaller demo set in the same folder: no leftover images
    assert sorted(p.name for p in data.iterdir()) == ["demo_000.png", "demo_001.png", "metadata.csv"]
    assert len(scan_dataset(data).samples) == 2
    (data / "mine.jpg").write_bytes(b"user file")
    with pytest.raises(DatasetError, match="not a demo set"):
        make_demo_dataset(data, n=2)
    own_csv = tmp_path / "own"
    own_csv.mkdir()
    (own_csv / "metadata.csv").write_text("filename,prompt\nholiday.jpg,my trip\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="not a demo set"):
        make_demo_dataset(own_csv)
    assert (own_csv / "metadata.csv").read_text(encoding="utf-8").endswith("my trip\n")


def test_prefetch_keeps_order_and_stays_within_its_window():
    import threading
    import time

    from lora_trainer.data.images import prefetch

    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.001 * (7 - i % 7))  # later items finish first
        return i * i

    out = []
    for k, value in enumerate(prefetch(work, range(40), ahead=3)):
        out.append(value)
        assert len(started) <= k + 1 + 3, "more than `ahead` items in flight"
    assert out == [i * i for i in range(40)]
    assert list(prefetch(work, [])) == []


def test_prefetch_closed_early_starts_nothing_more():
    import threading
    import time

    from lora_trainer.data.images import decode_threads, prefetch

    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.05)
        return i

    stream = prefetch(work, range(100), ahead=20)
    assert next(stream) == 0
    stream.close()  # 20 were queued: only those already running finish
    assert len(started) <= 1 + 2 * decode_threads(), started


def test_fast_jpeg_decode_reads_fewer_pixels_and_nearly_the_same_image(tmp_path, monkeypatch):
    import lora_trainer.data.dataset as dataset_mod

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (192, 256, 3), dtype=np.uint8)).resize((1024, 768))
    photo.save(tmp_path / "photo.jpg", quality=92)
    (tmp_path / "photo.txt").write_text("a photo")
    samples = scan_dataset(tmp_path).samples
    sizes = []
    real = dataset_mod.resize_center_crop
    monkeypatch.setattr(dataset_mod, "resize_center_crop", lambda img, res: sizes.append(img.size) or real(img, res))
    full = ImageDataset(samples, 64)[0]["pixel_values"]
    fast = ImageDataset(samples, 64, fast_jpeg_decode=True)[0]["pixel_values"]
    # 1/4 scale is the smallest still at least 2 x 64 on both sides (1/8 would be 128 x 96)
    assert sizes == [(1024, 768), (256, 192)]
    mse = ((full - fast) * 127.5).pow(2).mean().item()
    assert 10 * math.log10(255**2 / mse) > 38, mse  # within JPEG's own noise


def test_an_image_damaged_after_the_scan_is_named_in_the_error(tmp_path):
    make_demo_dataset(tmp_path / "d", n=2, resolution=64)
    samples = scan_dataset(tmp_path / "d").samples
    samples[1].path.write_bytes(samples[1].path.read_bytes()[:100])
    ds = ImageDataset(samples, 64)
    assert ds[0]["pixel_values"].shape == (3, 64, 64)
    with pytest.raises(DatasetError, match=r"demo_001\.png: truncated or corrupt.*changed after the dataset scan"):
        ds[1]
