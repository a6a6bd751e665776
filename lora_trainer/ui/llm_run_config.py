"""The app's language-model mode (``model.task_type: text-generation``): its fields → a run's config, with no gradio.
The fields with their labels and starting values, the labels that name config keys in messages, and
``build_llm_config`` (the same validation as the command line)."""

from __future__ import annotations

from pathlib import Path

from lora_trainer.config import CHOICES, Config, config_from_dict, default_value
from lora_trainer.engine.output_checks import name_problem
from lora_trainer.errors import LoraTrainerError
from lora_trainer.llm.rows import SUFFIXES
from lora_trainer.ui.views import CONTINUE_LABEL, name_fields

CONFIG_SOURCE = "Language model LoRA"  # config_from_dict's source: the start of its messages, dropped in the app
# the settings fields: (config key, label, kind, extra)
LLM_FIELDS = [
    ("lora_rank", "Rank", "number", None), ("lora_alpha", "Alpha", "number", None),
    ("lora_dropout", "Dropout", "number", None), ("learning_rate", "Learning rate", "number", None),
    ("batch_size", "Batch size", "number", None),
    ("gradient_accumulation_steps", "Gradient accumulation", "number", None),
    ("epochs", "Epochs", "number", None), ("max_train_steps", "Max steps (0 = use epochs)", "number", None),
    ("max_seq_length", "Max tokens per row (longer text is split into chunks, a longer prompt row cut)", "number",
     None),
    ("validation_split", "Held-out share (e.g. 0.05; empty = 5% from 40 rows on, else none)", "text", None),
    ("lr_scheduler", "LR scheduler", "choice", list(CHOICES["lr_scheduler"])),
    ("mixed_precision", "Mixed precision", "choice", list(CHOICES["mixed_precision"])),
    ("quantize_base", "Quantized base (QLoRA: CUDA and bitsandbytes)", "choice", list(CHOICES["quantize_base"])),
    ("target_modules", "LoRA layers (comma-separated; empty = the architecture's attention projections; "
                       "all-linear)", "text", None),
    ("save_steps", "Checkpoint every N steps (0 = off)", "number", None), ("seed", "Seed", "number", None),
    ("train_on_prompt", "Train on the prompt's tokens too", "bool", None),
    ("packing", "Pack short rows into sequences of max tokens", "bool", None),
    ("gradient_checkpointing", "Gradient checkpointing (less memory)", "bool", None),
    ("resume_from_checkpoint", CONTINUE_LABEL, "bool", None),
]
LLM_KEYS = [key for key, *_ in LLM_FIELDS]
# where the mode starts (a language model's usual LoRA; the config's own defaults are an image LoRA's)
LLM_START = {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "batch_size": 4,
             "gradient_accumulation_steps": 1, "epochs": 3, "max_train_steps": 0, "validation_split": "",
             "target_modules": "", "resume_from_checkpoint": False}
LLM_LABELS = {"base_model": "Base model", "train_data_dir": "Data", "metadata_path": "Data",
              "output_name": "Adapter name", **{key: label for key, label, *_ in LLM_FIELDS}}
DATA_KINDS = f"a {' / '.join(SUFFIXES)} file, or a folder of them"


def field_start(key: str):
    """What a field shows when the app starts."""
    return LLM_START[key] if key in LLM_START else default_value(key)


def build_llm_config(host, base_model: str, data_path: str, name: str, values: dict) -> Config:
    """The fields → a validated text-generation Config: ``data_path`` a file (data.metadata_path) or a folder
    (data.train_data_dir), the run folder ``<host.run_root>/<name>``. Empty fields take the config's defaults."""
    base = str(base_model or "").strip()
    if not base:
        raise LoraTrainerError("Base model: choose a local Hugging Face causal-LM folder (config.json, the tokenizer "
                               "and *.safetensors weights); nothing is downloaded")
    data = str(data_path or "").strip()
    if not data:
        raise LoraTrainerError(f"Data: choose the training rows: {DATA_KINDS}")
    path = Path(data).expanduser()
    if not path.exists():
        raise LoraTrainerError(f"Data: {path.resolve()} does not exist ({DATA_KINDS})")
    name = (name or "").strip()
    if not name:
        raise LoraTrainerError("Adapter name: is empty: give the adapter a name (its folder in the run folder)")
    problem = name_problem(name, Path(host.run_root))
    if problem:
        raise LoraTrainerError(f"Adapter name: {problem}")
    settings = {"task_type": "text-generation", "base_model": base, "output_name": name,
                "output_dir": str(Path(host.run_root) / name),
                **({"metadata_path": str(path)} if path.is_file() else {"train_data_dir": str(path)})}
    for key, value in values.items():
        if isinstance(value, str):
            value = value.strip()
        if key == "resume_from_checkpoint":  # (the checkbox: the newest checkpoint of this name's runs)
            value = "latest" if value else None
        if key == "target_modules":
            value = [m.strip() for m in str(value or "").split(",") if m.strip()] or None
        if value is None or value == "" or (key == "max_train_steps" and not value) or (
                key == "max_seq_length" and value == default_value(key)):
            continue  # (empty: the config's default; max steps 0: the epochs count; the max tokens as the field
            # started: the config's, which a model with a shorter context shortens to its own)
        settings[key] = value  # (a text field's number, "0.05", is read by the config as a number)
    return config_from_dict(settings, source=CONFIG_SOURCE)


def llm_message(error) -> str:
    """An error's message as the app says it: fields by their labels (``Data: …``), not config keys."""
    text = str(error)
    if text.startswith(f"{CONFIG_SOURCE}: "):
        text = text[len(CONFIG_SOURCE) + 2:]
    return name_fields(text, LLM_LABELS)
