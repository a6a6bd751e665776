"""The tab's fields → a run's config, with no gradio: the presets, the advanced fields (their choices are the
config's own), the labels that name config keys in the tab's messages, and ``build_config``. Anything that builds
a run from the tab's values (the tab, a test, an HTTP API) uses this."""

from __future__ import annotations

from pathlib import Path

from lora_trainer.config import CHOICES, Config, config_from_dict
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui.views import name_fields

CONFIG_SOURCE = "Train LoRA tab"  # config_from_dict's source: the start of its messages, dropped in the tab
PRESETS = {
    "Style (defaults)": {},
    "Character / object": {"lora_rank": 16, "lora_alpha": 16, "train_text_encoder": True},
    "Quick test (100 steps)": {"max_train_steps": 100, "save_steps": 0},
}
# the advanced fields: (config key, label, kind, extra)
ADVANCED = [
    ("lora_rank", "Rank", "number", None), ("lora_alpha", "Alpha", "number", None),
    ("lora_dropout", "Dropout", "number", None), ("learning_rate", "Learning rate", "number", None),
    ("batch_size", "Batch size", "number", None),
    ("gradient_accumulation_steps", "Gradient accumulation", "number", None),
    ("epochs", "Epochs", "number", None), ("max_train_steps", "Max steps (0 = use epochs)", "number", None),
    ("resolution", "Resolution", "number", None),
    ("lr_scheduler", "LR scheduler", "choice", list(CHOICES["lr_scheduler"])),
    ("lr_warmup_steps", "Warmup steps", "number", None), ("mixed_precision", "Mixed precision", "choice",
                                                          list(CHOICES["mixed_precision"])),
    ("gradient_checkpointing", "Gradient checkpointing (less memory)", "bool", None),
    ("attention", "Attention kernel while training (auto = PyTorch SDPA)", "choice", list(CHOICES["attention"])),
    ("compile_unet", "Compile the UNet (torch.compile: faster steps after a first one of minutes)", "bool", None),
    ("cache_latents_to_disk", "Keep encoded images on disk (the next run of this name skips encoding)", "bool", None),
    ("train_text_encoder", "Train the text encoder", "bool", None),
    ("caption_prefix", "Trigger word prefix", "text", None),
    ("min_snr_gamma", "Min-SNR gamma (0 = off)", "number", None), ("noise_offset", "Noise offset", "number", None),
    ("seed", "Seed", "number", None), ("save_steps", "Checkpoint every N steps (0 = off)", "number", None),
]
ZERO_IS_NONE = {"max_train_steps", "min_snr_gamma"}
# config key → the label of the field that sets it, to name fields in messages as the tab shows them
FIELD_LABELS = {"train_data_dir": "Dataset folder", "output_name": "LoRA name", "base_model": "Base model",
                **{key: label for key, label, *_ in ADVANCED}}
NO_LORA = ("Train a LoRA first: the strength sweep and Send to txt2img use the file in 'Trained LoRA' "
           "(or put the path of a .safetensors LoRA there).")


def field_default(key: str, cfg: Config):
    """What a field shows for ``key`` in ``cfg`` (0 for "off" where the config says None)."""
    for section in (cfg.data, cfg.model, cfg.training, cfg.output):
        if hasattr(section, key):
            value = getattr(section, key)
            return 0 if value is None and key in ZERO_IS_NONE else value
    raise KeyError(key)


def build_config(host, data_dir: str, name: str, preset: str, base_model: str | None, advanced: dict) -> Config:
    """The tab's fields → a validated Config (errors name config keys; ``tab_message`` names the fields)."""
    if not str(data_dir).strip():
        raise LoraTrainerError("choose the dataset folder (a folder of images with captions)")
    name = (name or "").strip()
    if not name:
        raise LoraTrainerError("give the LoRA a name (it becomes <lora:name:0.7>)")
    settings = dict(host.defaults())
    settings.update(PRESETS.get(preset, {}))
    for key, value in advanced.items():  # gr.Number gives floats; the config takes 8.0 for an int field
        settings[key] = None if key in ZERO_IS_NONE and not value else value
    settings.update(train_data_dir=str(data_dir).strip(), output_name=name,
                    output_dir=str(Path(host.run_root) / name))
    if base_model:
        settings["base_model"] = base_model.strip()
    return config_from_dict(settings, source=CONFIG_SOURCE)


def tab_message(error) -> str:
    """An error's message as the tab says it: fields by their labels (``Dataset folder: …``), not config keys."""
    text = str(error)
    if text.startswith(f"{CONFIG_SOURCE}: "):
        text = text[len(CONFIG_SOURCE) + 2:]
    return name_fields(text, FIELD_LABELS)
