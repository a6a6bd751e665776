"""The standalone app's language-model mode (model.task_type: text-generation) without a browser: the fields into a
config, a run through the panel's own handler with progress, loss and Stop, "Try the adapter", the Task switch; on
the tiny random LLaMA of lora_trainer.llm.tiny (no download)."""

from __future__ import annotations

import json
import time

import pytest

from lora_trainer.llm.outputs import is_adapter
from lora_trainer.llm.tiny import make_tiny_llama
from lora_trainer.ui.llm_run_config import LLM_KEYS, build_llm_config, field_start, llm_message
from lora_trainer.ui.session import TrainingSession

gr = pytest.importorskip("gradio")
panel = pytest.importorskip("lora_trainer.ui.llm_panel")
COLORS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("night", "black")]
WORDS = "what is the color of sky grass blue green snow white night black".split()
# what memorises the four rows on the tiny model (as tests/test_llm.py's training)
MEMORISE = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 1e-2, "batch_size": 4,
            "epochs": 30, "save_steps": 0}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama", WORDS)


@pytest.fixture
def host(tmp_path, monkeypatch):
    from lora_trainer.ui.standalone_host import DiffusersHost

    monkeypatch.setattr(TrainingSession, "_active", None)
    monkeypatch.setattr(panel, "POLL_S", 0.05)
    return DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs")


def rows_file(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "colors.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is the color of {t}", "completion": c}) + "\n"
                            for t, c in COLORS), encoding="utf-8")
    return path


def field_values(**changed) -> list:
    return [changed.get(key, field_start(key)) for key in LLM_KEYS]


def wait_for(session, timeout=120):
    status = session.wait(timeout)
    assert not status.running, "the run did not end"
    return status


# --- the fields → the config
def test_the_fields_build_a_text_generation_config(host, base, tmp_path):
    data = rows_file(tmp_path / "data")
    values = dict(zip(LLM_KEYS, field_values()))
    cfg = build_llm_config(host, str(base), str(data), "colors", values)
    assert cfg.model.task_type == "text-generation" and cfg.model.base_model == str(base)
    assert (cfg.data.metadata_path, cfg.output.output_dir) == (str(data), str(tmp_path / "runs" / "colors"))
    assert (cfg.training.lora_rank, cfg.training.lora_alpha, cfg.training.epochs) == (16, 32.0, 3)
    assert cfg.training.resume_from_checkpoint is None  # (the Continue box: "latest" when ticked)
    assert build_llm_config(host, str(base), str(data), "colors", {**values, "resume_from_checkpoint": True}
                            ).training.resume_from_checkpoint == "latest"
    # empty fields are the config's own (by architecture, 5% held out from 40 rows on, the epochs count)
    assert not {"target_modules", "validation_split", "max_train_steps"} & cfg.explicit
    cfg = build_llm_config(host, str(base), str(data.parent), "colors",
                           {**values, "target_modules": "q_proj, v_proj", "validation_split": " 0.25 ",
                            "max_train_steps": 7, "quantize_base": "no"})
    assert cfg.data.train_data_dir == str(data.parent) and not cfg.data.metadata_path
    assert (cfg.training.target_modules, cfg.data.validation_split, cfg.training.max_train_steps) == (
        ["q_proj", "v_proj"], 0.25, 7)


@pytest.mark.parametrize("base_model, data, name, changed, words", [
    ("", "DATA", "x", {}, ["Base model: choose a local Hugging Face causal-LM folder"]),
    ("BASE", "", "x", {}, ["Data: choose the training rows", ".jsonl"]),
    ("BASE", "nowhere.jsonl", "x", {}, ["Data:", "nowhere.jsonl does not exist"]),
    ("BASE", "DATA", "a/b", {}, ["Adapter name: 'a/b' contains '/'"]),
    ("BASE", "DATA", "x", {"max_seq_length": 4}, ["Max tokens per row: 4 is out of range"]),
    ("BASE", "DATA", "x", {"quantize_base": "3bit"}, ["Quantized base: '3bit' is not one of"]),
    ("BASE", "DATA", "x", {"validation_split": "a tenth"}, ["Held-out share: expected a number", "'a tenth'"]),
])
def test_a_bad_field_is_named_by_its_label(host, base, tmp_path, base_model, data, name, changed, words):
    data = {"DATA": str(rows_file(tmp_path / "data"))}.get(data, str(tmp_path / data) if data else "")
    base_model = {"BASE": str(base)}.get(base_model, base_model)
    updates = list(panel.run_llm_training(host, base_model, data, name, *field_values(**changed)))
    status, loss, adapter, stop = updates[-1]
    assert len(updates) == 1 and stop["interactive"] is False
    assert all(w in status for w in words), status
    assert "data." not in status and "training." not in status and "model." not in status
    assert not (tmp_path / "runs").exists()


def test_a_folder_that_is_no_model_is_named_after_the_run_starts(host, tmp_path):
    data = rows_file(tmp_path / "data")
    updates = list(panel.run_llm_training(host, str(tmp_path), str(data), "x", *field_values()))
    status, *_, stop = updates[-1]
    assert "Base model:" in status and "is not a Hugging Face model folder" in status and "model.base_model" not in (
        status)
    assert stop["interactive"] is False


# --- a run, and the adapter tried
def test_a_run_through_the_panel_shows_progress_and_its_adapter_answers(host, base, tmp_path):
    data = rows_file(tmp_path / "data")
    updates = list(panel.run_llm_training(host, str(base), str(data), "colors", *field_values(**MEMORISE)))
    assert updates[0][3]["interactive"] is True  # Stop, while it runs
    status, loss, adapter, stop = updates[-1]
    assert stop["interactive"] is False
    assert "Finished after 30/30 steps: adapter colors" in status and "4 rows trained" in status, status
    assert "<svg" in loss and ">colors</span>" in status  # (the run folder's name)
    assert adapter == str(tmp_path / "runs" / "colors" / "colors") and is_adapter(adapter)

    for thing, color in COLORS:
        text, message = panel.generate_text(host, adapter, f"what is the color of {thing}", 2, False, False, 1)
        assert text.split() == [color], message
    assert "colors: 2 new tokens (greedy)" in message
    text, message = panel.generate_text(host, str(tmp_path / "runs" / "colors"), "what is the color of snow", 3,
                                        True, False, 5)  # (a run folder finds its adapter; sampled)
    assert "sampled, seed 5" in message and "error" not in message
    from lora_trainer.ui import llm_try

    assert llm_try._loaded  # (kept for the next try) ...
    again = list(panel.run_llm_training(host, str(base), str(data), "again", *field_values(max_train_steps=1)))
    assert "Finished after 1/1 steps" in again[-1][0] and not llm_try._loaded  # ...and let go when a run starts
    for adapter_text, prompt, n, words in [
        ("", "sky", 2, "Adapter: train one first"),
        (str(tmp_path), "sky", 2, "Adapter:"),
        (adapter, "  ", 2, "Prompt: write the text"),
        (adapter, "sky", 0, "Max new tokens: 0 must be from 1"),
    ]:
        text, message = panel.generate_text(host, adapter_text, prompt, n, False, False, 1)
        assert text == "" and words in message and "lora_trainer_error" in message, message


def test_stop_keeps_what_was_trained_and_one_run_goes_at_a_time_across_both_tasks(host, base, tmp_path):
    from lora_trainer.errors import LoraTrainerError
    from lora_trainer.ui.llm_session import LlmTrainingSession

    data = rows_file(tmp_path / "data")
    cfg = build_llm_config(host, str(base), str(data), "long", dict(zip(LLM_KEYS, field_values(
        **{**MEMORISE, "epochs": 100000}))))
    session = LlmTrainingSession.start(host, cfg)
    deadline = time.time() + 120
    while session.status.step < 1 and session.status.running and time.time() < deadline:
        time.sleep(0.05)
    assert session.status.state == "training", session.status.message
    with pytest.raises(LoraTrainerError, match="already running"):
        TrainingSession.start(host, cfg)  # (an image run: the same one slot)
    text, message = panel.generate_text(host, str(tmp_path), "sky", 2, False, False, 1)
    assert "a training is running" in message
    TrainingSession.stop_active()
    status = wait_for(session)
    assert status.state == "stopped" and status.message.startswith("Stopped after "), status.message
    assert is_adapter(status.published) and (status.run_dir / "checkpoints").is_dir()


# --- the app: the Task choice switches modes; the WebUI's tab stays image-only
def components(blocks) -> dict:
    return {getattr(b, "elem_id", None): b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_the_app_has_both_modes_and_the_task_choice_switches_them(host):
    from lora_trainer.ui import tab
    from lora_trainer.ui.app import TASKS, build_app, task_visibility

    c = components(build_app(host))
    assert c["lora_trainer_image_mode"].visible is True and c["lora_trainer_llm_mode"].visible is False
    assert {"lora_trainer_llm_base_model", "lora_trainer_llm_data", "lora_trainer_llm_train", "lora_trainer_llm_stop",
            "lora_trainer_llm_prompt", "lora_trainer_llm_generate", "lora_trainer_train"} <= set(c)
    assert c["lora_trainer_llm_stop"].interactive is False
    assert c["lora_trainer_task"].value == next(iter(TASKS))
    image, llm = task_visibility("Language model LoRA (text-generation)")
    assert (image["visible"], llm["visible"]) == (False, True)
    image, llm = task_visibility("Image LoRA (text-to-image)")
    assert (image["visible"], llm["visible"]) == (True, False)
    assert not [k for k in components(tab.create_tab(host)) if k.startswith("lora_trainer_llm_")]


def test_the_message_names_fields_not_keys():
    assert llm_message("Language model LoRA: data.max_seq_length: 4 is out of range: must be >= 8").startswith(
        "Max tokens per row")
    assert llm_message("model.base_model: /x is not a Hugging Face model folder").startswith("Base model: /x")
