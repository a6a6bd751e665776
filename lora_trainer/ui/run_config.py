"""The tab's fields → a run's config, with no gradio: the presets, the advanced fields (their choices are the
config's own), the labels that name config keys in the tab's messages, and ``build_config``. Anything that builds
a run from the tab's values (the tab, a test, an HTTP API) uses this."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from lora_trainer.config import (
    CHOICES,
    FAMILY_DEFAULTS,
    FAMILY_NAMES,
    OPTIMIZER_LEARNING_RATES,
    Config,
    config_from_dict,
)
from lora_trainer.engine.output_checks import name_problem
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui.views import CONTINUE_LABEL, name_fields, short_label

CONFIG_SOURCE = "Train LoRA tab"  # config_from_dict's source: the start of its messages, dropped in the tab
PRESETS = {
    "Style (defaults)": {},
    "Character / object": {"lora_rank": 16, "lora_alpha": 16, "train_text_encoder": True},
    "Quick test (100 steps)": {"max_train_steps": 100, "save_steps": 0},
}
# the advanced fields: (config key, label, kind, extra)
ADVANCED = [
    ("lora_rank", "Rank", "number", None), ("lora_alpha", "Alpha", "number", None),
    ("conv_rank", "Convolution rank (LoCon: the ResNet blocks' 3x3 convolutions too; 0 = off)", "number", None),
    ("lora_dropout", "Dropout", "number", None), ("learning_rate", "Learning rate", "number", None),
    ("text_encoder_lr", "Text encoder learning rate", "number", None),
    ("loraplus_lr_ratio", "LoRA+ ratio (the B matrices learn this many times faster; 0 = off, 16 usual)", "number",
     None),
    ("text_encoder_2_lr", "Second text encoder learning rate (0 = the text encoder's)", "number", None),
    ("optimizer", "Optimizer (prodigy finds its own step size: with the learning rates as filled it uses 1.0)",
     "choice", list(CHOICES["optimizer"])),
    ("optimizer_args", "Optimizer arguments (name=value apart by spaces, e.g. weight_decay=0.01 decouple=True)",
     "text", None),
    ("batch_size", "Batch size", "number", None),
    ("gradient_accumulation_steps", "Gradient accumulation", "number", None),
    ("epochs", "Epochs", "number", None), ("max_train_steps", "Max steps (0 = use epochs)", "number", None),
    ("resolution", "Resolution", "number", None),
    ("lr_scheduler", "LR scheduler", "choice", list(CHOICES["lr_scheduler"])),
    ("lr_scheduler_num_cycles", "LR cycles (cosine_with_restarts)", "number", None),
    ("lr_warmup_steps", "Warmup steps", "number", None), ("mixed_precision", "Mixed precision", "choice",
                                                          list(CHOICES["mixed_precision"])),
    ("gradient_checkpointing", "Gradient checkpointing (less memory)", "bool", None),
    ("auto_fit", "Fit the GPU's memory (checkpointing, a smaller batch) where the estimate says it does not fit",
     "bool", None),
    ("attention", "Attention kernel while training (auto = PyTorch SDPA)", "choice", list(CHOICES["attention"])),
    ("compile_unet", "Compile the UNet (torch.compile: faster steps after a first one of minutes)", "bool", None),
    ("cache_latents_to_disk", "Keep encoded images on disk (the next run of this name skips encoding)", "bool", None),
    ("train_text_encoder", "Train the text encoder", "bool", None),
    ("train_text_encoder_2", "Train the second text encoder (SDXL)", "bool", None),
    ("caption_prefix", "Trigger word prefix", "text", None),
    ("reg_data_dir", "Regularization images folder (class images; empty = none; kohya's N_class folders or plain)",
     "text", None),
    ("prior_loss_weight", "Prior loss weight (the regularization images' share of the loss)", "number", None),
    ("enable_bucket", "Aspect-ratio buckets (each image trained whole, not cropped to a square)", "bool", None),
    ("shuffle_caption", "Shuffle caption tags each time an image trains (the prefix and **bold** tags stay first)",
     "bool", None),
    ("keep_tokens", "Keep the first N tags in place", "number", None),
    ("caption_tag_dropout_rate", "Tag dropout (each tag left out with this chance, e.g. 0.1)", "number", None),
    ("caption_dropout_rate", "Caption dropout (the whole caption left out with this chance)", "number", None),
    ("min_snr_gamma", "Min-SNR gamma (0 = off)", "number", None), ("noise_offset", "Noise offset", "number", None),
    ("multires_noise_iterations", "Pyramid noise levels (0 = off; 6-10 usual)", "number", None),
    ("ip_noise_gamma", "Input perturbation noise (0 = off; 0.05-0.1 usual)", "number", None),
    ("loss_type", "Loss (huber / smooth_l1: an odd image pulls less)", "choice", list(CHOICES["loss_type"])),
    ("debiased_estimation_loss", "Debiased estimation (weight each timestep's loss by 1/sqrt(SNR))", "bool", None),
    ("seed", "Seed", "number", None), ("save_steps", "Checkpoint every N steps (0 = off)", "number", None),
    ("validation_split", "Validation share of the images (0 = none; e.g. 0.1)", "number", None),
    ("validation_every_n_steps", "Validation loss every N steps (0 = at the end)", "number", None),
    ("nan_max_retries", "NaN rollbacks before the run stops (0 = no guard)", "number", None),
    ("resume_from_checkpoint", CONTINUE_LABEL, "bool", None),
]
ZERO_IS_NONE = {"max_train_steps", "min_snr_gamma", "text_encoder_2_lr", "reg_data_dir",
                "loraplus_lr_ratio"}  # (0 in a number field, empty in a text field)
# the fields the model family fills (config.FAMILY_DEFAULTS: SDXL resolution 1024, rank 32, ...), and those shown
# for SDXL only (on a host that can train its second text encoder)
FAMILY_KEYS = tuple(dict.fromkeys(key for values in FAMILY_DEFAULTS.values() for key in values))
SDXL_ONLY = ("train_text_encoder_2", "text_encoder_2_lr")
# config key → the label of the field that sets it, to name fields in messages as the tab shows them
FIELD_KINDS = {key: kind for key, _label, kind, _extra in ADVANCED}
FIELD_LABELS = {"train_data_dir": "Dataset folder", "output_name": "LoRA name", "base_model": "Base model",
                **{key: label for key, label, *_ in ADVANCED}}
NO_LORA = ("Train a LoRA first: the strength sweep, Send to txt2img and Merge into checkpoint use the file in "
           "'Trained LoRA' (or put the path of a .safetensors LoRA there).")


def field_default(key: str, cfg: Config):
    """What a field shows for ``key`` in ``cfg`` (0 for "off" where the config says None, or "" in a text field;
    optimizer arguments as the text the field takes back)."""
    for section in (cfg.data, cfg.model, cfg.training, cfg.output):
        if hasattr(section, key):
            value = getattr(section, key)
            if value is None and key in ZERO_IS_NONE:
                return "" if FIELD_KINDS[key] == "text" else 0
            if key == "resume_from_checkpoint":  # (a checkbox: "latest" or none)
                return value is not None
            if isinstance(value, dict):  # (no spaces inside a value: the text is split at them)
                return " ".join(f"{name}={arg!r}".replace(" ", "") for name, arg in value.items())
            return value
    raise KeyError(key)


def optimizer_rates(advanced: dict, filled: dict | None, defaults: dict) -> set[str]:
    """The learning-rate fields left out of a run of an optimizer that sets its own step size (Prodigy), where they
    still show what the tab filled them with (the family's value, else the host's ``defaults``, else the config's):
    the optimizer's own rate applies (config.OPTIMIZER_LEARNING_RATES)."""
    if advanced.get("optimizer") not in OPTIMIZER_LEARNING_RATES:
        return set()
    shown = filled["values"] if filled is not None else {}
    return {key for key in ("learning_rate", "text_encoder_lr") if key in advanced and is_default(
        advanced[key], shown.get(key, defaults.get(key, field_default(key, Config()))))}


def build_config(host, data_dir: str, name: str, preset: str, base_model: str | None, advanced: dict,
                 filled: dict | None = None) -> Config:
    """The tab's fields → a validated Config (errors name config keys; ``tab_message`` names the fields).

    ``filled``: what the tab filled the family fields with (``family_fill``). A field that still shows it is passed
    as a default, not as the user's (``Config.explicit``): the loaded model's family decides it where the tab did not
    know the family. The SDXL-only fields count only where the tab shows them."""
    if not str(data_dir).strip():
        raise LoraTrainerError("choose the dataset folder (a folder of images with captions)")
    name = (name or "").strip()
    problem = name_problem(name, Path(host.run_root))
    if problem:
        raise LoraTrainerError(f"LoRA name: {problem}")
    advanced, defaulted = dict(advanced), set()
    if filled is not None:
        defaulted = {k for k in FAMILY_KEYS if k in advanced and is_default(advanced[k], filled["values"].get(k))}
        if not shows_text_encoder_2(host, filled.get("family")):
            for key in SDXL_ONLY:
                advanced.pop(key, None)
    settings = dict(host.defaults())
    own_rates = optimizer_rates(advanced, filled, settings)
    settings.update(PRESETS.get(preset, {}))
    for key in own_rates:  # (the host's defaults too: the WebUI's Settings give a learning rate)
        del advanced[key]
        settings.pop(key, None)
        defaulted.discard(key)
    if "resume_from_checkpoint" in advanced:  # (the checkbox: the newest checkpoint of this name's runs)
        advanced["resume_from_checkpoint"] = "latest" if advanced["resume_from_checkpoint"] else None
    for key, value in advanced.items():  # gr.Number gives floats; the config takes 8.0 for an int field
        if isinstance(value, str) and key in ZERO_IS_NONE:  # (a folder's path: spaces around it are none of it)
            value = value.strip()
        settings[key] = None if key in ZERO_IS_NONE and not value else value
    settings.update(train_data_dir=str(data_dir).strip(), output_name=name,
                    output_dir=str(Path(host.run_root) / name))
    if base_model:
        settings["base_model"] = base_model.strip()
    cfg = config_from_dict(settings, source=CONFIG_SOURCE)
    return dataclasses.replace(cfg, explicit=cfg.explicit - defaulted) if defaulted else cfg


# --- the model family's defaults in the fields
def host_config(host) -> Config:
    """The config the tab starts from: the config's defaults under the host's (the WebUI's Settings: SD 1.x's)."""
    return config_from_dict({"train_data_dir": "-", **host.defaults()})


def family_values(base: Config, family: str | None) -> dict:
    """What the family fields show for ``family``: its defaults (config.FAMILY_DEFAULTS) over ``base``'s values."""
    own = FAMILY_DEFAULTS.get(family, {}) if family else {}
    return {key: own.get(key, field_default(key, base)) for key in FAMILY_KEYS}


def family_fill(host, base: Config, base_model: str | None = None) -> dict:
    """What the tab fills the family fields with when it starts: {"family": the host's model family or None,
    "values": key → value}; the tab keeps it (a gr.State) to tell the user's values from its own."""
    family = host.model_family(base_model if host.chooses_base_model else None)
    return {"family": family, "values": family_values(base, family)}


def is_default(value, filled) -> bool:
    """Whether a field still shows ``filled``, the default the tab put there (a field the user emptied does not)."""
    if value is None or filled is None:
        return False
    if isinstance(value, (int, float)) and isinstance(filled, (int, float)):
        return math.isclose(value, filled, rel_tol=1e-9, abs_tol=0.0)
    return value == filled


def refill(filled: dict, base: Config, family: str | None, values: dict) -> tuple[dict, dict]:
    """The model family is now ``family``: (key → new value of each family field that still shows what the tab
    filled, the new fill). The fields the user changed keep their values; an unknown family (None) changes nothing."""
    if family is None:
        return {}, filled
    new = family_values(base, family)
    changes = {k: v for k, v in new.items() if is_default(values.get(k), filled["values"].get(k)) and values[k] != v}
    return changes, {"family": family, "values": new}


def shows_text_encoder_2(host, family: str | None) -> bool:
    """Whether the tab offers the SDXL-only fields: an SDXL model, on a host that can train its second encoder."""
    return family == "sdxl" and bool(getattr(host, "trains_text_encoder_2", False))


def family_note(host, family: str | None) -> str:
    """The note that says which family the defaults came from (empty while the family is unknown)."""
    if not family:
        return ""
    where = "the base model" if host.chooses_base_model else "the loaded model"
    own = ", ".join(f"{short_label(FIELD_LABELS[k]).lower()} {v:g}" for k, v in FAMILY_DEFAULTS.get(family, {}).items())
    return (f"Defaults for {FAMILY_NAMES.get(family, family)} ({where}){': ' + own if own else ''}. "
            "Fields you change keep your values.")


def tab_message(error) -> str:
    """An error's message as the tab says it: fields by their labels (``Dataset folder: …``), not config keys."""
    text = str(error)
    if text.startswith(f"{CONFIG_SOURCE}: "):
        text = text[len(CONFIG_SOURCE) + 2:]
    return name_fields(text, FIELD_LABELS)
