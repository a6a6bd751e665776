"""The WebUI host: train the model AUTOMATIC1111 has loaded, in place, on its GPU, under its queue lock.

This package is the only code that imports ``modules.*`` (the WebUI's own modules).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path

from lora_trainer.config import default_value
from lora_trainer.engine.lora import remove_lora
from lora_trainer.errors import LoraTrainerError
from lora_trainer.models.ldm import LdmBackend, ldm_family
from lora_trainer.models.sgm import SgmBackend
from lora_trainer.ui.views import SWEEP_STEPS
from lora_trainer.utils.fsio import write_new
from lora_trainer.utils.host_memory import give_back_freed_memory
from lora_trainer.webui.model_checks import refuse_untrainable, schedule_facts

log = logging.getLogger(__name__)
SECTION = ("lora_trainer", "LoRA Trainer")
# WebUI Settings → "LoRA Trainer": the tab's defaults (option name → config key, label); the values start at
# the config's own defaults (lora_trainer.config's dataclasses)
OPTIONS = {
    "lora_trainer_lora_rank": ("lora_rank", "Default LoRA rank"),
    "lora_trainer_lora_alpha": ("lora_alpha", "Default LoRA alpha"),
    "lora_trainer_learning_rate": ("learning_rate", "Default learning rate"),
    "lora_trainer_batch_size": ("batch_size", "Default batch size"),
    "lora_trainer_epochs": ("epochs", "Default epochs"),
    "lora_trainer_resolution": ("resolution", "Default training resolution"),
    "lora_trainer_gradient_checkpointing": ("gradient_checkpointing", "Gradient checkpointing by default"),
}


def _networks():
    """The built-in Lora extension's module, if it is loaded."""
    return sys.modules.get("networks")


def unapply_lora_networks(sd_model) -> int:
    """Put back the base weights the built-in Lora extension merged in place; returns how many layers.

    The extension changes weights in place at the first forward after a prompt names a LoRA, and keeps
    the originals in ``network_weights_backup``. With no network loaded, the next generation after
    training re-applies whatever its prompt asks for.
    """
    networks = _networks()
    if networks is None:
        return 0
    import torch

    networks.loaded_networks.clear()
    restored = 0
    with torch.no_grad():  # the extension restores inside generation, where grad is off; here too
        for module in sd_model.modules():
            if getattr(module, "network_current_names", ()) != ():
                networks.network_restore_weights_from_backup(module)
                module.network_current_names = ()
                restored += 1
    return restored


def emphasis_mode(cfg) -> str:
    """The WebUI's emphasis mode (Settings → Stable Diffusion → Emphasis mode), which reads its prompt syntax."""
    from modules import shared

    if getattr(shared.opts, "use_old_emphasis_implementation", False) and not cfg.data.weighted_captions:
        log.warning("the WebUI uses its old emphasis implementation, which escaped brackets do not reach: brackets "
                    "in captions weigh their words; set Emphasis mode to None to train captions as written")
    return str(getattr(shared.opts, "emphasis", "Original"))


def host_clip_skip(family: str | None) -> int | None:
    """The WebUI's Clip skip (Settings → Stable Diffusion), with which it encodes an SD 1.x/2.x prompt; None for SDXL
    (whose encoders' layers are fixed) or where the setting is not there."""
    from modules import shared

    value = getattr(shared.opts, "CLIP_stop_at_last_layers", None)
    return int(value) if family != "sdxl" and isinstance(value, (int, float)) else None


class WebUIHost:
    name = "webui"
    chooses_base_model, sends_to_txt2img = False, True  # the model the WebUI has loaded; its txt2img tab
    trains_text_encoder_2 = False  # SDXL's second encoder is OpenCLIP in the WebUI: peft 0.13.2 cannot wrap it

    def __init__(self):
        self._saved = None  # (requires_grad flags, training modes) of the model before training
        self.image_size = None  # the last training's resolution (samples are made at it); None before one

    # --- settings and places
    def defaults(self) -> dict:
        from modules import shared

        return {key: getattr(shared.opts, opt, default_value(key)) for opt, (key, _) in OPTIONS.items()}

    @property
    def run_root(self) -> Path:
        from modules import paths

        return Path(paths.data_path) / "outputs" / "lora_trainer"

    @property
    def lora_dir(self) -> Path:
        from modules import shared

        return Path(shared.cmd_opts.lora_dir)

    # --- the GPU
    @contextlib.contextmanager
    def lock(self):
        from modules import call_queue, shared

        with call_queue.queue_lock:
            shared.state.begin(job="Train LoRA")
            try:
                yield
            finally:
                shared.state.end()

    # --- auto-captioning: the WebUI's own interrogators first (no download), then ours
    def captioners(self) -> dict[str, str]:
        from lora_trainer.data.captioners import CAPTIONERS
        from lora_trainer.webui.captioners import KINDS

        return {**KINDS, **{name: name for name in CAPTIONERS}}

    def make_captioner(self, kind: str, model: str | None, download: bool):
        from lora_trainer.webui.captioners import KINDS, QueueLocked, WebUIInterrogator

        if kind in KINDS:
            return WebUIInterrogator(kind)
        from lora_trainer.data.captioners import make_captioner

        return QueueLocked(make_captioner(kind, model=model, download=download))

    def make_backend(self, cfg) -> LdmBackend:
        from modules import devices, sd_hijack_checkpoint, shared

        sd_model = shared.sd_model
        family = refuse_untrainable(sd_model, cfg, shared.cmd_opts)
        prediction_type, zero_snr = schedule_facts(sd_model, cfg, shared.opts)
        self.image_size = cfg.data.resolution
        restored = unapply_lora_networks(sd_model)
        if restored:
            log.info("took the active Lora networks out of %d layers before training", restored)
        self._saved = ({n: p.requires_grad for n, p in sd_model.named_parameters()},
                       {n: m.training for n, m in sd_model.named_modules()})
        info = getattr(sd_model, "sd_checkpoint_info", None)
        name = getattr(info, "model_name", None) or getattr(info, "name", None) or "webui-model"
        kind = SgmBackend if family == "sdxl" else LdmBackend
        return kind(sd_model, name, devices.device, devices.dtype_unet,
                    checkpointing=(sd_hijack_checkpoint.add, sd_hijack_checkpoint.remove),
                    upcast_attention=bool(getattr(shared.opts, "upcast_attn", False)),
                    host_attention=getattr(getattr(sys.modules.get("modules.sd_hijack"), "current_optimizer", None),
                                           "name", None),
                    hypernetworks=[getattr(h, "name", str(h)) for h in getattr(shared, "loaded_hypernetworks", [])],
                    emphasis=emphasis_mode(cfg), prediction_type=prediction_type, zero_terminal_snr=zero_snr,
                    clip_skip=host_clip_skip(family))

    def release_backend(self, backend) -> None:
        """Remove the LoRA layers and put back every flag: the model computes exactly what it did."""
        if backend is None:
            return
        from modules import devices

        backend.restore_attention()  # first: dict entries only, so nothing below can leave ours in
        for module in backend.components().values():
            if module is not None:
                remove_lora(module)
        backend.disable_gradient_checkpointing()
        if self._saved is not None:
            grads, modes = self._saved
            for n, p in backend.sd_model.named_parameters():
                p.requires_grad_(grads.get(n, p.requires_grad))
            for n, m in backend.sd_model.named_modules():
                m.training = modes.get(n, m.training)
            self._saved = None
        devices.torch_gc()
        give_back_freed_memory()  # (the allocator's free pages: the host's next generation needs them)

    # --- generation
    def model_family(self, base_model=None) -> str | None:
        """The loaded model's family, as config.FAMILY_DEFAULTS names it (sdxl, sd_v2_768_v, sd_v2, sd_v1); None
        with no model loaded."""
        from modules import shared

        sd_model = getattr(shared, "sd_model", None)
        if sd_model is None:
            return None
        family = ldm_family(sd_model)
        return "sd_v2_768_v" if family == "sd_v2" and getattr(sd_model, "parameterization", "eps") == "v" else family

    def preflight_where(self, cfg):
        """The loaded model's family (its diffusers shapes stand in for A1111's modules) on the WebUI's device, with
        the bytes of the model already there: training uses them in place."""
        from modules import devices, shared

        from lora_trainer.engine.preflight import Where, module_bytes

        family = self.model_family()
        if family is None:
            return None
        return Where(None, family, devices.device, module_bytes([shared.sd_model], on=devices.device))

    def native_image_size(self, base_model=None) -> int:
        """The loaded model's own image size: 1024 for SDXL, 768 for SD 2.x v-prediction, else 512."""
        return {"sdxl": 1024, "sd_v2_768_v": 768}.get(self.model_family(), 512)

    def _txt2img(self, prompt: str, negative: str, seed: int, steps: int = 20, size: int | None = None):
        size = size or self.image_size or self.native_image_size()
        from modules import processing, shared

        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompt, negative_prompt=negative, seed=seed, steps=steps,
            width=size, height=size, cfg_scale=7.0, batch_size=1, n_iter=1,
            do_not_save_samples=True, do_not_save_grid=True)
        try:
            return processing.process_images(p).images[0]
        finally:
            p.close()

    def sample(self, backend, prompt: str, seed: int):
        """The WebUI's own generation, on the model as it is now (the LoRA being trained is in it)."""
        import torch

        with torch.no_grad(), backend.encoders_on_device():  # the VAE and text encoder(s) back for the image
            return self._txt2img(prompt, "", seed)

    def sweep(self, lora_path: Path, prompt: str, negative: str, strengths: list[float], seed: int,
              base_model=None, steps: int = SWEEP_STEPS, size: int | None = None) -> list[tuple[float, object]]:
        """txt2img with ``<lora:name:S>`` at each strength (0 = no LoRA at all), same prompt, seed, size, steps."""
        name = Path(lora_path).stem
        with self.lock():
            return [(s, self._txt2img(f"{prompt} <lora:{name}:{s:g}>" if s else prompt, negative, seed, steps, size))
                    for s in strengths]

    # --- the result
    def publish(self, lora_path: Path, name: str) -> Path:
        """Copy the LoRA into the Lora folder (never over an existing file) and refresh the Lora list."""
        target = write_new(self.lora_dir / f"{name}.safetensors", lambda p: shutil.copyfile(lora_path, p))
        networks = _networks()
        if networks is not None:
            networks.list_available_networks()
        log.info("LoRA ready: %s (prompt with <lora:%s:0.7>)", target, target.stem)
        return target

    def merge_into_model(self, lora_path: Path, weight: float, base_model=None) -> Path:
        """The LoRA merged into the loaded model's checkpoint file, written to models/Stable-diffusion (never over an
        existing file), the checkpoint list refreshed."""
        from modules import sd_models, shared

        from lora_trainer.export.merge import merge_into_folder_of

        info = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
        base = Path(getattr(info, "filename", "") or "")
        if not base.is_file():
            raise LoraTrainerError("Merge into checkpoint: no checkpoint file is loaded (load one in the WebUI's "
                                   "checkpoint list first)")
        if base.suffix != ".safetensors":
            raise LoraTrainerError(f"Merge into checkpoint: the loaded checkpoint {base.name} is a {base.suffix} file "
                                   "(a pickle, which is never read here): load a .safetensors checkpoint to merge into")
        out = merge_into_folder_of(base, lora_path, weight, sd_models.model_path)
        sd_models.list_models()
        log.info("merged %s x%g into %s: %s (refresh the checkpoint list to pick it)", Path(lora_path).name, weight,
                 base.name, out)
        return out
