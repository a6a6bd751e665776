"""The Forge host: train the model Stable Diffusion WebUI Forge has loaded, in place, under its queue lock.

Forge keeps A1111's ``modules`` (shared, processing, call_queue, paths, the Lora list in ``networks``) around its
own model backend (``backend``): what differs from ``webui.host.WebUIHost`` is how the model is found, prepared
and given back (``models.forge`` says what Forge's model needs). Before training: the LoRAs Forge merged into the
weights for a prompt are taken out (its LoraLoader, with no patches: the originals are back), its patchers are
the unpatched ones, the UNet is loaded to the device by Forge's memory manager, and its weights are made ordinary
tensors. After: the LoRA layers out, every flag back, the weights inference tensors again (bitwise the same).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from lora_trainer.engine.lora import remove_lora
from lora_trainer.errors import LoraTrainerError
from lora_trainer.models.forge import (
    ForgeBackend,
    forge_family,
    forge_prediction_type,
    forge_text_encoders,
    inference_tensors,
    ordinary_tensors,
    refuse_untrainable_forge,
)
from lora_trainer.utils.host_memory import give_back_freed_memory
from lora_trainer.webui.host import WebUIHost, emphasis_mode, host_clip_skip

log = logging.getLogger(__name__)


def is_forge() -> bool:
    """Whether the WebUI this runs in is Forge: its own packages ``backend`` (the model code) and ``modules_forge``."""
    return all(importlib.util.find_spec(name) is not None for name in ("modules_forge", "backend.memory_management"))


def reset_forge_loras(sd_model) -> None:
    """Take out the LoRAs Forge merged into the weights for a prompt (``<lora:...>``): its LoraLoader restores
    its backups when refreshed with no patches; the model's patchers become the unpatched originals and its LoRA
    hash empty, as after a prompt without LoRAs (the next prompt with one applies it again)."""
    original = sd_model.forge_objects_original
    original.unet.refresh_loras()
    original.clip.patcher.refresh_loras()
    sd_model.forge_objects = original.shallow_copy()
    sd_model.forge_objects_after_applying_lora = original.shallow_copy()
    sd_model.current_lora_hash = str([])


class ForgeHost(WebUIHost):
    name = "forge"
    trains_text_encoder_2 = True  # SDXL's second text encoder is a Hugging Face CLIP model in Forge (peft wraps it)

    def __init__(self):
        super().__init__()
        self._replaced = []  # what ordinary_tensors swapped, for inference_tensors

    def _loaded_model(self, load: bool):
        """Forge's model: it loads the selected checkpoint at the first generation, so ``load`` does what a
        generation does (``forge_model_reload``: nothing when it is loaded already)."""
        from modules import sd_models

        if load:
            return sd_models.forge_model_reload()[0]
        return sd_models.model_data.sd_model

    def make_backend(self, cfg) -> ForgeBackend:
        from backend import memory_management, operations
        from modules import shared

        sd_model = self._loaded_model(load=True)
        refuse_untrainable_forge(sd_model, cfg)
        self.image_size = cfg.data.resolution
        reset_forge_loras(sd_model)
        unet_patcher = sd_model.forge_objects.unet
        memory_management.load_models_gpu([unet_patcher])
        device = unet_patcher.load_device
        unet = unet_patcher.model.diffusion_model
        elsewhere = {str(p.device) for p in unet.parameters() if p.device.type != device.type}
        if elsewhere:
            raise LoraTrainerError(f"Forge's memory manager left part of the UNet on {', '.join(sorted(elsewhere))} "
                                   f"(not enough free memory on {device} for all of it): close other programs on the "
                                   f"GPU, or start Forge without options that keep weights on the CPU, then train")
        first, second = forge_text_encoders(sd_model, forge_family(sd_model))
        t = cfg.training
        trained = [unet] + ([first] if t.train_text_encoder else []) + ([second] if t.train_text_encoder_2 else [])
        modules = [unet_patcher.model, sd_model.forge_objects.clip.cond_stage_model,
                   sd_model.forge_objects.vae.first_stage_model]
        self._saved = [({n: p.requires_grad for n, p in top.named_parameters()},
                        {n: m.training for n, m in top.named_modules()}) for top in modules]
        self._replaced = ordinary_tensors(trained)
        info = getattr(sd_model, "sd_checkpoint_info", None)
        name = getattr(info, "model_name", None) or getattr(info, "name", None) or "forge-model"
        ztsnr = bool(getattr(getattr(sd_model, "model_config", None), "ztsnr", False))
        prediction = cfg.model.prediction_type
        try:
            return ForgeBackend(sd_model, name, device, linear_cls=operations.ForgeOperations.Linear,
                                load=memory_management.load_model_gpu, emphasis=emphasis_mode(cfg),
                                clip_skip=host_clip_skip(forge_family(sd_model)),
                                prediction_type=forge_prediction_type(sd_model) if prediction == "auto" else prediction,
                                zero_terminal_snr=ztsnr or getattr(shared.opts, "sd_noise_schedule", "") ==
                                "Zero Terminal SNR")
        except BaseException:
            self._give_back(modules)
            raise

    def _give_back(self, modules) -> None:
        """Every requires_grad and training flag as it was, the weights inference tensors again."""
        if self._saved is not None:
            for top, (grads, modes) in zip(modules, self._saved):
                for n, p in top.named_parameters():
                    want = grads.get(n, p.requires_grad)
                    if p.requires_grad != want:  # (an inference tensor's flag is set inside inference mode)
                        with torch.inference_mode(p.is_inference()):
                            p.requires_grad_(want)
                for n, m in top.named_modules():
                    m.training = modes.get(n, m.training)
            self._saved = None
        replaced, self._replaced = self._replaced, []
        inference_tensors(replaced)

    def release_backend(self, backend) -> None:
        """Remove the LoRA layers, put every flag back and make the weights inference tensors again."""
        if backend is None:
            return
        from modules import devices

        for module in backend.components().values():
            if module is not None:
                remove_lora(module)
        backend.release()
        self._give_back(backend.modules())
        devices.torch_gc()
        give_back_freed_memory()  # (the allocator's free pages: the host's next generation needs them)

    # --- the model
    def model_family(self, base_model=None) -> str | None:
        sd_model = self._loaded_model(load=False)
        family = forge_family(sd_model)
        if family == "sd_v2" and forge_prediction_type(sd_model) == "v_prediction":
            return "sd_v2_768_v"
        return family

    def preflight_where(self, cfg):
        from modules import devices

        from lora_trainer.engine.preflight import Where, module_bytes

        sd_model = self._loaded_model(load=False)
        family = self.model_family()
        if family is None:
            return None
        objects = sd_model.forge_objects
        modules = [objects.unet.model, objects.clip.cond_stage_model, objects.vae.first_stage_model]
        return Where(None, family, devices.device, module_bytes(modules, on=devices.device))

    def sample(self, backend, prompt: str, seed: int):
        """Forge's own txt2img on the model as it is now (with the LoRA being trained); Forge generates under
        inference mode, so the frozen weights it may have moved are made ordinary again after it."""
        image = super().sample(backend, prompt, seed)
        trained = [m for m in backend.components().values() if m is not None and any(
            p.requires_grad for p in m.parameters())]
        self._replaced += ordinary_tensors(trained)
        return image
