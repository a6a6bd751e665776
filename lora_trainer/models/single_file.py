"""Single-file checkpoints (what the WebUI keeps in models/Stable-diffusion): told apart, and loaded offline.

What a file holds is read from its header alone, before anything loads (key names and one tensor's shape; no
tensor is read): the family (SD 1.x, SD 2.x, SDXL), the marker keys some SDXL finetunes carry (``v_pred``,
``ztsnr``: empty tensors in NoobAI-XL V-pred and its kind, read by A1111's dev branch), and the kinds that are
refused with a message (SDXL refiner, SD3, Flux, inpainting and other image-conditioned UNets).

diffusers' ``from_single_file`` needs the model's diffusers config files and tokenizers; they ship in
``configs/sd15`` and ``configs/sdxl`` (no weights), so nothing is fetched from a hub. SDXL's two tokenizers
use the CLIP vocabulary files of ``configs/sd15`` (the same BPE tables; the second pads with ``!``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.compat import dtype_kwargs

log = logging.getLogger(__name__)

SD15_CONFIG = Path(__file__).parent / "configs" / "sd15"
SDXL_CONFIG = Path(__file__).parent / "configs" / "sdxl"
CONFIGS = {"sd_v1": SD15_CONFIG, "sdxl": SDXL_CONFIG}  # the families a single file loads as
MARKERS = ("v_pred", "ztsnr")  # marker keys some SDXL finetunes carry (A1111 dev PR #16567, #16569)
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"  # its input channels: 4, or 9 for inpainting
FAMILY_NAMES = {"sd_v1": "Stable Diffusion 1.x", "sd_v2": "Stable Diffusion 2.x", "sdxl": "SDXL",
                "sdxl_refiner": "an SDXL refiner", "sd3": "Stable Diffusion 3", "flux": "Flux",
                "unknown": "not a Stable Diffusion checkpoint we recognise",
                "lora": "a LoRA, not a base model: a LoRA goes in the WebUI's models/Lora folder (or is "
                        "trained from a base model, not from it); give a full checkpoint or a diffusers folder"}
# what a loadable checkpoint of each family holds: part → the prefix of its keys
PARTS = {"sd_v1": {"UNet": "model.diffusion_model.", "VAE": "first_stage_model.",
                   "text encoder": "cond_stage_model.transformer."},
         "sdxl": {"UNet": "model.diffusion_model.", "VAE": "first_stage_model.",
                  "first text encoder": "conditioner.embedders.0.transformer.",
                  "second text encoder": "conditioner.embedders.1.model."}}
SUPPORTED = ("single-file checkpoints of Stable Diffusion 1.x and SDXL (base models and their finetunes, epsilon "
             "or v-prediction) are supported")


@dataclass(frozen=True)
class CheckpointFacts:
    """What a single-file checkpoint's header says (``inspect_checkpoint``)."""

    family: str  # sd_v1 | sd_v2 | sdxl | sdxl_refiner | sd3 | flux | unknown
    markers: frozenset[str]  # of MARKERS
    in_channels: int | None  # of the UNet's first convolution (4 for text-to-image), None if it has none
    missing: tuple[str, ...] = ()  # parts of its family (PARTS) that it has no keys for

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if "v_pred" in self.markers else "epsilon"

    @property
    def zero_terminal_snr(self) -> bool:
        return "ztsnr" in self.markers


def _family(keys: set[str]) -> str:
    if keys and all(k.startswith(("lora_unet_", "lora_te", "lora_te1_", "lora_te2_")) for k in keys) or any(
            k.endswith((".lora_A.weight", ".lora_down.weight")) for k in keys):
        return "lora"
    if any("joint_blocks." in k for k in keys):
        return "sd3"
    if any("double_blocks." in k for k in keys):
        return "flux"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        refiner = any(k.startswith("conditioner.embedders.0.model.") for k in keys)
        return "sdxl_refiner" if refiner and not any(k.startswith("conditioner.embedders.1.") for k in keys) else "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd_v2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) and any(
            k.startswith("model.diffusion_model.") for k in keys):
        return "sd_v1"
    return "unknown"


def inspect_checkpoint(path) -> CheckpointFacts:
    """Family, marker keys and input channels from the ``.safetensors`` header only (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            shape = f.get_slice(FIRST_CONV).get_shape() if FIRST_CONV in keys else None
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ModelLoadError(f"model.base_model: {path} is not a readable .safetensors file ({e})") from None
    in_channels = int(shape[1]) if shape is not None and len(shape) == 4 else None
    family = _family(keys)
    parts = PARTS.get(family, {})
    missing = tuple(part for part, prefix in parts.items() if not any(k.startswith(prefix) for k in keys))
    return CheckpointFacts(family, frozenset(k for k in MARKERS if k in keys), in_channels, missing)


def detect_family(path) -> str:
    """``sd_v1``, ``sd_v2``, ``sdxl``, ``sdxl_refiner``, ``sd3``, ``flux`` or ``unknown``, from the key names."""
    return inspect_checkpoint(path).family


def check_single_file(path) -> CheckpointFacts:
    """The facts of a checkpoint that loads here, or ModelLoadError naming the file and what is supported."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model.base_model: {path} does not exist (or is not a file)")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"model.base_model: {path} is not a .safetensors file; pickle checkpoints (.ckpt, .pt, "
                             ".bin) are not loaded for safety (they can run code): convert it to .safetensors")
    facts = inspect_checkpoint(path)
    if facts.family == "sd_v2":
        raise ModelLoadError(f"model.base_model: {path.name} looks like {FAMILY_NAMES['sd_v2']}, which is not "
                             f"supported as a single file: {SUPPORTED} (for SD 2.x, point base_model at a diffusers "
                             "folder)")
    if facts.family == "lora":
        raise ModelLoadError(f"model.base_model: {path.name} is {FAMILY_NAMES['lora']}: {SUPPORTED}")
    if facts.family not in CONFIGS:
        raise ModelLoadError(f"model.base_model: {path.name} looks like {FAMILY_NAMES[facts.family]}, which is not "
                             f"supported: {SUPPORTED}")
    if facts.in_channels not in (None, 4):
        raise ModelLoadError(f"model.base_model: {path.name} is an inpainting (or other image-conditioned) model: its "
                             f"UNet takes {facts.in_channels} input channels ({FIRST_CONV}), a text-to-image one 4; "
                             f"LoRAs are trained on text-to-image models: {SUPPORTED}")
    if facts.missing:
        wanted = ", ".join(f"{part} ({PARTS[facts.family][part]}*)" for part in facts.missing)
        raise ModelLoadError(f"model.base_model: {path.name} looks like {FAMILY_NAMES[facts.family]} but has no "
                             f"weights for its {wanted}: a UNet-only or partial file? A full checkpoint is needed")
    return facts


def is_sdxl_file(path) -> bool:
    """Whether ``path`` is a ``.safetensors`` file whose keys are an SDXL base model's (or a finetune's)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() == ".safetensors" and detect_family(path) == "sdxl"


def _tokenizers(config: Path) -> dict:
    """Tokenizers that the config folder describes without vocabulary files (the shipped SDXL one): CLIP's
    vocabulary from configs/sd15 with the folder's special tokens (SDXL's second tokenizer pads with "!")."""
    from transformers import CLIPTokenizer

    out = {}
    for name in ("tokenizer", "tokenizer_2"):
        folder = config / name
        if folder.is_dir() and not any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            tokens = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
            out[name] = CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer", **tokens)
    return out


def _with_markers(pipe, facts: CheckpointFacts, name: str):
    """The pipeline's scheduler as the marker keys say: v-prediction, zero terminal SNR (rescaled betas), as a
    diffusers folder of such a model says in its scheduler config. The backend's noise scheduler (so
    ``model.prediction_type: auto``) and ``model.zero_terminal_snr: auto`` read them from there."""
    changes = {}
    if "v_pred" in facts.markers:
        changes["prediction_type"] = "v_prediction"
        log.info("%s has the 'v_pred' marker key: a v-prediction model (model.prediction_type: auto follows it)", name)
    if facts.zero_terminal_snr:
        changes["rescale_betas_zero_snr"] = True
        log.info("%s has the 'ztsnr' marker key: trained with zero terminal SNR (model.zero_terminal_snr: auto "
                 "follows it)", name)
    if changes:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **changes)
    return pipe


def _check_every_weight_loaded(pipe, path: Path) -> None:
    """diffusers leaves a weight the file lacks on the meta device (warning at most): say which, and stop."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        missing = [k for k, t in (module.state_dict().items() if module is not None else ()) if t.is_meta]
        if missing:
            raise ModelLoadError(f"model.base_model: {path.name} has no weights for {name} ({', '.join(missing[:3])}"
                                 f"{' ...' if len(missing) > 3 else ''}): a damaged or partial checkpoint?")


def load_single_file_pipeline(path, torch_dtype: torch.dtype = torch.float32, config_dir=None):
    """A single-file SD 1.x or SDXL ``.safetensors`` checkpoint as a StableDiffusionPipeline or
    StableDiffusionXLPipeline, offline; ``config_dir``: a diffusers folder whose configs (and tokenizers) to use
    instead of the shipped ones. Refused kinds are refused before anything loads (``check_single_file``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    facts = check_single_file(path)
    config = Path(config_dir) if config_dir else CONFIGS[facts.family]
    if not (config / "model_index.json").is_file():
        # diffusers reads any other string as a hub repo id and, finding nothing cached, downloads it
        # even with local_files_only=True: refuse before that can happen
        raise ModelLoadError(f"model.base_model: the config folder {config} for {path.name} has no model_index.json "
                             "(a diffusers-format config folder is needed; a broken install misses the shipped one)")
    log.info("loading single-file %s checkpoint %s (config %s)", FAMILY_NAMES[facts.family], path, config)
    if facts.family == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {"add_watermarker": False, **_tokenizers(config)}
    else:
        cls, extra = StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True,
                                    **dtype_kwargs(torch_dtype), **extra)
    except Exception as e:  # diffusers raises many kinds (OSError, ValueError, KeyError, RuntimeError...)
        raise ModelLoadError(f"model.base_model: could not load {path}: {type(e).__name__}: {e}") from e
    _check_every_weight_loaded(pipe, path)
    return _with_markers(pipe, facts, path.name)
