"""The "Train LoRA" tab: the same Blocks inside the WebUI and in the standalone app.

The tab turns its fields into a config (``config_from_dict``: the same validation as the CLI, with config keys
named by the tab's field labels), runs a ``TrainingSession`` on the host, shows live progress, and offers the
strength sweep. What it shows is formatted in ``views`` (no gradio there); the handlers here are module-level
functions of the host and the field values, so tests call them without a browser.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path

import gradio as gr

from lora_trainer.config import Config, is_text_generation
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui import compat
from lora_trainer.ui.dataset_panel import create_dataset_panel
from lora_trainer.ui.estimate import estimate_message
from lora_trainer.ui.launched_session import LaunchedSession
from lora_trainer.ui.run_config import (
    ADVANCED,
    FAMILY_KEYS,
    FIELD_LABELS,
    NO_LORA,
    PRESETS,
    SDXL_ONLY,
    build_config,
    family_fill,
    family_note,
    field_default,
    host_config,
    refill,
    shows_text_encoder_2,
    tab_message,
)
from lora_trainer.ui.session import TrainingSession, friendly_error
from lora_trainer.ui.views import SWEEP_STEPS, loss_svg, message_html, status_html

log = logging.getLogger(__name__)
PREFIX = "lora_trainer_"
POLL_S = 1.0
DEFAULT_STRENGTHS = "0, 0.25, 0.5, 0.75, 1"

# --- training
def training_view(session: TrainingSession) -> tuple:
    """status, loss plot, samples, Trained LoRA, Stop (clickable only while the run goes)."""
    s = session.status
    samples = [(img, f"step {step}") for step, img in s.samples]
    lora_file = str(s.published) if s.published else gr.update()
    return (status_html(s, FIELD_LABELS), loss_svg(s.losses, s.validation), samples, lora_file,
            gr.update(interactive=s.running))


def run_training(host, data_dir, name, preset, base_model, sample_prompt, sample_every, filled, *values, gpus=1):
    """Start a run and yield the tab's outputs while it goes: ``training_view`` plus the strength sweep's
    gallery and message (cleared when the run starts: the sweep shown was of the previous LoRA), the sweep's
    size (the new LoRA's resolution when it is done) and the LoRA this run made (for Train & generate).
    ``filled``: what the tab filled the family fields with (``refresh_family``), to tell the user's values.
    ``gpus`` > 1 (the standalone app on a machine with several): one process per GPU (ui.launched_session)."""
    keep = gr.update()
    try:
        advanced = {key: v for (key, *_), v in zip(ADVANCED, values)}
        cfg = build_config(host, data_dir, name, preset, base_model if host.chooses_base_model else None, advanced,
                           filled)
        sample = dict(sample_prompt=sample_prompt or "", sample_every=int(sample_every or 0))
        session = (LaunchedSession.start(host, cfg, processes=int(gpus), **sample) if int(gpus or 1) > 1
                   else TrainingSession.start(host, cfg, **sample))
    except LoraTrainerError as e:
        active = TrainingSession.active()  # (after a page reload: Stop still reaches a run that goes on)
        running = active is not None and active.status.running
        yield (message_html(tab_message(e), "error"), keep, keep, keep, gr.update(interactive=running),
               keep, keep, keep, None)
        return
    yield (*training_view(session), [], message_html("the sweep of the new LoRA appears here", "hint"), keep, None)
    while session.status.running:
        time.sleep(POLL_S)
        yield (*training_view(session), keep, keep, keep, None)
    s = session.status
    made = str(s.published) if s.published else None
    yield (*training_view(session), keep, keep, cfg.data.resolution if made else keep, made)


def estimate_memory(host, data_dir, name, preset, base_model, sample_prompt, sample_every, filled, *values) -> str:
    """The pre-flight estimate of the run the fields describe (Train's inputs), as a message: its peak memory against
    what the device has free, the time, and the settings that would fit where these do not."""
    try:
        advanced = {key: v for (key, *_), v in zip(ADVANCED, values)}
        cfg = build_config(host, str(data_dir or "").strip() or "-", name, preset,
                           base_model if host.chooses_base_model else None, advanced, filled)
        text, kind = estimate_message(host, cfg)
    except LoraTrainerError as e:
        return message_html(tab_message(e), "error")
    except Exception as e:  # noqa: BLE001 (an estimate that fails says so; training is not affected)
        log.warning("memory estimate failed:\n%s", traceback.format_exc())
        return message_html(f"No estimate: {type(e).__name__}: {e}", "hint")
    return message_html(text, {"ok": "info"}.get(kind, kind))


def refresh_family(host, base_model, filled, *values) -> tuple:
    """When the model family may have changed (the page loads, a new base model, Train): its defaults into each
    family field (``FAMILY_KEYS``) the user did not change, the SDXL-only fields shown for SDXL, the note that names
    the family. Outputs: the note, the fill, the ``FAMILY_KEYS`` fields, the ``SDXL_ONLY`` fields. An unknown family
    changes nothing."""
    filled = filled or {"family": None, "values": {}}
    family = host.model_family(base_model if host.chooses_base_model else None)
    changes, filled = refill(filled, host_config(host), family, dict(zip(FAMILY_KEYS, values)))
    if family is None:
        return (gr.update(), filled, *[gr.update()] * (len(FAMILY_KEYS) + len(SDXL_ONLY)))
    fields = [gr.update(value=changes[key]) if key in changes else gr.update() for key in FAMILY_KEYS]
    sdxl = [gr.update(visible=shows_text_encoder_2(host, family))] * len(SDXL_ONLY)
    return (message_html(family_note(host, family), "hint"), filled, *fields, *sdxl)


# --- the strength sweep and Send to txt2img
def default_sweep_size(host, base_model: str | None = None) -> int:
    """The last training's resolution, else the model's own size (the host says: 512 for SD 1.x)."""
    last = TrainingSession.active()
    if last is not None and last.status.state in ("done", "stopped") and not is_text_generation(last.cfg):
        return int(last.cfg.data.resolution)
    if host.image_size:
        return int(host.image_size)
    return int(host.native_image_size(base_model or None))


def _sweep_settings(host, strength_text, size, steps, base) -> tuple[list[float], int, int]:
    try:
        values = [float(x) for x in str(strength_text or "").replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise LoraTrainerError(f"'Strengths' must be numbers separated by commas, e.g. {DEFAULT_STRENGTHS}") from None
    if not values:
        raise LoraTrainerError(f"'Strengths' is empty: give one or more, e.g. {DEFAULT_STRENGTHS}")
    size = int(size or 0) or default_sweep_size(host, base)
    if size % 8 or not 64 <= size <= 4096:
        raise LoraTrainerError(f"'Size': {size} must be a multiple of 8 from 64 to 4096 (e.g. 512)")
    steps = int(steps or 0) or SWEEP_STEPS
    if not 1 <= steps <= 150:
        raise LoraTrainerError(f"'Sampling steps': {steps} must be from 1 to 150")
    return values, size, steps


def trained_lora(lora_path) -> Path:
    """The file in 'Trained LoRA' (a LoraTrainerError saying what to do where there is none)."""
    path_text = str(lora_path or "").strip()
    if not path_text:
        raise LoraTrainerError(NO_LORA)
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise LoraTrainerError(f"Trained LoRA: {path} is not a file. {NO_LORA}")
    return path


def sweep_images(host, lora_path, prompt, negative, seed, strength_text, size, steps, base=None) -> tuple:
    """The sweep's gallery and message. Every problem is a message in the tab, not an exception."""
    try:
        path = trained_lora(lora_path)
        values, size, steps = _sweep_settings(host, strength_text, size, steps, base)
        images = host.sweep(path, prompt or "", negative or "", values, int(seed or 0),
                            base_model=base if host.chooses_base_model else None, steps=steps, size=size)
    except LoraTrainerError as e:
        return [], message_html(tab_message(e), "error")
    except Exception as e:  # the tab stays usable; the console has the traceback
        log.exception("the strength sweep failed")
        return [], message_html(tab_message(friendly_error(e)), "error")
    done = (f"{path.stem}: strengths {', '.join(f'{s:g}' for s in values)} at {size}×{size}, {steps} steps, "
            f"seed {int(seed or 0)}")
    return [(img, f"strength {s:g}") for s, img in images], message_html(done, "info")


def merge_checkpoint(host, lora_path, weight, base=None) -> str:
    """Merge into checkpoint: the LoRA in 'Trained LoRA' at ``weight`` merged into the base model's file as a new
    checkpoint (the host says where); a message either way."""
    try:
        path = trained_lora(lora_path)
        weight = float(weight if weight not in (None, "") else 1)
        if not math.isfinite(weight) or weight == 0:
            raise LoraTrainerError(f"'Merge weight': {weight:g} must be a number other than 0 (e.g. 1 or 0.7)")
        out = host.merge_into_model(path, weight, base if host.chooses_base_model else None)
    except LoraTrainerError as e:
        return message_html(tab_message(e), "error")
    except Exception as e:  # the tab stays usable; the console has the traceback
        log.exception("merging into a checkpoint failed")
        return message_html(tab_message(friendly_error(e)), "error")
    return message_html(f"{path.stem} ×{weight:g} merged into a new checkpoint: {out} (refresh the checkpoint list "
                        "to pick it; the LoRA is in it, so prompt without it)", "info")


def sweep_after_training(host, trained, *sweep_args) -> tuple:
    """Train & generate's sweep: of the LoRA this run made, or a note when the run made none."""
    if not trained:
        return [], message_html("no sweep: the training made no LoRA (see its status)", "hint")
    return sweep_images(host, trained, *sweep_args)


def send_update(lora_path, prompt) -> tuple:
    """The prompt Send to txt2img pastes, the button (clickable only with a trained LoRA) and the sweep hint.

    The WebUI's paste binding copies the prompt box into txt2img and switches tabs on click; with an empty box it
    pastes the last generation's parameters instead. So without a LoRA the button cannot be clicked at all.
    """
    path = Path(str(lora_path or "").strip()).expanduser()
    if not str(lora_path or "").strip() or not path.is_file():
        return "", gr.update(interactive=False), message_html(NO_LORA, "hint")
    lora = f"<lora:{path.stem}:0.7>"
    return (f"{prompt}, {lora}" if prompt else lora), gr.update(interactive=True), ""


# --- the layout
def _advanced_fields(host, defaults: Config, fill: dict) -> dict:
    made = {}

    def value(key):
        return fill["values"][key] if key in fill["values"] else field_default(key, defaults)

    def visible(key):
        return key not in SDXL_ONLY or shows_text_encoder_2(host, fill["family"])

    with gr.Accordion("Advanced", open=False, elem_id=f"{PREFIX}advanced"):
        with gr.Row():
            for key, label, kind, extra in ADVANCED:
                elem = f"{PREFIX}{key}"
                if kind == "choice":
                    made[key] = gr.Dropdown(label=label, choices=extra, value=value(key), elem_id=elem)
                elif kind == "text":
                    made[key] = gr.Textbox(label=label, value=value(key), elem_id=elem)
                elif kind == "number":
                    made[key] = gr.Number(label=label, value=value(key), visible=visible(key), elem_id=elem)
        with gr.Row():  # checkboxes on their own row, so their labels are not squeezed
            for key, label, kind, _ in ADVANCED:
                if kind == "bool":
                    made[key] = gr.Checkbox(label=label, value=value(key), visible=visible(key),
                                            elem_id=f"{PREFIX}{key}")
    return made


def host_gpus(host) -> int:
    """How many GPUs the tab may train on at once: the standalone app's count (``gpu_count``); 1 in the WebUI, which
    trains its own loaded model in its own process."""
    return max(1, int(getattr(host, "gpu_count", lambda: 1)()))


def _training_panel(host, defaults: Config, fill: dict) -> dict:
    ui = {}
    ui["data_dir"] = gr.Textbox(label="Dataset folder", placeholder="/path/to/images (captions in metadata.csv "
                                "or .txt files)", elem_id=f"{PREFIX}data_dir")
    with gr.Row():
        ui["name"] = gr.Textbox(label="LoRA name", value="my_lora", elem_id=f"{PREFIX}name")
        ui["preset"] = gr.Dropdown(label="Preset", choices=list(PRESETS), value=next(iter(PRESETS)),
                                   elem_id=f"{PREFIX}preset")
    ui["base_model"] = gr.Textbox(label="Base model (diffusers folder, .safetensors, or tiny-demo)",
                                  value=defaults.model.base_model, visible=host.chooses_base_model,
                                  elem_id=f"{PREFIX}base_model")
    note = family_note(host, fill["family"])
    ui["family_note"] = gr.HTML(message_html(note, "hint") if note else "", elem_id=f"{PREFIX}family_note")
    ui["filled"] = gr.State(fill)  # what the family fields were filled with: a field still showing it is a default
    ui["advanced"] = _advanced_fields(host, defaults, fill)
    with gr.Row():
        ui["sample_prompt"] = gr.Textbox(label="Sample prompt (empty = no samples)", elem_id=f"{PREFIX}sample_prompt")
        ui["sample_every"] = gr.Number(label="Sample every N steps", value=50, elem_id=f"{PREFIX}sample_every")
    gpus = host_gpus(host)
    ui["gpus"] = gr.Slider(1, max(gpus, 2), value=1, step=1, visible=gpus > 1, elem_id=f"{PREFIX}gpus",
                           label=f"GPUs ({gpus} here): more than 1 trains in one process per GPU, batch size per "
                                 "GPU")
    with gr.Row():
        ui["train"] = gr.Button("Train", variant="primary", elem_id=f"{PREFIX}train")
        ui["train_generate"] = gr.Button("Train & generate", elem_id=f"{PREFIX}train_generate")
        ui["stop"] = gr.Button("Stop", variant="stop", interactive=False, elem_id=f"{PREFIX}stop")
        ui["estimate"] = gr.Button("Estimate memory", elem_id=f"{PREFIX}estimate")
    ui["estimate_out"] = gr.HTML("", elem_id=f"{PREFIX}estimate_out")
    return ui


def _sweep_panel(host) -> dict:
    ui = {}
    with compat.group():
        with gr.Row():
            ui["prompt"] = gr.Textbox(label="Sweep prompt", scale=3, elem_id=f"{PREFIX}sweep_prompt")
            ui["negative"] = gr.Textbox(label="Negative prompt", scale=2, elem_id=f"{PREFIX}sweep_negative")
        with gr.Row():
            ui["strengths"] = gr.Textbox(label="Strengths", value=DEFAULT_STRENGTHS, elem_id=f"{PREFIX}strengths")
            ui["seed"] = gr.Number(label="Seed", value=1, elem_id=f"{PREFIX}sweep_seed")
            # the last training's resolution, else the model's own; a finished training sets it to its resolution
            ui["size"] = gr.Number(label="Size (px, square)", value=default_sweep_size(host),
                                   elem_id=f"{PREFIX}sweep_size")
            ui["steps"] = gr.Number(label="Sampling steps", value=SWEEP_STEPS, elem_id=f"{PREFIX}sweep_steps")
        with gr.Row():
            ui["sweep"] = gr.Button("Strength sweep", elem_id=f"{PREFIX}sweep")
            ui["send"] = gr.Button("Send to txt2img", interactive=False, visible=host.sends_to_txt2img,
                                   elem_id=f"{PREFIX}send_txt2img")
        ui["status"] = gr.HTML(message_html(NO_LORA, "hint"), elem_id=f"{PREFIX}sweep_status")
        ui["gallery"] = compat.gallery("Strength sweep", f"{PREFIX}sweep_gallery", columns=5)
        ui["send_prompt"] = gr.Textbox(visible=False, elem_id=f"{PREFIX}send_prompt")
    return ui


def _merge_panel() -> dict:
    ui = {}
    with gr.Row():
        ui["weight"] = gr.Number(label="Merge weight", value=1.0, elem_id=f"{PREFIX}merge_weight")
        ui["button"] = gr.Button("Merge into checkpoint", elem_id=f"{PREFIX}merge")
    ui["status"] = gr.HTML("", elem_id=f"{PREFIX}merge_status")
    return ui


def create_tab(host) -> gr.Blocks:
    """The tab's Blocks for ``host`` (the WebUI's or the standalone app's)."""
    defaults = host_config(host)
    fill = family_fill(host, defaults, defaults.model.base_model)
    with gr.Blocks(analytics_enabled=False) as tab, gr.Column(elem_id=f"{PREFIX}root"):
        with gr.Row():
            with gr.Column(scale=3):
                t = _training_panel(host, defaults, fill)
            with gr.Column(scale=2):
                status = gr.HTML(elem_id=f"{PREFIX}status")
                loss = gr.HTML(loss_svg([]), elem_id=f"{PREFIX}loss")
                samples = compat.gallery("Samples during training", f"{PREFIX}samples", columns=4)
                lora_file = gr.Textbox(label="Trained LoRA", interactive=True, elem_id=f"{PREFIX}lora_file")
                merge = _merge_panel()
        create_dataset_panel(host, t["data_dir"], t["advanced"])
        sw = _sweep_panel(host)
        trained = gr.State(None)  # the LoRA the last run of this page made (None: it made none)
        _wire(host, t, sw, [status, loss, samples, lora_file], trained)
        merge["button"].click(lambda *args: merge_checkpoint(host, *args),
                              inputs=[lora_file, merge["weight"], t["base_model"]], outputs=[merge["status"]])
        _wire_family(host, tab, t)
        tab.lora_trainer_send = (sw["send"], sw["send_prompt"])  # the WebUI glue binds these to txt2img
    return tab


def _wire(host, t: dict, sw: dict, shown: list, trained) -> None:
    fields = [t["advanced"][key] for key, *_ in ADVANCED]
    train_inputs = [t["data_dir"], t["name"], t["preset"], t["base_model"], t["sample_prompt"], t["sample_every"],
                    t["filled"], *fields]
    outputs = [*shown, t["stop"], sw["gallery"], sw["status"], sw["size"], trained]
    sweep_inputs = [sw["prompt"], sw["negative"], sw["seed"], sw["strengths"], sw["size"], sw["steps"], t["base_model"]]
    lora_file = shown[3]

    def train(gpus, *args):
        yield from run_training(host, *args, gpus=gpus)

    def sweep(*args):
        return sweep_images(host, *args)

    def sweep_after(*args):
        return sweep_after_training(host, *args)

    def refresh(*args):
        return refresh_family(host, *args)

    family = _family_io(t)
    # the family fields first (the WebUI may have loaded another model since the page loaded), then the run
    t["train"].click(refresh, **family).then(train, inputs=[t["gpus"], *train_inputs], outputs=outputs)
    t["train_generate"].click(refresh, **family).then(train, inputs=[t["gpus"], *train_inputs], outputs=outputs).then(
        sweep_after, inputs=[trained, *sweep_inputs], outputs=[sw["gallery"], sw["status"]])
    t["stop"].click(TrainingSession.stop_active, inputs=[], outputs=[])

    def estimate(*args):
        return estimate_memory(host, *args)

    t["estimate"].click(refresh, **family).then(estimate, inputs=train_inputs, outputs=[t["estimate_out"]])
    sw["sweep"].click(sweep, inputs=[lora_file, *sweep_inputs], outputs=[sw["gallery"], sw["status"]])
    # kept current, so that the WebUI's paste binding on the button reads the right prompt when clicked
    for source in (lora_file, sw["prompt"]):
        source.change(send_update, inputs=[lora_file, sw["prompt"]],
                      outputs=[sw["send_prompt"], sw["send"], sw["status"]])


def _family_io(t: dict) -> dict:
    """refresh_family's inputs and outputs."""
    fields = [t["advanced"][key] for key in FAMILY_KEYS]
    return {"inputs": [t["base_model"], t["filled"], *fields],
            "outputs": [t["family_note"], t["filled"], *fields, *(t["advanced"][key] for key in SDXL_ONLY)]}


def _wire_family(host, tab, t: dict) -> None:
    """The model family's defaults into the fields when the page loads (the WebUI may have loaded its model after
    the tab was built) and when the base model changes (the standalone app)."""
    def refresh(*args):
        return refresh_family(host, *args)

    tab.load(refresh, **_family_io(t))
    if host.chooses_base_model:
        t["base_model"].change(refresh, **_family_io(t))
