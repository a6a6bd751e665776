"""Config: both shapes, aliases, every error message names the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lora_trainer.config import (
    Config,
    apply_overrides,
    config_from_dict,
    default_template,
    load_config,
    resolve_mixed_precision,
    save_config,
    validate_paths,
    write_template,
)
from lora_trainer.errors import ConfigError

NESTED = """
data:
  train_data_dir: imgs
  resolution: 768
model:
  base_model: tiny-demo
training:
  lora_rank: 16
  lora_alpha: 8
  learning_rate: 1e-4
  target_modules: to_q
  min_snr_gamma: 5
output:
  output_dir: out
  output_name: style
"""
FLAT = """
train_data_dir: imgs
resolution: 768
base_model: tiny-demo
lora_rank: 16
alpha: 8
lr: 1.0e-4
target_modules: [to_q]
min_snr_gamma: 5.0
output_dir: out
output_name: style
"""


def error_of(d) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    return str(e.value)


def test_both_shapes_give_the_same_config():
    nested, flat = config_from_dict(yaml.safe_load(NESTED)), config_from_dict(yaml.safe_load(FLAT))
    assert nested == flat
    assert nested.training.learning_rate == 1e-4  # PyYAML reads 1e-4 as a string; accepted as a number
    assert nested.training.target_modules == ["to_q"] and nested.training.lora_alpha == 8.0
    assert nested.data.resolution == 768 and nested.output.output_name == "style"


def test_alias_and_key_together_is_an_error():
    msg = error_of({"train_data_dir": "x", "training": {"alpha": 4, "lora_alpha": 8}})
    assert "training.lora_alpha" in msg and "'alpha'" in msg and "'lora_alpha'" in msg


def test_unknown_key_suggests_the_nearest():
    msg = error_of({"train_data_dir": "x", "training": {"learnig_rate": 1e-4}})
    assert msg.endswith("unknown key 'learnig_rate' in training: did you mean 'learning_rate'?")
    assert "at top level: did you mean 'lora_rank'" in error_of({"train_data_dir": "x", "lora_rnak": 4})


def test_kohyas_names_are_read_or_pointed_to_ours():
    """kohya's sd-scripts keys: those that mean the same are read as ours; the others say what to write here (not a
    near name of another meaning: save_every_n_steps is not sample_every_n_steps)."""
    cfg = config_from_dict({"train_data_dir": "x", "network_dim": 16, "network_alpha": 8, "max_train_epochs": 3,
                            "flip_aug": True, "pretrained_model_name_or_path": "m"})
    t = cfg.training
    assert (t.lora_rank, t.lora_alpha, t.epochs, cfg.data.random_flip, cfg.model.base_model) == (16, 8, 3, True, "m")
    assert "kohya's 'save_every_n_steps' is save_steps here" in error_of({"train_data_dir": "x",
                                                                          "save_every_n_steps": 100})
    assert "kohya's 'unet_lr' is learning_rate here" in error_of({"train_data_dir": "x", "training": {"unet_lr": 1}})
    assert "kohya's 'save_model_as' has no setting here" in error_of({"train_data_dir": "x",
                                                                      "save_model_as": "safetensors"})
    assert config_from_dict({"train_data_dir": "x", "target_modules": "to_q, to_v"}).training.target_modules == [
        "to_q", "to_v"]  # (a list written as text: --set target_modules=to_q,to_v)
    assert "kohya's 'v_parameterization' is model.prediction_type here: v_prediction" in error_of(
        {"train_data_dir": "x", "v_parameterization": True})
    for key, ours in [("network_train_unet_only", "is train_text_encoder here"),  # (not a near name of another
                      ("cache_text_encoder_outputs", "is cache_text_embeddings"),  # meaning: train_text_encoder_2,
                      ("max_token_length", "has no setting here")]:  # max_seq_length)
        assert f"kohya's '{key}' {ours}" in error_of({"train_data_dir": "x", key: True})


def test_kohyas_width_height_resolution_is_read_when_square_and_refused_with_a_fix_otherwise():
    for written in ("1024,1024", "1024x1024", [1024, 1024], "1024, 1024"):
        assert config_from_dict({"train_data_dir": "x", "resolution": written}).data.resolution == 1024
    msg = error_of({"train_data_dir": "x", "resolution": "1024,768"})
    assert "data.resolution: '1024,768' is 1024×768; a non-square resolution is not supported" in msg
    assert "(e.g. 832)" in msg
    assert "out of range" in error_of({"train_data_dir": "x", "resolution": "32,32"})
    assert "expected an integer" in error_of({"train_data_dir": "x", "resolution": "big,big"})


def test_unknown_key_searches_every_section_and_otherwise_lists_the_keys():
    assert "unknown key 'learnig_rate' in data: did you mean 'learning_rate' (in section 'training')?" in error_of(
        {"data": {"train_data_dir": "x", "learnig_rate": 1e-4}})
    msg = error_of({"train_data_dir": "x", "model": {"zzz": 1}})
    assert "unknown key 'zzz' in model; its keys are: base_model, prediction_type" in msg
    assert "init-config" in error_of({"train_data_dir": "x", "zzz": 1})


def test_a_known_key_in_another_section_is_read_where_it_belongs_and_said_once(caplog):
    caplog.set_level("INFO", logger="lora_trainer.config")
    cfg = config_from_dict({"data": {"train_data_dir": "x", "learning_rate": 1e-4}})
    assert cfg.training.learning_rate == 1e-4 and "learning_rate" in cfg.explicit
    assert "'learning_rate' in data: read as training.learning_rate" in caplog.text
    assert "unknown key 'learnig_rate' in data: did you mean 'learning_rate'" in error_of(
        {"data": {"train_data_dir": "x", "learnig_rate": 1e-4}})


def test_the_same_setting_twice_is_an_error_only_with_different_values():
    msg = error_of({"train_data_dir": "x", "epochs": 3, "training": {"epochs": 4}})
    assert "training.epochs: set twice with different values ('epochs' at top level: 3, 'epochs' in training: 4)" in msg
    assert config_from_dict({"train_data_dir": "x", "epochs": 3, "training": {"epochs": 3}}).training.epochs == 3
    same = config_from_dict({"train_data_dir": "x", "lr": "1e-4", "epochs": "3",
                             "training": {"learning_rate": 0.0001, "epochs": 3}})  # (the same once read)
    assert (same.training.learning_rate, same.training.epochs) == (1e-4, 3)


ARTICLE_FLAT = """
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "./models/sd-v1-5-pruned.safetensors"
lora_rank: 16
target_modules: ["q_proj", "v_proj"]
batch_size: 4
epochs: 15
learning_rate: 2e-4
output_dir: "./output/cyberpunk_lora"
"""
ARTICLE_NESTED = """
data: {train_data_dir: "./data/style_train", metadata_path: "./data/style_train/metadata.csv"}
model: {base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors", lora_rank: 8, task_type: "image-to-text"}
training: {batch_size: 4, epochs: 10, learning_rate: 2e-4, gradient_accumulation_steps: 2}
output: {output_dir: "./output/my_style_lora", save_steps: 100}
"""


def test_the_lora_scripts_articles_configs_read_as_written(caplog):
    """Issue 17: the articles' configs; that they also train is tests/test_train.py's."""
    caplog.set_level("INFO", logger="lora_trainer.config")
    flat = config_from_dict(yaml.safe_load(ARTICLE_FLAT))
    assert flat.training.target_modules == ["to_q", "to_v"]  # q_proj/v_proj mean the UNet's projections
    assert flat.training.text_encoder_target_modules == ["q_proj", "v_proj"]  # the text encoder keeps them
    assert "the UNet's attention projections ['to_q', 'to_v']" in caplog.text
    assert (flat.training.lora_rank, flat.training.epochs, flat.training.learning_rate) == (16, 15, 2e-4)
    nested = config_from_dict(yaml.safe_load(ARTICLE_NESTED))
    assert (nested.training.lora_rank, nested.training.save_steps, nested.model.task_type) == (8, 100, "text-to-image")
    assert nested.training.gradient_accumulation_steps == 2 and nested.output.output_dir == "./output/my_style_lora"


@pytest.mark.parametrize("value, expected", [("image-to-text", "text-to-image"), ("SD", "text-to-image"),
                                             ("stable-diffusion", "text-to-image"), ("text-to-image", "text-to-image")])
def test_task_type_names_the_image_lora_as_the_articles_do(value, expected):
    assert config_from_dict({"train_data_dir": "x", "task_type": value}).model.task_type == expected


@pytest.mark.parametrize("value", ["text-generation", "llm"])
def test_the_language_model_task_needs_its_base_model(value):
    """Accepted (tests/test_llm.py trains it), but the image default base model is refused for it."""
    assert "model.base_model is required for model.task_type: text-generation" in error_of(
        {"train_data_dir": "x", "task_type": value})
    assert config_from_dict({"train_data_dir": "x", "task_type": value, "base_model": "m"}).model.task_type == (
        "text-generation")


@pytest.mark.parametrize("training, words", [
    ({"lora_rank": "abc"}, ["training.lora_rank", "'abc'", "integer", ">= 1"]),
    ({"lora_rank": True}, ["training.lora_rank", "True", "integer"]),
    ({"lora_rank": 2.5}, ["training.lora_rank", "2.5"]),
    ({"lora_rank": 0}, ["training.lora_rank", "0", ">= 1"]),
    ({"lora_dropout": 1.0}, ["training.lora_dropout", "1.0", "< 1"]),
    ({"learning_rate": "fast"}, ["training.learning_rate", "'fast'", "number", "> 0"]),
    ({"learning_rate": -1}, ["training.learning_rate", "-1", "> 0"]),
    ({"gradient_checkpointing": "yes"}, ["training.gradient_checkpointing", "'yes'", "true or false"]),
    ({"target_modules": []}, ["training.target_modules", "non-empty list"]),
    ({"lr_scheduler": "cosin"}, ["training.lr_scheduler", "'cosin'", "constant, constant_with_warmup, cosine, linear",
                                 "did you mean 'cosine'?"]),
    ({"mixed_precision": "fp8"}, ["training.mixed_precision", "'fp8'", "auto, no, fp16, bf16"]),
    ({"min_snr_gamma": 0}, ["training.min_snr_gamma", "> 0"]),
    ({"learning_rate": float("nan")}, ["training.learning_rate", "nan", "number"]),
    ({"lora_alpha": "inf"}, ["training.lora_alpha", "'inf'", "number > 0"]),
    ({"lora_rank": 2000}, ["training.lora_rank", "2000", ">= 1 and <= 1024"]),
])
def test_bad_values_name_key_value_and_allowed(training, words):
    msg = error_of({"train_data_dir": "x", "training": training})
    for w in words:
        assert w in msg, (w, msg)


def test_choices_are_case_insensitive_and_nulls_allowed_where_optional():
    cfg = config_from_dict({"train_data_dir": "x", "lr_scheduler": "Cosine", "max_train_steps": None})
    assert cfg.training.lr_scheduler == "cosine" and cfg.training.max_train_steps is None
    assert "training.epochs: a value is required" in error_of({"train_data_dir": "x", "epochs": None})


def test_yaml_yes_no_words():
    # YAML 1.1 reads a bare `no` as false: for a choice that has "no" that is what the user meant
    cfg = config_from_dict(yaml.safe_load("train_data_dir: x\nmixed_precision: no\nlog_with: NONE\n"))
    assert cfg.training.mixed_precision == "no" and cfg.output.log_with == "none"
    overridden = apply_overrides({"train_data_dir": "x"}, ["mixed_precision=no"])
    assert config_from_dict(overridden).training.mixed_precision == "no"
    assert "expected text, got True" in error_of(yaml.safe_load("train_data_dir: x\ntraining_comment: yes\n"))
    assert "training.mixed_precision: expected one of auto, no, fp16, bf16, got True" in error_of(
        {"train_data_dir": "x", "mixed_precision": True})


def test_special_checks():
    assert "data.train_data_dir is required" in error_of({})
    assert "multiple of 8" in error_of({"train_data_dir": "x", "resolution": 500})
    assert "output.output_name" in error_of({"train_data_dir": "x", "output_name": "../evil"})
    assert "must start with '.'" in error_of({"train_data_dir": "x", "caption_extension": "txt"})
    assert "must be a mapping" in error_of({"train_data_dir": "x", "training": [1, 2]})


def test_all_errors_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_data_dir: x\nlora_rank: 0\nbatch_size: -1\nlearnig_rate: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 3 problems:") and msg.count("\n") == 3
    assert "lora_rank" in msg and "batch_size" in msg and "learnig_rate" in msg


def test_yaml_errors_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train_data_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:.*line \d+.*not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml.*not found"):
        load_config(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(listy)


def test_validate_paths(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    ok = config_from_dict({"train_data_dir": str(images), "resume_from_checkpoint": "latest"})
    validate_paths(ok)

    def paths_error(**flat):
        cfg = config_from_dict({"train_data_dir": str(images), **flat})
        with pytest.raises(ConfigError) as e:
            validate_paths(cfg)
        return str(e.value)

    assert f"data.train_data_dir: {tmp_path / 'missing'} is not an existing folder" in paths_error(
        train_data_dir=str(tmp_path / "missing"))
    assert "data.metadata_path" in paths_error(metadata_path=str(tmp_path / "meta.csv"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    assert "pickle" in paths_error(base_model=str(ckpt)) and "convert it to .safetensors" in paths_error(
        base_model=str(ckpt))
    assert "without model_index.json" in paths_error(base_model=str(images))
    assert "does not exist" in paths_error(base_model=str(tmp_path / "none"))
    assert "training.resume_from_checkpoint" in paths_error(resume_from_checkpoint=str(tmp_path / "nope"))
    validate_paths(config_from_dict({"train_data_dir": str(images), "base_model": str(images)}),
                   check_base_model=False)
    with pytest.raises(ConfigError, match="data.train_data_dir is not set"):
        validate_paths(Config())  # "" would otherwise resolve to the working directory


def test_built_in_model_names_come_from_the_models_package(tmp_path):
    from lora_trainer.models.factory import BUILTIN_MODELS

    assert set(BUILTIN_MODELS) == {"tiny-demo", "tiny-sdxl", "tiny-sdxl-v"}
    images = tmp_path / "imgs"
    images.mkdir()
    for name in BUILTIN_MODELS:
        validate_paths(config_from_dict({"train_data_dir": str(images), "base_model": name}),
                       builtin_models=BUILTIN_MODELS)
    listed = "tiny-sdxx does not exist.*built-in model: tiny-demo, tiny-sdxl, tiny-sdxl-v\\)"
    with pytest.raises(ConfigError, match=listed):
        validate_paths(config_from_dict({"train_data_dir": str(images), "base_model": "tiny-sdxx"}),
                       builtin_models=BUILTIN_MODELS)


def test_template_shows_the_true_defaults(tmp_path):
    cfg = config_from_dict(yaml.safe_load(default_template()))
    assert cfg == dataclasses.replace(Config(), data=dataclasses.replace(Config().data,
                                                                         train_data_dir="path/to/your/images"))
    path = write_template(tmp_path / "my.yaml")
    with pytest.raises(ConfigError, match="already exists"):
        write_template(path)
    assert path.read_text() == default_template()


def test_snapshot_round_trip(tmp_path):
    cfg = config_from_dict(yaml.safe_load(NESTED))
    save_config(cfg, tmp_path / "snap.yaml")
    assert load_config(tmp_path / "snap.yaml") == cfg


def test_overrides_nested_and_flat(tmp_path):
    nested = yaml.safe_load(NESTED)
    out = apply_overrides(nested, ["training.epochs=3", "lr=5e-5", "resolution=512", "min_snr_gamma=null"])
    cfg = config_from_dict(out)
    assert cfg.training.epochs == 3 and cfg.training.learning_rate == 5e-5 and cfg.data.resolution == 512
    assert cfg.training.min_snr_gamma is None
    assert nested["training"]["learning_rate"] == "1e-4"  # the input is not changed
    flat = config_from_dict(apply_overrides(yaml.safe_load(FLAT), ["learning_rate=3e-4"]))  # replaces 'lr'
    assert flat.training.learning_rate == 3e-4
    # an override written in another section than the config's (read where it belongs) replaces it, no clash
    assert config_from_dict(apply_overrides(nested, ["training.resolution=128"])).data.resolution == 128
    assert config_from_dict({"train_data_dir": "x", "output_name": "mine.safetensors"}).output.output_name == "mine"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(ConfigError, match="unknown section 'trainig'.*did you mean 'training'"):
        apply_overrides({}, ["trainig.epochs=1"])
    path = tmp_path / "c.yaml"
    path.write_text(NESTED)
    assert load_config(path, overrides=["epochs=2"]).training.epochs == 2


def test_a_problem_with_a_set_value_names_the_set_not_the_file(tmp_path):
    """A bad value given by ``--set`` is the command line's: the file it was applied to has another (or none)."""
    path = tmp_path / "c.yaml"
    path.write_text(NESTED)
    for override, expected in [("network_dim=abc", "--set network_dim=abc: training.lora_rank: expected an integer"),
                               ("lerning_rate=1", "--set lerning_rate=1: unknown key 'lerning_rate'"),
                               ("training.foo=1", "--set training.foo=1: unknown key 'foo' in training"),
                               ("output_name=a/b", "--set output_name=a/b: output.output_name: 'a/b' must be")]:
        with pytest.raises(ConfigError) as e:
            load_config(path, overrides=[override])
        assert str(e.value).startswith(expected), str(e.value)
    path.write_text(NESTED.replace("lora_rank: 16", "lora_rank: 0"))
    with pytest.raises(ConfigError, match=f"^{path}: training.lora_rank: 0 is out of range"):
        load_config(path, overrides=["epochs=2"])  # the file's own problem: the file's
    with pytest.raises(ConfigError) as e:  # and beside a --set one: both, under the file's name
        load_config(path, overrides=["epochs=0"])
    assert str(e.value) == (f"{path}: 2 problems:\n  training.lora_rank: 0 is out of range: must be >= 1 and <= 1024"
                            "\n  --set epochs=0: training.epochs: 0 is out of range: must be >= 1")


KOHYA_TOML = """
[model_arguments]
pretrained_model_name_or_path = "tiny-demo"

[additional_network_arguments]
network_dim = 16
network_alpha = 8

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-4
optimizer_args = ["weight_decay=0.1"]

[dataset_arguments]
train_data_dir = "imgs"
resolution = "768,768"
shuffle_caption = true

[training_arguments]
output_dir = "out"
output_name = "style"
train_batch_size = 2
max_train_epochs = 3
"""


def test_kohyas_toml_config_is_read_as_kohya_reads_it(tmp_path):
    """kohya's sd-scripts take a TOML file (--config_file), its keys in tables of any name: here the same, by the
    .toml suffix (it was read as YAML: 'the config must be a mapping ..., got str')."""
    path = tmp_path / "kohya.toml"
    path.write_text(KOHYA_TOML)
    cfg = load_config(path, overrides=["max_train_steps=2"])
    t = cfg.training
    assert (cfg.model.base_model, cfg.data.train_data_dir, cfg.data.resolution, cfg.data.shuffle_caption) == (
        "tiny-demo", "imgs", 768, True)
    assert (t.lora_rank, t.lora_alpha, t.learning_rate, t.batch_size, t.epochs, t.max_train_steps) == (
        16, 8.0, 1e-4, 2, 3, 2)
    assert t.optimizer_args == {"weight_decay": 0.1} and cfg.output.output_name == "style"
    path.write_text("train_data_dir = 'imgs'\n[training]\nlora_rank = 4\n")  # our own sections, in TOML
    assert load_config(path).training.lora_rank == 4
    path.write_text(KOHYA_TOML + "[more]\nnetwork_dim = 32\n")
    with pytest.raises(ConfigError, match=r"key 'network_dim' is given twice, in \[additional_network_arguments\] "
                                          r"\(16\) and in \[more\] \(32\)"):
        load_config(path)
    path.write_text("network_dim = \n")
    with pytest.raises(ConfigError, match="kohya.toml: not valid TOML"):
        load_config(path)


def test_toml_in_a_yaml_file_says_what_it_is(tmp_path):
    for text in ("network_dim = 16\ntrain_data_dir = 'x'\n", KOHYA_TOML):
        path = tmp_path / "kohya.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="looks like TOML.*name the file .toml"):
            load_config(path)


def test_kohyas_train_batch_size_is_batch_size():
    """Per device in kohya's scripts, as here (README "Multi-GPU training")."""
    assert config_from_dict({"train_data_dir": "x", "train_batch_size": 6}).training.batch_size == 6


def test_resolve_mixed_precision():
    assert resolve_mixed_precision("auto", "cuda", True) == "bf16"
    assert resolve_mixed_precision("auto", "cuda", False) == "fp16"
    assert resolve_mixed_precision("auto", "cpu", False) == "no"
    assert resolve_mixed_precision("fp16", "cpu", False) == "no"
    assert resolve_mixed_precision("fp16", "cuda", True) == "fp16"
    assert resolve_mixed_precision("no", "cuda", True) == "no"


def test_an_output_name_that_is_the_diffusers_files_is_refused():
    """output_name pytorch_lora_weights would share its name with the diffusers-format file written beside the LoRA
    (one of them then became pytorch_lora_weights_1.safetensors, and <lora:pytorch_lora_weights> the wrong one)."""
    for name in ("pytorch_lora_weights", "Pytorch_LoRA_Weights.safetensors"):
        with pytest.raises(ConfigError, match=r"output.output_name: '[Pp]ytorch_[Ll]o[Rr][Aa]_[Ww]eights' is the name "
                                              r"of the diffusers-format file"):
            config_from_dict({"train_data_dir": "x", "output_name": name})
    cfg = config_from_dict({"train_data_dir": "x", "output_name": "pytorch_lora_weights",
                            "save_diffusers_format": False})
    assert cfg.output.output_name == "pytorch_lora_weights"


def test_an_integer_written_as_text_is_read_as_the_number():
    """``epochs: "10"`` (quoted in YAML, or a UI's text) is 10, as float keys read ``"1e-4"``; a fraction is not."""
    cfg = config_from_dict({"train_data_dir": "x", "epochs": "10", "lora_rank": " 4 ", "learning_rate": "1e-4"})
    assert (cfg.training.epochs, cfg.training.lora_rank, cfg.training.learning_rate) == (10, 4, 1e-4)
    with pytest.raises(ConfigError, match=r"training.epochs: expected an integer >= 1, got '2.5'"):
        config_from_dict({"train_data_dir": "x", "epochs": "2.5"})
