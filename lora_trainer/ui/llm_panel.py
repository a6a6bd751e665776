"""The standalone app's language-model mode (``model.task_type: text-generation``): base model folder, data, the main
training keys, Train with progress and loss, Stop, and "Try the adapter". The WebUI's tab stays image-only.

The handlers are module-level functions of the host and the field values (as in ``ui.tab``), so tests call them
without a browser; what they build and show lives in ``llm_run_config``, ``llm_session``, ``llm_try`` and ``views``.
"""

from __future__ import annotations

import logging
import time

import gradio as gr

from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui import compat
from lora_trainer.ui.llm_run_config import (
    DATA_KINDS,
    LLM_FIELDS,
    LLM_KEYS,
    LLM_LABELS,
    build_llm_config,
    field_start,
    llm_message,
)
from lora_trainer.ui.llm_session import LlmTrainingSession
from lora_trainer.ui.llm_try import try_adapter
from lora_trainer.ui.session import TrainingSession, friendly_error
from lora_trainer.ui.views import loss_svg, message_html, status_html

log = logging.getLogger(__name__)
PREFIX = "lora_trainer_llm_"
POLL_S = 1.0
NO_ADAPTER = "Train an adapter first, or put the path of an adapter folder (or of a run folder) in 'Adapter'."


def llm_training_view(session: TrainingSession) -> tuple:
    """status, loss plot (eval loss as the dashed series), Adapter, Stop (clickable only while the run goes)."""
    s = session.status
    adapter = str(s.published) if s.published else gr.update()
    return (status_html(s, LLM_LABELS), loss_svg(s.losses, s.validation), adapter, gr.update(interactive=s.running))


def run_llm_training(host, base_model, data_path, name, *values):
    """Start a run and yield ``llm_training_view`` while it goes; a bad field is a message naming it."""
    keep = gr.update()
    try:
        cfg = build_llm_config(host, base_model, data_path, name, dict(zip(LLM_KEYS, values)))
        session = LlmTrainingSession.start(host, cfg)
    except LoraTrainerError as e:
        active = TrainingSession.active()  # (Stop still reaches a run that goes on)
        yield (message_html(llm_message(e), "error"), keep, keep,
               gr.update(interactive=active is not None and active.status.running))
        return
    yield llm_training_view(session)
    while session.status.running:
        time.sleep(POLL_S)
        yield llm_training_view(session)
    yield llm_training_view(session)


def generate_text(host, adapter, prompt, max_new_tokens, sample, chat, seed) -> tuple[str, str]:
    """Try the adapter: (the generated text, a message). Every problem is a message, not an exception."""
    try:
        text, line = try_adapter(host, adapter, prompt, max_new_tokens, sample, chat, seed)
    except LoraTrainerError as e:
        return "", message_html(str(e), "error")
    except Exception as e:  # the app stays usable; the console has the traceback
        log.exception("generating from the adapter failed")
        return "", message_html(friendly_error(e), "error")
    return text, message_html(line, "info")


def _settings_fields() -> dict:
    made = {}
    with gr.Accordion("Settings", open=True, elem_id=f"{PREFIX}settings"):
        with gr.Row():
            for key, label, kind, extra in LLM_FIELDS:
                elem = f"{PREFIX}{key}"
                if kind == "choice":
                    made[key] = gr.Dropdown(label=label, choices=extra, value=field_start(key), elem_id=elem)
                elif kind == "text":
                    made[key] = gr.Textbox(label=label, value=field_start(key), elem_id=elem)
                elif kind == "number":
                    made[key] = gr.Number(label=label, value=field_start(key), elem_id=elem)
        with gr.Row():
            for key, label, kind, _ in LLM_FIELDS:
                if kind == "bool":
                    made[key] = gr.Checkbox(label=label, value=field_start(key), elem_id=f"{PREFIX}{key}")
    return made


def create_llm_panel(host) -> dict:
    """The mode's components, made in the current Blocks context; returns them by name."""
    ui = {}
    with gr.Row():
        with gr.Column(scale=3):
            ui["base_model"] = gr.Textbox(label="Base model (a local Hugging Face causal-LM folder)",
                                          placeholder="/path/to/model (config.json, tokenizer, *.safetensors)",
                                          elem_id=f"{PREFIX}base_model")
            ui["data"] = gr.Textbox(label="Data", placeholder=f"/path/to/rows.jsonl: {DATA_KINDS}",
                                    elem_id=f"{PREFIX}data")
            ui["name"] = gr.Textbox(label="Adapter name", value="my_llm_lora", elem_id=f"{PREFIX}name")
            ui["fields"] = _settings_fields()
            with gr.Row():
                ui["train"] = gr.Button("Train", variant="primary", elem_id=f"{PREFIX}train")
                ui["stop"] = gr.Button("Stop", variant="stop", interactive=False, elem_id=f"{PREFIX}stop")
        with gr.Column(scale=2):
            ui["status"] = gr.HTML(elem_id=f"{PREFIX}status")
            ui["loss"] = gr.HTML(loss_svg([]), elem_id=f"{PREFIX}loss")
            ui["adapter"] = gr.Textbox(label="Adapter", interactive=True, elem_id=f"{PREFIX}adapter")
    with compat.group():
        ui["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{PREFIX}prompt")
        with gr.Row():
            ui["max_new_tokens"] = gr.Number(label="Max new tokens", value=128, elem_id=f"{PREFIX}max_new_tokens")
            ui["sample"] = gr.Checkbox(label="Sample (else greedy)", value=False, elem_id=f"{PREFIX}sample")
            ui["chat"] = gr.Checkbox(label="As a chat turn (the tokenizer's chat template)", value=False,
                                     elem_id=f"{PREFIX}chat")
            ui["seed"] = gr.Number(label="Seed", value=1, elem_id=f"{PREFIX}try_seed")
        ui["generate"] = gr.Button("Try the adapter", elem_id=f"{PREFIX}generate")
        ui["try_status"] = gr.HTML(message_html(NO_ADAPTER, "hint"), elem_id=f"{PREFIX}try_status")
        ui["output"] = gr.Textbox(label="Generated", lines=6, interactive=False, elem_id=f"{PREFIX}output")
    _wire(host, ui)
    return ui


def _wire(host, ui: dict) -> None:
    def train(*args):
        yield from run_llm_training(host, *args)

    def try_it(*args):
        return generate_text(host, *args)

    fields = [ui["fields"][key] for key in LLM_KEYS]
    ui["train"].click(train, inputs=[ui["base_model"], ui["data"], ui["name"], *fields],
                      outputs=[ui["status"], ui["loss"], ui["adapter"], ui["stop"]])
    ui["stop"].click(TrainingSession.stop_active, inputs=[], outputs=[])
    ui["generate"].click(try_it, inputs=[ui["adapter"], ui["prompt"], ui["max_new_tokens"], ui["sample"], ui["chat"],
                                         ui["seed"]],
                         outputs=[ui["output"], ui["try_status"]])
