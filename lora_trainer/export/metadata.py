"""The ``ss_*`` (kohya sd-scripts) and ``modelspec.*`` (SAI model spec 1.0.1) metadata of a LoRA file.

Every value is a string, written the way kohya's train_network.py writes it (``str(value)``: ``None``
becomes ``"None"``, booleans ``"True"``/``"False"``, JSON fields via ``json.dumps``). The WebUI reads
these: it hides a LoRA whose family (``ss_base_model_version`` starting with ``sdxl_``, else
``ss_v2 == "True"``) does not match the loaded model, and shows the tag frequency and training settings.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

from lora_trainer import __version__
from lora_trainer.data.buckets import BucketSpec

FAMILIES = ("sd_v1", "sd_v2", "sdxl_base_v1-0")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SAI_MODEL_SPEC = "1.0.1"
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"  # kohya's value for SDXL LoRAs
ALIASES = {"sdxl": "sdxl_base_v1-0", "v": "v_prediction", "eps": "epsilon"}  # as some backends name them


def _s(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _size(resolution) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


def _architecture(family: str, v_pred: bool) -> str:
    """As kohya's sai_model_spec.determine_architecture, for a LoRA."""
    if family == "sdxl_base_v1-0":
        arch = "stable-diffusion-xl-v1-base"
    elif family == "sd_v2":
        arch = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    return f"{arch}/lora"


@dataclass(frozen=True)
class ModelFacts:
    """The base model a LoRA was trained on: its ``family`` (``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``/``sdxl``),
    ``prediction_type`` (``epsilon``/``v_prediction``), ``name`` (ss_sd_model_name), ``clip_skip`` if any."""

    family: str
    prediction_type: str
    name: str
    clip_skip: int | None = None


@dataclass(frozen=True)
class RunFacts:
    """What the run did beyond its config: ``steps`` done of ``max_train_steps``, ``epoch`` reached of
    ``num_epochs``, ``num_train_images`` (images × repeats), ``tag_frequency`` ``{dataset: {tag: count}}``,
    ``trained_text_encoder`` (and ``trained_text_encoder_2``, SDXL's second), ``started_at``/``finished_at`` unix
    seconds (``time.time()``)."""

    steps: int
    max_train_steps: int
    epoch: int
    num_epochs: int
    num_train_images: int
    tag_frequency: dict
    trained_text_encoder: bool
    started_at: float
    finished_at: float
    trained_text_encoder_2: bool = False  # SDXL's second text encoder
    bucket_info: dict | None = None  # the aspect-ratio buckets (data.buckets.bucket_info); None: square crops


def _text_encoder_lr(t, run: RunFacts):
    """ss_text_encoder_lr: the trained encoder's rate; with two that differ, both as a list (as newer kohya
    writes its per-encoder ``text_encoder_lr``); None when only the UNet trained."""
    lrs = ([t.text_encoder_lr] if run.trained_text_encoder else []) + (
        [t.text_encoder_2_learning_rate] if run.trained_text_encoder_2 else [])
    if not lrs:
        return None
    return lrs[0] if len(set(lrs)) == 1 else lrs


def build_metadata(cfg, model: ModelFacts, run: RunFacts, extra: dict | None = None) -> dict[str, str]:
    """Metadata for a LoRA trained by ``cfg`` (a lora_trainer Config) on ``model``; every value a ``str``.

    The family is written as kohya does (``sd_v1_v``/``sd_v2_v`` when v-prediction); ss_network_alpha is the
    true lora_alpha; ss_training_comment and modelspec.description carry output.training_comment.
    ``extra``: more keys (``ss_*`` or ``modelspec.*``) to add; dicts and lists become JSON, the rest ``str``.
    """
    t, out = cfg.training, cfg.output
    base_model_version, prediction_type = model.family, model.prediction_type
    resolution, clip_skip, comment = cfg.data.resolution, model.clip_skip, out.training_comment
    text_encoder_lr = _text_encoder_lr(t, run)
    base_model_version = ALIASES.get(base_model_version, base_model_version)
    prediction_type = ALIASES.get(prediction_type, prediction_type)
    if base_model_version not in FAMILIES:
        raise ValueError(f"base_model_version: {base_model_version!r} is not one of {FAMILIES}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: {prediction_type!r} is not one of {PREDICTION_TYPES}")
    v_pred = prediction_type == "v_prediction"
    sdxl = base_model_version.startswith("sdxl")
    width, height = _size(resolution)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _s(int(t.lora_rank)),
        "ss_network_alpha": _s(float(t.lora_alpha)),
        "ss_network_dropout": _s(t.lora_dropout),
        "ss_network_args": json.dumps({"target_modules": list(t.target_modules), **(
            {"conv_dim": str(t.conv_rank), "conv_alpha": str(t.conv_lora_alpha)} if t.conv_rank else {}), **(
            {"loraplus_lr_ratio": str(t.loraplus_lr_ratio)} if t.loraplus_lr_ratio else {})}),
        "ss_base_model_version": base_model_version + ("_v" if v_pred and not sdxl else ""),
        "ss_v2": _s(base_model_version == "sd_v2"),
        "ss_v_parameterization": _s(v_pred),
        "ss_output_name": out.output_name,
        "ss_sd_model_name": model.name,
        "ss_resolution": _s((width, height)),
        "ss_clip_skip": _s(clip_skip),
        "ss_tag_frequency": json.dumps(run.tag_frequency),
        "ss_num_train_images": _s(run.num_train_images),
        "ss_learning_rate": _s(t.learning_rate),
        "ss_unet_lr": _s(t.learning_rate),
        "ss_text_encoder_lr": _s(text_encoder_lr),
        "ss_network_train_unet_only": _s(text_encoder_lr is None),
        "ss_steps": _s(run.steps),
        "ss_max_train_steps": _s(run.max_train_steps),
        "ss_epoch": _s(run.epoch),
        "ss_num_epochs": _s(run.num_epochs),
        "ss_seed": _s(t.seed),
        "ss_batch_size_per_device": _s(t.batch_size),
        "ss_gradient_accumulation_steps": _s(t.gradient_accumulation_steps),
        "ss_lr_scheduler": _s(t.lr_scheduler),
        "ss_optimizer": _s(t.optimizer + (f"({','.join(f'{k}={v}' for k, v in t.optimizer_args.items())})"
                                          if t.optimizer_args else "")),  # (its arguments too, as kohya writes them)
        "ss_mixed_precision": _s(t.mixed_precision),
        **_noise_and_loss_keys(t),
        "ss_zero_terminal_snr": _s(cfg.model.zero_terminal_snr == "true"),
        "ss_fp8_base": _s(t.fp8_base),  # kohya's pair for "the UNet in float8, the text encoders as they are"
        "ss_fp8_base_unet": _s(t.fp8_base),
        **_data_keys(cfg.data, run.bucket_info),
        "ss_training_started_at": _s(run.started_at),
        "ss_training_finished_at": _s(run.finished_at),
        "ss_training_comment": _s(comment or None),
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": _architecture(base_model_version, v_pred),
        "modelspec.implementation": IMPL_STABILITY_AI if sdxl else IMPL_DIFFUSERS,
        "modelspec.implementation_version": f"lora-trainer/{__version__}",
        "modelspec.title": out.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(run.finished_at)).isoformat(),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    if comment:
        meta["modelspec.description"] = comment
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = _s(clip_skip)
    meta.update({k: _s(v) for k, v in (extra or {}).items()})
    return meta


def _noise_and_loss_keys(t) -> dict[str, str]:
    """kohya's keys of the training noise and the loss (engine.loss)."""
    return {
        "ss_noise_offset": _s(t.noise_offset),
        "ss_multires_noise_iterations": _s(t.multires_noise_iterations or None),  # (kohya: None when off)
        "ss_multires_noise_discount": _s(t.multires_noise_discount),
        "ss_ip_noise_gamma": _s(t.ip_noise_gamma or None),
        "ss_debiased_estimation": _s(t.debiased_estimation_loss),
        "ss_min_snr_gamma": _s(t.min_snr_gamma),
        "ss_loss_type": _s(t.loss_type),
        "ss_huber_schedule": _s(t.huber_schedule),
        "ss_huber_scale": _s(t.huber_scale),
        "ss_huber_c": _s(t.huber_c),
    }


def _data_keys(d, bucket_info: dict | None) -> dict[str, str]:
    """kohya's keys of the aspect-ratio buckets and the caption augmentation (data.buckets, data.augment). Without
    buckets, as kohya's datasets write them (train_util: bucket_no_upscale False, the sides None, bucket_info null):
    data.bucket_no_upscale changes nothing then, so its True is not written."""
    spec = BucketSpec.from_data(d) if bucket_info is not None else None
    return {
        "ss_enable_bucket": _s(spec is not None),
        "ss_bucket_no_upscale": _s(spec is not None and bool(d.bucket_no_upscale)),
        "ss_min_bucket_reso": _s(spec.min_reso if spec else None),
        "ss_max_bucket_reso": _s(spec.max_reso if spec else None),
        "ss_bucket_info": json.dumps(bucket_info),  # (kohya: json.dumps, "null" without buckets)
        "ss_shuffle_caption": _s(bool(d.shuffle_caption)),
        "ss_keep_tokens": _s(int(d.keep_tokens)),
        "ss_caption_dropout_rate": _s(float(d.caption_dropout_rate)),
        "ss_caption_dropout_every_n_epochs": _s(int(d.caption_dropout_every_n_epochs)),
        "ss_caption_tag_dropout_rate": _s(float(d.caption_tag_dropout_rate)),
    }
