"""kohya's sd-scripts configs (``train_network.py --config_file my.toml``, what kohya_ss's GUI saves) read as kohya
reads them: its keys in our terms, its defaults where a file leaves a setting out and ours differ, its settings that
change nothing here taken with a log line, and the ones this trainer cannot honour refused together, each with what
it would need. ``config.load_config`` calls ``read_kohya`` on a ``.toml`` file's keys (its tables flattened)."""

from __future__ import annotations

import logging

from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)

# kohya's networks.lora: every Linear (and 1x1 convolution) of the UNet's transformer blocks, and of the text
# encoders' attention and MLP (LoRANetwork.UNET_TARGET_REPLACE_MODULE / TEXT_ENCODER_TARGET_REPLACE_MODULE)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# kohya's defaults (train_util's and train_network's argparse) where ours differ, for the settings a kohya file
# leaves out: our names; the learning rates, text encoder and step count are settled in read_kohya
DEFAULTS = {"batch_size": 1, "gradient_accumulation_steps": 1, "lora_rank": 4, "lora_alpha": 1.0,
            "lora_dropout": 0.0, "caption_extension": ".caption", "enable_bucket": False, "min_bucket_reso": 256,
            "max_bucket_reso": 1024, "save_precision": "fp32", "target_modules": UNET_TARGETS,
            "text_encoder_target_modules": TEXT_ENCODER_TARGETS}
LEARNING_RATE, MAX_TRAIN_STEPS = 2e-6, 1600  # (--learning_rate, --max_train_steps without --max_train_epochs)

# kohya's names for our settings (config.ALIASES holds those that every config may use)
RENAMED = {"max_data_loader_n_workers": "dataloader_num_workers", "caption_extention": "caption_extension",
           "network_dropout": "lora_dropout", "save_every_n_steps": "save_steps",
           "cache_text_encoder_outputs": "cache_text_embeddings"}

# kohya settings that change nothing this trainer does: what happens here instead
NO_EFFECT = {
    "v2": "the model family is told by the model's files",
    "xformers": "attention is PyTorch's SDPA (attention: auto), as fast",
    "sdpa": "attention is PyTorch's SDPA (attention: auto)",
    "mem_eff_attn": "attention is PyTorch's SDPA (attention: auto)",
    "persistent_data_loader_workers": "the images are decoded once and cached",
    "lowram": "the model is loaded as this trainer loads it", "highvram": "memory is managed by this trainer",
    "logging_dir": "the logs go to <output_dir>/logs (TensorBoard) and train.log",
    "log_prefix": "the logs go to <output_dir>/logs", "log_tracker_name": "the logs go to <output_dir>/logs",
    "sample_sampler": "samples use the model's own scheduler",
    "save_state": "resumable checkpoints are written every save_steps and on a stop",
    "save_state_on_train_end": "resumable checkpoints are written every save_steps and on a stop",
    "save_last_n_epochs": "every epoch's LoRA is kept", "save_last_n_epochs_state": "checkpoints_total_limit",
    "save_last_n_steps": "checkpoints_total_limit", "save_last_n_steps_state": "checkpoints_total_limit",
    "no_half_vae": "the VAE encodes in fp32", "full_fp16": "the LoRA weights train in fp32 (mixed_precision autocasts)",
    "full_bf16": "the LoRA weights train in fp32 (mixed_precision autocasts)",
    "vae_batch_size": "latents are cached as this trainer batches them", "debug_dataset": "(off)",
    "cache_text_encoder_outputs_to_disk": "text embeddings are cached in memory",
    "console_log_level": "", "console_log_file": "", "console_log_simple": "", "wandb_api_key": "",
    "wandb_run_name": "", "log_tracker_config": "", "log_config": "", "output_config": "", "tokenizer_cache_dir": "",
    "metadata_title": "", "metadata_author": "", "metadata_description": "", "metadata_license": "",
    "metadata_tags": "", "ddp_gradient_as_bucket_view": "", "ddp_static_graph": "", "skip_cache_check": "",
    "huggingface_repo_id": "", "huggingface_token": "", "huggingface_repo_type": "", "save_state_to_huggingface": "",
    "huggingface_path_in_repo": "", "huggingface_repo_visibility": "", "async_upload": "",
    "resume_from_huggingface": "",
}

# kohya settings taken only at the value that trains as here: (the values, what this trainer does)
ONLY = {
    "network_module": (("networks.lora",), "the LoRA is kohya's networks.lora kind (LyCORIS, DyLoRA, OFT are not "
                                           "trained here)"),
    "save_model_as": (("safetensors",), "the LoRA is always a .safetensors file"),
    "caption_separator": ((",",), "a caption's tags are separated by commas"),
    "color_aug": ((False,), "no colour augmentation (random_flip, random_crop are)"),
    "network_train_text_encoder_only": ((False,), "the UNet always trains"),
    "masked_loss": ((False,), "every pixel counts"),
    "enable_wildcard": ((False,), "a caption file is one caption"),
    "noise_offset_random_strength": ((False,), "noise_offset is a fixed strength"),
    "dim_from_weights": ((False,), "the rank is lora_rank"),
    "adaptive_noise_scale": ((None, 0), "noise_offset is a fixed strength"),
    "scale_weight_norms": ((None, 0), "no max-norm regularization"),
    "v_pred_like_loss": ((None, 0), "the loss is the model's own target's"),
    "network_weights": ((None, ""), "a run starts from a new LoRA or a checkpoint of its own (resume_from_checkpoint)"),
    "resume": ((None, ""), "resume_from_checkpoint takes this trainer's checkpoints (kohya's state folders are not "
                           "read)"),
    "dataset_config": ((None, ""), "the dataset is train_data_dir (kohya's <repeats>_<name> folders are read) and "
                                   "the data keys in this file"),
    "in_json": ((None, ""), "captions come from .txt/.caption sidecars or metadata.csv"),
    "vae": ((None, ""), "the model's own VAE is used"),
    "keep_tokens_separator": ((None, ""), "keep_tokens counts tags"),
    "lr_scheduler_type": ((None, ""), "lr_scheduler is one of this trainer's"),
    "lr_scheduler_args": ((None, "", ()), "lr_scheduler takes lr_scheduler_num_cycles and lr_scheduler_power"),
}


def _is(value, allowed: tuple) -> bool:
    """Whether a TOML value is one of ``allowed`` (text without case; () an empty list; numbers by value)."""
    for a in allowed:
        if (a == () and isinstance(value, list) and not value) or (a is None and value is None) or (
                isinstance(a, str) and isinstance(value, str) and value.strip().lower() == a) or (
                isinstance(a, bool) and value is a) or (
                type(a) is int and isinstance(value, (int, float)) and not isinstance(value, bool) and value == a):
            return True
    return False


def read_kohya(doc: dict, source: str) -> dict:
    """``doc`` (a kohya config's keys, its tables flattened) in our terms. Raises one ConfigError listing every kohya
    setting that cannot train as kohya's would here."""
    from lora_trainer.config import ALIASES

    out, errors, notes = {}, [], []
    for key, value in doc.items():
        if key in NO_EFFECT:
            if value not in (None, False, "", []):
                notes.append(f"{key} = {value!r}: {NO_EFFECT[key] or 'no setting here'}")
        elif key in ONLY:
            allowed, here = ONLY[key]
            if not _is(value, allowed):
                shown = " or ".join(repr(a) for a in allowed if a not in (None, ())) or "unset"
                errors.append(f"kohya's {key} = {value!r} is not trained here: {here} (take it out, or {key} = "
                              f"{shown})")
        elif key in RENAMED:
            out[RENAMED[key]] = value
            if key == "save_every_n_steps":
                notes.append(f"{key} = {value!r}: a resumable checkpoint every {value} steps (save_steps); the LoRA "
                             "file is written at the end and on a stop")
        elif key == "max_token_length":
            if value not in (None, 75):
                log.warning("%s: max_token_length = %r: a caption is one 75-token window here; longer captions are "
                            "cut (python -m lora_trainer check names them)", source, value)
        elif key == "network_args":
            errors += _network_args(value, out)
        elif key == "v_parameterization":
            if value is True:
                out["prediction_type"] = "v_prediction"
            elif value is not False:
                errors.append(f"kohya's v_parameterization: expected true or false, got {value!r}")
        elif key == "network_train_unet_only":
            if not isinstance(value, bool):
                errors.append(f"kohya's network_train_unet_only: expected true or false, got {value!r}")
            else:
                out["train_text_encoder"] = not value
        elif key == "zero_terminal_snr" and isinstance(value, bool):
            out[key] = str(value).lower()
        elif key == "save_precision" and value == "float":
            out[key] = "fp32"
        elif key == "log_with" and value in ("wandb", "all"):
            notes.append(f"log_with = {value!r}: the logs go to TensorBoard only")
            out[key] = "tensorboard"
        elif key not in ("unet_lr", "text_encoder_lr", "learning_rate"):
            out[key] = value
    errors += _learning_rates(doc, out)
    if errors:
        listed = errors[0] if len(errors) == 1 else f"{len(errors)} problems:\n  " + "\n  ".join(errors)
        raise ConfigError(f"{source} (read as kohya's sd-scripts config): {listed}")

    sdxl = _is_sdxl(out)
    if sdxl:
        _sdxl_clip_skip(out, source)
    given = {ALIASES.get(k, k) for k in out}
    defaults = {k: v for k, v in DEFAULTS.items() if k not in given}
    if not given & {"max_train_steps", "epochs"}:
        defaults["max_train_steps"] = MAX_TRAIN_STEPS
    if "train_text_encoder" not in given:
        defaults["train_text_encoder"] = True  # (kohya trains the text encoder unless network_train_unet_only)
    te = out.get("train_text_encoder", defaults.get("train_text_encoder"))
    if te and sdxl and "train_text_encoder_2" not in given:  # (kohya's SDXL LoRA holds both: lora_te1_, lora_te2_)
        defaults["train_text_encoder_2"] = True
    if not given & {"sample_prompts"}:  # (kohya samples nothing without prompts)
        for name in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first"):
            if out.pop(name, None):
                notes.append(f"{name}: no sample_prompts, so nothing is sampled (as kohya)")
    for note in notes:
        log.info("%s: kohya's %s", source, note)
    if defaults:
        log.info("%s: kohya's defaults for what the file leaves out: %s", source,
                 ", ".join(f"{k} {v}" for k, v in defaults.items()))
    if te:
        log.info("%s: the text encoder%s, as kohya's default (network_train_unet_only = true: the UNet only)",
                 source, "s train (SDXL's both)" if sdxl else " trains")
    return defaults | out


def _is_sdxl(out: dict) -> bool:
    """Whether the file's base model is SDXL, as its files say (nothing is loaded)."""
    from lora_trainer.models.family import family_of

    return family_of(out.get("pretrained_model_name_or_path") or out.get("base_model")) == "sdxl"


def _sdxl_clip_skip(out: dict, source: str) -> None:
    """kohya's SDXL training warns that clip_skip does not work for SDXL and trains without it: so here (an SDXL base
    model) (this trainer refuses clip_skip for SDXL where its own config sets it)."""
    skip = out.get("clip_skip")
    if skip not in (None, 1):
        log.warning("%s: kohya's clip_skip = %r is not used for an SDXL model (SDXL takes its text encoders' "
                    "penultimate layers by design; kohya's SDXL training ignores it too)", source, skip)
        out.pop("clip_skip")


def _network_args(value, out: dict) -> list[str]:
    """networks.lora's ``network_args = ["conv_dim=4", "conv_alpha=1"]``: conv_dim is conv_rank here (the UNet's
    ResNet blocks get LoRA layers, their 3x3 convolutions at this rank), conv_alpha conv_alpha (kohya's default 1 with
    conv_dim; without conv_dim kohya does not read it), loraplus_lr_ratio loraplus_lr_ratio (LoRA+). Any other
    argument is refused by name."""
    if value in (None, "", []):
        return []
    items = value if isinstance(value, list) else [value]
    args, errors = {}, []
    for item in items:
        name, eq, arg = str(item).partition("=")
        if not eq or not name.strip():
            errors.append(f"kohya's network_args item {item!r}: expected name=value, e.g. \"conv_dim=4\"")
        else:
            args[name.strip()] = arg.strip()
    for name in sorted(set(args) - {"conv_dim", "conv_alpha", "loraplus_lr_ratio"}):
        errors.append(f"kohya's network_args {name}={args[name]} is not trained here: of networks.lora's arguments "
                      "only conv_dim, conv_alpha and loraplus_lr_ratio are (take it out)")
    try:
        rank = int(args["conv_dim"]) if "conv_dim" in args else 0
        alpha = float(args.get("conv_alpha", 1.0))
        plus = float(args["loraplus_lr_ratio"]) if "loraplus_lr_ratio" in args else None
    except ValueError:
        return errors + [f"kohya's network_args {', '.join(f'{k}={v}' for k, v in args.items())}: conv_dim takes a "
                         "whole number, conv_alpha and loraplus_lr_ratio a number"]
    if rank:
        out["conv_rank"], out["conv_alpha"] = rank, alpha
    if plus:
        out["loraplus_lr_ratio"] = plus
    return errors


def _learning_rates(doc: dict, out: dict) -> list[str]:
    """kohya's rates: the UNet's is unet_lr, else learning_rate; a text encoder's text_encoder_lr (a list: SDXL's
    first and second), else learning_rate (kohya's default 2e-6 where neither is given)."""
    errors = []
    rate = doc.get("learning_rate", LEARNING_RATE)
    unet = doc.get("unet_lr")
    if unet is not None and not isinstance(unet, bool) and unet == 0:
        errors.append("kohya's unet_lr = 0 (the text encoder alone) is not trained here: the UNet always trains")
    out["learning_rate"] = rate if unet is None else unet
    te = doc.get("text_encoder_lr")
    if isinstance(te, list):
        if not 1 <= len(te) <= 2:
            errors.append(f"kohya's text_encoder_lr = {te!r}: expected one rate, or two (SDXL's text encoders)")
        else:
            out["text_encoder_lr"], out["text_encoder_2_lr"] = te[0], te[-1]
    else:
        out["text_encoder_lr"] = rate if te is None else te
    return errors
