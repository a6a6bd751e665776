"""Sample images and the validation loss from the command line (issue 17): output.sample_prompts (kohya's prompt
syntax), sample_every_n_steps / _epochs / sample_at_first; data.validation_split / validation_dir and
training.validation_every_n_steps. Tiny models at 64², a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_trainer.config import config_from_dict, validate_paths
from lora_trainer.data.dataset import scan_dataset
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.data.split import split_validation
from lora_trainer.engine import validation
from lora_trainer.engine.events import Callbacks
from lora_trainer.engine.run import Run
from lora_trainer.engine.samples import SamplePrompt, load_sample_prompts, parse_prompt
from lora_trainer.engine.trainer import train
from lora_trainer.engine.validation import Validator
from lora_trainer.errors import ConfigError

# attention-only LoRA barely moves a random-weight model (as in test_train)
WIDE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2"]


def make_cfg(data_dir, out_dir, data=None, output=None, base_model="tiny-demo", **training):
    t = {"max_train_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
         "lora_rank": 4, "lora_alpha": 4, "lora_dropout": 0.0, "save_steps": 0, "seed": 7,
         "target_modules": WIDE_TARGETS}
    t.update(training)
    return config_from_dict({
        "data": {"train_data_dir": str(data_dir), "resolution": 64, **(data or {})},
        "model": {"base_model": base_model},
        "training": t,
        "output": {"output_dir": str(out_dir), "output_name": "t", "save_precision": "fp32",
                   "log_with": "tensorboard", **(output or {})},
    })


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=6, resolution=64, seed=0)


def summary(result) -> dict:
    return json.loads((result.run_dir / "summary.json").read_text())


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def tensorboard_tags(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"images": 0, "scalars": 0}).Reload()
    return {"images": {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]},
            "scalars": {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}}


# --- the prompt syntax
def test_each_option_of_kohyas_prompt_syntax_parses():
    p = parse_prompt("a red circle, soft light --n blurry, ugly --s 12 --d 5 --w 64 --h 128 --l 6.5", 3)
    assert p == SamplePrompt(3, "a red circle, soft light", negative="blurry, ugly", steps=12, seed=5, width=64,
                             height=128, scale=6.5)
    assert parse_prompt("x --seed 9 --S 2", 0) == SamplePrompt(0, "x", seed=9, steps=2)  # (case as kohya: any)
    assert parse_prompt("plain prompt", 1) == SamplePrompt(1, "plain prompt")
    assert parse_prompt("x --ss euler_a --s 4", 0) == SamplePrompt(0, "x", steps=4)  # kohya's sampler: ignored


def test_a_prompt_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeff# my prompts\n\na cat --d 1\n  # indented comment\na dog --n cat --s 3\n", encoding="utf-8")
    assert load_sample_prompts(str(path)) == [SamplePrompt(0, "a cat", seed=1),
                                              SamplePrompt(1, "a dog", negative="cat", steps=3)]
    assert load_sample_prompts(["a --w 512", "b"]) == [SamplePrompt(0, "a", width=512), SamplePrompt(1, "b")]
    assert load_sample_prompts(None) == []


@pytest.mark.parametrize("line, words", [
    ("x --q 5", ["unknown option", "--n", "--l"]),
    ("x --s 0", ["--s", "out of range"]),
    ("x --s many", ["--s", "not an integer"]),
    ("x --w 65", ["--w", "multiple of 8"]),
    ("x --l -2", ["--l", "> 0"]),
    ("x --l abc", ["--l", "not a number"]),
    (" --s 3", ["no prompt"]),
])
def test_a_bad_prompt_option_is_a_config_error_naming_the_key_and_line(tmp_path, line, words):
    path = tmp_path / "p.txt"
    path.write_text(f"fine\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_sample_prompts(str(path))
    assert "output.sample_prompts (p.txt line 2)" in str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ConfigError, match=r"output\.sample_prompts\[1\]"):
        load_sample_prompts(["fine", line])


# --- bad values
@pytest.mark.parametrize("settings, words", [
    ({"output": {"sample_every_n_steps": 5}}, ["output.sample_every_n_steps", "needs output.sample_prompts"]),
    ({"output": {"sample_at_first": True}}, ["output.sample_at_first", "needs output.sample_prompts"]),
    ({"output": {"sample_prompts": [""]}}, ["output.sample_prompts", "expected a list of prompts"]),
    ({"output": {"sample_prompts": 5}}, ["output.sample_prompts", "expected a list of prompts"]),
    ({"output": {"sample_prompts": ["a"], "sample_every_n_epochs": -1}}, ["output.sample_every_n_epochs", ">= 0"]),
    ({"data": {"validation_split": 1.0}}, ["data.validation_split", "< 1"]),
    ({"data": {"validation_split": -0.1}}, ["data.validation_split", ">= 0"]),
    ({"data": {"validation_split": 0.1, "validation_dir": "v"}}, ["data.validation_split", "data.validation_dir",
                                                                  "not both"]),
    ({"training": {"validation_every_n_steps": 10}}, ["training.validation_every_n_steps", "data.validation_split"]),
])
def test_bad_values_are_config_errors_naming_the_key(tmp_path, settings, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train_data_dir": str(tmp_path), **settings})
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_files_and_a_split_that_leaves_nothing_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    data = make_demo_dataset(tmp_path / "data", n=3, resolution=64, seed=0)
    cfg = make_cfg(data, tmp_path / "out", data={"validation_dir": str(tmp_path / "nope")},
                   output={"sample_prompts": str(tmp_path / "prompts.txt")})
    with pytest.raises(ConfigError) as e:
        validate_paths(cfg)
    assert "data.validation_dir" in str(e.value) and "output.sample_prompts" in str(e.value)

    monkeypatch.setattr("lora_trainer.engine.trainer.load_backend", lambda cfg: pytest.fail("a model loaded"))
    with pytest.raises(ConfigError, match=r"data\.validation_split: 0\.9 of 3 image\(s\) holds out 3, which leaves no"):
        train(make_cfg(data, tmp_path / "out", data={"validation_split": 0.9}), progress=False)
    (tmp_path / "p.txt").write_text("a --s x\n")
    with pytest.raises(ConfigError, match="output.sample_prompts"):
        train(make_cfg(data, tmp_path / "out", output={"sample_prompts": str(tmp_path / "p.txt")}), progress=False)
    assert not (tmp_path / "out").exists()


# --- sample images
SAMPLES = {"sample_prompts": ["a red circle --s 2 --d 5", "a blue square --n green --s 2 --l 4 --w 64 --h 96"],
           "sample_every_n_steps": 3, "sample_every_n_epochs": 1, "sample_at_first": True}


def test_samples_appear_named_by_step_and_prompt_at_the_steps_due(demo_data, tmp_path):
    """6 images, batch 2: an epoch is 3 steps; 5 steps: the baseline (0), every 3 steps and each epoch's end (3), the
    last step (5); each prompt's image at its size, in the run's samples folder, TensorBoard and summary.json."""
    result = train(make_cfg(demo_data, tmp_path / "out", output=SAMPLES, max_train_steps=5), progress=False)
    names = sorted(p.name for p in (result.run_dir / "samples").iterdir())
    assert names == [f"t_step{s:06d}_prompt{i:02d}.png" for s in (0, 3, 5) for i in (0, 1)]
    assert Image.open(result.run_dir / "samples" / names[0]).size == (64, 64)
    assert Image.open(result.run_dir / "samples" / names[1]).size == (64, 96)
    assert summary(result)["sample_images"] == [f"samples/{n}" for n in names]
    tags = tensorboard_tags(result.run_dir)["images"]
    assert tags == {"samples/prompt00": [0, 3, 5], "samples/prompt01": [0, 3, 5]}

    by_epoch = train(make_cfg(demo_data, tmp_path / "epochs", max_train_steps=7,
                              output={"sample_prompts": ["x --s 2"], "sample_every_n_epochs": 2}), progress=False)
    assert sorted(p.name for p in (by_epoch.run_dir / "samples").iterdir()) == [
        "t_step000006_prompt00.png", "t_step000007_prompt00.png"]  # (the end of epoch 2, the last step)


def test_same_seed_same_image_and_the_samples_show_the_lora_being_trained(demo_data, tmp_path):
    """Two runs of one config make the same images; the baseline (LoRA B = 0: the base model) and the last step's
    differ, so the samples are made with the LoRA in; and the samples and the validation loss leave the training
    as it was (the same LoRA as a run without them)."""
    output = {"sample_prompts": ["a red circle --s 2 --d 5", "a red circle --s 2"], "sample_at_first": True}
    runs = [train(make_cfg(demo_data, tmp_path / f"out{k}", output=output,
                           data={"validation_dir": str(demo_data)}, validation_every_n_steps=2), progress=False)
            for k in range(2)]
    first, second = (sorted((r.run_dir / "samples").iterdir()) for r in runs)
    assert [p.name for p in first] == [p.name for p in second] and len(first) == 4
    for a, b in zip(first, second):
        assert np.array_equal(pixels(a), pixels(b)), a.name
    baseline, last, no_seed = (pixels(runs[0].run_dir / "samples" / f"t_step{step:06d}_prompt{i:02d}.png")
                               for step, i in ((0, 0), (4, 0), (0, 1)))
    assert np.abs(baseline - last).max() > 0
    assert not np.array_equal(baseline, no_seed)  # (no --d: the run's seed, 7; --d 5: its own)

    plain = train(make_cfg(demo_data, tmp_path / "plain"), progress=False)
    with_them, without = load_file(runs[0].lora_path), load_file(plain.lora_path)
    assert with_them.keys() == without.keys()
    assert all(np.array_equal(with_them[k].numpy(), without[k].numpy()) for k in without)


def test_sdxl_samples_and_validation(tmp_path):
    data = make_demo_dataset(tmp_path / "data", n=3, resolution=64, seed=0)
    cfg = make_cfg(data, tmp_path / "out", base_model="tiny-sdxl", max_train_steps=2, batch_size=1,
                   target_modules=["to_q", "to_v"], data={"validation_split": 0.3},
                   output={"sample_prompts": ["a circle --s 2 --n square"], "sample_every_n_steps": 1})
    result = train(cfg, progress=False)
    assert sorted(p.name for p in (result.run_dir / "samples").iterdir()) == [
        "t_step000001_prompt00.png", "t_step000002_prompt00.png"]
    s = summary(result)
    assert s["validation_images"] == 1 and [step for step, _ in s["validation_losses"]] == [2]
    assert np.isfinite(s["validation_loss"])


# --- the validation loss
class Recorder(Callbacks):
    def __init__(self):
        self.losses, self.validation = {}, []

    def on_step(self, info):
        self.losses[info.step] = info.loss

    def on_validation(self, step, loss):
        self.validation.append((step, loss))


@pytest.mark.parametrize("cached", [True, False])
def test_validation_loss_is_the_same_every_time_and_not_the_training_loss(demo_data, tmp_path, monkeypatch, cached):
    """Fixed timesteps, noise and latents, the model in eval mode (dropout on in training): two evaluations of the
    same weights agree exactly, two runs of one seed give the same curve; it is logged, in TensorBoard, summary.json
    and the callbacks, every N steps and at the end."""
    twice, modes = [], []
    loss, evaluate = Validator.loss, Validator.evaluate

    def evaluated_twice(self, run):
        twice.append((loss(self, run), loss(self, run)))
        return twice[-1][0]

    def evaluate_then_train(self, run, step):
        value = evaluate(self, run, step)
        modes.append(("after", {m.training for c in run.modules.values() for m in c.modules()}))
        return value

    monkeypatch.setattr(Validator, "loss", evaluated_twice)
    monkeypatch.setattr(Validator, "evaluate", evaluate_then_train)
    inputs, real_loss = [], validation.diffusion_loss

    def spied_loss(backend, *args, **kw):
        modes.append(("during", {m.training for c in backend.components().values() if c is not None
                                 for m in c.modules()}))
        inputs.append((kw["timesteps"].tolist(), kw["noise"].clone()))
        return real_loss(backend, *args, **kw)

    monkeypatch.setattr(validation, "diffusion_loss", spied_loss)
    curves, recorders = [], []
    for k in range(2 if cached else 1):  # (one run without the cache: it checks the fixed inputs alone)
        recorders.append(Recorder())
        cfg = make_cfg(demo_data, tmp_path / f"out{k}", data={"validation_split": 0.34}, validation_every_n_steps=2,
                       max_train_steps=5, lora_dropout=0.5, cache_latents=cached, min_snr_gamma=5.0)
        result = train(cfg, callbacks=recorders[-1], progress=False)
        curves.append(summary(result)["validation_losses"])
    assert all(a == b for a, b in twice)
    # every module in eval mode while it evaluates (no LoRA dropout), back in training mode after
    assert modes and all(flags == ({False} if when == "during" else {True}) for when, flags in modes), modes
    # every evaluation: the 2 images at the same 4 timesteps with the same noise
    assert [t for t, _ in inputs[:4]] == [[125, 125], [375, 375], [625, 625], [875, 875]]
    assert len(inputs) == len(curves) * 2 * 3 * 4 and all(
        t == inputs[i % 4][0] and torch.equal(noise, inputs[i % 4][1]) for i, (t, noise) in enumerate(inputs))
    assert not torch.equal(inputs[0][1], inputs[1][1])
    assert curves[0] == curves[-1] and [step for step, _ in curves[0]] == [2, 4, 5]
    assert recorders[0].validation == [tuple(x) for x in curves[0]]
    assert all(value != recorders[0].losses[step] for step, value in curves[0])
    assert len({value for _, value in curves[0]}) == 3  # (the LoRA learns: the curve moves)
    assert summary(result)["validation_loss"] == curves[-1][-1][1] and summary(result)["validation_images"] == 2
    scalars = tensorboard_tags(result.run_dir)["scalars"]["validation/loss"]
    assert [(s, pytest.approx(v)) for s, v in scalars] == [tuple(x) for x in curves[-1]]
    assert "validation loss" in (result.run_dir / "logs" / "train.log").read_text()


def test_validation_split_holds_its_images_out_of_every_batch(demo_data, tmp_path, monkeypatch):
    trained, held = [], []
    micro_batch, for_run = Run.micro_batch, Validator.for_run.__func__

    def spy_batch(self, batch):
        trained.extend(self.scan.samples[int(i)].path for i in batch["indices"])
        return micro_batch(self, batch)

    def spy_validator(cls, run, samples, progress, facts):
        held.extend(s.path for s in samples)
        return for_run(cls, run, samples, progress, facts)

    monkeypatch.setattr(Run, "micro_batch", spy_batch)
    monkeypatch.setattr(Validator, "for_run", classmethod(spy_validator))
    result = train(make_cfg(demo_data, tmp_path / "out", data={"validation_split": 0.34}, max_train_steps=6),
                   progress=False)
    every = {s.path for s in scan_dataset(demo_data).samples}
    assert len(held) == 2 and not set(held) & set(trained) and set(held) | set(trained) == every
    assert len(trained) == 12 and summary(result)["images_used"] == 4  # (two epochs of the 4 left)
    # the split is the seed's: the same again, another with another seed (checked to differ for these names)
    scan = scan_dataset(demo_data)
    assert [s.path for s in split_validation(scan, 0.34, 7)[1]] == sorted(held)
    assert split_validation(scan, 0.34, 6)[1] != split_validation(scan, 0.34, 7)[1]
    assert len(split_validation(scan, 0.01, 7)[1]) == 1  # (at least one image)


def test_the_tabs_loss_plot_gets_the_validation_series(demo_data, tmp_path):
    """A run of the standalone app with validation images: the session keeps the validation points, the loss plot
    draws them beside the training loss."""
    from lora_trainer.ui.session import TrainingSession
    from lora_trainer.ui.standalone_host import DiffusersHost
    from lora_trainer.ui.views import loss_svg

    cfg = make_cfg(demo_data, tmp_path / "out", data={"validation_split": 0.34}, validation_every_n_steps=1,
                   max_train_steps=2)
    status = TrainingSession.start(DiffusersHost(tmp_path / "Lora"), cfg).wait(300)
    assert status.state == "done", status.message
    assert [step for step, _ in status.validation] == [1, 2]
    assert "validation loss" in loss_svg(status.losses, status.validation)
