"""Regularization images (data.reg_data_dir, training.prior_loss_weight), read and balanced as kohya's scripts do:
an epoch takes as many of them as subject images, their loss weighted; the LoRA's metadata says so."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from test_kohya_folders import image
from test_train import make_cfg

from lora_trainer.data.dataset import scan_dataset
from lora_trainer.data.regularization import balanced_repeats, with_regularization
from lora_trainer.engine.loss import diffusion_loss
from lora_trainer.engine.preflight import total_steps_of
from lora_trainer.engine.trainer import train
from lora_trainer.errors import DatasetError


def test_an_epoch_takes_as_many_regularization_images_as_subject_images():
    """kohya's rule: each folder's repeats in order until the count is met, then one more each in turn."""
    assert balanced_repeats([1, 1, 1], 7) == [3, 2, 2]
    assert balanced_repeats([5, 5], 3) == [5, 0]  # (more than needed: the rest left out)
    assert balanced_repeats([2], 5) == [5]
    assert balanced_repeats([], 5) == []


def sets(root):
    """The subject: 10_sks dog, two images captioned by the folder; the class: 1_dog, three."""
    for k in range(2):
        image(root / "img" / "10_sks dog" / f"s{k}.png", (200, 40 * k, 30))
    for k in range(3):
        image(root / "reg" / "1_dog" / f"r{k}.png", (30, 40 * k, 200))
    return root / "img", root / "reg"


def test_regularization_images_follow_the_subjects(tmp_path):
    subject, reg = sets(tmp_path)
    cfg = make_cfg(subject, tmp_path / "out")
    cfg.data.reg_data_dir, cfg.data.caption_prefix = str(reg), "photo, "
    scan = with_regularization(cfg.data, scan_dataset(subject, caption_prefix="photo, "))
    assert [(s.path.name, s.is_reg, s.repeats, s.caption) for s in scan.samples] == [
        ("s0.png", False, 10, "photo, sks dog"), ("s1.png", False, 10, "photo, sks dog"),
        ("r0.png", True, 7, "dog"), ("r1.png", True, 7, "dog"), ("r2.png", True, 6, "dog")]  # (no prefix: the class's)
    assert scan.folders() == {"10_sks dog": {"n_repeats": 10, "img_count": 2}}
    assert scan.reg_dirs == {"1_dog": {"n_repeats": 1, "img_count": 3}}  # (the folder's own repeats, as kohya's)
    cfg.training.batch_size, cfg.training.max_train_steps, cfg.training.epochs = 4, None, 1
    assert total_steps_of(cfg) == 10  # (40 images an epoch, batch 4, accumulation 1)


def test_the_metadata_counts_every_regularization_image_as_kohya_does(tmp_path):
    """Five class images for two subject images: two train an epoch, the metadata's folders count all five."""
    image(tmp_path / "img" / "a.png")
    image(tmp_path / "img" / "b.png")
    for k in range(5):
        image(tmp_path / "reg" / "1_dog" / f"r{k}.png")
    cfg = make_cfg(tmp_path / "img", tmp_path / "out")
    cfg.data.reg_data_dir = str(tmp_path / "reg")
    scan = with_regularization(cfg.data, scan_dataset(tmp_path / "img"))
    assert [s.repeats for s in scan.samples if s.is_reg] == [1, 1]
    assert scan.reg_dirs == {"1_dog": {"n_repeats": 1, "img_count": 5}}


def test_a_damaged_regularization_image_is_skipped_with_its_reason_said(tmp_path, caplog):
    """The subject's skipped files are listed by the check before the run; a class image skipped is said too, named
    by its whole path (not as if it were in the subject's folder)."""
    subject, reg = sets(tmp_path)
    (reg / "1_dog" / "s0.png").write_bytes(b"")  # (a name the subject's folder has too)
    cfg = make_cfg(subject, tmp_path / "out")
    cfg.data.reg_data_dir = str(reg)
    caplog.set_level(logging.WARNING)
    scan = with_regularization(cfg.data, scan_dataset(subject))
    assert [s.path.name for s in scan.samples if s.is_reg] == ["r0.png", "r1.png", "r2.png"]
    bad = str(reg.resolve() / "1_dog" / "s0.png")
    assert [(s.path, s.reason) for s in scan.skipped] == [(bad, "empty file")]
    assert f"regularization image {bad} skipped: empty file" in caplog.text


def test_a_regularization_folder_without_images_names_the_key(tmp_path):
    subject, _ = sets(tmp_path)
    (tmp_path / "empty").mkdir()
    cfg = make_cfg(subject, tmp_path / "out")
    cfg.data.reg_data_dir = str(tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"data.reg_data_dir \(the regularization images\): no usable images"):
        with_regularization(cfg.data, scan_dataset(subject))


def test_the_prior_loss_weight_weighs_each_image():
    """Per image: weights [1, 0] give the first image's loss alone; [2, 2] twice the plain mean."""
    class Backend:
        prediction_type = "epsilon"
        noise_scheduler = __import__("diffusers").DDPMScheduler(num_train_timesteps=1000)

        @staticmethod
        def predict(noisy, timesteps, cond):
            return noisy * cond

    latents, cond = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    noise, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])

    def loss(weights, rows=slice(None)):
        return diffusion_loss(Backend, latents[rows], cond[rows], None, noise=noise[rows], timesteps=timesteps[rows],
                              sample_weights=None if weights is None else torch.tensor(weights))

    assert torch.allclose(loss([1.0, 0.0]), loss(None, slice(0, 1)) / 2)
    assert torch.allclose(loss([2.0, 2.0]), 2 * loss(None))


def test_a_run_with_regularization_images_weighs_them_and_writes_kohyas_metadata(tmp_path, monkeypatch):
    from lora_trainer.engine.run import Run

    subject, reg = sets(tmp_path)
    cfg = make_cfg(subject, tmp_path / "out", max_train_steps=3, batch_size=4, prior_loss_weight=0.5)
    cfg.data.reg_data_dir = str(reg)
    seen, real = [], Run._loss_weights

    def weights(run, batch):
        out = real(run, batch)
        seen.append([(run.scan.samples[i].is_reg, w) for i, w in zip(batch["indices"].tolist(), out.tolist())])
        return out

    monkeypatch.setattr(Run, "_loss_weights", weights)
    result = train(cfg, progress=False)
    assert result.status == "finished" and result.images_used == 2
    pairs = [p for batch in seen for p in batch]
    assert len(pairs) == 12 and all(w == (0.5 if is_reg else 1.0) for is_reg, w in pairs)
    assert {is_reg for is_reg, _ in pairs} == {True, False}
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "20" and meta["ss_num_reg_images"] == "3"  # (kohya's: before balancing)
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 3}}
    assert meta["ss_prior_loss_weight"] == "0.5" and "1_dog" not in json.loads(meta["ss_tag_frequency"])
