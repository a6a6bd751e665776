"""The ``ss_*`` (kohya sd-scripts) and ``modelspec.*`` (SAI model spec) metadata of a LoRA file.

Every value is a string. The WebUI reads these: it hides a LoRA whose ``ss_base_model_version`` does
not match the loaded model's family, and shows the tag frequency and training settings.
"""

from __future__ import annotations

import datetime
import json

ARCHITECTURES = {
    "sd_v1": "stable-diffusion-v1",
    "sd_v2": "stable-diffusion-v2-512",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
}


def _s(value) -> str:
    return "None" if value is None else str(value)


def build_metadata(*, output_name: str, rank: int, alpha: float, dropout: float, base_model_version: str,
                   prediction_type: str, sd_model_name: str, resolution: int, tag_frequency: dict,
                   num_train_images: int, learning_rate: float, unet_lr: float, text_encoder_lr: float | None,
                   steps: int, max_train_steps: int, epoch: int, num_epochs: int, seed: int, batch_size: int,
                   gradient_accumulation_steps: int, lr_scheduler: str, optimizer: str, mixed_precision: str,
                   noise_offset: float, min_snr_gamma: float | None, training_started_at: float,
                   training_finished_at: float, comment: str = "", network_args: dict | None = None) -> dict[str, str]:
    """Metadata for a LoRA trained with these settings.

    ``base_model_version``: ``sd_v1``, ``sd_v2`` or ``sdxl_base_v1-0``; ``prediction_type``: ``epsilon`` or
    ``v_prediction``; ``tag_frequency``: ``{dataset name: {tag: count}}``; times are unix seconds.
    """
    v_pred = prediction_type == "v_prediction"
    arch = ARCHITECTURES.get(base_model_version, base_model_version)
    if base_model_version == "sd_v2" and v_pred:
        arch = "stable-diffusion-v2-768-v"
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _s(rank),
        "ss_network_alpha": _s(float(alpha)),
        "ss_network_dropout": _s(dropout),
        "ss_network_args": json.dumps(network_args or {}),
        "ss_base_model_version": base_model_version,
        "ss_v2": _s(base_model_version == "sd_v2"),
        "ss_v_parameterization": _s(v_pred),
        "ss_output_name": output_name,
        "ss_sd_model_name": sd_model_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "ss_num_train_images": _s(num_train_images),
        "ss_learning_rate": _s(learning_rate),
        "ss_unet_lr": _s(unet_lr),
        "ss_text_encoder_lr": _s(text_encoder_lr),
        "ss_network_train_unet_only": _s(text_encoder_lr is None),
        "ss_steps": _s(steps),
        "ss_max_train_steps": _s(max_train_steps),
        "ss_epoch": _s(epoch),
        "ss_num_epochs": _s(num_epochs),
        "ss_seed": _s(seed),
        "ss_batch_size_per_device": _s(batch_size),
        "ss_gradient_accumulation_steps": _s(gradient_accumulation_steps),
        "ss_lr_scheduler": lr_scheduler,
        "ss_optimizer": optimizer,
        "ss_mixed_precision": mixed_precision,
        "ss_noise_offset": _s(noise_offset),
        "ss_min_snr_gamma": _s(min_snr_gamma),
        "ss_training_started_at": _s(training_started_at),
        "ss_training_finished_at": _s(training_finished_at),
        "ss_training_comment": comment or "None",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.fromtimestamp(training_finished_at).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    if comment:
        meta["modelspec.description"] = comment
    return meta
