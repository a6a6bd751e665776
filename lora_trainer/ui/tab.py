"""The "Train LoRA" tab: the same Blocks inside the WebUI and in the standalone app.

The tab turns its fields into a config (``config_from_dict``: the same validation and messages as the
CLI), runs a ``TrainingSession`` on the host, shows live progress, and offers the strength sweep.
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path

import gradio as gr

from lora_trainer.config import CHOICES, Config, config_from_dict
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui import compat
from lora_trainer.ui.dataset_panel import create_dataset_panel
from lora_trainer.ui.session import TrainingSession, format_status

log = logging.getLogger(__name__)
PREFIX = "lora_trainer_"
POLL_S = 1.0
DEFAULT_STRENGTHS = "0, 0.25, 0.5, 0.75, 1"

PRESETS = {
    "Style (defaults)": {},
    "Character / object": {"lora_rank": 16, "lora_alpha": 16, "train_text_encoder": True},
    "Quick test (100 steps)": {"max_train_steps": 100, "save_steps": 0},
}
# the advanced fields: (config key, label, kind, extra)
ADVANCED = [
    ("lora_rank", "Rank", "number", None), ("lora_alpha", "Alpha", "number", None),
    ("lora_dropout", "Dropout", "number", None), ("learning_rate", "Learning rate", "number", None),
    ("batch_size", "Batch size", "number", None), ("gradient_accumulation_steps", "Gradient accumulation", "number", None),
    ("epochs", "Epochs", "number", None), ("max_train_steps", "Max steps (0 = use epochs)", "number", None),
    ("resolution", "Resolution", "number", None), ("lr_scheduler", "LR scheduler", "choice",
                                                   ["constant", "constant_with_warmup", "cosine", "linear"]),
    ("lr_warmup_steps", "Warmup steps", "number", None), ("mixed_precision", "Mixed precision", "choice",
                                                          list(CHOICES["mixed_precision"])),
    ("gradient_checkpointing", "Gradient checkpointing (less memory)", "bool", None),
    ("attention", "Attention kernel while training (auto = PyTorch SDPA)", "choice", list(CHOICES["attention"])),
    ("compile_unet", "Compile the UNet (torch.compile: faster steps after a first one of minutes)", "bool", None),
    ("cache_latents_to_disk", "Keep encoded images on disk (the next run of this name skips encoding)", "bool", None),
    ("train_text_encoder", "Train the text encoder", "bool", None), ("caption_prefix", "Trigger word prefix", "text", None),
    ("min_snr_gamma", "Min-SNR gamma (0 = off)", "number", None), ("noise_offset", "Noise offset", "number", None),
    ("seed", "Seed", "number", None), ("save_steps", "Checkpoint every N steps (0 = off)", "number", None),
]
ZERO_IS_NONE = {"max_train_steps", "min_snr_gamma"}


def _default(key: str, cfg: Config):
    for section in (cfg.data, cfg.model, cfg.training, cfg.output):
        if hasattr(section, key):
            value = getattr(section, key)
            return 0 if value is None and key in ZERO_IS_NONE else value
    raise KeyError(key)


def build_config(host, data_dir: str, name: str, preset: str, base_model: str | None, advanced: dict) -> Config:
    """The tab's fields → a validated Config (errors name the field as the CLI would)."""
    if not str(data_dir).strip():
        raise LoraTrainerError("choose the dataset folder (a folder of images with captions)")
    name = (name or "").strip()
    if not name:
        raise LoraTrainerError("give the LoRA a name (it becomes <lora:name:0.7>)")
    settings = dict(host.defaults()) if hasattr(host, "defaults") else {}
    settings.update(PRESETS.get(preset, {}))
    for key, value in advanced.items():  # gr.Number gives floats; the config takes 8.0 for an int field
        settings[key] = None if key in ZERO_IS_NONE and not value else value
    settings.update(train_data_dir=str(data_dir).strip(), output_name=name,
                    output_dir=str(Path(host.run_root) / name))
    if base_model:
        settings["base_model"] = base_model.strip()
    return config_from_dict(settings, source="Train LoRA tab")


def _loss_svg(losses: list[tuple[int, float]], width: int = 480, height: int = 160) -> str:
    """The loss curve as inline SVG (no plotting library, same in every gradio version)."""
    if len(losses) < 2:
        return f"<div class='{PREFIX}loss_empty'>the loss curve appears here</div>"
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pts = " ".join(f"{(s - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 10) + 5:.1f},"
                   f"{height - 5 - (v - lo) / span * (height - 20):.1f}" for s, v in losses)
    return (f"<svg class='{PREFIX}loss' viewBox='0 0 {width} {height}' width='100%' height='{height}'>"
            f"<polyline fill='none' stroke='currentColor' stroke-width='1.5' points='{pts}'/>"
            f"<text x='5' y='12' font-size='11' fill='currentColor'>loss {values[0]:.3f} → {values[-1]:.3f}</text></svg>")


def _view(session: TrainingSession | None):
    if session is None:
        return "", _loss_svg([]), [], ""
    s = session.status
    css = {"error": "error", "done": "done", "stopped": "done"}.get(s.state, "running")
    status = f"<div class='{PREFIX}status {PREFIX}{css}'>{html.escape(format_status(s))}</div>"
    samples = [(img, f"step {step}") for step, img in s.samples]
    return status, _loss_svg(s.losses), samples, str(s.published or "")


def create_tab(host) -> gr.Blocks:
    """The tab's Blocks for ``host`` (the WebUI's or the standalone app's)."""
    defaults = config_from_dict({"train_data_dir": "-", **(host.defaults() if hasattr(host, "defaults") else {})})
    with gr.Blocks(analytics_enabled=False) as tab, gr.Column(elem_id=f"{PREFIX}root"):
        with gr.Row():
            with gr.Column(scale=3):
                data_dir = gr.Textbox(label="Dataset folder", placeholder="/path/to/images (captions in metadata.csv "
                                      "or .txt files)", elem_id=f"{PREFIX}data_dir")
                with gr.Row():
                    name = gr.Textbox(label="LoRA name", value="my_lora", elem_id=f"{PREFIX}name")
                    preset = gr.Dropdown(label="Preset", choices=list(PRESETS), value=next(iter(PRESETS)),
                                         elem_id=f"{PREFIX}preset")
                base_model = gr.Textbox(label="Base model (diffusers folder, .safetensors, or tiny-demo)",
                                        value=defaults.model.base_model, visible=host.name == "standalone",
                                        elem_id=f"{PREFIX}base_model")
                with gr.Accordion("Advanced", open=False, elem_id=f"{PREFIX}advanced"):
                    made = {}
                    with gr.Row():
                        for key, label, kind, extra in ADVANCED:
                            value, elem = _default(key, defaults), f"{PREFIX}{key}"
                            if kind == "choice":
                                made[key] = gr.Dropdown(label=label, choices=extra, value=value, elem_id=elem)
                            elif kind == "text":
                                made[key] = gr.Textbox(label=label, value=value, elem_id=elem)
                            elif kind == "number":
                                made[key] = gr.Number(label=label, value=value, elem_id=elem)
                    with gr.Row():  # checkboxes on their own row, so their labels are not squeezed
                        for key, label, kind, _ in ADVANCED:
                            if kind == "bool":
                                made[key] = gr.Checkbox(label=label, value=_default(key, defaults),
                                                        elem_id=f"{PREFIX}{key}")
                    fields = [made[key] for key, *_ in ADVANCED]
                with gr.Row():
                    sample_prompt = gr.Textbox(label="Sample prompt (empty = no samples)", elem_id=f"{PREFIX}sample_prompt")
                    sample_every = gr.Number(label="Sample every N steps", value=50, elem_id=f"{PREFIX}sample_every")
                with gr.Row():
                    train_btn = gr.Button("Train", variant="primary", elem_id=f"{PREFIX}train")
                    train_gen_btn = gr.Button("Train & generate", elem_id=f"{PREFIX}train_generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id=f"{PREFIX}stop")
            with gr.Column(scale=2):
                status = gr.HTML(elem_id=f"{PREFIX}status")
                loss = gr.HTML(_loss_svg([]), elem_id=f"{PREFIX}loss")
                samples = compat.gallery("Samples during training", f"{PREFIX}samples", columns=4)
                lora_file = gr.Textbox(label="Trained LoRA", interactive=True, elem_id=f"{PREFIX}lora_file")
        create_dataset_panel(host, data_dir, made["caption_prefix"], made["resolution"])
        with compat.group():
            with gr.Row():
                sweep_prompt = gr.Textbox(label="Sweep prompt", elem_id=f"{PREFIX}sweep_prompt")
                sweep_negative = gr.Textbox(label="Negative prompt", elem_id=f"{PREFIX}sweep_negative")
                sweep_seed = gr.Number(label="Seed", value=1, elem_id=f"{PREFIX}sweep_seed")
                strengths = gr.Textbox(label="Strengths", value=DEFAULT_STRENGTHS, elem_id=f"{PREFIX}strengths")
            with gr.Row():
                sweep_btn = gr.Button("Strength sweep", elem_id=f"{PREFIX}sweep")
                send_btn = gr.Button("Send to txt2img", elem_id=f"{PREFIX}send_txt2img", visible=host.name != "standalone")
            sweep_gallery = compat.gallery("Strength sweep", f"{PREFIX}sweep_gallery", columns=5)
            send_prompt = gr.Textbox(visible=False, elem_id=f"{PREFIX}send_prompt")

        train_inputs = [data_dir, name, preset, base_model, sample_prompt, sample_every, *fields]
        outputs = [status, loss, samples, lora_file]

        def run_training(data_dir, name, preset, base_model, sample_prompt, sample_every, *values):
            try:
                advanced = {key: v for (key, *_), v in zip(ADVANCED, values)}
                cfg = build_config(host, data_dir, name, preset, base_model if host.name == "standalone" else None,
                                   advanced)
                session = TrainingSession.start(host, cfg, sample_prompt=sample_prompt or "",
                                                sample_every=int(sample_every or 0))
            except LoraTrainerError as e:
                yield f"<div class='{PREFIX}status {PREFIX}error'>{html.escape(str(e))}</div>", _loss_svg([]), [], ""
                return
            while session.status.running:
                yield _view(session)
                time.sleep(POLL_S)
            yield _view(session)

        def stop():
            session = TrainingSession.active()
            if session is not None:
                session.stop()

        def run_sweep(lora_path, prompt, negative, seed, strength_text, base):
            if not lora_path or not Path(lora_path).is_file():
                raise gr.Error("train a LoRA first (or put the path of a .safetensors LoRA in 'Trained LoRA')")
            try:
                values = [float(x) for x in strength_text.replace(";", ",").split(",") if x.strip()]
            except ValueError:
                raise gr.Error(f"strengths must be numbers separated by commas, e.g. {DEFAULT_STRENGTHS}") from None
            images = host.sweep(Path(lora_path), prompt or "", negative or "", values, int(seed or 0),
                                base_model=base if host.name == "standalone" else None)
            return [(img, f"strength {s:g}") for s, img in images]

        def send_to_txt2img(lora_path, prompt):
            lora = Path(lora_path).stem if lora_path else "my_lora"
            return f"{prompt}, <lora:{lora}:0.7>" if prompt else f"<lora:{lora}:0.7>"

        sweep_inputs = [lora_file, sweep_prompt, sweep_negative, sweep_seed, strengths, base_model]
        train_btn.click(run_training, inputs=train_inputs, outputs=outputs)
        train_gen_btn.click(run_training, inputs=train_inputs, outputs=outputs).then(
            run_sweep, inputs=sweep_inputs, outputs=[sweep_gallery])
        stop_btn.click(stop, inputs=[], outputs=[])
        sweep_btn.click(run_sweep, inputs=sweep_inputs, outputs=[sweep_gallery])
        # kept current, so that the WebUI's paste binding on send_btn reads the right prompt when clicked
        for source in (lora_file, sweep_prompt):
            source.change(send_to_txt2img, inputs=[lora_file, sweep_prompt], outputs=[send_prompt])
        tab.lora_trainer_send = (send_btn, send_prompt)  # the WebUI glue binds these to txt2img
    return tab
