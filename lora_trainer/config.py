"""One typed config: YAML in (nested sections or flat keys), validation that names the bad key, YAML out.

Every check here runs before any model loads. Errors are collected and raised together, each naming
the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import logging
import math
import re
import typing
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from lora_trainer.errors import ConfigError
from lora_trainer.kohya_config import read_kohya
from lora_trainer.utils.fsio import atomic_write_text

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("lora_default.yaml")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_NAME = "pytorch_lora_weights"  # (export.diffusers_format.WEIGHT_NAME's stem)


@dataclass
class DataConfig:
    train_data_dir: str = ""
    metadata_path: str | None = None
    caption_extension: str = ".txt"
    caption_priority: str = "csv"
    caption_prefix: str = ""
    recursive: bool = False
    resolution: int = 512
    random_flip: bool = False
    enable_bucket: bool = True  # aspect-ratio buckets (data.buckets); false: every image center-cropped to a square
    min_bucket_reso: int | None = None  # a bucket's shortest side; None: 256, or the resolution where it is smaller
    max_bucket_reso: int | None = None  # a bucket's longest side; None: twice the resolution
    bucket_reso_steps: int = 64  # bucket sides are multiples of this
    bucket_no_upscale: bool = False  # images smaller than resolution² train at their own size (rounded down)
    random_crop: bool = False  # cut each image out of its resized picture at a random place (seeded) each epoch
    fast_jpeg_decode: bool = True
    weighted_captions: bool = False
    # caption augmentation (data.augment), each time an image is trained; the prefix and **core** tags always kept
    shuffle_caption: bool = False  # the comma-separated tags in a new order
    keep_tokens: int = 0  # ...but the first N tags in place
    caption_tag_dropout_rate: float = 0.0  # each other tag left out with this probability
    caption_dropout_rate: float = 0.0  # the whole caption replaced by the empty prompt with this probability
    caption_dropout_every_n_epochs: int = 0  # ...and in every N-th epoch (0: never)
    validation_split: float = 0.0  # a fraction of the images held out for the validation loss (0 = none)
    validation_dir: str | None = None  # or a second folder of validation images (the same caption rules)
    reg_data_dir: str | None = None  # regularization (class) images, kohya's layout or plain (data.regularization)
    # a language model's LoRA (model.task_type: text-generation; lora_trainer.llm)
    max_seq_length: int = 512  # tokens per row; a longer text row is split into chunks, a longer prompt row cut
    train_on_prompt: bool = False  # the loss counts the prompt's tokens too (default: only the completion's)
    packing: bool = False  # short rows joined into sequences of up to max_seq_length tokens


@dataclass
class ModelConfig:
    base_model: str = "tiny-demo"
    prediction_type: str = "auto"
    zero_terminal_snr: str = "auto"  # auto: as the model's scheduler says (rescale_betas_zero_snr)
    task_type: str = "text-to-image"  # an image LoRA; "text-generation": a language model's (lora_trainer.llm)
    trust_remote_code: bool = False  # text-generation: run the Python code a model folder ships (auto_map)


@dataclass
class TrainingConfig:
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    conv_rank: int = 0  # >0: the UNet's ResNet blocks get LoRA too, 3x3 convolutions at this rank (kohya's conv_dim)
    conv_alpha: float | None = None  # ...and this alpha (None: the same strength as the rest, lora_alpha / lora_rank)
    train_text_encoder: bool = False
    text_encoder_lr: float = 5e-5
    train_text_encoder_2: bool = False  # SDXL's second text encoder (CLIP ViT-bigG)
    text_encoder_2_lr: float | None = None  # None = text_encoder_lr
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    batch_size: int = 4
    epochs: int = 10
    max_train_steps: int | None = None
    learning_rate: float = 2e-4
    loraplus_lr_ratio: float | None = None  # LoRA+: the B matrices learn this many times faster (kohya's; 16 usual)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts: the number of cosines (1: cosine)
    lr_scheduler_power: float = 1.0  # polynomial: the decay's power (1: linear)
    optimizer: str = "adamw"
    optimizer_args: dict[str, object] = field(default_factory=dict)  # the optimizer's other arguments (kohya's)
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    nan_guard_every: int = 10  # keep the last good LoRA + optimizer state every N steps, in memory (0: no guard)
    nan_max_retries: int = 3  # rollbacks on a non-finite loss or gradient before the run stops (0: no guard)
    nan_lr_factor: float = 0.5  # each rollback multiplies the learning rates by this
    gradient_accumulation_steps: int = 2
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    fp8_base: bool = False  # the frozen UNet's weights stored in float8, upcast per layer (models.fp8)
    quantize_base: str = "no"  # text-generation: the frozen base in 4bit (QLoRA, NF4) or 8bit (bitsandbytes, CUDA)
    auto_fit: bool = False  # apply the pre-flight's settings that fit the device's memory (engine.preflight)
    seed: int = 42
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0  # pyramid noise: lower-resolution noise levels added (kohya's; 6-10 usual)
    multires_noise_discount: float = 0.3  # ...each level's weight times this
    ip_noise_gamma: float = 0.0  # input perturbation: the latents noised with noise + γ·ξ (0.05-0.1 usual)
    debiased_estimation_loss: bool = False  # each timestep's loss weighted by 1/sqrt(SNR) (arXiv 2310.08442)
    loss_type: str = "l2"  # l2 (squared error), l1, huber or smooth_l1 (kohya's scheduled Huber loss)
    huber_schedule: str = "snr"  # huber/smooth_l1: each timestep's threshold: snr, exponential or constant
    huber_c: float = 0.1  # ...the threshold at high noise (snr, exponential) or always (constant)
    huber_scale: float = 1.0  # ...times this (exponential, constant)
    min_timestep: int = 0  # timesteps drawn from [min_timestep, max_timestep) (kohya's); 0 and None: all
    max_timestep: int | None = None  # None: the schedule's end (1000)
    prior_loss_weight: float = 1.0  # the loss weight of the regularization images (data.reg_data_dir)
    min_snr_gamma: float | None = None
    clip_skip: int = 1  # the CLIP layer the captions' conditioning comes from: 1 the last, 2 the one before (SD 1.x)
    save_steps: int = 100
    save_every_n_epochs: int = 0
    checkpoints_total_limit: int = 3
    resume_from_checkpoint: str | None = None
    dataloader_num_workers: int = 0
    ddp_timeout: int = 30  # minutes a process of a multi-process run waits for the others (engine.distributed)
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    cache_text_embeddings: bool = True
    compile_unet: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    attention: str = "auto"
    validation_every_n_steps: int = 0  # the validation loss every N steps (0: at the end only)

    @property
    def trains_text_encoders(self) -> bool:
        """Whether a text encoder gets LoRA layers (then captions are encoded every step, with gradients)."""
        return self.train_text_encoder or self.train_text_encoder_2

    @property
    def conv_lora_alpha(self) -> float:
        """conv_alpha, or the alpha that gives the convolutions' LoRA the others' strength (alpha / rank)."""
        return self.lora_alpha * self.conv_rank / self.lora_rank if self.conv_alpha is None else self.conv_alpha

    @property
    def text_encoder_2_learning_rate(self) -> float:
        return self.text_encoder_lr if self.text_encoder_2_lr is None else self.text_encoder_2_lr


@dataclass
class OutputConfig:
    output_dir: str = "output/my_lora"
    output_name: str = "my_lora"
    save_precision: str = "fp16"
    save_diffusers_format: bool = True
    training_comment: str = ""
    log_with: str = "tensorboard"
    sample_prompts: str | list[str] | None = None  # prompts (kohya's sample syntax), or a file of them
    sample_every_n_steps: int = 0  # sample images every N steps (0 = off)
    sample_every_n_epochs: int = 0  # and/or at the end of every N epochs (0 = off)
    sample_at_first: bool = False  # also before step 1 (the base model's images, to compare)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # the keys (flat names) the YAML document set; the others may take their model family's default
    explicit: frozenset = field(default_factory=frozenset, compare=False, repr=False)


SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig, "output": OutputConfig}
# field name → section (names are unique across sections, which is what makes the flat form work)
FIELD_SECTION = {f.name: sec for sec, cls in SECTION_CLASSES.items() for f in fields(cls)}


def default_value(key: str):
    """The default of a config key (flat name, e.g. ``lora_rank``): the dataclasses are the one source."""
    section = SECTION_CLASSES[FIELD_SECTION[key]]()
    return getattr(section, key)


ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate", "warmup_steps": "lr_warmup_steps",
           # kohya's sd-scripts names of the same settings
           "optimizer_type": "optimizer", "network_dim": "lora_rank", "network_alpha": "lora_alpha",
           "pretrained_model_name_or_path": "base_model", "max_train_epochs": "epochs", "flip_aug": "random_flip",
           "train_batch_size": "batch_size"}
# kohya's names of settings that are not quite ours: what to write here instead (an unknown key's message)
KOHYA_KEYS = {
    "unet_lr": "is learning_rate here (the UNet's; text_encoder_lr is the text encoder's)",
    "save_every_n_steps": "is save_steps here (a resumable checkpoint every N steps; the LoRA file is written at the "
                          "end and on a stop)",
    "resume": "is resume_from_checkpoint here (a checkpoint folder of this trainer's run, or 'latest'; kohya's state "
              "folders are not read)",
    "save_model_as": "has no setting here: the LoRA is always a .safetensors file (kohya's format; the diffusers "
                     "file beside it: output.save_diffusers_format)",
    "network_module": "has no setting here: the LoRA is kohya's networks.lora kind (peft's LoRA on "
                      "training.target_modules)",
    "network_weights": "has no setting here: a run starts from a new LoRA or from a checkpoint of its own "
                       "(resume_from_checkpoint)",
    "v_parameterization": "is model.prediction_type here: v_prediction (auto, the default, takes the model's: its "
                          "scheduler's, or a single file's v_pred key)",
    "v2": "has no setting here: an SD 2.x model is told by its files (and a 768-v one by its scheduler's prediction "
          "type)",
    "network_train_unet_only": "is train_text_encoder here, the other way round: false (the default) trains the UNet "
                               "only; kohya trains the text encoder too unless network_train_unet_only is true",
    "cache_text_encoder_outputs": "is cache_text_embeddings here (on by default, where no text encoder trains and "
                                  "the captions are not augmented)",
    "max_token_length": "has no setting here: a caption is one 75-token window (the dataset check names longer ones)",
    "xformers": "is attention: xformers here (auto, the default, is PyTorch's SDPA)",
    "sdpa": "is attention: sdpa here (auto, the default, is the same)",
}
# values other tools write for a choice (the lora-scripts articles: task_type "image-to-text" for an image LoRA)
VALUE_ALIASES = {"task_type": {"image-to-text": "text-to-image", "sd": "text-to-image", "stable-diffusion":
                               "text-to-image", "txt2img": "text-to-image", "llm": "text-generation"}}
# attention projections named as in a text encoder or a language model → the UNet's (issue 17: the articles'
# ``target_modules: ["q_proj", "v_proj"]``); the text encoder keeps its own names
UNET_PROJECTIONS = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0", "out_proj": "to_out.0"}

CHOICES = {
    "caption_priority": ("csv", "txt"),
    "prediction_type": ("auto", "epsilon", "v_prediction"),
    "zero_terminal_snr": ("auto", "true", "false"),
    "task_type": ("text-to-image", "text-generation"),
    "lr_scheduler": ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial"),
    "optimizer": ("adamw", "adamw8bit", "prodigy", "adafactor"),
    "quantize_base": ("no", "4bit", "8bit"),
    "mixed_precision": ("auto", "no", "fp16", "bf16"),
    "save_precision": ("fp32", "fp16", "bf16"),
    "log_with": ("tensorboard", "none"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
    "attention": ("auto", "sdpa", "xformers"),
    "loss_type": ("l2", "l1", "huber", "smooth_l1"),
    "huber_schedule": ("snr", "exponential", "constant"),
}
# (lowest, highest, lowest is exclusive, highest is exclusive); None = unbounded
RANGES = {
    "resolution": (64, 4096, False, False),
    "min_bucket_reso": (64, 4096, False, False),
    "max_bucket_reso": (64, 8192, False, False),
    "bucket_reso_steps": (8, 1024, False, False),
    "keep_tokens": (0, None, False, False),
    "caption_tag_dropout_rate": (0, 1, False, True),
    "caption_dropout_rate": (0, 1, False, True),
    "caption_dropout_every_n_epochs": (0, None, False, False),
    "lora_rank": (1, 1024, False, False),
    "lora_alpha": (0, None, True, False),
    "conv_rank": (0, 1024, False, False),
    "conv_alpha": (0, None, True, False),
    "lora_dropout": (0, 1, False, True),
    "text_encoder_lr": (0, None, True, False),
    "text_encoder_2_lr": (0, None, True, False),
    "batch_size": (1, None, False, False),
    "epochs": (1, None, False, False),
    "max_train_steps": (1, None, False, False),
    "learning_rate": (0, None, True, False),
    "loraplus_lr_ratio": (0, None, True, False),
    "lr_warmup_steps": (0, None, False, False),
    "lr_scheduler_num_cycles": (1, None, False, False),
    "lr_scheduler_power": (0, None, True, False),
    "weight_decay": (0, None, False, False),
    "adam_beta1": (0, 1, False, True),
    "adam_beta2": (0, 1, False, True),
    "adam_epsilon": (0, None, True, False),
    "max_grad_norm": (0, None, False, False),
    "nan_guard_every": (0, None, False, False),
    "nan_max_retries": (0, None, False, False),
    "nan_lr_factor": (0, 1, True, False),
    "gradient_accumulation_steps": (1, None, False, False),
    "noise_offset": (0, None, False, False),
    "multires_noise_iterations": (0, 64, False, False),
    "multires_noise_discount": (0, 1, True, False),
    "ip_noise_gamma": (0, None, False, False),
    "huber_c": (0, 1, True, False),
    "huber_scale": (0, None, True, False),
    "min_timestep": (0, 999, False, False),
    "max_timestep": (1, 1000, False, False),
    "prior_loss_weight": (0, None, False, False),
    "min_snr_gamma": (0, None, True, False),
    "clip_skip": (1, 12, False, False),
    "save_steps": (0, None, False, False),
    "save_every_n_epochs": (0, None, False, False),
    "checkpoints_total_limit": (0, None, False, False),
    "dataloader_num_workers": (0, None, False, False),
    "ddp_timeout": (1, None, False, False),
    "validation_split": (0, 1, False, True),
    "max_seq_length": (8, None, False, False),
    "validation_every_n_steps": (0, None, False, False),
    "sample_every_n_steps": (0, None, False, False),
    "sample_every_n_epochs": (0, None, False, False),
}


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# other tools' keys for a setting we spell otherwise (transformers' from_pretrained: load_in_4bit)
OTHER_TOOLS_KEYS = {"load_in_4bit": "training.quantize_base: 4bit", "load_in_8bit": "training.quantize_base: 8bit"}


def _unknown_key(key: str, section: str | None) -> str:
    """``unknown key 'x' in training: did you mean 'y'?``, searching every name and alias."""
    where = f"in {section}" if section else "at top level"
    if key in OTHER_TOOLS_KEYS:
        return (f"unknown key '{key}' {where}: write {OTHER_TOOLS_KEYS[key]} (a language model's quantized base; "
                "leave it out for none)")
    if key in KOHYA_KEYS:
        return f"unknown key '{key}' {where}: kohya's '{key}' {KOHYA_KEYS[key]}"
    close = difflib.get_close_matches(key, [*FIELD_SECTION, *ALIASES, *([] if section else SECTION_CLASSES)],
                                      n=1, cutoff=0.6)
    if close:
        home = FIELD_SECTION.get(ALIASES.get(close[0], close[0]))
        elsewhere = f" (in section '{home}')" if section and home != section else ""
        return f"unknown key '{key}' {where}: did you mean '{close[0]}'{elsewhere}?"
    if section:
        keys = ", ".join(f.name for f in fields(SECTION_CLASSES[section]))
        return f"unknown key '{key}' {where}; its keys are: {keys}"
    return (f"unknown key '{key}' {where}; expected a section ({', '.join(SECTION_CLASSES)}) or a setting name "
            "(`python -m lora_trainer init-config my.yaml` writes every key with comments)")


def _range_text(lo, hi, lo_open, hi_open) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


def _field_types() -> dict[str, object]:
    out = {}
    for cls in SECTION_CLASSES.values():
        hints = typing.get_type_hints(cls)
        out.update({f.name: hints[f.name] for f in fields(cls)})
    return out


FIELD_TYPES = _field_types()


def _convert(name: str, value, key: str):
    """Check and convert one value; returns (value, error message or None)."""
    hint = FIELD_TYPES[name]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None:
        return (None, None) if optional else (None, f"{key}: a value is required (got nothing)")
    if name == "sample_prompts":
        return _sample_prompts(value, key)
    if name == "resolution" and isinstance(value, (str, list, tuple)):
        value, error = _resolution(value, key)
        if error:
            return None, error
    shown = repr(value)
    if base is bool:
        if isinstance(value, bool):
            return value, None
        return None, f"{key}: expected true or false, got {shown}"
    if isinstance(value, bool) and name in CHOICES and str(value).lower() in CHOICES[name]:
        value = str(value).lower()  # a choice of true / false, as YAML reads it
    if value is False and name in CHOICES:  # YAML 1.1 reads a bare no / off as false
        value = next((c for c in ("no", "none") if c in CHOICES[name]), value)
    if base is int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)  # (a number written as text, "10": as float keys take "1e-4")
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not value.is_integer())):
            rng = RANGES.get(name)
            return None, f"{key}: expected an integer{' ' + _range_text(*rng) if rng else ''}, got {shown}"
        value = int(value)
    elif base is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            rng = RANGES.get(name)
            return None, f"{key}: expected a number{' ' + _range_text(*rng) if rng else ''}, got {shown}"
        value = float(value)
    elif base is str:
        if isinstance(value, bool):
            wanted = f"one of {', '.join(CHOICES[name])}" if name in CHOICES else "text"
            return None, f"{key}: expected {wanted}, got {shown} (YAML reads yes/no/on/off as true/false: quote it)"
        if not isinstance(value, (str, int, float)):
            return None, f"{key}: expected text, got {shown}"
        value = str(value)
        if name in CHOICES:
            value = value.lower()
            value = VALUE_ALIASES.get(name, {}).get(value, value)
            if value not in CHOICES[name]:
                return None, (f"{key}: {shown} is not one of {', '.join(CHOICES[name])}"
                              f"{_suggest(value, CHOICES[name])}")
    elif typing.get_origin(base) is dict:
        return _arguments(value, key)
    elif typing.get_origin(base) is list:
        if isinstance(value, str):  # (one name, or several apart by commas: "to_q, to_v" as --set writes them)
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            return None, f"{key}: expected a non-empty list of names, got {shown}"
    if name in RANGES and isinstance(value, (int, float)):
        lo, hi, lo_open, hi_open = RANGES[name]
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            return None, f"{key}: {shown} is out of range: must be {_range_text(lo, hi, lo_open, hi_open)}"
    return value, None


def _resolution(value, key: str):
    """data.resolution as kohya's configs write it, ``"1024,1024"`` (or ``1024x1024``, ``[1024, 1024]``): a square's
    side; kohya's non-square width,height is refused with what to write (here buckets hold at most resolution²
    pixels and the square bucket is resolution × resolution; portraits and landscapes get buckets of their shape)."""
    parts = value if isinstance(value, (list, tuple)) else value.lower().replace("x", ",").split(",")
    if isinstance(value, str) and len(parts) == 1:
        return value, None  # (one number as text: read as any integer is)
    try:
        sides = [int(str(v).strip()) for v in parts]
    except ValueError:
        return None, f"{key}: expected an integer (a square's side, e.g. 512 or 1024), got {value!r}"
    if len(sides) != 2:
        return None, f"{key}: expected an integer or width,height as kohya writes it (e.g. 1024,1024), got {value!r}"
    if sides[0] != sides[1]:
        side = max(64, int(math.sqrt(sides[0] * sides[1])) // 64 * 64)
        return None, (f"{key}: {value!r} is {sides[0]}×{sides[1]}; a non-square resolution is not supported here: give "
                      f"one number, the square bucket's side (e.g. {side}); with data.enable_bucket (on by default) "
                      "each image trains in the bucket nearest its own shape, of at most that many pixels")
    log.info("%s: %r is the square %d×%d: resolution %d", key, value, sides[0], sides[0], sides[0])
    return sides[0], None


def _arguments(value, key: str):
    """training.optimizer_args: a mapping (``{d_coef: 2, decouple: true}``), or as kohya's configs write them, a list
    of ``name=value`` texts or one text of them apart by spaces (``"decouple=True weight_decay=0.01"``); a value in
    text is read as Python writes it (``True``, ``0.01``, ``0.9,0.99``: a tuple) or else kept as text."""
    if isinstance(value, str):
        value = value.split()
    if isinstance(value, list):
        pairs = {}
        for item in value:
            name, sep, text = str(item).partition("=")
            if not sep or not name.strip():
                return None, f"{key}: expected name=value, got {item!r}"
            try:
                pairs[name.strip()] = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                pairs[name.strip()] = text.strip()
        value = pairs
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        return None, f"{key}: expected a mapping of argument names to values, got {value!r}"
    return dict(value), None


def _sample_prompts(value, key: str):
    """output.sample_prompts: a list of prompts, or the path of a file of them (kohya's sample syntax either way;
    engine.samples reads them); an empty list is none."""
    if isinstance(value, str) and value.strip():
        return value, None
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return value or None, None
    return None, (f"{key}: expected a list of prompts or the path of a file with one prompt per line, got "
                  f"{value!r}")


def _check_samples_and_validation(values: dict[str, dict], errors: list[str]) -> None:
    d, o, t = values["data"], values["output"], values["training"]
    if not o.get("sample_prompts"):
        for name in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first"):
            if o.get(name):
                errors.append(f"output.{name}: {o[name]!r} needs output.sample_prompts (the prompts to sample: a "
                              "list, or a file with one prompt per line)")
    if d.get("validation_split") and d.get("validation_dir"):
        errors.append(f"data.validation_split: {d['validation_split']!r} and data.validation_dir: "
                      f"{d['validation_dir']!r} are both set; hold out a part of the images or use a second "
                      "folder, not both")
    if t.get("validation_every_n_steps") and not (d.get("validation_split") or d.get("validation_dir")):
        errors.append(f"training.validation_every_n_steps: {t['validation_every_n_steps']!r} needs validation "
                      "images: data.validation_split (e.g. 0.1) or data.validation_dir")


def _check_buckets(values: dict[str, dict], errors: list[str]) -> None:
    """The bucket keys together (data.buckets): steps a multiple of 8 (the VAE's factor), min <= resolution <= max
    (with buckets on), and a random crop only where images are decoded each step."""
    d, t = values["data"], values["training"]
    step, low, high, res = (d.get(k) for k in ("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso", "resolution"))
    if isinstance(step, int) and step % 8:
        errors.append(f"data.bucket_reso_steps: {step} must be a multiple of 8 (the VAE's factor; 64 is usual, "
                      f"e.g. {max(8, step - step % 8)} or {step - step % 8 + 8})")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        errors.append(f"data.min_bucket_reso: {low} is above data.max_bucket_reso: {high}; lower the one or raise "
                      "the other")
    if d.get("enable_bucket") is False:
        res = None  # (without buckets the bucket sides are not used: kohya's defaults 256..1024 at any resolution)
    if isinstance(res, int) and isinstance(low, int) and low > res:
        errors.append(f"data.min_bucket_reso: {low} is above data.resolution: {res} (the square bucket); set it "
                      f"to {res} or less")
    if isinstance(res, int) and isinstance(high, int) and high < res:
        errors.append(f"data.max_bucket_reso: {high} is below data.resolution: {res} (the square bucket); set it "
                      f"to {res} or more, or null (twice the resolution)")
    if d.get("random_crop") is True and d.get("enable_bucket") is False:
        errors.append("data.random_crop: true needs data.enable_bucket: true (the square crop is always centred)")
    if d.get("random_crop") is True and t.get("cache_latents", default_value("cache_latents")):
        errors.append("data.random_crop: true needs training.cache_latents: false (a cached latent is one crop, "
                      "encoded once); set cache_latents: false, or random_crop: false")


TEXT_GENERATION = "text-generation"


def is_text_generation(cfg_or_values) -> bool:
    """Whether a config (or its checked values) trains a language model's LoRA (lora_trainer.llm)."""
    model = cfg_or_values["model"] if isinstance(cfg_or_values, dict) else cfg_or_values.model
    task = model.get("task_type") if isinstance(model, dict) else model.task_type
    return task == TEXT_GENERATION


def _check_text_generation(values: dict[str, dict], errors: list[str]) -> None:
    """A language model's config: its data and model keys (the image keys are not read)."""
    d, o, m, t = values["data"], values["output"], values["model"], values["training"]
    if t.get("fp8_base") is True:
        errors.append("training.fp8_base: true is for image LoRAs (the UNet in float8); for a language model, "
                      "training.quantize_base: 4bit or 8bit keeps the frozen base quantized (bitsandbytes, CUDA)")
    if t.get("conv_rank"):
        errors.append(f"training.conv_rank: {t['conv_rank']} is for image LoRAs (a UNet's convolutions); a language "
                      "model's LoRA takes training.target_modules; set conv_rank: 0")
    if not d.get("train_data_dir") and not d.get("metadata_path"):
        errors.append("data.train_data_dir (a folder of *.jsonl / *.json / *.csv / *.txt files) or data.metadata_path "
                      "(one such file) is required for model.task_type: text-generation")
    if m.get("base_model", ModelConfig.base_model) == ModelConfig.base_model:
        errors.append("model.base_model is required for model.task_type: text-generation: a local Hugging Face "
                      "causal-LM folder (config.json, tokenizer and *.safetensors weights)")
    if d.get("validation_split") and d.get("validation_dir"):
        errors.append("data.validation_dir is not read for model.task_type: text-generation; use "
                      "data.validation_split (e.g. 0.05)")
    _check_output_name(o.get("output_name"), "folder", errors)


def _check_special(values: dict[str, dict], errors: list[str]) -> None:
    d, o, t, m = values["data"], values["output"], values["training"], values["model"]
    if is_text_generation(values):
        _check_text_generation(values, errors)
        return
    if t.get("quantize_base", "no") != "no":
        errors.append(f"training.quantize_base: {t['quantize_base']!r} is for model.task_type: text-generation (a "
                      "language model's frozen base); for an image LoRA, training.fp8_base: true stores the UNet in "
                      "float8")
    if m.get("zero_terminal_snr") == "true" and m.get("prediction_type") == "epsilon":
        errors.append("model.zero_terminal_snr: true needs the v-prediction target (at the last timestep the noisy "
                      "latent is pure noise: predicting the noise teaches nothing there); set model.prediction_type: "
                      "v_prediction (or auto, for a v-prediction model), or model.zero_terminal_snr: false")
    if t.get("cache_latents_to_disk") is True and t.get("cache_latents") is False:
        errors.append("training.cache_latents_to_disk: true needs training.cache_latents: true (the disk cache "
                      "keeps the cached latents); set cache_latents: true, or cache_latents_to_disk: false")
    low, high = t.get("min_timestep", 0), t.get("max_timestep")
    if isinstance(low, int) and isinstance(high, int) and not low < high:
        errors.append(f"training.min_timestep: {low}, max_timestep: {high}: the timesteps are drawn from "
                      "[min_timestep, max_timestep), so min_timestep must be below max_timestep")
    if t.get("fp8_base") is True and t.get("compile_unet") is True:
        errors.append("training.fp8_base: true does not combine with training.compile_unet: true (the per-layer casts "
                      "of the float8 weights break torch.compile's graph at every layer); set one of them to false")
    if not d.get("train_data_dir"):
        errors.append("data.train_data_dir is required: the folder of training images")
    res = d.get("resolution")
    if isinstance(res, int) and res % 8:
        errors.append(f"data.resolution: {res} must be a multiple of 8 "
                      f"(e.g. {res - res % 8 or 8} or {res - res % 8 + 8})")
    _check_buckets(values, errors)
    if d.get("weighted_captions") is True and (d.get("shuffle_caption") is True or d.get("caption_tag_dropout_rate")):
        errors.append("data.weighted_captions: true does not combine with data.shuffle_caption or "
                      "data.caption_tag_dropout_rate (a weighted group such as (red, blue:1.2) holds commas: cut at "
                      "them it would lose its weight); set weighted_captions: false, or leave the tags in order")
    ext = d.get("caption_extension")
    if isinstance(ext, str) and not ext.startswith("."):
        errors.append(f"data.caption_extension: {ext!r} must start with '.', e.g. '.txt'")
    _check_samples_and_validation(values, errors)
    name = o.get("output_name")
    if isinstance(name, str) and name.lower().endswith(".safetensors") and name[:-len(".safetensors")].strip():
        o["output_name"] = name[:-len(".safetensors")]  # (the file's suffix is added: "x.safetensors.safetensors")
        log.info("output.output_name %r: the LoRA is %s.safetensors", name, o["output_name"])
    _check_output_name(o["output_name"] if "output_name" in o else None, "file", errors)
    if str(o.get("output_name", "")).lower() == DIFFUSERS_NAME and o.get("save_diffusers_format", True):
        errors.append(f"output.output_name: {o['output_name']!r} is the name of the diffusers-format file written "
                      "beside the LoRA (output.save_diffusers_format): choose another name (it becomes "
                      "<lora:name:0.7>), or set save_diffusers_format: false")


def _check_output_name(name, what: str, errors: list[str]) -> None:
    """output.output_name names a file (an image LoRA) or a folder (a language model's adapter) in output_dir."""
    if isinstance(name, str) and (not name.strip() or "/" in name or "\\" in name or name.startswith(".")):
        errors.append(f"output.output_name: {name!r} must be a plain {what} name (no '/', '\\', no leading '.')")


def _read_as_written(values: dict[str, dict]) -> None:
    """What other tools' configs mean, in our terms, each said once: text-encoder-style attention names in
    training.target_modules are the UNet's projections (and, unless set, the text encoder's targets)."""
    t = values["training"]
    targets = t.get("target_modules")
    if isinstance(targets, list) and any(m in UNET_PROJECTIONS for m in targets):
        unet = list(dict.fromkeys(UNET_PROJECTIONS.get(m, m) for m in targets))
        log.info("training.target_modules %s: the UNet's attention projections %s (the text encoder, if it trains, "
                 "keeps %s)", targets, unet, [m for m in targets if m in UNET_PROJECTIONS])
        t["target_modules"] = unet
        t.setdefault("text_encoder_target_modules", [m for m in targets if m in UNET_PROJECTIONS and m != "o_proj"]
                     or default_value("text_encoder_target_modules"))


# learning rates where the optimizer sets its own step size (Prodigy: the rate scales its estimate, 1.0 as its authors
# and kohya's guides use it), for the keys a config did not set; they then count as set (a family's own do not apply)
OPTIMIZER_LEARNING_RATES = {"prodigy": 1.0}


def _optimizer_defaults(t: dict) -> None:
    rate = OPTIMIZER_LEARNING_RATES.get(t.get("optimizer"))
    if rate is None:
        return
    unset = [k for k in ("learning_rate", "text_encoder_lr") if k not in t]
    for k in unset:
        t[k] = rate
    if unset:
        log.info("training.optimizer %s: %s %g (not set in the config: it finds its own step size, which the rate "
                 "scales)", t["optimizer"], " and ".join(unset), rate)
    trained = {"learning_rate": True, "text_encoder_lr": t.get("train_text_encoder"),
               "text_encoder_2_lr": t.get("train_text_encoder_2")}
    low = [f"{k} {t[k]:g}" for k, on in trained.items()
           if on and isinstance(t.get(k), float) and k not in unset and t[k] < 0.1 * rate]
    if low:
        log.warning("training.optimizer %s: %s scales its own step size: %g is usual, a rate this low trains "
                    "hardly at all", t["optimizer"], ", ".join(low), rate)


def _same_setting(name: str, a, b) -> bool:
    """Whether two values given for one setting are the same once read (``1e-4`` and ``0.0001``, ``"10"`` and
    ``10``); a value that does not read is compared as written."""
    if a == b:
        return True
    (ca, ea), (cb, eb) = _convert(name, a, name), _convert(name, b, name)
    return ea is None and eb is None and ca == cb


def config_from_dict(d: dict | None, source: str = "<config>",
                     given: dict[tuple[str | None, str], str] | None = None) -> Config:
    """Validate a parsed YAML document (nested, flat or mixed) and build the Config. ``given``: the keys the command
    line's ``--set`` put in ``d`` (``override_origins``); a problem with one names that ``--set``, not ``source``."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys to values, got {type(d).__name__}")
    errors: list[str] = []
    raw: dict[str, dict] = {sec: {} for sec in SECTION_CLASSES}
    origin: dict[tuple[str, str], str] = {}  # (section, field) → where it was set, to report clashes
    from_set: dict[tuple[str, str], str] = {}  # (section, field) → the --set that gave it

    def put(section: str | None, key: str, value) -> None:
        name = ALIASES.get(key, key)
        home = FIELD_SECTION.get(name)
        where = f"'{key}' {f'in {section}' if section else 'at top level'}"
        item = (given or {}).get((section, key))
        if home is None:
            errors.append(_from_set(item, _unknown_key(key, section)))
            return
        if section and home != section:  # a known key in another section: taken, as the articles write them
            log.info("%s: read as %s.%s (it usually lives in section '%s')", where, home, name, home)
        if (home, name) in origin and not _same_setting(name, raw[home][name], value):
            errors.append(f"{home}.{name}: set twice with different values ({origin[(home, name)]}: "
                          f"{raw[home][name]!r}, {where}: {value!r}); keep one")
        elif (home, name) not in origin:
            origin[(home, name)] = where
            raw[home][name] = value
            if item:
                from_set[(home, name)] = item

    for key, value in d.items():
        key = str(key)
        if key in SECTION_CLASSES:
            if value is None:
                continue
            if not isinstance(value, dict):
                errors.append(f"section '{key}' must be a mapping of keys to values, got {value!r}")
                continue
            for sub_key, sub_value in value.items():
                put(key, str(sub_key), sub_value)
        else:
            put(None, key, value)

    values: dict[str, dict] = {sec: {} for sec in SECTION_CLASSES}
    for section, items in raw.items():
        for name, value in items.items():
            converted, error = _convert(name, value, f"{section}.{name}")
            if error:
                errors.append(_from_set(from_set.get((section, name)), error))
            else:
                values[section][name] = converted
    checked = len(errors)
    _check_special(values, errors)
    errors[checked:] = [_from_set(next((i for (sec, n), i in from_set.items() if e.startswith(f"{sec}.{n}:")), None), e)
                        for e in errors[checked:]]  # (a check of one key's value that --set gave)
    if not is_text_generation(values):  # (a language model's q_proj is its own)
        _read_as_written(values)
    _optimizer_defaults(values["training"])
    if errors:
        if len(errors) == 1 and errors[0].startswith(SET_PREFIX):
            raise ConfigError(errors[0])  # (the command line's: the file is not at fault)
        listed = errors[0] if len(errors) == 1 else f"{len(errors)} problems:\n  " + "\n  ".join(errors)
        raise ConfigError(f"{source}: {listed}")
    return Config(**{sec: cls(**values[sec]) for sec, cls in SECTION_CLASSES.items()},
                  explicit=frozenset(name for items in values.values() for name in items))


SET_PREFIX = "--set "


def _from_set(item: str | None, error: str) -> str:
    """``error`` about a key the command line's ``--set item`` gave: said so (the config file does not have it)."""
    return f"{SET_PREFIX}{item}: {error}" if item else error


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives the same key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"key '{key}' is given twice, on line {seen[key] + 1} and line "
                                  f"{key_node.start_mark.line + 1}; keep one")
            if isinstance(key, str):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}:{where}: not valid YAML: {problem}") from None


def _override_slot(item: str) -> tuple[str | None, str, object]:
    """Where ``--set KEY=VALUE`` goes in a config dict: (section or None for the top level, the key as written, the
    value read as YAML). A dotted key names its section; a flat one goes to its setting's section (unknown: the top
    level, where validation names it)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. training.epochs=2")
    value = _parse_yaml(text, f"override {item!r}")
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTION_CLASSES:
            raise ConfigError(f"override {item!r}: unknown section '{section}'{_suggest(section, SECTION_CLASSES)}")
        return section, name, value
    return FIELD_SECTION.get(ALIASES.get(key, key)), key, value


def override_origins(overrides: list[str] | None) -> dict[tuple[str | None, str], str]:
    """(section, key) → the ``--set`` item that put it there (``apply_overrides``'s places): for ``config_from_dict``,
    so that a bad value given on the command line is named as such, not as the config file's."""
    return {_override_slot(item)[:2]: item for item in overrides or []}


def apply_overrides(d: dict | None, overrides: list[str] | None) -> dict:
    """``["training.epochs=2", "lr=1e-4"]`` applied to a (nested or flat) config dict; returns a copy."""
    out = copy.deepcopy(d) if d else {}
    for item in overrides or []:
        section, name, value = _override_slot(item)
        canonical = ALIASES.get(name, name)
        for k in {canonical, *(a for a, n in ALIASES.items() if n == canonical)}:
            out.pop(k, None)  # the same setting written elsewhere (flat, in any section: a known key is read where
            for sec in SECTION_CLASSES:  # it belongs, or by its alias) would clash: the override replaces it
                if isinstance(out.get(sec), dict):
                    out[sec].pop(k, None)
        if section is None:
            out[name] = value  # unknown: let validation name it
        else:
            if not isinstance(out.get(section), dict):
                out[section] = {}
            out[section][name] = value
    return out


def _parse_toml(text: str, source: str) -> dict:
    """A ``.toml`` config as kohya's sd-scripts read theirs (``--config_file``): the keys of a table that is not one
    of our sections (``[model_arguments]``, ``[training_arguments]``, ...) are read as top-level keys, and in kohya's
    terms (kohya_config.read_kohya) unless the file has our sections (``[data]``, ``[training]``, ...)."""
    try:
        import tomllib
    except ImportError:  # (Python 3.10)
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(f"{source}: reading a TOML config needs Python 3.11 or the tomli package (pip install "
                              "tomli); or write it as YAML, `key: value` for each `key = value`") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    out: dict = {}
    where: dict[str, str] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and key not in SECTION_CLASSES:
            items, table = value.items(), f"[{key}]"
        else:
            items, table = [(key, value)], "the top level"
        for name, v in items:
            if name in out and out[name] != v:
                raise ConfigError(f"{source}: key '{name}' is given twice, in {where[name]} ({out[name]!r}) and in "
                                  f"{table} ({v!r}); keep one")
            out[name], where[name] = v, table
    if any(key in SECTION_CLASSES for key in doc):  # (our sections: this trainer's config, written as TOML)
        return out
    return read_kohya(out, source)


def _looks_like_toml(text: str) -> bool:
    """Whether the file's first line that is not blank or a comment is TOML's ``key = value`` or ``[table]``."""
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")
    return bool(re.fullmatch(r"[\w.-]+\s*=.*|\[[\w.-]+\]", first))


def load_config(path, overrides: list[str] | None = None) -> Config:
    """A YAML config (or a TOML one, kohya's, by its ``.toml`` suffix), ``overrides`` (``--set``) applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path.resolve()} not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".toml":
        d = _parse_toml(text, str(path))
    else:
        toml_hint = ConfigError(f"{path}: this is not YAML (`key: value`) but looks like TOML (`key = value`, "
                                "kohya's config files): name the file .toml, or write each `key = value` as "
                                "`key: value`") if _looks_like_toml(text) else None
        try:
            d = _parse_yaml(text, str(path))
        except ConfigError:
            if toml_hint:
                raise toml_hint from None
            raise
        if toml_hint and not isinstance(d, dict):
            raise toml_hint
    if d is not None and not isinstance(d, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(d).__name__}")
    return config_from_dict(apply_overrides(d, overrides), source=str(path), given=override_origins(overrides))


def validate_paths(cfg: Config, check_base_model: bool = True, builtin_models: Collection[str] = ()) -> None:
    """Check every path in the config exists and is of the right kind; raise one error listing all.

    ``builtin_models``: the names ``model.base_model`` may take besides a path (the models package owns them,
    ``models.factory.BUILTIN_MODELS``; the config imports nothing of it). The config's own default is one."""
    errors = []
    data_dir = Path(cfg.data.train_data_dir).expanduser().resolve()
    if not cfg.data.train_data_dir:
        errors.append("data.train_data_dir is not set: the folder of training images")
    elif not data_dir.is_dir():
        errors.append(f"data.train_data_dir: {data_dir} is not an existing folder")
    if cfg.data.metadata_path:
        meta = Path(cfg.data.metadata_path).expanduser().resolve()
        if not meta.is_file():
            errors.append(f"data.metadata_path: {meta} does not exist")
    base = cfg.model.base_model
    builtin_models = tuple(dict.fromkeys([ModelConfig.base_model, *builtin_models]))
    if check_base_model and base not in builtin_models:
        p = Path(base).expanduser().resolve()
        if p.suffix.lower() in PICKLE_SUFFIXES:
            errors.append(f"model.base_model: {p} is a pickle checkpoint, which is not loaded for safety "
                          "(it can run code); convert it to .safetensors")
        elif p.is_file():
            if p.suffix.lower() != ".safetensors":
                errors.append(f"model.base_model: {p} is not a .safetensors file or a diffusers folder")
        elif p.is_dir():
            if not (p / "model_index.json").is_file():
                errors.append(f"model.base_model: {p} is a folder without model_index.json (not a diffusers model)")
        else:
            named = f", or a built-in model: {', '.join(builtin_models)}" if builtin_models else ""
            errors.append(f"model.base_model: {p} does not exist (expected a diffusers folder or a .safetensors "
                          f"checkpoint{named})")
    if cfg.data.reg_data_dir and not Path(cfg.data.reg_data_dir).expanduser().is_dir():
        errors.append(f"data.reg_data_dir: {Path(cfg.data.reg_data_dir).expanduser().resolve()} is not an existing "
                      "folder (the regularization images; leave the key out for none)")
    if cfg.data.validation_dir and not Path(cfg.data.validation_dir).expanduser().is_dir():
        errors.append(f"data.validation_dir: {Path(cfg.data.validation_dir).expanduser().resolve()} is not an "
                      "existing folder")
    prompts = cfg.output.sample_prompts
    if isinstance(prompts, str) and not Path(prompts).expanduser().is_file():
        errors.append(f"output.sample_prompts: {Path(prompts).expanduser().resolve()} is not an existing file (a "
                      "file with one prompt per line; or write the prompts in the config as a YAML list)")
    resume = cfg.training.resume_from_checkpoint
    if resume and resume != "latest" and not Path(resume).expanduser().is_dir():
        errors.append(f"training.resume_from_checkpoint: {Path(resume).expanduser().resolve()} is not an existing "
                      "checkpoint folder (or use 'latest')")
    if errors:
        raise ConfigError("\n".join(errors))


def resolve_mixed_precision(value: str, device_type: str, bf16_supported: bool) -> str:
    if device_type != "cuda":
        if value in ("fp16", "bf16"):
            log.warning("mixed_precision %s needs a CUDA GPU; training in fp32 on %s", value, device_type)
        return "no"
    if value == "auto":
        return "bf16" if bf16_supported else "fp16"
    return value


def config_to_dict(cfg: Config) -> dict:
    return {sec: dataclasses.asdict(getattr(cfg, sec)) for sec in SECTION_CLASSES}


# What a model family trains best with where the config does not say (issue 16; kohya's SDXL LoRA guide: dim 32,
# alpha 16, UNet lr 1e-4, text encoder lr 1e-5; SD 2.x 768-v at its own 768). SD 1.x keeps the dataclasses' own.
FAMILY_DEFAULTS = {
    "sdxl": {"resolution": 1024, "lora_rank": 32, "lora_alpha": 16.0, "learning_rate": 1e-4,
             "text_encoder_lr": 1e-5},
    "sd_v2_768_v": {"resolution": 768},
}
FAMILY_NAMES = {"sdxl": "SDXL", "sd_v2_768_v": "SD 2.x 768-v", "sd_v2": "SD 2.x", "sd_v1": "SD 1.x"}


def family_defaults_left(cfg: Config, family: str | None) -> dict:
    """The family's defaults for the keys ``cfg`` did not set (``Config.explicit``)."""
    return {k: v for k, v in FAMILY_DEFAULTS.get(family, {}).items() if k not in cfg.explicit}


def with_family_defaults(cfg: Config, family: str | None) -> tuple[Config, list[str]]:
    """``cfg`` with its model family's defaults where it set nothing, and a line for each one applied
    (``SDXL: resolution 1024 (not set in the config)``)."""
    applied = family_defaults_left(cfg, family)
    sections = {sec: {k: v for k, v in applied.items() if FIELD_SECTION[k] == sec} for sec in SECTION_CLASSES}
    out = dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **items)
                                      for sec, items in sections.items() if items})
    return out, [f"{FAMILY_NAMES.get(family, family)}: {k} {v} (not set in the config)" for k, v in applied.items()]


def save_config(cfg: Config, path) -> Path:
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def default_template() -> str:
    return TEMPLATE.read_text(encoding="utf-8")


def write_template(path) -> Path:
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path.resolve()} already exists; not overwriting it (choose another name)")
    return atomic_write_text(path, default_template())
