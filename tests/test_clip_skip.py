"""training.clip_skip: the captions' conditioning from the CLIP layer that many from the end, through the final layer
norm (the WebUI's "Clip skip", kohya's --clip_skip), on SD 1.x/2.x; refused for SDXL before its model loads."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_train import make_cfg

from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.trainer import train
from lora_trainer.errors import ConfigError
from lora_trainer.models.diffusers_backend import load_diffusers_backend
from lora_trainer.models.prompts import final_layer_norm
from lora_trainer.models.tiny_sdxl import TINY_SDXL_NAMES


def test_the_conditioning_comes_from_the_layer_before_the_last_through_the_final_norm():
    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    captions = ["a red circle", "a (blue:1.3) square"]
    with torch.no_grad():
        last = backend.encode_prompts(captions).context
        backend.use_clip_skip(2)
        skipped = backend.encode_prompts(captions).context
        weighted = backend.encode_prompts(captions[1:], weighted=True).context
        te = backend.text_encoder
        ids = backend.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
        expected = final_layer_norm(te)(te(ids, output_hidden_states=True).hidden_states[-2])
    assert torch.equal(skipped, expected) and not torch.allclose(skipped, last)
    assert weighted.shape == (1, 77, last.shape[-1]) and not torch.allclose(weighted, last[1:])
    with pytest.raises(ConfigError, match="training.clip_skip: 9 is more than this text encoder's"):
        backend.use_clip_skip(9)


def test_a_run_with_clip_skip_records_it_and_sdxl_refuses_it_before_loading(tmp_path, monkeypatch):
    data = make_demo_dataset(tmp_path / "data", n=2, resolution=64, seed=0)
    result = train(make_cfg(data, tmp_path / "out", max_train_steps=1, clip_skip=2), progress=False)
    with safe_open(str(result.lora_path), "pt") as f:
        assert f.metadata()["ss_clip_skip"] == "2"
    from lora_trainer.engine import trainer

    monkeypatch.setattr(trainer, "load_backend", lambda cfg: pytest.fail("the model was loaded"))
    cfg = make_cfg(data, tmp_path / "xl", max_train_steps=1, clip_skip=2)
    cfg.model.base_model = TINY_SDXL_NAMES[0]
    with pytest.raises(ConfigError, match="training.clip_skip: 2 is for SD 1.x/2.x; SDXL takes"):
        train(cfg, progress=False)
