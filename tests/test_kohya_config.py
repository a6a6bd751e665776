"""kohya's sd-scripts TOML configs (what kohya_ss's GUI saves) read as kohya reads them (lora_trainer.kohya_config)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open

from lora_trainer.cli import main
from lora_trainer.config import load_config
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.optim import lr_schedule
from lora_trainer.errors import ConfigError
from lora_trainer.kohya_config import TEXT_ENCODER_TARGETS, UNET_TARGETS

# as kohya_ss's GUI writes one (v24/v25), with its habits: xformers, persistent workers, a logging_dir, a sampler
GUI_TOML = """
[model_arguments]
pretrained_model_name_or_path = "tiny-demo"
v2 = false
v_parameterization = false

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
unet_lr = 1e-4
text_encoder_lr = 5e-5

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 3e-4
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 0
max_grad_norm = 1.0

[dataset_arguments]
train_data_dir = "DATA"
resolution = "64,64"
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 64
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
cache_latents = true
max_data_loader_n_workers = 0
persistent_data_loader_workers = true
color_aug = false
flip_aug = false

[training_arguments]
output_dir = "OUT"
output_name = "gui_style"
save_precision = "fp16"
save_model_as = "safetensors"
save_every_n_epochs = 1
train_batch_size = 2
max_train_steps = 2
mixed_precision = "no"
seed = 7
clip_skip = 2
xformers = true
max_token_length = 225
logging_dir = "logs"
log_prefix = "gui_style"
sample_sampler = "euler_a"
sample_every_n_epochs = 1
multires_noise_iterations = 6
multires_noise_discount = 0.3
ip_noise_gamma = 0.05
debiased_estimation_loss = true
loss_type = "smooth_l1"
huber_schedule = "exponential"
huber_c = 0.2
min_timestep = 100
max_timestep = 900
network_args = ["conv_dim=4", "conv_alpha=2"]
"""


def write(tmp_path, text: str):
    path = tmp_path / "kohya.toml"
    path.write_text(text.replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "out")))
    return path


def test_a_kohya_gui_config_is_read_in_kohyas_terms(tmp_path, caplog):
    """Its rates (unet_lr for the UNet, text_encoder_lr for the text encoder, which kohya trains unless
    network_train_unet_only), kohya's LoRA modules (every Linear of the transformer blocks, the text encoder's
    attention and MLP), no LoRA dropout and no gradient accumulation (kohya's defaults), the scheduler with its cycles;
    the settings that change nothing here are taken with a line saying so."""
    caplog.set_level(logging.INFO)
    cfg = load_config(write(tmp_path, GUI_TOML))
    t, d = cfg.training, cfg.data
    assert (t.learning_rate, t.text_encoder_lr, t.train_text_encoder, t.lora_rank, t.lora_alpha) == (
        1e-4, 5e-5, True, 16, 8.0)
    assert (t.target_modules, t.text_encoder_target_modules) == (UNET_TARGETS, TEXT_ENCODER_TARGETS)
    assert (t.lora_dropout, t.gradient_accumulation_steps, t.batch_size, t.max_train_steps, t.seed) == (0, 1, 2, 2, 7)
    assert (t.lr_scheduler, t.lr_scheduler_num_cycles, t.clip_skip, t.attention) == ("cosine_with_restarts", 3, 2,
                                                                                     "auto")
    assert (d.caption_extension, d.enable_bucket, d.resolution, d.keep_tokens) == (".txt", True, 64, 1)
    assert cfg.model.prediction_type == "auto" and cfg.output.sample_every_n_epochs == 0  # (no prompts: as kohya)
    assert (t.loss_type, t.huber_schedule, t.huber_c, t.min_timestep, t.max_timestep) == ("smooth_l1", "exponential",
                                                                                            0.2, 100, 900)
    assert (t.conv_rank, t.conv_alpha) == (4, 2.0)
    default_alpha = load_config(write(tmp_path, 'train_data_dir = "DATA"\nnetwork_args = ["conv_dim=8"]\n'))
    assert (default_alpha.training.conv_rank, default_alpha.training.conv_alpha) == (8, 1.0)  # (kohya's default)
    said = caplog.text
    assert "kohya's xformers = True: attention is PyTorch's SDPA" in said
    assert "max_token_length = 225: a caption is one 75-token window here" in said


def test_what_a_kohya_file_leaves_out_takes_kohyas_default(tmp_path):
    cfg = load_config(write(tmp_path, 'pretrained_model_name_or_path = "tiny-demo"\ntrain_data_dir = "DATA"\n'))
    t, d = cfg.training, cfg.data
    assert (t.batch_size, t.gradient_accumulation_steps, t.lora_rank, t.lora_alpha, t.lora_dropout) == (1, 1, 4, 1, 0)
    assert (t.learning_rate, t.text_encoder_lr, t.train_text_encoder, t.max_train_steps) == (2e-6, 2e-6, True, 1600)
    assert (d.caption_extension, d.enable_bucket, d.min_bucket_reso, d.max_bucket_reso) == (".caption", False, 256,
                                                                                           1024)
    assert cfg.output.save_precision == "fp32"


@pytest.mark.parametrize("lines, want", [
    ("learning_rate = 3e-4", (3e-4, 3e-4, None)),  # (one rate for both, as kohya)
    ("learning_rate = 3e-4\nunet_lr = 1e-4", (1e-4, 3e-4, None)),
    ("unet_lr = 1e-4\ntext_encoder_lr = [1e-5, 2e-5]", (1e-4, 1e-5, 2e-5)),  # (SDXL's two text encoders)
])
def test_kohyas_learning_rates(tmp_path, lines, want):
    cfg = load_config(write(tmp_path, f'train_data_dir = "DATA"\n{lines}\nnetwork_train_unet_only = false\n'))
    t = cfg.training
    assert (t.learning_rate, t.text_encoder_lr, t.text_encoder_2_lr) == want and t.train_text_encoder
    only_unet = load_config(write(tmp_path, 'train_data_dir = "DATA"\nnetwork_train_unet_only = true\n'))
    assert not only_unet.training.train_text_encoder
    v = load_config(write(tmp_path, 'train_data_dir = "DATA"\nv2 = true\nv_parameterization = true\n'))
    assert v.model.prediction_type == "v_prediction"


def test_kohya_settings_that_would_train_otherwise_are_refused_together(tmp_path):
    """Each named with what this trainer does instead, before anything loads."""
    path = write(tmp_path, 'train_data_dir = "DATA"\nnetwork_module = "lycoris.kohya"\nsave_model_as = "ckpt"\n'
                           'masked_loss = true\ncolor_aug = true\nnetwork_args = ["conv_dim=4", "block_dims=2,2"]\n'
                           'unet_lr = 0\n'
                           'caption_separator = ","\nmultires_noise_iterations = 0\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path} (read as kohya's sd-scripts config): 6 problems:")
    for key in ("network_module = 'lycoris.kohya'", "save_model_as = 'ckpt'", "masked_loss = True",
                "color_aug = True", "network_args block_dims=2,2", "unet_lr = 0"):
        assert f"kohya's {key}" in message, key
    assert "caption_separator" not in message and "multires" not in message  # (the values that train as here)


def _rates(schedule, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    return rates


def test_cosine_with_restarts_and_polynomial_schedules(tmp_path):
    """kohya's lr_scheduler choices beyond ours: cosine_with_restarts (num_cycles cosines, each from the full rate)
    and polynomial (power); one cycle is the cosine."""
    cfg = load_config(write(tmp_path, 'train_data_dir = "DATA"\nlearning_rate = 1.0\nlr_scheduler = '
                                      '"cosine_with_restarts"\nlr_scheduler_num_cycles = 2\n'))

    def schedule(t):
        return lr_schedule(t, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 8)

    rates = _rates(schedule(cfg.training), 8)
    assert rates[0] == rates[4] == 1.0 and rates[3] < 0.2 and rates[7] < 0.2  # (two cosines of 4 steps)
    t = cfg.training
    t.lr_scheduler_num_cycles = 1
    one = _rates(schedule(t), 8)
    t.lr_scheduler = "cosine"
    assert one == pytest.approx(_rates(schedule(t), 8))
    t.lr_scheduler, t.lr_scheduler_power = "polynomial", 2.0
    assert _rates(schedule(t), 8)[4] == pytest.approx((1 - 4 / 8) ** 2, abs=1e-6)
    assert math.isclose(_rates(schedule(t), 8)[0], 1.0)


def test_a_kohya_gui_config_trains(tmp_path, monkeypatch, capsys):
    """The GUI's file, its paths pointed at a tiny generated set: a kohya-format LoRA of kohya's modules."""
    monkeypatch.chdir(tmp_path)
    make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    assert main(["train", "-c", str(write(tmp_path, GUI_TOML))]) == 0
    with safe_open(str(tmp_path / "out" / "gui_style.safetensors"), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
        meta = f.metadata()
    assert any(n.endswith("_ff_net_2") for n in names) and any(n.endswith("_proj_in") for n in names)
    assert any(n.startswith("lora_te_") and n.endswith("_mlp_fc1") for n in names)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("16", "8.0")
    assert (meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"], meta["ss_debiased_estimation"]) == (
        "6", "0.05", "True")
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("smooth_l1", "exponential", "0.2")
    with safe_open(str(tmp_path / "out" / "gui_style.safetensors"), "pt") as f:  # (kohya's conv_dim: LoCon layers)
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert f.get_tensor(f"{conv}.lora_down.weight").shape[:1] == (4,) and float(f.get_tensor(f"{conv}.alpha")) == 2
        assert f.get_tensor(f"{conv}.lora_down.weight").ndim == 4
        assert float(f.get_tensor("lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha")) == 8  # (network_alpha)
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    assert "finished:" in capsys.readouterr().out


def test_a_kohya_file_for_sdxl_trains_as_kohyas_sdxl_training(tmp_path, caplog):
    """kohya's SDXL training warns that clip_skip does not work there and trains without it; so here (a config of
    our own with clip_skip for SDXL is refused when the model is known: models.sdxl_backend.check_clip_skip). Its
    LoRA holds both text encoders unless network_train_unet_only (sdxl_train_network: lora_te1_, lora_te2_)."""
    cfg = load_config(write(tmp_path, 'pretrained_model_name_or_path = "tiny-sdxl"\ntrain_data_dir = "DATA"\n'
                                      'clip_skip = 2\n'))
    assert cfg.training.clip_skip == 1 and "clip_skip" not in cfg.explicit
    assert cfg.training.train_text_encoder and cfg.training.train_text_encoder_2  # (kohya's SDXL LoRA: both)
    assert "kohya's clip_skip = 2 is not used for an SDXL model" in caplog.text
    sd1 = load_config(write(tmp_path, 'pretrained_model_name_or_path = "tiny-demo"\ntrain_data_dir = "DATA"\n'
                                      'clip_skip = 2\n'))
    assert sd1.training.clip_skip == 2 and not sd1.training.train_text_encoder_2
    unet_only = load_config(write(tmp_path, 'pretrained_model_name_or_path = "tiny-sdxl"\ntrain_data_dir = "DATA"\n'
                                            'network_train_unet_only = true\n'))
    assert not unet_only.training.train_text_encoder and not unet_only.training.train_text_encoder_2


def test_a_kohya_file_for_sdxl_trains_both_text_encoders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_demo_dataset(tmp_path / "data", n=2, resolution=64)
    path = write(tmp_path, 'pretrained_model_name_or_path = "tiny-sdxl"\ntrain_data_dir = "DATA"\nresolution = 64\n'
                           'output_dir = "OUT"\noutput_name = "xl"\nmax_train_steps = 1\nunet_lr = 1e-4\n'
                           'text_encoder_lr = [1e-5, 2e-5]\nmixed_precision = "no"\nnetwork_args = ["conv_dim=2"]\n')
    assert main(["train", "-c", str(path)]) == 0
    with safe_open(str(tmp_path / "out" / "xl.safetensors"), "pt") as f:
        prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in f.keys()}
        names = {k.split(".")[0] for k in f.keys()}
    assert {"lora_unet", "lora_te1", "lora_te2"} <= prefixes
    assert any(n.endswith("_in_layers_2") for n in names) and any(n.endswith("_out_layers_3") for n in names)
    assert all(n.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
                             "lora_te1_", "lora_te2_")) for n in names), names  # (kohya's SDXL LDM names)


def test_loraplus_trains_the_b_matrices_at_the_ratio_and_resumes_only_with_it(tmp_path):
    """kohya's network_args loraplus_lr_ratio (LoRA+): each part's B ("up") matrices in a group of their own at the
    rate times the ratio; a resume with another ratio is refused before anything trains."""
    from lora_trainer.config import config_from_dict
    from lora_trainer.engine.run import add_lora_layers
    from lora_trainer.engine.trainer import train
    from lora_trainer.models.factory import load_backend

    cfg = load_config(write(tmp_path, 'pretrained_model_name_or_path = "tiny-demo"\ntrain_data_dir = "DATA"\n'
                                      'unet_lr = 1e-4\ntext_encoder_lr = 1e-5\n'
                                      'network_args = ["loraplus_lr_ratio=16"]\n'))
    assert cfg.training.loraplus_lr_ratio == 16
    _, groups = add_lora_layers(cfg, load_backend(cfg))
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("unet B (LoRA+)", 1.6e-3),
                                                      ("text_encoder", 1e-5), ("text_encoder B (LoRA+)", 1.6e-4)]
    assert all(p.shape[1] == 4 for p in groups[1]["params"])  # (B: [out, rank] or [out, rank, 1, 1])
    make_demo_dataset(tmp_path / "data", n=2, resolution=64)
    run = {"train_data_dir": str(tmp_path / "data"), "resolution": 64, "output_dir": str(tmp_path / "out"),
           "max_train_steps": 2, "save_steps": 1, "batch_size": 1, "mixed_precision": "no", "log_with": "none"}
    result = train(config_from_dict({**run, "loraplus_lr_ratio": 16}), progress=False)
    assert result.status == "finished"
    with pytest.raises(ConfigError, match="loraplus_lr_ratio: 16.0 in the checkpoint, None now"):
        train(config_from_dict({**run, "max_train_steps": 3, "resume_from_checkpoint": "latest"}), progress=False)
