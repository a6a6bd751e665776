"""Single-file SD 1.x checkpoints load offline, with every weight where it belongs."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from ldm_checkpoint import write_ldm_checkpoint
from safetensors.torch import save_file

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.single_file import SD15_CONFIG, detect_family, load_single_file_pipeline
from lora_trainer.models.tiny import build_tiny_components, tiny_model_path


@pytest.fixture
def no_network(monkeypatch):
    """Any DNS lookup or connection fails the test (with HF_HUB_OFFLINE set or not)."""
    def refuse(*args, **kwargs):
        pytest.fail(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_tiny_ldm_checkpoint_loads_with_every_weight(tmp_path, no_network):
    parts = build_tiny_components(seed=0)
    path = tmp_path / "tiny_sd15.safetensors"
    write_ldm_checkpoint(parts, path)
    assert detect_family(path) == "sd_v1"
    pipe = load_single_file_pipeline(path, config_dir=tiny_model_path())
    for name in ("unet", "vae", "text_encoder"):
        want = {k: v for k, v in parts[name].state_dict().items() if not k.endswith("position_ids")}
        got = getattr(pipe, name).state_dict()
        if name == "text_encoder":  # newer transformers drop the text_model. level
            want = {k.removeprefix("text_model."): v for k, v in want.items()}
            got = {k.removeprefix("text_model."): v for k, v in got.items()}
        assert set(want) <= set(got), f"{name}: missing {sorted(set(want) - set(got))[:3]}"
        for key, value in want.items():
            assert torch.equal(got[key].to(value.dtype), value), f"{name}.{key} differs"


def _fake(tmp_path, name, keys):
    path = tmp_path / name
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


@pytest.mark.parametrize("keys, family", [
    (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"], "sd_v1"),
    (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.transformer.x"], "sd_v2"),
    (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.x"], "sdxl"),
    (["lora_unet_x.lora_down.weight"], "lora"),
])
def test_detect_family(tmp_path, keys, family):
    assert detect_family(_fake(tmp_path, "m.safetensors", keys)) == family


@pytest.mark.parametrize("keys, words", [
    (["model.diffusion_model.a", "cond_stage_model.model.b"], "Stable Diffusion 2.x"),
    (["model.diffusion_model.a", "cond_stage_model.transformer.b"], "has no weights for its VAE"),
])
def test_other_families_are_refused_clearly(tmp_path, keys, words):
    with pytest.raises(ModelLoadError, match=words) as e:
        load_single_file_pipeline(_fake(tmp_path, "other.safetensors", keys))
    assert "other.safetensors" in str(e.value) and "1.x" in str(e.value)


def test_pickle_checkpoint_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="convert it to .safetensors"):
        load_single_file_pipeline(ckpt)


def test_missing_file_or_config_folder_is_a_clear_error(tmp_path, no_network):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_single_file_pipeline(tmp_path / "nowhere.safetensors")
    path = _fake(tmp_path, "v1.safetensors", ["model.diffusion_model.a", "cond_stage_model.transformer.b",
                                              "first_stage_model.c"])
    with pytest.raises(ModelLoadError, match="no model_index.json"):  # diffusers would take it for a hub repo id
        load_single_file_pipeline(path, config_dir="runwayml/stable-diffusion-v1-5")


def test_damaged_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        load_single_file_pipeline(bad)


def test_shipped_sd15_config_and_tokenizer():
    from transformers import CLIPTokenizer

    unet = json.loads((SD15_CONFIG / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == 768 and unet["block_out_channels"] == [320, 640, 1280, 1280]
    tok = CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_tiny_model_folder_has_the_vocabulary_files_every_transformers_reads(tmp_path):
    # transformers 5 writes only tokenizer.json; 4.x (the WebUI's pins) reads vocab.json + merges.txt
    from transformers import CLIPTokenizer

    from lora_trainer.models.diffusers_backend import load_pipeline
    from lora_trainer.models.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    tok = folder / "tokenizer"
    from_files = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=77)
    pipe, _ = load_pipeline(str(folder))
    text = "a photo of a cat, **core style**"
    assert from_files(text).input_ids == pipe.tokenizer(text).input_ids
