"""Per-family defaults: what the config does not set takes the model family's value (SDXL: resolution 1024, rank
32, alpha 16, lr 1e-4, text encoder lr 1e-5; SD 2.x 768-v: 768), logged, in the snapshot and the resume settings;
SD 1.x keeps the dataclasses' own."""

from __future__ import annotations

import logging

import yaml
from safetensors import safe_open
from test_train import StopAt

from lora_trainer.config import (
    FAMILY_DEFAULTS,
    Config,
    apply_overrides,
    config_from_dict,
    default_template,
    load_config,
    save_config,
    with_family_defaults,
)
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.trainer import train
from lora_trainer.models.tiny_sdxl import TINY_SDXL_NAME


def test_the_config_records_the_keys_it_was_given(tmp_path):
    cfg = config_from_dict(apply_overrides({"data": {"train_data_dir": "x"}, "lr": 1e-3}, ["training.lora_rank=4"]))
    assert cfg.explicit == {"train_data_dir", "learning_rate", "lora_rank"}
    assert Config().explicit == frozenset() and cfg == config_from_dict({"train_data_dir": "x", "lora_rank": 4,
                                                                         "learning_rate": 1e-3})
    save_config(cfg, tmp_path / "snap.yaml")  # the snapshot holds values only, and reads back
    assert "explicit" not in (tmp_path / "snap.yaml").read_text() and load_config(tmp_path / "snap.yaml") == cfg
    template = config_from_dict(yaml.safe_load(default_template()))
    family_keys = {k for d in FAMILY_DEFAULTS.values() for k in d}
    assert not template.explicit & family_keys, "the template must leave the family's keys to the model"


def test_family_defaults_fill_only_what_the_config_left_out():
    cfg = config_from_dict({"train_data_dir": "x", "lora_rank": 16})
    sdxl, lines = with_family_defaults(cfg, "sdxl")
    assert (sdxl.data.resolution, sdxl.training.lora_rank, sdxl.training.lora_alpha) == (1024, 16, 16.0)
    assert (sdxl.training.learning_rate, sdxl.training.text_encoder_lr) == (1e-4, 1e-5)
    assert "SDXL: resolution 1024 (not set in the config)" in lines and not any("lora_rank" in x for x in lines)
    assert sdxl.explicit == cfg.explicit
    assert with_family_defaults(cfg, "sd_v2_768_v")[0].data.resolution == 768
    same, none = with_family_defaults(cfg, "sd_v1")
    assert same == cfg and none == []


def sdxl_settings(data, out, **training):
    return {"data": {"train_data_dir": str(data), "resolution": 64},
            "model": {"base_model": TINY_SDXL_NAME},
            "training": {"max_train_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "save_steps": 1,
                         **training},
            "output": {"output_dir": str(out), "output_name": "xl", "save_diffusers_format": False,
                       "log_with": "none"}}


def test_sdxl_takes_its_defaults_and_resumes_with_them(tmp_path, caplog):
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)
    settings = sdxl_settings(data, tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        first = train(config_from_dict(settings), callbacks=StopAt(1), progress=False)
    assert "SDXL: lora_rank 32 (not set in the config)" in caplog.text
    assert "SDXL: resolution" not in caplog.text  # set: 64
    snapshot = yaml.safe_load((first.run_dir / "config.yaml").read_text())
    assert (snapshot["training"]["lora_rank"], snapshot["training"]["lora_alpha"]) == (32, 16.0)
    assert snapshot["training"]["learning_rate"] == 1e-4 and snapshot["data"]["resolution"] == 64
    with safe_open(first.lora_path, "pt") as f:
        assert (f.metadata()["ss_network_dim"], f.metadata()["ss_network_alpha"]) == ("32", "16.0")
    # the same config resumes: the checkpoint's rank 32 is what the model's defaults give again
    settings["training"]["resume_from_checkpoint"] = "latest"
    resumed = train(config_from_dict(settings), progress=False)
    assert resumed.steps == 2 and resumed.status == "finished"


def test_sd1_keeps_its_defaults(tmp_path):
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)
    settings = sdxl_settings(data, tmp_path / "out", max_train_steps=1)
    settings["model"]["base_model"] = "tiny-demo"
    result = train(config_from_dict(settings), progress=False)
    snapshot = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    defaults = Config().training
    assert (snapshot["training"]["lora_rank"], snapshot["training"]["learning_rate"]) == (
        defaults.lora_rank, defaults.learning_rate)
