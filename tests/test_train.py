"""The training loop end to end on the tiny model: it learns, resumes exactly, stops cleanly, exports."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.config import config_from_dict
from lora_trainer.data.dataset import ImageDataset, collate, scan_dataset
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.checkpoint import list_checkpoints
from lora_trainer.engine.events import Callbacks
from lora_trainer.engine.loss import diffusion_loss
from lora_trainer.engine.trainer import train
from lora_trainer.errors import DatasetError
from lora_trainer.models.diffusers_backend import load_diffusers_backend, load_pipeline

# attention-only LoRA barely moves a random-weight model; the demo and this test adapt more layers
WIDE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2"]


def make_cfg(data_dir, out_dir, random_flip=True, **training):
    t = {"max_train_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
         "lora_rank": 4, "lora_alpha": 2, "lora_dropout": 0.0, "save_steps": 0, "seed": 7}
    t.update(training)
    return config_from_dict({
        "data": {"train_data_dir": str(data_dir), "resolution": 64, "random_flip": random_flip},
        "model": {"base_model": "tiny-demo"},
        "training": t,
        "output": {"output_dir": str(out_dir), "output_name": "test_lora", "save_precision": "fp32",
                   "log_with": "tensorboard"},
    })


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=6, resolution=64, seed=0)


class StopAt(Callbacks):
    def __init__(self, step):
        self.step, self.seen = step, []

    def on_step(self, info):
        self.seen.append(info.step)

    def should_stop(self):
        return bool(self.seen) and self.seen[-1] >= self.step


def fixed_loss(backend, data_dir, seed=123, rounds=4):
    """Mean diffusion loss over the set with fixed noise and timesteps: comparable before and after."""
    samples = scan_dataset(data_dir).samples
    batch = collate([ImageDataset(samples, 64)[i] for i in range(len(samples))])
    gen = torch.Generator(device=backend.device).manual_seed(seed)
    for m in backend.components().values():
        m.eval()
    with torch.no_grad():
        latents = backend.encode_images(batch["pixel_values"], gen)
        cond = backend.encode_prompts(batch["captions"])
        return sum(diffusion_loss(backend, latents, cond, gen).item() for _ in range(rounds)) / rounds


# every switchable speed-up at once (real torch.compile: about a minute on 2 CPU cores); on a GPU in bf16
EVERY_SPEEDUP = dict(channels_last=True, gradient_checkpointing=True, compile_unet=True, cache_latents=True,
                     cache_latents_to_disk=True)


def as_photos(data_dir, folder, size=1024):
    """The demo set as large JPEGs (fast_jpeg_decode reads them at 1/8 scale at 64²)."""
    from PIL import Image

    folder.mkdir()
    rows = (data_dir / "metadata.csv").read_text().replace(".png,", ".jpg,")
    (folder / "metadata.csv").write_text(rows)
    for png in data_dir.glob("*.png"):
        Image.open(png).convert("RGB").resize((size, size), Image.BICUBIC).save(folder / f"{png.stem}.jpg",
                                                                                 quality=92)
    return folder


@pytest.mark.parametrize("speedups", [
    pytest.param({}, id="plain"), pytest.param(EVERY_SPEEDUP, id="every-speedup", marks=pytest.mark.latest_only),
    pytest.param({"cache_latents": False, "dataloader_num_workers": 2, "photos": True}, id="photos-uncached-workers"),
    pytest.param(dict(EVERY_SPEEDUP, compile_mode="reduce-overhead"), id="cuda-graphs",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_training_learns(demo_data, tmp_path, speedups):
    cuda = torch.cuda.is_available()
    backend = load_diffusers_backend("tiny-demo", torch.device("cuda" if cuda else "cpu"),
                                     torch.bfloat16 if cuda else torch.float32)
    before = fixed_loss(backend, demo_data)
    speedups = dict(speedups)
    data = as_photos(demo_data, tmp_path / "photos") if speedups.pop("photos", False) else demo_data
    if data is not demo_data:  # every image captioned from the csv and read at 1/8 scale
        photos = scan_dataset(data).samples
        assert len(photos) == 6 and all(p.caption_source == "csv" for p in photos)
        assert {ImageDataset(photos, 64, fast_jpeg_decode=True).decode_scale(i) for i in range(6)} == {8}
    cfg = make_cfg(data, tmp_path / "out", max_train_steps=40, batch_size=6, target_modules=WIDE_TARGETS,
                   lora_rank=8, lora_alpha=8, **speedups)
    result = train(cfg, backend=backend, progress=False)
    after = fixed_loss(backend, demo_data)  # (with the encoders back where the UNet is)
    assert {p.device.type for m in (backend.vae, backend.text_encoder) for p in m.parameters()} == {backend.device.type}
    assert result.status == "finished" and result.steps == 40
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("cached", [True, False])
def test_resume_gives_the_same_lora(demo_data, tmp_path, cached):
    # 6 images, batch 2, accumulation 2 -> 3 micro-batches = 2 steps per epoch (the second of 1 batch);
    # stopping at step 3 stops mid-epoch; dropout, flips, noise offset and min-SNR all draw random numbers.
    settings = dict(max_train_steps=6, gradient_accumulation_steps=2, lora_dropout=0.1, lr_scheduler="cosine",
                    lr_warmup_steps=2, noise_offset=0.05, min_snr_gamma=5.0, save_steps=3, cache_latents=cached)
    straight = train(make_cfg(demo_data, tmp_path / "a", **settings), progress=False)

    stopper = StopAt(3)
    first = train(make_cfg(demo_data, tmp_path / "b", **settings), callbacks=stopper, progress=False)
    assert first.status == "stopped" and first.steps == 3
    resumed = train(make_cfg(demo_data, tmp_path / "b", resume_from_checkpoint="latest", **settings), progress=False)
    assert resumed.run_dir == first.run_dir and resumed.steps == 6 and resumed.status == "finished"

    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the LoRA really moved away from its start (lora_up starts at zero)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_up.weight"))
    # the stopped run's checkpoint equals the straight run's checkpoint at the same step
    ca = dict(list_checkpoints(straight.run_dir))[3]
    cb = dict(list_checkpoints(first.run_dir))[3]
    wa, wb = load_file(ca / "lora_state.safetensors"), load_file(cb / "lora_state.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_outputs(demo_data, tmp_path):
    out = tmp_path / "out"
    result = train(make_cfg(demo_data, out, save_steps=2), progress=False)
    run = result.run_dir
    assert run == out.resolve()
    assert result.lora_path == run / "test_lora.safetensors"
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    assert list((run / "logs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    log_text = (run / "logs" / "train.log").read_text()
    assert "run folder" in log_text and "saved checkpoint" in log_text and "finished after 4 steps" in log_text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["images_used"] == 6 and summary["status"] == "finished"
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]  # (save_steps, and the end: a resume may train on)
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_output_name"] == "test_lora" and meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == 2.0 and meta["ss_steps"] == "4"
    assert all(k.startswith("lora_unet_") for k in keys)
    assert not list(run.rglob("*.tmp")), "temp files left behind"
    mask = os.umask(0)
    os.umask(mask)
    assert result.lora_path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600

    # a second run never writes into a folder that holds a run
    before = result.lora_path.read_bytes()
    again = train(make_cfg(demo_data, out), progress=False)
    assert again.run_dir != run and again.run_dir.name.startswith("out-")
    assert result.lora_path.read_bytes() == before


def test_stop_saves_checkpoint_and_lora(demo_data, tmp_path):
    result = train(make_cfg(demo_data, tmp_path / "out", max_train_steps=10), callbacks=StopAt(2), progress=False)
    assert result.status == "stopped" and result.steps == 2
    assert [s for s, _ in list_checkpoints(result.run_dir)] == [2]
    assert result.lora_path.is_file()
    assert json.loads((result.run_dir / "summary.json").read_text())["status"] == "stopped"


def test_text_encoder_accumulation_and_checkpointing(demo_data, tmp_path):
    cfg = make_cfg(demo_data, tmp_path / "out", max_train_steps=2, train_text_encoder=True,
                   gradient_checkpointing=True, gradient_accumulation_steps=2, mixed_precision="fp16")
    result = train(cfg, progress=False)
    tensors = load_file(result.lora_path)
    te = [k for k in tensors if k.startswith("lora_te_")]
    assert te and any(k.startswith("lora_unet_") for k in tensors)
    assert any(tensors[k].abs().sum() > 0 for k in te if k.endswith("lora_up.weight")), "text encoder did not train"
    assert result.final_loss is not None and result.final_loss == result.final_loss  # not NaN


def test_bad_dataset_fails_before_model_loads(tmp_path, monkeypatch):
    import lora_trainer.models.diffusers_backend as db

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.png").write_bytes(b"not an image")
    monkeypatch.setattr(db, "load_diffusers_backend", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DatasetError, match="empty|no usable|0 usable|not an image"):
        train(make_cfg(empty, tmp_path / "out"), progress=False)


def test_ctrl_c_stops_after_the_step_and_saves(demo_data, tmp_path):
    import os
    import signal

    class CtrlCAt(Callbacks):
        def on_step(self, info):
            if info.step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # what a terminal sends on Ctrl-C

    before = signal.getsignal(signal.SIGINT)  # (Python's default_int_handler; SIG_IGN in a shell's background job)
    result = train(make_cfg(demo_data, tmp_path / "out", max_train_steps=10), callbacks=CtrlCAt(), progress=False)
    assert result.status == "stopped" and result.steps == 2
    assert [s for s, _ in list_checkpoints(result.run_dir)] == [2]
    assert result.lora_path.is_file() and not list(result.run_dir.rglob("*.tmp"))
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_ctrl_c_while_the_caches_are_built_stops_at_once_and_leaves_no_run(demo_data, tmp_path, monkeypatch,
                                                                             capsys):
    """Before the first step nothing is trained: Ctrl-C stops at once (it used to finish the caches, train a step and
    write a 1-step LoRA); the command line then exits as an interrupted command, as it does after a stop."""
    import os
    import signal

    from lora_trainer.cli import main
    from lora_trainer.engine import trainer

    real = trainer._build_caches

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)  # (Ctrl-C while the latents are encoded)
        return real(*args)

    monkeypatch.setattr(trainer, "_build_caches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(demo_data, tmp_path / "out", max_train_steps=10), progress=False)
    assert not (tmp_path / "out").exists()
    config = tmp_path / "c.yaml"
    config.write_text(f"train_data_dir: {demo_data}\nresolution: 64\nmax_train_steps: 10\noutput_dir: "
                      f"{tmp_path / 'cli'}\n")
    assert main(["train", "-c", str(config)]) == 130 and "aborted" in capsys.readouterr().err
    from types import SimpleNamespace

    import lora_trainer.cli as cli

    result = SimpleNamespace(status="stopped")  # (a run a Ctrl-C stopped after a step: saved, then stopped)
    monkeypatch.setattr(cli, "_train", lambda cfg, events=None: result)
    monkeypatch.setattr(cli, "_report", lambda result: None)
    assert main(["train", "-c", str(config)]) == 130
    result.status = "finished"
    assert main(["train", "-c", str(config)]) == 0


def test_resume_refuses_a_checkpoint_of_another_shape(demo_data, tmp_path):
    from lora_trainer.errors import ConfigError

    first = train(make_cfg(demo_data, tmp_path / "out", max_train_steps=4), callbacks=StopAt(2), progress=False)
    with pytest.raises(ConfigError, match="lora_rank: 4 in the checkpoint, 8 now"):
        train(make_cfg(demo_data, tmp_path / "out", max_train_steps=4, lora_rank=8, resume_from_checkpoint="latest"),
              progress=False)
    assert first.run_dir.is_dir()


def test_nan_loss_saves_the_last_good_state_and_explains(demo_data, tmp_path, monkeypatch):
    from lora_trainer.engine.trainer import TrainingError

    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    calls, predict = {"n": 0}, backend.predict

    def nan_on_third(*args):  # one prediction goes NaN, and only that once (the diagnosis re-runs it finite)
        calls["n"] += 1
        out = predict(*args)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(backend, "predict", nan_on_third)
    with pytest.raises(TrainingError, match="loss became nan at step 3, but the same step run again with checks "
                                            "gave a finite loss.*learning_rate") as e:
        train(make_cfg(demo_data, tmp_path / "out", max_train_steps=5, nan_max_retries=0), backend=backend,
              progress=False)  # (without the NaN guard: tests/test_guard.py has it)
    assert "fp16" not in str(e.value)  # fp32 on the CPU: no advice about fp16
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [2]


def test_an_image_damaged_during_an_uncached_run_saves_the_last_step_and_names_it(demo_data, tmp_path, monkeypatch):
    import lora_trainer.data.dataset as dataset_module

    reads = {"n": 0}
    real = dataset_module.load_image

    def damaged_after_eight_reads(path, draft=None):
        reads["n"] += 1
        if reads["n"] > 8:  # 6 images, batch 2: the first 4 steps read 8
            path.write_bytes(b"")
        return real(path, draft=draft)

    monkeypatch.setattr(dataset_module, "load_image", damaged_after_eight_reads)
    with pytest.raises(DatasetError, match=r"demo_00\d\.png: empty file \(it changed after the dataset scan\)"):
        train(make_cfg(demo_data, tmp_path / "out", max_train_steps=6, cache_latents=False), progress=False)
    [(step, _)] = list_checkpoints(tmp_path / "out")
    assert step in (3, 4)  # the last complete step (two threads decode: the 9th read may be step 4's image)


def test_a_run_that_fails_before_training_leaves_no_folder(demo_data, tmp_path, monkeypatch):
    import lora_trainer.models.diffusers_backend as db
    from lora_trainer.errors import ModelLoadError

    def broken(*a, **k):
        raise ModelLoadError("model.base_model: broken")

    monkeypatch.setattr(db, "load_diffusers_backend", broken)
    with pytest.raises(ModelLoadError):
        train(make_cfg(demo_data, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_v_prediction_target_and_metadata(demo_data, tmp_path):
    cfg = make_cfg(demo_data, tmp_path / "out", max_train_steps=2)
    cfg.model.prediction_type = "v_prediction"
    result = train(cfg, progress=False)
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"
    assert result.final_loss == result.final_loss  # finite, not NaN


def _counting(backend):
    """Count the images and captions ``backend`` encodes."""
    counts = {"images": 0, "prompts": 0}
    encode_dist, encode_prompts = backend.encode_image_dist, backend.encode_prompts

    def count_images(pixels):
        counts["images"] += pixels.shape[0]
        return encode_dist(pixels)

    def count_prompts(captions, weighted=False):
        counts["prompts"] += len(captions)
        return encode_prompts(captions, weighted=weighted)

    backend.encode_image_dist, backend.encode_prompts = count_images, count_prompts
    return counts


def test_cache_encodes_each_image_and_caption_once(demo_data, tmp_path):
    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    counts = _counting(backend)
    train(make_cfg(demo_data, tmp_path / "out", max_train_steps=9, random_flip=True), backend=backend, progress=False)
    assert counts == {"images": 12, "prompts": 6}  # 6 images, mirrored once each; 6 distinct captions


def _same_lora(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_latent_cache_on_disk_is_reused_by_later_runs(demo_data, tmp_path, caplog):
    from lora_trainer.data.buckets import BucketSpec
    from lora_trainer.data.images import file_digest
    from lora_trainer.engine.cache import encoder_fingerprint, latent_key

    out = tmp_path / "out"
    memory_only = train(make_cfg(demo_data, tmp_path / "mem", max_train_steps=3), progress=False)

    def run(cfg):  # a fresh model each time, counting what it encodes
        backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
        counts = _counting(backend)
        return train(cfg, backend=backend, progress=False), counts["images"]

    def disk_run(**kw):
        return run(make_cfg(demo_data, out, max_train_steps=3, cache_latents_to_disk=True, **kw))

    first, encoded = disk_run()
    store = out.resolve() / "latent_cache"
    assert encoded == 12 and len(list(store.glob("*.safetensors"))) == 12  # 6 images × (plain, mirrored)
    # the same LoRA as with the latents in memory only: where a posterior comes from changes nothing
    assert _same_lora(first.lora_path, memory_only.lora_path)

    # a second run from the same output_dir (it goes to a new folder) loads every latent from disk
    with caplog.at_level("INFO", logger="lora_trainer"):
        second, encoded = disk_run()
    assert second.run_dir != first.run_dir and encoded == 0 and "6 loaded from" in caplog.text
    assert _same_lora(second.lora_path, memory_only.lora_path)

    # an unreadable entry is encoded again, with a warning: still the same LoRA (one image per VAE call)
    encoder = encoder_fingerprint(load_pipeline("tiny-demo")[0].vae)
    fit = BucketSpec(64).fit(64, 64)  # (buckets on, as by default: the square one; a key names its bucket)
    victim = store / f"{latent_key(file_digest(demo_data / 'demo_001.png'), 64, False, encoder, fit=fit)}.safetensors"
    victim.write_bytes(b"cut off")
    caplog.clear()
    with caplog.at_level("WARNING", logger="lora_trainer"):
        third, encoded = disk_run(batch_size=3)
    assert encoded == 2 and victim.name in caplog.text and third.status == "finished"  # plain + mirrored
    assert load_file(victim)["mean"].shape == (4, 16, 16)
    # and the same LoRA as a memory-only run at that batch size: loaded and fresh posteriors are equal
    memory_batch3 = train(make_cfg(demo_data, tmp_path / "mem3", max_train_steps=3, batch_size=3), progress=False)
    assert _same_lora(third.lora_path, memory_batch3.lora_path)

    # a copy of an image has the same content, so the same key
    (demo_data / "extra.png").write_bytes((demo_data / "demo_000.png").read_bytes())
    caplog.clear()
    with caplog.at_level("INFO", logger="lora_trainer"):
        assert disk_run()[1] == 0
    assert "7 loaded from" in caplog.text and "0 encoded" in caplog.text
    # another resolution is another key (7 images, 6 distinct contents)
    cfg = make_cfg(demo_data, out, max_train_steps=1, cache_latents_to_disk=True)
    cfg.data.resolution = 128
    assert run(cfg)[1] == 14 and len(list(store.glob("*.safetensors"))) == 24


def test_a_failed_run_keeps_the_latent_cache_and_nothing_else(demo_data, tmp_path):
    class Boom(Callbacks):
        def on_start(self, total_steps, run_dir):  # after the latents were cached
            raise RuntimeError("boom")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        train(make_cfg(demo_data, out, cache_latents_to_disk=True), callbacks=Boom(), progress=False)
    assert [p.name for p in out.iterdir()] == ["latent_cache"]
    # the folder holds no run, so the next run goes into it (not into a timestamped one beside it)
    assert train(make_cfg(demo_data, out, cache_latents_to_disk=True), progress=False).run_dir == out.resolve()


def test_an_unwritable_cache_does_not_stop_training(demo_data, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "latent_cache").write_text("a file where the cache folder would go")  # as a read-only folder
    with caplog.at_level("WARNING", logger="lora_trainer"):
        result = train(make_cfg(demo_data, out, cache_latents_to_disk=True), progress=False)
    assert result.status == "finished" and caplog.text.count("latent cache: cannot write to") == 1
    assert (out / "latent_cache").read_text().startswith("a file")


def test_a_failing_cache_write_does_not_stop_training(demo_data, tmp_path, monkeypatch, caplog):
    from safetensors import SafetensorError

    from lora_trainer.engine import cache

    def full_disk(tensors, filename, metadata=None):  # what safetensors raises when the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(cache, "save_file", full_disk)
    with caplog.at_level("WARNING", logger="lora_trainer"):
        result = train(make_cfg(demo_data, tmp_path / "out", cache_latents_to_disk=True), progress=False)
    assert result.status == "finished" and caplog.text.count("No space left on device") == 1
    assert not list((tmp_path / "out" / "latent_cache").glob("*"))  # and no temp file left behind


def test_latent_cache_keys_follow_content_and_encoder(demo_data, tmp_path):
    from lora_trainer.data.images import file_digest
    from lora_trainer.engine.cache import encoder_fingerprint, latent_key

    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    fp = encoder_fingerprint(backend.image_encoder())
    digest = file_digest(demo_data / "demo_000.png")
    keys = {latent_key(digest, 64, False, fp), latent_key(digest, 64, True, fp), latent_key(digest, 128, False, fp),
            latent_key(file_digest(demo_data / "demo_001.png"), 64, False, fp)}
    assert len(keys) == 4
    with torch.no_grad():
        backend.vae.decoder.conv_out.weight.add_(1.0)  # the decoder makes no latents: same encoder, same key
        assert encoder_fingerprint(backend.image_encoder()) == fp
        backend.vae.encoder.conv_in.weight.mul_(1.001)
        assert encoder_fingerprint(backend.image_encoder()) != fp


def test_cache_to_disk_needs_cache_latents(demo_data, tmp_path):
    from lora_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="cache_latents_to_disk: true needs training.cache_latents: true"):
        make_cfg(demo_data, tmp_path / "o", cache_latents=False, cache_latents_to_disk=True)


def test_compile_unet_switch_trains_through_the_compiled_module(demo_data, tmp_path, monkeypatch):
    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    compiled, calls = [], []

    def fake_compile(fn, mode="default"):  # the real compile takes minutes on 2 cores: check the wiring here
        compiled.append(any("lora_A" in n for n, _ in backend.unet.named_modules()))  # after LoRA went in

        def run(*args, **kwargs):
            calls.append(mode)
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = train(make_cfg(demo_data, tmp_path / "out", max_train_steps=2, compile_unet=True), backend=backend,
                   progress=False)
    assert compiled == [True] and calls == ["default"] * 2  # every step through the compiled call
    assert result.steps == 2 and all(k.startswith("lora_unet_") for k in load_file(result.lora_path))


@pytest.mark.parametrize("missing, device, words", [
    ("c++ compiler", "cpu", "compiling for the CPU needs a C\\+\\+ compiler, and none of .+ is on PATH"),
    ("triton", "cuda", "compiling for the GPU needs the Triton compiler \\(pip install triton"),
    ("new gpu", "cuda", "compute capability 7.0 and newer, and GeForce GTX 1080 is 6.1"),
    ("c compiler", "cuda", "Triton needs a C compiler to build its GPU launcher, and none of gcc, clang"),
    ("dynamo", "cpu", "torch.compile does not run with torch"),
    ("device", "mps", "compiling for mps is not supported here")])
def test_compile_unet_that_cannot_build_is_refused_before_any_model_loads(demo_data, tmp_path, monkeypatch,
                                                                         missing, device, words):
    import importlib.util
    import shutil

    import torch._dynamo

    import lora_trainer.engine.trainer as trainer_module
    import lora_trainer.models.diffusers_backend as db
    from lora_trainer.errors import ConfigError

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(trainer_module, "pick_device", lambda mp: (torch.device(device), "no"))
    real_find_spec = importlib.util.find_spec
    triton = None if missing == "triton" else object()  # a GPU machine has it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: triton if name == "triton" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (6, 1) if missing == "new gpu" else (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GeForce GTX 1080")
    if missing in ("c++ compiler", "c compiler"):
        monkeypatch.setattr(shutil, "which", lambda name: None)
    if missing == "dynamo":
        monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    monkeypatch.setattr(db, "load_diffusers_backend", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError,
                       match="training.compile_unet: .*" + words + ".*or set training.compile_unet: false"):
        train(make_cfg(demo_data, tmp_path / "out", compile_unet=True), progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("settings, expected", [
    ({}, [("offload", True, 0), "restore"]),  # latents and captions cached: the VAE and text encoder wait
    ({"train_text_encoder": True}, [("offload", False, 0), "restore"]),  # the text encoder trains: it stays
    ({"cache_latents": False}, ["restore"])])  # the VAE encodes every step: everything stays
def test_idle_encoders_wait_off_the_gpu_while_training(demo_data, tmp_path, monkeypatch, settings, expected):
    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    assert backend.offload_idle_encoders(text_encoder=True) == 0 and not backend._offloaded  # nothing on a CPU
    calls, steps = [], StopAt(99)
    monkeypatch.setattr(backend, "offload_idle_encoders", lambda text_encoder: calls.append(
        ("offload", text_encoder, len(steps.seen))))
    monkeypatch.setattr(backend, "restore_encoders", lambda: calls.append("restore"))
    result = train(make_cfg(demo_data, tmp_path / "out", max_train_steps=2, **settings), backend=backend,
                   callbacks=steps, progress=False)
    assert result.steps == 2 and calls == expected  # before the first step, and back when training ends


@pytest.mark.parametrize("settings, waits", [({}, True), ({"validation_split": 0.25}, True),
                                             ({"cache_latents": False}, False)])
def test_the_unet_waits_while_the_caches_are_built(demo_data, tmp_path, monkeypatch, settings, waits):
    """Every image and caption the encoders cache (the validation images' too) is encoded while the UNet waits, the
    idle encoders leave the GPU before it comes back, and the first step comes after; nothing waits when nothing is
    cached."""
    import contextlib

    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    events, steps = [], StopAt(99)
    encode_images, encode_dist = backend.encode_images, backend.encode_image_dist
    encode_prompts = backend.encode_prompts

    @contextlib.contextmanager
    def waiting():
        events.append("wait")
        yield
        events.append("back")

    monkeypatch.setattr(backend, "unet_waits_for_cache", waiting)
    from lora_trainer.engine import trainer

    optimization = trainer.optimization
    monkeypatch.setattr(trainer, "optimization", lambda *a: events.append("optimizer") or optimization(*a))
    monkeypatch.setattr(backend, "offload_idle_encoders", lambda text_encoder: events.append("encoders off"))
    monkeypatch.setattr(backend, "encode_images", lambda *a: events.append("image") or encode_images(*a))
    monkeypatch.setattr(backend, "encode_image_dist", lambda *a: events.append("image") or encode_dist(*a))
    monkeypatch.setattr(backend, "encode_prompts", lambda *a, **k: events.append("caption") or encode_prompts(*a, **k))
    steps.on_step = lambda info: events.append("step")
    cfg = make_cfg(demo_data, tmp_path / "out", max_train_steps=2, **settings)
    train(cfg, backend=backend, callbacks=steps, progress=False)
    if not waits:
        assert {"wait", "encoders off"}.isdisjoint(events) and events.count("step") == 2
        return
    first, back = events.index("wait"), events.index("back")
    assert events.count("wait") == 1 and {"image", "caption"} <= set(events[first + 1:back])
    assert {"image", "caption"}.isdisjoint(events[back:])  # (the held-out images' too: encoded while it waits)
    # the encoders the steps need not leave before the UNet comes back: the two never share the GPU; the optimizer
    # is made where the UNet's LoRA then is (fused AdamW checks its parameters' device)
    assert events[back - 1:] == ["encoders off", "back", "optimizer", "step", "step"]


def test_a_run_that_caches_loads_its_unet_onto_the_cpu_and_the_rest_onto_the_gpu(monkeypatch):
    """models.factory.load_backend: where the latents are cached the UNet never comes to the GPU before the caches
    are built (unet_waits_for_cache brings it at their end); the encoders go where they encode. Checked on the moves
    asked for, so that it runs without a GPU."""
    from lora_trainer.models import diffusers_backend, factory

    pipe, name = load_pipeline("tiny-demo", torch.float32)
    moves = []
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, part)
        monkeypatch.setattr(module, "to", lambda *a, _p=part, _m=module, **k: moves.append((_p, *map(str, a))) or _m)
    monkeypatch.setattr(factory, "pick_device", lambda precision: (torch.device("cuda"), "no"))
    monkeypatch.setattr(diffusers_backend, "load_pipeline", lambda *a: (pipe, name))
    for cache_latents, unet_goes in ((True, "cpu"), (False, "cuda")):
        moves.clear()
        backend = factory.load_backend(make_cfg("unused", "unused", cache_latents=cache_latents))
        assert [m for m in moves if m[0] == "unet"] == [("unet", unet_goes)]
        assert {("vae", "cuda"), ("text_encoder", "cuda")} <= set(moves) and backend.device.type == "cuda"


def test_waiting_on_cpu_moves_only_off_a_gpu_and_always_back(monkeypatch):
    from lora_trainer.models.offload import waiting_on_cpu

    module, moves = torch.nn.Linear(2, 2), []
    monkeypatch.setattr(module, "to", lambda device: moves.append(str(device)) or module)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: moves.append("emptied"))
    with waiting_on_cpu([module, None], torch.device("cpu"), "while testing"):
        assert moves == []  # on the CPU already: nothing moves
    with pytest.raises(RuntimeError, match="encode failed"):
        with waiting_on_cpu([module], torch.device("cuda"), "while testing"):
            assert moves == ["cpu", "emptied"]
            raise RuntimeError("encode failed")
    assert moves == ["cpu", "emptied", "cuda"]  # back where it trains, even after an error

    def no_room(device):  # (the failed encode's traceback still holds its activations: no room to come back)
        moves.append(str(device))
        if str(device) == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return module

    moves.clear()
    monkeypatch.setattr(module, "to", no_room)
    with pytest.raises(RuntimeError, match="encode failed") as error:
        with waiting_on_cpu([module], torch.device("cuda"), "while testing"):
            raise RuntimeError("encode failed")
    assert not isinstance(error.value, torch.cuda.OutOfMemoryError)
    assert moves == ["cpu", "emptied", "cuda", "cpu"]  # (tried, then all left on the CPU: none split between the two)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loads the UNet beside a GPU")
def test_a_unet_loaded_to_wait_comes_to_the_gpu_when_the_caches_are_built():
    backend = load_diffusers_backend("tiny-demo", torch.device("cuda"), torch.bfloat16, unet_waits=True)
    unet = list(backend.unet.parameters())
    assert {p.device.type for p in unet} == {"cpu"} and {p.device.type for p in backend.vae.parameters()} == {"cuda"}
    with backend.unet_waits_for_cache():
        assert {p.device.type for p in backend.unet.parameters()} == {"cpu"}
    assert list(backend.unet.parameters()) == unet and {(p.device.type, p.dtype) for p in unet} == {
        ("cuda", torch.bfloat16)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moves the UNet off a GPU")
def test_the_unet_frees_its_gpu_memory_while_the_caches_are_built():
    backend = load_diffusers_backend("tiny-demo", torch.device("cuda"), torch.bfloat16)
    unet = list(backend.unet.parameters())
    before = torch.cuda.memory_allocated()
    with backend.unet_waits_for_cache():
        assert {p.device.type for p in backend.unet.parameters()} == {"cpu"}
        assert before - torch.cuda.memory_allocated() >= 0.9 * sum(p.numel() * p.element_size() for p in unet)
    assert list(backend.unet.parameters()) == unet and {p.device.type for p in unet} == {"cuda"}  # the same objects


def test_out_of_memory_says_what_to_do_and_keeps_the_last_step_even_when_the_encoders_cannot_come_back(
        demo_data, tmp_path, monkeypatch):
    from lora_trainer.engine.trainer import TrainingError

    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    calls, predict = [], backend.predict

    def out_of_memory_at_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(*args)

    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 160.00 MiB")

    monkeypatch.setattr(backend, "predict", out_of_memory_at_step_3)
    monkeypatch.setattr(backend, "offload_idle_encoders", lambda text_encoder: backend._offloaded.append(backend.vae))
    monkeypatch.setattr(backend.vae, "to", no_room)  # the GPU is still full when training ends
    with pytest.raises(TrainingError, match="out of GPU memory: lower training.batch_size"):
        train(make_cfg(demo_data, tmp_path / "out", max_train_steps=5), backend=backend, progress=False)
    assert backend._offloaded == [backend.vae]  # left on the CPU, with a warning
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [2]  # the last good step is saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moves the encoders off a GPU")
def test_offloaded_encoders_free_their_gpu_memory_and_come_back_for_samples():
    backend = load_diffusers_backend("tiny-demo", torch.device("cuda"), torch.bfloat16)
    on = lambda m: {p.device.type for p in m.parameters()}  # noqa: E731
    before = torch.cuda.memory_allocated()
    freed = backend.offload_idle_encoders(text_encoder=True)
    assert freed > 0 and before - torch.cuda.memory_allocated() >= 0.9 * freed
    assert on(backend.vae) == on(backend.text_encoder) == {"cpu"} and on(backend.unet) == {"cuda"}
    with backend.encoders_on_device():
        assert on(backend.vae) == on(backend.text_encoder) == {"cuda"}
    assert on(backend.vae) == {"cpu"}
    backend.restore_encoders()
    assert on(backend.vae) == on(backend.text_encoder) == {"cuda"}


def test_attention_is_pytorch_sdpa_everywhere():
    from diffusers.models.attention_processor import AttnProcessor2_0

    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    for module in (backend.unet, backend.vae):
        assert {type(p) for p in module.attn_processors.values()} == {AttnProcessor2_0}
    if getattr(type(backend.text_encoder), "_supports_sdpa", False):  # transformers >= 4.41; A1111's 4.30 has none
        assert backend.text_encoder.config._attn_implementation == "sdpa"


def test_latent_cache_keys_follow_the_decoding(tmp_path):
    from PIL import Image

    from lora_trainer.engine.cache import latent_key

    Image.new("RGB", (1024, 768), (9, 9, 9)).save(tmp_path / "photo.jpg")
    Image.new("RGB", (200, 150), (9, 9, 9)).save(tmp_path / "small.jpg")
    Image.new("RGB", (1024, 768), (9, 9, 9)).save(tmp_path / "big.png")
    samples = scan_dataset(tmp_path).samples  # big.png, photo.jpg, small.jpg
    fast, full = ImageDataset(samples, 64, fast_jpeg_decode=True), ImageDataset(samples, 64)
    # only a JPEG that decodes smaller gets another key: a PNG set keeps its cache when the switch flips
    assert [fast.decode_scale(i) for i in range(3)] == [1, 4, 1]
    assert [full.decode_scale(i) for i in range(3)] == [1, 1, 1]
    assert fast[1]["pixel_values"].shape == (3, 64, 64)
    assert latent_key("d", 64, False, "e") == latent_key("d", 64, False, "e", decode_scale=1)
    assert latent_key("d", 64, False, "e") != latent_key("d", 64, False, "e", decode_scale=4)
