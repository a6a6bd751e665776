"""What the WebUI's loaded model is, for training: refused kinds, and its prediction type and noise schedule.

A1111 v1.10.1 sets ``is_sdxl``/``is_sd2``/``is_sd3``/``is_sdxl_inpaint`` and ``parameterization`` on the model it
loads. It does not detect SDXL v-prediction (NoobAI-XL V-pred and the like carry empty ``v_pred``/``ztsnr``
marker tensors; only A1111's dev branch reads them, and a ``.yaml`` beside the file does it in a release): the
checkpoint file's keys are read here too (its header only), so training uses the objective the weights were
trained with, and the user is told when the WebUI's own generation does not.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lora_trainer.errors import LoraTrainerError, ModelLoadError
from lora_trainer.models.ldm import ldm_family
from lora_trainer.models.sgm import size_embedders
from lora_trainer.models.single_file import inspect_checkpoint

log = logging.getLogger(__name__)


def refuse_untrainable(sd_model, cfg, cmd_opts) -> str:
    """The loaded model's family (sd_v1, sd_v2, sdxl), or LoraTrainerError saying why it cannot be trained here."""
    if sd_model is None:
        raise LoraTrainerError("no model is loaded: choose a Stable Diffusion 1.x, 2.x or SDXL checkpoint at the top "
                               "of the page")
    if getattr(sd_model, "is_sd3", False) or not hasattr(sd_model, "model"):
        raise LoraTrainerError("the loaded model is not Stable Diffusion 1.x, 2.x or SDXL (SD3, Flux and others are "
                               "not trained here): load one of those at the top of the page")
    if getattr(sd_model, "is_sdxl_inpaint", False) or _in_channels(sd_model) not in (None, 4):
        raise LoraTrainerError("the loaded model is an inpainting model; LoRAs are trained on text-to-image models: "
                               "load the base model it was made from")
    if _stores_fp8(sd_model.model):
        raise LoraTrainerError("the loaded model's weights are stored in FP8 (Settings → Optimizations → FP8 weight); "
                               "LoRA training needs them in fp16/bf16/fp32: set FP8 weight to Disable and reload the "
                               "model")
    family = ldm_family(sd_model)
    if family == "sdxl":
        size_embedders(sd_model.conditioner)  # a refiner's (aesthetic score) is refused here
    t = cfg.training
    if family == "sd_v2" and t.train_text_encoder:
        raise LoraTrainerError("training the text encoder of SD 2.x (OpenCLIP) is not supported yet; "
                               "turn off 'Train the text encoder'")
    if family == "sdxl" and t.train_text_encoder_2:
        raise LoraTrainerError("training SDXL's second text encoder is not supported inside the WebUI (it is "
                               "OpenCLIP there, which peft cannot wrap); turn off 'Train the second text encoder' "
                               "(the first one can train), or train it with the command line")
    if family != "sdxl" and t.train_text_encoder_2:
        raise LoraTrainerError(f"training.train_text_encoder_2: the loaded model ({family}) has one text encoder")
    if getattr(cmd_opts, "lowvram", False) or getattr(cmd_opts, "medvram", False) or (
            family == "sdxl" and getattr(cmd_opts, "medvram_sdxl", False)):
        raise LoraTrainerError("training does not work with --medvram/--lowvram/--medvram-sdxl (they move the model "
                               "between CPU and GPU); restart the WebUI without them")
    return family


def _stores_fp8(unet) -> bool:
    import torch

    fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
    return any(m.weight.dtype in fp8 for m in unet.modules() if isinstance(m, torch.nn.Linear))


def _in_channels(sd_model) -> int | None:
    first = getattr(getattr(sd_model.model, "diffusion_model", None), "input_blocks", None)
    try:
        return int(first[0][0].in_channels)
    except (TypeError, AttributeError, IndexError):
        return None


def checkpoint_markers(sd_model) -> frozenset[str]:
    """The marker keys (``v_pred``, ``ztsnr``) in the loaded checkpoint file's header; empty if not readable."""
    filename = getattr(getattr(sd_model, "sd_checkpoint_info", None), "filename", None)
    if not filename or Path(filename).suffix.lower() != ".safetensors":
        return frozenset()
    try:
        return inspect_checkpoint(filename).markers
    except ModelLoadError as e:  # a file the WebUI could load but we cannot read: say so, train as the WebUI says
        log.warning("could not look for v-prediction markers: %s", e)
        return frozenset()


def schedule_facts(sd_model, cfg, opts) -> tuple[str, bool]:
    """(prediction_type, zero terminal SNR) to train with: the config's prediction_type unless auto, else the
    checkpoint's ``v_pred`` marker or the WebUI's ``parameterization``; zero terminal SNR from the ``ztsnr``
    marker, the model's ``ztsnr`` (A1111 dev) or Settings → Noise schedule "Zero Terminal SNR"."""
    markers = checkpoint_markers(sd_model)
    webui_v = getattr(sd_model, "parameterization", "eps") == "v"
    if "v_pred" in markers and not webui_v:
        log.warning("the loaded checkpoint is a v-prediction model (its 'v_pred' key), but the WebUI loaded it as "
                    "epsilon: training uses v-prediction; the WebUI's own images (and the samples) will be wrong "
                    "until it knows (a .yaml beside the checkpoint with VScaling, or a WebUI that reads the key)")
    prediction = cfg.model.prediction_type
    if prediction == "auto":
        prediction = "v_prediction" if webui_v or "v_pred" in markers else "epsilon"
    # the setting applies to whatever model is loaded; an epsilon model has no use for it (nothing to predict at
    # SNR 0), so only a v-prediction one takes it
    setting = getattr(opts, "sd_noise_schedule", "Default") == "Zero Terminal SNR" and prediction == "v_prediction"
    ztsnr = "ztsnr" in markers or bool(getattr(sd_model, "ztsnr", False)) or setting
    if "ztsnr" in markers and not getattr(sd_model, "ztsnr", False) and not setting:
        log.warning("the loaded checkpoint was trained with zero terminal SNR (its 'ztsnr' key) but the WebUI samples "
                    "without it: set Settings → Sampler parameters → Noise schedule for sampling to \"Zero Terminal "
                    "SNR\" for its images (and the samples) to match")
    if ztsnr and cfg.model.zero_terminal_snr == "auto":
        log.info("zero terminal SNR: the loaded model is trained so (%s)", "its 'ztsnr' key" if "ztsnr" in markers
                 else "the WebUI's noise schedule setting")
    return prediction, ztsnr
