"""Aspect-ratio buckets: kohya's bucket sizes, each image whole in the bucket nearest its shape, batches of one
bucket in a seeded order, exact resumes, the latent cache per bucket, SDXL's size/crop ids, the kohya metadata and
the dataset check's histogram. Tiny models on the CPU, images of 64-256 px."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import StopAt, make_cfg

from lora_trainer.config import config_from_dict
from lora_trainer.data.buckets import BucketSpec, bucket_info
from lora_trainer.data.check import check_dataset
from lora_trainer.data.dataset import ImageDataset, scan_dataset
from lora_trainer.data.images import resize_center_crop, to_tensor
from lora_trainer.engine.batches import Plan, epoch_batches, schedule
from lora_trainer.engine.run import Run
from lora_trainer.engine.trainer import train
from lora_trainer.errors import ConfigError
from lora_trainer.models.tiny_sdxl import TINY_SDXL_NAME, tiny_sdxl_model_path

# resolution 128, sides multiples of 32 from 64: (64,256) (96,160) (128,128) (160,96) (192,64) (224,64) (256,64) ...
BUCKETS = {"resolution": 128, "min_bucket_reso": 64, "bucket_reso_steps": 32}
SHAPES = {"portrait": (96, 160), "landscape": (160, 96), "square": (128, 128), "wide": (256, 128)}


def picture(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random picture with a red band at its left edge and a blue one at its right edge (1/8 of the width
    each): a square centre crop of a wide picture loses both."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((6, 6, 3)) * 120 + 60).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(base).copy()
    arr[:, : w // 8] = (230, 20, 20)
    arr[:, w - w // 8 :] = (20, 20, 230)
    return Image.fromarray(arr)


def mixed_set(root, per_shape: int = 2):
    """Portraits, landscapes, squares and 2:1 panoramas, captioned in metadata.csv."""
    root.mkdir(parents=True)
    rows = ["file_name,text"]
    k = 0
    for shape, (w, h) in SHAPES.items():
        for j in range(per_shape):
            name = f"{shape}_{j}.png"
            picture(w, h, k).save(root / name)
            rows.append(f"{name},a {shape} picture, tone {j}")
            k += 1
    (root / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def bucket_cfg(data, out, data_keys=None, random_flip=False, **training):
    cfg = make_cfg(data, out, random_flip=random_flip, **training)
    for key, value in {**BUCKETS, **(data_keys or {})}.items():
        setattr(cfg.data, key, value)
    return cfg


@pytest.fixture
def mixed(tmp_path):
    return mixed_set(tmp_path / "mixed")


def dataset_of(folder, **kw) -> ImageDataset:
    samples = scan_dataset(folder).samples
    spec = kw.pop("spec", BucketSpec(128, 64, None, 32))
    return ImageDataset(samples, 128, buckets=spec, **kw)


# --- the bucket maths ------------------------------------------------------------------------------------

def test_bucket_sizes_are_kohyas():
    resos = BucketSpec(512).resolutions()  # kohya's make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert resos == [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                     (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                     (1024, 256)]
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert BucketSpec(1024).max_reso == 2048 and BucketSpec(64).min_reso == 64  # (default max 2×; min ≤ resolution)


def test_each_image_covers_the_nearest_bucket_and_loses_the_least():
    spec = BucketSpec(512)
    fit = spec.fit(1000, 500)  # 2:1: the nearest bucket is 704×320 (2.2:1), scaled to cover it
    assert fit.bucket == (704, 320) and fit.resized == (704, 352) and fit.centre() == (16, 0)
    assert fit.kept == pytest.approx(320 / 352)
    assert spec.fit(800, 800).bucket == (512, 512) and spec.fit(800, 800).kept == 1
    assert spec.fit(500, 1000).bucket == (320, 704)
    info = bucket_info([spec.fit(1000, 500), spec.fit(800, 800), spec.fit(900, 900)])
    assert info["buckets"] == {0: {"resolution": [512, 512], "count": 2}, 1: {"resolution": [704, 320], "count": 1}}
    assert info["mean_img_ar_error"] == pytest.approx(0.2 / 3)


def test_no_upscale_keeps_small_images_at_their_own_size():
    spec = BucketSpec(512, no_upscale=True)
    small = spec.fit(300, 200)  # kohya: the image's own size rounded down to the step, not enlarged
    assert small.bucket == (256, 192) and small.resized == (300, 200) and small.scale == 1
    big = spec.fit(1000, 500)  # too large: scaled down to at most 512² pixels, its shape kept
    assert big.bucket == (640, 320) and big.resized == (640, 320)
    assert BucketSpec(512).fit(300, 200).scale > 2  # (with upscaling: into 640×384)


# --- the images the trainer sees ----------------------------------------------------------------------

def test_a_wide_image_is_trained_whole_not_cropped_to_a_square(mixed):
    dataset = dataset_of(mixed)
    names = [s.path.stem for s in dataset.samples]
    wide = names.index("wide_0")
    pixels = dataset[wide]["pixel_values"]
    assert tuple(pixels.shape) == (3, 96, 160)  # its bucket 160×96, not 128×128
    red, blue = torch.tensor([230, 20, 20]) / 127.5 - 1, torch.tensor([20, 20, 230]) / 127.5 - 1
    # scaled to 192×96 and 16 columns cut off each side: both coloured bands (24 px wide) are still in the picture
    assert torch.allclose(pixels[:, 48, 2], red, atol=0.05) and torch.allclose(pixels[:, 48, -3], blue, atol=0.05)
    square = to_tensor(resize_center_crop(Image.open(dataset.samples[wide].path).convert("RGB"), 128))
    assert not torch.allclose(square[:, 64, 2], red, atol=0.05)  # (the square crop loses the band)
    assert {names[i].split("_")[0]: tuple(dataset[i]["pixel_values"].shape[1:]) for i in range(len(names))} == {
        "portrait": (160, 96), "landscape": (96, 160), "square": (128, 128), "wide": (96, 160)}


def test_without_buckets_every_image_is_the_centre_square_as_before(mixed):
    samples = scan_dataset(mixed).samples
    dataset = ImageDataset(samples, 128)
    for i, s in enumerate(samples):
        want = to_tensor(resize_center_crop(Image.open(s.path).convert("RGB"), 128))
        assert torch.equal(dataset[i]["pixel_values"], want)
    assert dataset.groups() == [list(range(len(samples)))] and dataset.bucket_info() is None


def test_random_crop_is_drawn_from_the_seed_epoch_and_image(mixed):
    dataset = dataset_of(mixed, random_crop=True, seed=5)
    wide = [s.path.stem for s in dataset.samples].index("wide_0")
    crops = [dataset[(wide, e)]["crop"] for e in range(8)]
    assert all(top == 0 and 0 <= left <= 32 for top, left in crops) and len(set(crops)) > 1
    assert crops == [dataset_of(mixed, random_crop=True, seed=5)[(wide, e)]["crop"] for e in range(8)]
    assert dataset[wide]["crop"] == (0, 16)  # (no epoch: the centre, as the cache and the validation use)
    with pytest.raises(ConfigError, match="random_crop: true needs training.cache_latents: false"):
        config_from_dict({"train_data_dir": "x", "random_crop": True})


def test_bad_bucket_settings_are_named():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train_data_dir": "x", "resolution": 512, "bucket_reso_steps": 30, "min_bucket_reso": 640,
                          "max_bucket_reso": 384})
    text = str(e.value)
    assert "data.bucket_reso_steps: 30 must be a multiple of 8" in text
    assert "data.min_bucket_reso: 640 is above data.max_bucket_reso: 384" in text
    assert "data.max_bucket_reso: 384 is below data.resolution: 512" in text


# --- batches and steps ---------------------------------------------------------------------------------

def test_a_batch_holds_one_buckets_images_in_a_seeded_order():
    buckets = ((0, 1, 2), (3, 4, 5, 6, 7), (8,))  # batch 2: 2 + 3 + 1 = 6 batches an epoch
    plan = Plan(9, 2, 2, 7, buckets)
    assert plan.batches_per_epoch == 6 and plan.steps_per_epoch == 3 and plan.epochs == 3
    for epoch in range(3):
        batches = epoch_batches(9, 2, 11, epoch, buckets)
        assert sorted(i for b in batches for i in b) == list(range(9))
        assert all(any(set(b) <= set(g) for g in buckets) for b in batches)
        assert batches == epoch_batches(9, 2, 11, epoch, buckets)
    assert epoch_batches(9, 2, 11, 0, buckets) != epoch_batches(9, 2, 11, 1, buckets)
    whole = list(schedule(plan, 11, 0))
    assert list(schedule(plan, 11, 4)) == whole[8:]  # a resume at step 4 finds its place
    cfg = config_from_dict({"train_data_dir": "x", "epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 1})
    assert Plan.from_config(cfg, 9, [list(g) for g in buckets]).total_steps == 12  # not 2 × ceil(9/2) = 10
    assert Plan.from_config(cfg, 9, [list(range(9))]).total_steps == 10


def test_the_estimates_step_count_counts_each_buckets_batches(mixed, tmp_path):
    from lora_trainer.engine.preflight import total_steps_of

    cfg = bucket_cfg(mixed, tmp_path / "run", max_train_steps=None, epochs=2, batch_size=3)
    assert total_steps_of(cfg) == 2 * (1 + 1 + 2)  # buckets of 2, 2 and 4 images (not 2 × ceil(8 / 3) = 6)
    cfg.data.enable_bucket = False
    assert total_steps_of(cfg) == 2 * 3


def test_a_mixed_set_trains_in_its_buckets_and_the_file_says_which(mixed, tmp_path, monkeypatch, caplog):
    seen = []
    micro_batch = Run.micro_batch

    def spy(self, batch):
        seen.append((tuple(batch["pixel_values"].shape), batch["indices"].tolist()))
        return micro_batch(self, batch)

    monkeypatch.setattr(Run, "micro_batch", spy)
    caplog.set_level("INFO")
    result = train(bucket_cfg(mixed, tmp_path / "run", max_train_steps=None, epochs=1, cache_latents=False),
                   progress=False)
    samples = scan_dataset(mixed).samples
    names = [s.path.stem.split("_")[0] for s in samples]
    # 8 images in 3 buckets (landscape and wide share 160×96): 1 + 1 + 2 batches of 2 = 4 steps in the epoch
    assert result.steps == result.total_steps == 4
    assert {shape[2:] for shape, _ in seen} == {(160, 96), (96, 160), (128, 128)}
    for shape, indices in seen:
        want = {"portrait": (160, 96), "square": (128, 128)}.get(names[indices[0]], (96, 160))
        assert shape[2:] == want and len({names[i] in ("landscape", "wide") for i in indices}) == 1
    assert sorted(i for _, b in seen for i in b) == list(range(8))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["buckets"] == [{"resolution": [96, 160], "count": 2}, {"resolution": [128, 128], "count": 2},
                                  {"resolution": [160, 96], "count": 4}]
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["ss_bucket_info"])
    assert list(info["buckets"].values()) == summary["buckets"] and list(info["buckets"]) == ["0", "1", "2"]
    assert info["mean_img_ar_error"] == pytest.approx(summary["mean_img_ar_error"], abs=1e-6)
    assert (meta["ss_enable_bucket"], meta["ss_bucket_no_upscale"]) == ("True", "False")
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("64", "256")
    assert "images in 3 buckets: 96×160 ×2, 128×128 ×2, 160×96 ×4" in caplog.text


@pytest.mark.parametrize("cached", [True, False])
def test_resume_with_buckets_gives_the_same_lora(mixed, tmp_path, cached):
    extra = {"cache_latents": cached, "max_train_steps": 7, "batch_size": 2}
    data = {"shuffle_caption": True, "caption_tag_dropout_rate": 0.3}  # (and the captions augmented: data.augment)
    data |= {} if cached else {"random_crop": True}  # (the random crop needs images decoded each step)
    whole = train(bucket_cfg(mixed, tmp_path / "whole", data, **extra), progress=False)
    first = train(bucket_cfg(mixed, tmp_path / "parts", data, save_steps=3, **extra), callbacks=StopAt(3),
                  progress=False)
    assert first.status == "stopped" and first.steps == 3
    resumed = train(bucket_cfg(mixed, tmp_path / "parts", data, resume_from_checkpoint="latest", **extra),
                    progress=False)
    assert resumed.steps == 7
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_latent_cache_keeps_each_bucket_and_reloads_it(mixed, tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = dict(cache_latents_to_disk=True, max_train_steps=2, random_flip=True)
    first = train(bucket_cfg(mixed, tmp_path / "out", **cfg), progress=False)
    second = train(bucket_cfg(mixed, tmp_path / "out", **cfg), progress=False)  # (a new run folder beside it)
    assert "8 loaded from" in caplog.text and "0 encoded" in caplog.text
    shapes = {tuple(load_file(p)["mean"].shape) for p in (tmp_path / "out" / "latent_cache").glob("*.safetensors")}
    assert shapes == {(4, 40, 24), (4, 24, 40), (4, 32, 32)}  # (1/4 of each bucket: the tiny VAE)
    a, b = load_file(first.lora_path), load_file(second.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_upscale_trains_small_images_at_their_own_size(tmp_path, monkeypatch):
    root = tmp_path / "small"
    root.mkdir()
    for k, (w, h) in enumerate([(100, 70), (100, 70), (250, 250)]):
        picture(w, h, k).save(root / f"img_{k}.png")
    dataset = dataset_of(root, spec=BucketSpec(128, 64, None, 32, no_upscale=True))
    assert [f.bucket for f in dataset.fits] == [(96, 64), (96, 64), (128, 128)]
    assert all(f.scale <= 1 for f in dataset.fits)
    assert tuple(dataset[0]["pixel_values"].shape) == (3, 64, 96)
    result = train(bucket_cfg(root, tmp_path / "run", {"bucket_no_upscale": True}, max_train_steps=2), progress=False)
    with safe_open(str(result.lora_path), "pt") as f:
        assert f.metadata()["ss_bucket_no_upscale"] == "True"


# --- SDXL's size and crop ids ---------------------------------------------------------------------------

def test_sdxl_ids_carry_each_images_size_crop_and_bucket(mixed, tmp_path):
    dataset = dataset_of(mixed)
    names = [s.path.stem for s in dataset.samples]
    ids = {n: tuple(r) for n, r in zip(names, dataset.time_ids(torch.arange(len(names))).tolist())}
    # (original h, w, crop top, left in the resized picture, bucket h, w)
    assert ids["wide_0"] == (128, 256, 0, 16, 96, 160)  # 256×128 → 192×96, 16 columns cut each side
    assert ids["portrait_0"] == (160, 96, 0, 0, 160, 96) and ids["square_0"] == (128, 128, 0, 0, 128, 128)
    flipped = dataset.time_ids(torch.tensor([names.index("wide_0")]), flip=torch.tensor([True]))
    assert flipped[0].tolist() == [128, 256, 0, 16, 96, 160]  # (a centred crop mirrors onto itself)
    random_ds = dataset_of(mixed, random_crop=True, seed=5)
    wide = names.index("wide_0")
    item = random_ds[(wide, 3)]
    crops = torch.tensor([item["crop"]])
    row = random_ds.time_ids(torch.tensor([wide]), crops=crops)[0].tolist()
    assert row == [128, 256, *item["crop"], 96, 160]
    mirrored = random_ds.time_ids(torch.tensor([wide]), flip=torch.tensor([True]), crops=crops)[0].tolist()
    assert mirrored[3] == 192 - 160 - item["crop"][1]


def test_sdxl_trains_in_buckets_with_their_ids(mixed, tmp_path):
    cfg = bucket_cfg(mixed, tmp_path / "run", max_train_steps=3, batch_size=2)
    cfg.model.base_model = str(tiny_sdxl_model_path(TINY_SDXL_NAME))
    from lora_trainer.models.sdxl_backend import load_sdxl_backend

    backend = load_sdxl_backend(TINY_SDXL_NAME, torch.device("cpu"), torch.float32)
    seen = []
    backend.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((tuple(args[0].shape), kwargs["added_cond_kwargs"]["time_ids"].clone())),
        with_kwargs=True)
    train(cfg, backend=backend, progress=False)
    assert len(seen) == 3
    for shape, ids in seen:  # the target size in the ids is the bucket the latents have (4× the tiny VAE's)
        assert all((r[4], r[5]) == (4 * shape[2], 4 * shape[3]) for r in ids.tolist())


# --- the dataset check ----------------------------------------------------------------------------------

def test_the_check_reports_the_histogram_and_what_still_loses_much(tmp_path):
    root = mixed_set(tmp_path / "set", per_shape=1)
    picture(400, 100, 9).save(root / "strip.png")  # 4:1: its bucket 256×64 (4:1) keeps it whole...
    picture(300, 128, 10).save(root / "odd.png")  # ...2.34:1 is between buckets: cropped into 192×64 (3:1)
    picture(40, 40, 11).save(root / "thumb.png")  # 3.2× up into 128×128
    report = check_dataset(root, resolution=128, buckets=BucketSpec(128, 64, None, 32))
    assert report.to_dict()["buckets"] == report.buckets == [
        {"resolution": [96, 160], "count": 1}, {"resolution": [128, 128], "count": 2},
        {"resolution": [160, 96], "count": 2}, {"resolution": [192, 64], "count": 1},
        {"resolution": [256, 64], "count": 1}]
    assert "aspect-ratio buckets (5; a batch holds one bucket's images): 96×160 ×1, 128×128 ×2" in report.summary()
    # (the 2:1 picture keeps 83% in 160×96, the 2.34:1 one 78% in 192×64)
    assert sorted(f.split(" ")[0] for f in report.by_check("crop")[0].files) == ["odd.png", "wide_0.png"]
    assert [f.split(" ")[0] for f in report.by_check("upscale")[0].files] == ["thumb.png"]
    assert not report.by_check("aspect")  # (no square crop drops half of strip.png)
    square = check_dataset(root, resolution=128, buckets=None)  # enable_bucket off: as before
    assert not square.buckets and not square.by_check("crop")
    assert {f.split(" ")[0] for f in square.by_check("aspect")[0].files} == {"strip.png", "odd.png"}
