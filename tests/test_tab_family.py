"""The tab and the model family (issue 16): it fills resolution, rank, alpha and the learning rates with the family's
defaults (config.FAMILY_DEFAULTS) when it sees the family (the WebUI's loaded model, the standalone app's base model,
read from its files without loading), never over a value the user typed, and names the family in a note; the SDXL-only
fields (the second text encoder) show for SDXL on a host that can train it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_trainer.config import FAMILY_DEFAULTS, Config, with_family_defaults
from lora_trainer.ui.run_config import (
    ADVANCED,
    FAMILY_KEYS,
    SDXL_ONLY,
    build_config,
    family_fill,
    host_config,
)
from lora_trainer.ui.session import TrainingSession
from lora_trainer.ui.standalone_host import DiffusersHost

gr = pytest.importorskip("gradio")
tab = pytest.importorskip("lora_trainer.ui.tab")
SDXL = FAMILY_DEFAULTS["sdxl"]


class LoadedModelHost:
    """A host like the WebUI's: it trains the model it has loaded, whose family the test sets; no
    ``trains_text_encoder_2`` unless given (the UI must default it to False)."""

    name = "webui-like"
    chooses_base_model, sends_to_txt2img = False, True
    image_size = None

    def __init__(self, tmp_path, family=None, settings=None, **flags):
        self.family, self.settings = family, settings or {}
        self.run_root, self.lora_dir = tmp_path / "runs", tmp_path / "Lora"
        self.__dict__.update(flags)

    def defaults(self) -> dict:
        return dict(self.settings)

    def model_family(self, base_model=None):
        return self.family

    def native_image_size(self, base_model=None) -> int:
        return 512

    def captioners(self) -> dict:
        return {"blip": "blip"}


def shown(update):
    """The value an output update sets, or None where it leaves the field alone."""
    return update.get("value") if isinstance(update, dict) else update


def refresh(host, filled, values: dict, base_model=None):
    """refresh_family's outputs by name: (note, fill, {key: new value or None}, {key: visible})."""
    out = tab.refresh_family(host, base_model, filled, *[values[k] for k in FAMILY_KEYS])
    note, filled, rest = out[0], out[1], out[2:]
    fields = {k: shown(u) for k, u in zip(FAMILY_KEYS, rest)}
    visible = {k: u.get("visible") for k, u in zip(SDXL_ONLY, rest[len(FAMILY_KEYS):])}
    return shown(note), filled, fields, visible


def components(blocks) -> dict:
    return {getattr(b, "elem_id", None): b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


# --- the standalone app: the family from the base model's files, nothing loaded
def write_folder(path, class_name="StableDiffusionPipeline", cross=768, prediction="epsilon", te2=False):
    """A diffusers folder's config files only (no weights: loading it would fail)."""
    index = {"_class_name": class_name, "unet": ["diffusers", "UNet2DConditionModel"]}
    if te2:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    for name, data in {"model_index.json": index, "unet/config.json": {"cross_attention_dim": cross},
                       "scheduler/scheduler_config.json": {"prediction_type": prediction}}.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(data))
    return str(path)


def test_the_standalone_host_reads_the_family_from_the_base_models_files(tmp_path):
    host = DiffusersHost(tmp_path / "Lora")
    assert host.model_family("tiny-demo") == "sd_v1" and host.model_family("tiny-sdxl") == "sdxl"
    assert host.model_family("tiny-sdxl-v") == "sdxl" and host.model_family() == "sd_v1"  # (its base_model)
    assert host.model_family(write_folder(tmp_path / "xl", "StableDiffusionXLPipeline")) == "sdxl"
    assert host.model_family(write_folder(tmp_path / "xl_finetune", "MyPipeline", te2=True)) == "sdxl"
    assert host.model_family(write_folder(tmp_path / "sd15")) == "sd_v1"
    assert host.model_family(write_folder(tmp_path / "sd2", cross=1024)) == "sd_v2"
    assert host.model_family(write_folder(tmp_path / "sd2v", cross=1024, prediction="v_prediction")) == "sd_v2_768_v"
    xl_file = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.x": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)}, str(xl_file))
    assert host.model_family(str(xl_file)) == "sdxl" and host.native_image_size(str(xl_file)) == 1024
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    for unknown in ("nowhere", "empty", "broken.safetensors", "old.ckpt", "x"):  # ("x": a path half typed)
        assert host.model_family(str(tmp_path / unknown)) is None, unknown


# --- the fields: the family's defaults, never over the user's values
def test_the_fields_take_the_familys_defaults_but_never_over_a_value_the_user_typed(tmp_path):
    host = LoadedModelHost(tmp_path)  # no model loaded yet when the tab is built
    base = host_config(host)
    filled = family_fill(host, base)
    assert filled["family"] is None and filled["values"]["resolution"] == base.data.resolution == 512
    values = dict(filled["values"])

    host.family = "sdxl"  # the page loads: the WebUI has loaded an SDXL model
    note, filled, fields, visible = refresh(host, filled, values)
    assert fields == {k: SDXL[k] for k in FAMILY_KEYS}
    assert "Defaults for SDXL (the loaded model): resolution 1024, rank 32, alpha 16" in note
    values.update(fields)
    values.update(lora_rank=12, learning_rate=3e-4)  # the user types two values

    host.family = "sd_v1"  # another model loaded: SD 1.x's own defaults again, the typed values stay
    note, filled, fields, visible = refresh(host, filled, values)
    sd1 = Config()
    assert fields == {"resolution": 512, "lora_rank": None, "lora_alpha": sd1.training.lora_alpha,
                      "learning_rate": None, "text_encoder_lr": sd1.training.text_encoder_lr}
    assert "Defaults for SD 1.x (the loaded model)" in note
    values.update({k: v for k, v in fields.items() if v is not None})

    host.family = "sdxl"
    _, filled, fields, _ = refresh(host, filled, values)
    assert fields["lora_rank"] is None and fields["learning_rate"] is None and fields["resolution"] == 1024

    host.family = None  # unknown (the WebUI between two models): nothing changes
    note, same, fields, visible = refresh(host, filled, values)
    assert same == filled and note is None and set(fields.values()) == {None} and set(visible.values()) == {None}


def test_the_webuis_settings_stay_the_sd1_base(tmp_path):
    host = LoadedModelHost(tmp_path, "sd_v1", settings={"lora_rank": 16, "resolution": 640})
    base = host_config(host)
    assert family_fill(host, base)["values"]["lora_rank"] == 16  # SD 1.x: the Settings' values
    host.family = "sdxl"
    assert family_fill(host, base)["values"] == {k: SDXL[k] for k in FAMILY_KEYS}
    assert host.defaults() == {"lora_rank": 16, "resolution": 640}


def test_a_field_the_tab_filled_is_a_default_in_the_config_and_a_typed_one_is_the_users(tmp_path):
    host = LoadedModelHost(tmp_path)
    filled = family_fill(host, host_config(host))  # the family unknown to the tab
    advanced = {**filled["values"], "learning_rate": 3e-4}
    cfg = build_config(host, str(tmp_path), "x", "Style (defaults)", None, advanced, filled)
    assert "learning_rate" in cfg.explicit and not {"resolution", "lora_rank", "lora_alpha"} & cfg.explicit
    used, _ = with_family_defaults(cfg, "sdxl")  # the engine, once it sees the model is SDXL
    assert (used.data.resolution, used.training.lora_rank, used.training.learning_rate) == (1024, 32, 3e-4)
    everything = build_config(host, str(tmp_path), "x", "Style (defaults)", None, advanced)  # no fill: as given
    assert {"resolution", "lora_rank", "learning_rate"} <= everything.explicit


# --- the second text encoder: SDXL only, on a host that can train it
def test_the_second_text_encoder_fields_show_for_sdxl_on_a_host_that_can_train_it(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingSession, "_active", None)
    keys = [key for key, *_ in ADVANCED]
    assert set(FAMILY_KEYS) <= set(keys) and set(SDXL_ONLY) <= set(keys)
    c = components(tab.create_tab(DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs", base_model="tiny-sdxl")))
    assert (c["lora_trainer_resolution"].value, c["lora_trainer_lora_rank"].value) == (1024, 32)
    assert c["lora_trainer_text_encoder_lr"].value == SDXL["text_encoder_lr"]
    assert "Defaults for SDXL (the base model)" in c["lora_trainer_family_note"].value
    assert all(c[f"lora_trainer_{key}"].visible is not False for key in SDXL_ONLY)
    c = components(tab.create_tab(DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs")))  # tiny-demo
    assert c["lora_trainer_resolution"].value == 512 and "SD 1.x" in c["lora_trainer_family_note"].value
    assert all(c[f"lora_trainer_{key}"].visible is False for key in SDXL_ONLY)
    webui = LoadedModelHost(tmp_path, "sdxl")  # open_clip's second encoder: the host has no trains_text_encoder_2
    c = components(tab.create_tab(webui))
    assert c["lora_trainer_resolution"].value == 1024
    assert all(c[f"lora_trainer_{key}"].visible is False for key in SDXL_ONLY)
    assert set(refresh(webui, family_fill(webui, host_config(webui)), SDXL)[3].values()) == {False}

    wanted = {"train_text_encoder_2": True, "text_encoder_2_lr": 2e-6}
    for host, trains in [(webui, False), (LoadedModelHost(tmp_path, "sdxl", trains_text_encoder_2=True), True),
                         (LoadedModelHost(tmp_path, "sd_v1", trains_text_encoder_2=True), False)]:
        filled = family_fill(host, host_config(host))
        cfg = build_config(host, str(tmp_path), "x", "Style (defaults)", None, wanted, filled)
        assert cfg.training.train_text_encoder_2 is trains, host.family
        assert cfg.training.text_encoder_2_lr == (2e-6 if trains else None)


def test_the_page_load_and_a_new_base_model_refresh_the_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingSession, "_active", None)
    blocks = tab.create_tab(DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs"))
    c = components(blocks)
    note_id, model_id = c["lora_trainer_family_note"]._id, c["lora_trainer_base_model"]._id
    events = []
    for dep in blocks.get_config_file()["dependencies"]:
        if note_id in dep["outputs"]:
            targets = dep.get("targets") or []
            events += [t if isinstance(t, (list, tuple)) else (t, dep.get("trigger")) for t in targets]
            events += [] if targets else [(None, dep.get("trigger"))]  # (gradio 3: a page load has no target)
    kinds = {event for _, event in events}
    assert "load" in kinds and (model_id, "change") in [tuple(e) for e in events] and "click" in kinds
