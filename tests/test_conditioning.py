"""Captions → conditioning: literal by default, the WebUI's emphasis syntax with weighted_captions, each caption
on its own (not dependent on its batch-mates), the same on the command line and in the WebUI, and non-finite
conditioning or latents stopped before step 1 with a message naming the caption or image."""

from __future__ import annotations

import csv
import random

import pytest
import torch
from ldm_model import TinyLatentDiffusion

from lora_trainer.config import config_from_dict
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.data.emphasis import escape_emphasis, has_emphasis, parse_emphasis
from lora_trainer.engine.cache import EncodedCache
from lora_trainer.engine.events import Callbacks
from lora_trainer.engine.trainer import train
from lora_trainer.errors import DatasetError
from lora_trainer.models.conditioning import Conditioning
from lora_trainer.models.diffusers_backend import DiffusersBackend, load_pipeline
from lora_trainer.models.ldm import LdmBackend

CAPTIONS = ["hatsune miku (vocaloid), [sketch], 1girl", "a (red:1.3) circle BREAK on white", "plain words only",
            r"a literal \(bracket\) and ((double))"]


def test_parse_emphasis_reads_the_webui_syntax():
    assert parse_emphasis("normal text") == [("normal text", 1.0)]
    assert parse_emphasis("an (important) word") == [("an ", 1.0), ("important", pytest.approx(1.1)), (" word", 1.0)]
    assert parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", pytest.approx(1.1 * 1.1 * 1.3)), (" ", pytest.approx(1.1)),
        ("on", pytest.approx(1.1 / 1.1)), (" a ", pytest.approx(1.1)), ("hill", pytest.approx(0.55)),
        (", sun, ", 1.1), ("sky", pytest.approx(1.1 ** 4)), (".", 1.1)]
    assert parse_emphasis(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_emphasis("unbalanced (open") == [("unbalanced ", 1.0), ("open", pytest.approx(1.1))]
    assert parse_emphasis("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_emphasis("time: 12") == [("time: 12", 1.0)]


def test_escaped_captions_parse_as_one_literal_run():
    rng = random.Random(0)
    alphabet = "ab ()[]:\\.,1BREAK"
    texts = [*CAPTIONS, *("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300))]
    for text in texts:
        parsed = parse_emphasis(escape_emphasis(text))
        assert [w for _, w in parsed] == [1.0], (text, parsed)
        assert parsed[0][0].lower() == text.lower()  # (only BREAK → break: CLIP lowercases every prompt)
    assert has_emphasis("hatsune miku (vocaloid)") and not has_emphasis("hatsune miku")


@pytest.fixture
def ldm():
    sd_model = TinyLatentDiffusion()
    return sd_model, LdmBackend(sd_model, "tiny-ldm", torch.device("cpu"), torch.float32, emphasis="Original")


def diffusers_twin(sd_model) -> DiffusersBackend:
    """The command line's backend on the same text encoder weights as the WebUI's model."""
    pipe, _ = load_pipeline("tiny-demo")
    pipe.text_encoder.load_state_dict(sd_model.cond_stage_model.wrapped.transformer.state_dict())
    return DiffusersBackend(pipe, "tiny", torch.device("cpu"), torch.float32)


@torch.no_grad()
def test_command_line_and_webui_give_the_same_conditioning(ldm):
    sd_model, webui = ldm
    cli = diffusers_twin(sd_model)
    for caption in CAPTIONS:  # literal (the default): brackets and BREAK are text, the WebUI's parser is escaped
        assert torch.equal(webui.encode_prompts([caption]).context, cli.encode_prompts([caption]).context), caption
        assert torch.allclose(webui.encode_prompts([caption], weighted=True).context,
                              cli.encode_prompts([caption], weighted=True).context, atol=1e-6), caption
    # the escaping matters: the WebUI's parser on the raw caption weighs (vocaloid) and [sketch]
    raw = sd_model.get_learned_conditioning([CAPTIONS[0]])
    assert not torch.allclose(raw, cli.encode_prompts([CAPTIONS[0]]).context, atol=1e-4)
    assert torch.allclose(raw, cli.encode_prompts([CAPTIONS[0]], weighted=True).context, atol=1e-6)
    # a caption without syntax encodes the same either way
    plain = CAPTIONS[2]
    assert torch.equal(cli.encode_prompts([plain], weighted=True).context, cli.encode_prompts([plain]).context)
    sd_model.emphasis = "None"  # the parser off in the WebUI: nothing to escape
    none = LdmBackend(sd_model, "tiny-ldm", torch.device("cpu"), torch.float32, emphasis="None")
    assert torch.equal(none.encode_prompts([CAPTIONS[0]]).context, cli.encode_prompts([CAPTIONS[0]]).context)


def dataset_of(folder, captions):
    from lora_trainer.data.dataset import ImageDataset, scan_dataset

    data = make_demo_dataset(folder, n=len(captions), resolution=64)
    with open(data / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows([(f"demo_{i:03d}.png", c) for i, c in enumerate(captions)])
    return data, ImageDataset(scan_dataset(data).samples, 64)


@torch.no_grad()
@pytest.mark.parametrize("weighted", [False, True])
def test_a_caption_does_not_depend_on_its_batch_mates(ldm, weighted):
    """In the training loop (the text encoder trains) the backend encodes a batch: each row as if alone."""
    sd_model, backend = ldm
    prompts = [escape_emphasis(c) if not weighted else c for c in CAPTIONS]
    batch = backend.encode_prompts(CAPTIONS, weighted=weighted).context
    for i, caption in enumerate(CAPTIONS):
        assert torch.equal(batch[i], sd_model.get_learned_conditioning([prompts[i]])[0]), caption
    if weighted:  # the stand-in WebUI's "Original" emphasis rescales a batch by its mean: batch-mates matter
        together = sd_model.get_learned_conditioning(prompts)
        assert not torch.allclose(together[2], batch[2], atol=1e-5)


@torch.no_grad()
def test_the_cache_encodes_each_caption_alone(ldm, tmp_path):
    """Even over a backend whose batches mix (the WebUI's own batched call, weighted captions)."""
    sd_model, backend = ldm
    backend.encode_prompts = lambda captions, weighted: Conditioning(sd_model.get_learned_conditioning(list(captions)))
    _, dataset = dataset_of(tmp_path / "data", CAPTIONS)
    cache = EncodedCache.build(backend, dataset, seed=0, flips=False, texts=True, progress=False, weighted=True)
    for caption in CAPTIONS:
        assert torch.equal(cache.text([caption], "cpu").context, sd_model.get_learned_conditioning([caption])), caption


class Steps(Callbacks):
    def __init__(self):
        self.steps = []

    def on_step(self, info):
        self.steps.append(info.step)


def small_cfg(data, out, **training):
    t = {"max_train_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
         "lora_rank": 4, "lora_alpha": 4, "lora_dropout": 0.0, "save_steps": 0, **training}
    return config_from_dict({"train_data_dir": str(data), "resolution": 64, "output_dir": str(out),
                             "output_name": "c", "log_with": "none", **t})


def test_a_caption_whose_conditioning_is_not_finite_stops_the_run_before_step_1(ldm, tmp_path):
    """A text encoder whose output has mean exactly 0 for one caption: the WebUI's emphasis "Original" divides by
    that mean (0/0); the run stops before any step, naming the caption and the cause."""
    sd_model, backend = ldm
    data, _ = dataset_of(tmp_path / "data", ["a red circle", "zero mean caption", "a blue square"])
    transformer = sd_model.cond_stage_model.wrapped.transformer
    zero_ids = sd_model.cond_stage_model.wrapped.tokenizer("zero mean caption").input_ids
    real_forward = transformer.forward

    def forward(input_ids, *args, **kwargs):
        out = real_forward(input_ids, *args, **kwargs)
        for row, ids in enumerate(input_ids.tolist()):
            if ids[: len(zero_ids)] == zero_ids:
                out[0][row] = 0.0
        return out

    transformer.forward = forward
    steps = Steps()
    with pytest.raises(DatasetError, match=r"'zero mean caption' \(of demo_001\.png\).*emphasis mode \"Original\""
                                           r".*Emphasis mode"):
        train(small_cfg(data, tmp_path / "out"), backend=backend, callbacks=steps, progress=False)
    assert steps.steps == []
    assert not (tmp_path / "out").exists()  # no run folder left behind by a run that never started


def test_non_finite_latents_in_the_cache_stop_the_run_naming_the_image(tmp_path):
    data, dataset = dataset_of(tmp_path / "data", ["one", "two", "three"])
    pipe, _ = load_pipeline("tiny-demo")
    backend = DiffusersBackend(pipe, "tiny", torch.device("cpu"), torch.float32)
    real = backend.encode_image_dist
    target = dataset[1]["pixel_values"]

    def encode(pixels):  # the VAE gives NaN for one image
        mean, std = real(pixels)
        return (mean * float("nan"), std) if torch.equal(pixels[0], target) else (mean, std)

    backend.encode_image_dist = encode
    with pytest.raises(DatasetError, match=r"non-finite latents for 1 image\(s\): demo_001\.png"):
        EncodedCache.build(backend, dataset, seed=0, flips=False, texts=False, progress=False)


def test_a_nan_loss_from_non_finite_inputs_is_diagnosed_as_such(tmp_path):
    from lora_trainer.engine.trainer import TrainingError

    data, dataset = dataset_of(tmp_path / "data", ["one", "two", "three", "four"])
    pipe, _ = load_pipeline("tiny-demo")
    backend = DiffusersBackend(pipe, "tiny", torch.device("cpu"), torch.float32)
    real = backend.encode_images
    target = dataset[2]["pixel_values"]

    def encode(pixels, generator):  # uncached: the VAE runs each step, and gives NaN for one image
        latents = real(pixels, generator)
        bad = torch.tensor([torch.equal(p, target) for p in pixels])
        return torch.where(bad[:, None, None, None], float("nan"), latents)

    backend.encode_images = encode
    with pytest.raises(TrainingError, match=r"loss became nan at step \d: its inputs were not finite: the latents "
                                            r"of demo_002\.png") as e:
        train(small_cfg(data, tmp_path / "out", cache_latents=False, max_train_steps=4,
                        nan_max_retries=0), backend=backend,
              progress=False)
    assert "learning_rate" not in str(e.value)
