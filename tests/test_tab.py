"""The Train LoRA tab without a browser: what it shows (views), its handlers, and the Blocks it builds."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lora_trainer.config import config_from_dict
from lora_trainer.engine.events import TrainResult
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui import views
from lora_trainer.ui.session import Status, TrainingSession

gr = pytest.importorskip("gradio")
tab = pytest.importorskip("lora_trainer.ui.tab")
SVG = "{http://www.w3.org/2000/svg}"


def losses(n: int) -> list[tuple[int, float]]:
    return [(i, 0.2 * math.exp(-i / 30) + 0.05 + 0.03 * ((i * 7) % 5) / 5) for i in range(1, n + 1)]


# --- views: the plot and the status
def test_loss_plot_has_axes_with_tick_labels_raw_points_and_a_named_smoothed_line():
    data = losses(60)
    svg = ET.fromstring(views.loss_svg(data))  # well-formed SVG
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    assert "step" in texts and "loss" in texts
    x_ticks = [t.text for t in svg.iter(f"{SVG}text") if t.get("class") == "lora_trainer_xtick"]
    y_ticks = [t.text for t in svg.iter(f"{SVG}text") if t.get("class") == "lora_trainer_ytick"]
    assert x_ticks == ["20", "40", "60"] and len(y_ticks) >= 3
    assert all(float(a) < float(b) for a, b in zip(y_ticks, y_ticks[1:]))
    raw = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "lora_trainer_loss_raw"][0]
    assert len(raw.findall(f"{SVG}circle")) == 60  # every step's loss as a point
    (avg,) = [p for p in svg.iter(f"{SVG}polyline") if p.get("class") == "lora_trainer_loss_avg"]
    assert len(avg.get("points").split()) == 60
    assert "loss of each step" in texts and f"average of last {views.LOSS_WINDOW} steps" in texts
    assert "validation loss" not in texts


def test_loss_plot_takes_a_validation_series_and_thins_long_runs():
    svg = ET.fromstring(views.loss_svg(losses(2000), validation=[(s, 0.1) for s in range(100, 2001, 100)]))
    (val,) = [p for p in svg.iter(f"{SVG}polyline") if p.get("class") == "lora_trainer_loss_val"]
    assert len(val.get("points").split()) == 20
    assert "validation loss" in [t.text for t in svg.iter(f"{SVG}text")]
    raw = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "lora_trainer_loss_raw"][0]
    assert len(raw.findall(f"{SVG}circle")) <= views.MAX_POINTS + 1
    assert "appears here" in views.loss_svg(losses(1))


def test_the_status_names_its_loss_and_it_is_the_plots_last_smoothed_point():
    data = losses(50)
    s = Status(state="training", message="training", step=50, total_steps=100, steps_per_s=0.03, eta_s=1650,
               losses=data, run_dir=Path("/runs/deep/path/my_lora_20240101"))
    line = views.status_line(s)
    expected = sum(v for _, v in data[-20:]) / 20
    assert f"loss {expected:.4f} (avg of last 20 steps)" in line
    assert views.moving_average([v for _, v in data])[-1] == pytest.approx(expected)
    assert "33 s/step" in line and "it/s" not in line and "ETA 00:27:30" in line
    page = views.status_html(s)
    assert "/runs/deep" not in line and "title='/runs/deep/path/my_lora_20240101'" in page
    assert ">my_lora_20240101</span>" in page
    assert "(avg of last 3 steps)" in views.status_line(Status(state="training", total_steps=9, step=3,
                                                                losses=losses(3)))


@pytest.mark.parametrize("speed, text", [(0.03, "33 s/step"), (0.25, "4.0 s/step"), (1.0, "1.00 it/s"),
                                         (12.5, "12.50 it/s")])
def test_slow_speeds_read_as_seconds_per_step(speed, text):
    assert views.format_speed(speed) == text


def test_the_finished_status_counts_used_and_skipped_images_with_reasons_one_click_away(tmp_path):
    result = TrainResult(status="finished", run_dir=tmp_path, lora_path=None, diffusers_path=None, steps=4,
                         total_steps=4, final_loss=0.1, first_loss=0.2, images_used=16, images_skipped=6,
                         wall_time_s=1.0)
    skipped = [{"path": f"/data/bad_{i}.png", "reason": "not an image (cannot identify image file)"} for i in range(6)]
    s = Status(state="done", message="Finished after 4/4 steps: x.safetensors", total_steps=4, step=4,
               result=result, skipped=skipped, run_dir=tmp_path)
    page = views.status_html(s)
    assert "16 images used, 6 skipped" in page and "<details" in page and "<summary>" in page
    assert page.count("<li>") == 6 and "bad_5.png</code>: not an image" in page
    result.images_skipped = 0
    assert "16 images used" in views.status_html(Status(state="done", total_steps=4, result=result))
    assert "<details" not in views.status_html(Status(state="done", total_steps=4, result=result))


# --- config keys named by the tab's labels
def test_errors_name_the_tabs_fields_not_config_keys(tmp_path):
    from lora_trainer.config import validate_paths
    from lora_trainer.errors import ConfigError
    from lora_trainer.ui.standalone_host import DiffusersHost

    host = DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs")
    with pytest.raises(ConfigError) as bad:
        tab.build_config(host, str(tmp_path), "x", "Style (defaults)", None, {"resolution": 100, "lora_rank": 0})
    text = tab.tab_message(bad.value)
    assert "Resolution: 100 must be a multiple of 8" in text and "Rank:" in text
    assert "data.resolution" not in text and "Train LoRA tab" not in text
    cfg = tab.build_config(host, str(tmp_path / "nowhere"), "x", "Style (defaults)", None, {})
    with pytest.raises(ConfigError) as missing:
        validate_paths(cfg)
    assert str(missing.value).startswith("data.train_data_dir:")  # the CLI's message stays as it was
    assert tab.tab_message(missing.value).startswith(f"Dataset folder: {tmp_path / 'nowhere'} is not an existing")
    engine = ("out of GPU memory: lower training.batch_size (and raise gradient_accumulation_steps to keep the "
              "effective batch), turn on training.gradient_checkpointing, or lower data.resolution.")
    assert tab.tab_message(engine) == (
        "out of GPU memory: lower 'Batch size' (and raise 'Gradient accumulation' to keep the effective batch), "
        "turn on 'Gradient checkpointing', or lower 'Resolution'.")
    assert tab.tab_message("lower the resolution or the seed") == "lower the resolution or the seed"
    failed = Status(state="error", message="the loss became nan at step 3: lower training.learning_rate")
    assert "lower 'Learning rate'" in views.status_html(failed, tab.FIELD_LABELS)


def test_prodigy_regularization_and_optimizer_arguments_from_the_tab(tmp_path):
    """Prodigy from the tab takes its own rate (1.0) where the learning-rate fields show what the tab put there, and
    the user's where they changed them; the optimizer arguments field round-trips the config's mapping; an empty
    regularization folder field is none, a missing one is named by its label."""
    from lora_trainer.config import validate_paths
    from lora_trainer.errors import ConfigError
    from lora_trainer.ui.standalone_host import DiffusersHost

    host = DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs")
    base = config_from_dict({"train_data_dir": "-"})
    shown = {key: tab.field_default(key, base) for key, *_ in tab.ADVANCED}

    def build(**changed):
        return tab.build_config(host, str(tmp_path), "x", "Style (defaults)", None, {**shown, **changed})

    t = build(optimizer="prodigy").training
    assert (t.optimizer, t.learning_rate, t.text_encoder_lr) == ("prodigy", 1.0, 1.0)
    assert build(optimizer="prodigy", learning_rate=0.5).training.learning_rate == 0.5  # (the user's own)
    assert build().training.learning_rate == base.training.learning_rate  # (AdamW: the field's rate)
    fill = {"family": "sdxl", "values": {**shown, "learning_rate": 1e-4, "text_encoder_lr": 1e-5}}
    cfg = tab.build_config(host, str(tmp_path), "x", "Style (defaults)", None,
                           {**shown, "optimizer": "prodigy", "learning_rate": 1e-4, "text_encoder_lr": 1e-5}, fill)
    assert (cfg.training.learning_rate, cfg.training.text_encoder_lr) == (1.0, 1.0)  # (the family's fill too)

    class WebuiSettings(DiffusersHost):  # (the WebUI's Settings give the tab its learning rate)
        def defaults(self):
            return {**super().defaults(), "learning_rate": 2e-4}

    settings_host = WebuiSettings(tmp_path / "Lora", run_root=tmp_path / "runs")
    for fill in (None, {"family": "sd_v1", "values": {"learning_rate": 2e-4}}):
        t = tab.build_config(settings_host, str(tmp_path), "x", "Style (defaults)", None,
                             {**shown, "optimizer": "prodigy", "learning_rate": 2e-4}, fill).training
        assert (t.learning_rate, t.text_encoder_lr) == (1.0, 1.0), fill
    assert tab.build_config(settings_host, str(tmp_path), "x", "Style (defaults)", None,
                            {**shown, "learning_rate": 2e-4}).training.learning_rate == 2e-4  # (AdamW: the rate)

    t = build(conv_rank=8, loss_type="huber", multires_noise_iterations=6, ip_noise_gamma=0.05,
              debiased_estimation_loss=True, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=3).training
    assert (t.conv_rank, t.conv_lora_alpha, t.loss_type, t.multires_noise_iterations, t.ip_noise_gamma) == (
        8, base.training.lora_alpha, "huber", 6, 0.05)  # (conv_alpha: the rest's strength, alpha 8 / rank 8)
    assert t.debiased_estimation_loss and t.lr_scheduler_num_cycles == 3
    assert build(conv_rank=0).training.conv_rank == 0 and build().training.loss_type == "l2"
    assert build(loraplus_lr_ratio=16).training.loraplus_lr_ratio == 16 and build().training.loraplus_lr_ratio is None

    args = build(optimizer="adafactor", optimizer_args="scale_parameter=False warmup_init=False beta1=0.9").training
    assert args.optimizer_args == {"scale_parameter": False, "warmup_init": False, "beta1": 0.9}
    text = tab.field_default("optimizer_args", config_from_dict({"train_data_dir": "-", "optimizer_args": {
        "betas": [0.9, 0.99], "d_coef": 2, "decouple": True, "safeguard_warmup": "yes"}}))
    assert build(optimizer="prodigy", optimizer_args=text).training.optimizer_args == {
        "betas": [0.9, 0.99], "d_coef": 2, "decouple": True, "safeguard_warmup": "yes"}

    assert build().data.reg_data_dir is None and build(reg_data_dir="  ").data.reg_data_dir is None
    (tmp_path / "class").mkdir()
    cfg = build(reg_data_dir=str(tmp_path / "class"), prior_loss_weight=0.5)
    assert (cfg.data.reg_data_dir, cfg.training.prior_loss_weight) == (str(tmp_path / "class"), 0.5)
    with pytest.raises(ConfigError) as missing:
        validate_paths(build(reg_data_dir=str(tmp_path / "no class")))
    assert tab.tab_message(missing.value).startswith("Regularization images folder: ")


# --- the sweep and Send to txt2img
class SweepHost:
    name = "webui"
    chooses_base_model, sends_to_txt2img = False, True
    image_size = None

    def __init__(self):
        self.calls = []

    def native_image_size(self, base_model=None):
        return 512

    def sweep(self, lora_path, prompt, negative, strengths, seed, base_model=None, steps=None, size=None):
        self.calls.append({"lora": lora_path, "steps": steps, "size": size, "strengths": strengths})
        from PIL import Image

        return [(s, Image.new("RGB", (8, 8))) for s in strengths]


@pytest.fixture
def no_last_run(monkeypatch):
    monkeypatch.setattr(TrainingSession, "_active", None)


def test_a_sweep_without_a_trained_lora_says_so_instead_of_failing(tmp_path, no_last_run):
    host = SweepHost()
    for lora in ("", None, "   ", str(tmp_path / "gone.safetensors")):
        gallery, message = tab.sweep_images(host, lora, "a cat", "", 1, tab.DEFAULT_STRENGTHS, 0, 0)
        assert gallery == [] and "Train a LoRA first" in message and "lora_trainer_error" in message
    assert host.calls == []
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(b"x")
    gallery, message = tab.sweep_images(host, str(lora), "a cat", "", 1, "0, 1", 0, 0)
    assert host.calls[-1]["size"] == 512 and host.calls[-1]["steps"] == views.SWEEP_STEPS  # defaults
    assert [label for _, label in gallery] == ["strength 0", "strength 1"] and "mine" in message
    tab.sweep_images(host, str(lora), "a cat", "", 1, "0, 1", 768, 6)
    assert (host.calls[-1]["size"], host.calls[-1]["steps"]) == (768, 6)
    for strengths, size, words in [("0, x", 512, "'Strengths' must be numbers"), ("1", 500, "'Size': 500")]:
        gallery, message = tab.sweep_images(host, str(lora), "", "", 1, strengths, size, 0)
        assert gallery == [] and words in message
    assert len(host.calls) == 2
    gallery, message = tab.sweep_after_training(host, None, "a cat", "", 1, "0, 1", 0, 0)
    assert gallery == [] and "made no LoRA" in message and len(host.calls) == 2


def test_the_sweep_size_defaults_to_the_last_trainings_resolution(no_last_run, monkeypatch):
    host = SweepHost()
    assert tab.default_sweep_size(host) == 512
    host.image_size = 640  # the WebUI host remembers what it trained at
    assert tab.default_sweep_size(host) == 640

    class Last:
        status = Status(state="done")
        cfg = type("Cfg", (), {"data": type("Data", (), {"resolution": 768}),
                               "model": type("Model", (), {"task_type": "text-to-image"})})

    monkeypatch.setattr(TrainingSession, "_active", Last())
    assert tab.default_sweep_size(host) == 768
    Last.cfg.model.task_type = "text-generation"  # (the app's last run trained a language model: no image size)
    assert tab.default_sweep_size(host) == 640


def test_send_to_txt2img_without_a_lora_cannot_be_clicked_and_sends_no_placeholder(tmp_path):
    text, button, hint = tab.send_update("", "a cat")
    assert text == "" and button["interactive"] is False and "Train a LoRA first" in hint
    text, button, _ = tab.send_update(str(tmp_path / "missing.safetensors"), "a cat")
    assert "lora:" not in text and button["interactive"] is False
    lora = tmp_path / "style_v1.safetensors"
    lora.write_bytes(b"x")
    text, button, hint = tab.send_update(str(lora), "a cat")
    assert text == "a cat, <lora:style_v1:0.7>" and button["interactive"] is True and hint == ""


# --- the Blocks and a run through the tab's own handler
def components(blocks) -> dict:
    return {getattr(b, "elem_id", None): b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_the_tab_starts_with_stop_and_send_off_and_sweep_size_and_steps_fields(tmp_path, no_last_run):
    from lora_trainer.ui.standalone_host import DiffusersHost

    blocks = tab.create_tab(DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs"))
    c = components(blocks)
    assert c["lora_trainer_stop"].interactive is False
    assert c["lora_trainer_send_txt2img"].interactive is False
    assert c["lora_trainer_sweep_size"].value == 64  # tiny-demo's own size
    assert c["lora_trainer_sweep_steps"].value == views.SWEEP_STEPS
    assert "Train a LoRA first" in c["lora_trainer_sweep_status"].value
    assert "<svg" not in c["lora_trainer_loss"].value  # no run yet: the placeholder


def test_a_run_through_the_tab_turns_stop_on_and_off_clears_the_sweep_and_counts_skipped(tmp_path, monkeypatch):
    from lora_trainer.data.demo_set import make_demo_dataset
    from lora_trainer.ui.standalone_host import DiffusersHost

    monkeypatch.setattr(tab, "POLL_S", 0.05)
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    (data / "broken.png").write_bytes(b"not a png")
    host = DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs")
    advanced = {"resolution": 64, "max_train_steps": 2, "batch_size": 2, "save_steps": 0, "epochs": 1}
    values = [advanced.get(key, tab.field_default(key, config_from_dict({"train_data_dir": "-"})))
              for key, *_ in tab.ADVANCED]
    updates = list(tab.run_training(host, str(data), "tab_lora", "Style (defaults)", "tiny-demo", "", 0, None,
                                    *values))
    status, loss, samples, lora_file, stop, gallery, sweep_status, size, trained = updates[0]
    assert stop["interactive"] is True and gallery == [] and "new LoRA" in sweep_status
    status, loss, samples, lora_file, stop, gallery, sweep_status, size, trained = updates[-1]
    assert stop["interactive"] is False, status
    assert "Finished after 2/2 steps" in status and "4 images used, 1 skipped" in status
    assert "broken.png</code>:" in status and "<details" in status
    assert trained == lora_file and Path(trained).name == "tab_lora.safetensors" and size == 64
    assert "<svg" in loss and "title='" in status

    bad = list(tab.run_training(host, str(tmp_path / "nowhere"), "tab_lora", "Style (defaults)", "tiny-demo", "",
                                0, None, *values))
    status, *_, stop, gallery, sweep_status, size, trained = bad[-1]
    assert "Dataset folder:" in status and "data.train_data_dir" not in status
    assert stop["interactive"] is False and trained is None


def test_the_gpu_field_shows_where_the_app_has_several_and_a_run_takes_one_process_each(tmp_path, monkeypatch,
                                                                                      no_last_run):
    import torch

    from lora_trainer.ui.standalone_host import DiffusersHost

    host = DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs")
    if torch.cuda.device_count() < 2:
        assert components(tab.create_tab(host))["lora_trainer_gpus"].visible is False
    monkeypatch.setattr(DiffusersHost, "gpu_count", staticmethod(lambda: 4))
    gpus = components(tab.create_tab(host))["lora_trainer_gpus"]
    assert gpus.visible is True and (gpus.minimum, gpus.maximum, gpus.value) == (1, 4, 1)

    started = []

    class Launched:  # (ui.launched_session's own test runs the processes)
        @classmethod
        def start(cls, host, cfg, processes, **kw):
            started.append((processes, kw))
            raise LoraTrainerError("stopped here")

    monkeypatch.setattr(tab, "LaunchedSession", Launched)
    values = [tab.field_default(key, config_from_dict({"train_data_dir": "-"})) for key, *_ in tab.ADVANCED]
    shown = list(tab.run_training(host, str(tmp_path), "x", "Style (defaults)", "tiny-demo", "a cat", 5, None, *values,
                                  gpus=3))
    assert started == [(3, {"sample_prompt": "a cat", "sample_every": 5})] and "stopped here" in shown[-1][0]


def test_estimate_memory_shows_the_runs_peak_and_what_would_fit(tmp_path, monkeypatch):
    """The tab's Estimate memory: the same pre-flight as the run (engine.preflight) for the fields' settings, before
    anything loads; where it does not fit, the settings that would; a field's mistake named by its label."""
    from lora_trainer.data.demo_set import make_demo_dataset
    from lora_trainer.engine import preflight
    from lora_trainer.ui.standalone_host import DiffusersHost

    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    host = DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs")
    advanced = {"resolution": 64, "max_train_steps": 20, "batch_size": 4, "gradient_accumulation_steps": 1}
    values = [advanced.get(key, tab.field_default(key, config_from_dict({"train_data_dir": "-"})))
              for key, *_ in tab.ADVANCED]
    shown = tab.estimate_memory(host, str(data), "tab_lora", "Style (defaults)", "tiny-demo", "", 0, None, *values)
    assert "Estimate: peak ~" in shown and "for 20 steps" in shown and "NOT fit" not in shown

    monkeypatch.setattr(preflight, "free_memory", lambda device: 2**20)  # (1 MB free)
    shown = tab.estimate_memory(host, str(data), "tab_lora", "Style (defaults)", "tiny-demo", "", 0, None, *values)
    assert "Does NOT fit" in shown and "error" in shown

    values[[key for key, *_ in tab.ADVANCED].index("batch_size")] = 0
    shown = tab.estimate_memory(host, str(data), "tab_lora", "Style (defaults)", "tiny-demo", "", 0, None, *values)
    assert "Batch size:" in shown and "training.batch_size" not in shown


def test_the_standalone_apps_merge_writes_a_new_diffusers_folder_beside_the_lora_folder(tmp_path):
    import torch
    from diffusers import UNet2DConditionModel
    from test_export import TOL, unet_inputs
    from test_merge import lora_file

    from lora_trainer.models.tiny import tiny_model_path
    from lora_trainer.ui.standalone_host import DiffusersHost

    unet, lora = lora_file(tmp_path, "style", ldm_names=True)
    host = DiffusersHost(lora_dir=tmp_path / "out" / "Lora")
    message = tab.merge_checkpoint(host, str(lora), 1, "tiny-demo")
    folder = tmp_path / "out" / "Stable-diffusion" / f"{tiny_model_path().name}-style"
    assert str(folder) in message and (folder / "model_index.json").is_file()
    x, t, cond = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(UNet2DConditionModel.from_pretrained(folder / "unet")(x, t, cond).sample,
                                   unet(x, t, cond).sample, **TOL)
    tab.merge_checkpoint(host, str(lora), 1, "tiny-demo")
    assert folder.with_name(folder.name + "_1").is_dir()
    assert "is not a single-file .safetensors checkpoint or a diffusers folder" in tab.merge_checkpoint(
        host, str(lora), 1, str(tmp_path / "nowhere"))
