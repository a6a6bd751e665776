"""The host of the standalone app: a diffusers model chosen in the tab, LoRAs into a local folder."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import torch

from lora_trainer.engine.lora import remove_lora
from lora_trainer.ui.views import SWEEP_STEPS
from lora_trainer.utils.fsio import write_new

SWEEP_ADAPTER = "lora_trainer_sweep"


class DiffusersHost:
    name = "standalone"
    chooses_base_model, sends_to_txt2img = True, False  # a diffusers model named in the tab; no txt2img tab

    def __init__(self, lora_dir: str | Path = "output/Lora", run_root: str | Path = "output/runs",
                 base_model: str = "tiny-demo"):
        self.lora_dir, self.run_root = Path(lora_dir), Path(run_root)
        self.image_size = None  # (the standalone sweep defaults to the model's own size; see tab.default_sweep_size)
        self.base_model = base_model
        self._lock = threading.Lock()

    def defaults(self) -> dict:
        """Settings the tab starts from (the core config's defaults, on the chosen base model)."""
        return {"base_model": self.base_model}

    def lock(self):
        return self._lock

    def captioners(self) -> dict[str, str]:
        """Auto-captioners the tab offers: name -> what it is."""
        from lora_trainer.data.captioners import CAPTIONERS

        return {name: name for name in CAPTIONERS}

    def make_captioner(self, kind: str, model: str | None, download: bool):
        from lora_trainer.data.captioners import make_captioner

        return make_captioner(kind, model=model, download=download)

    def make_backend(self, cfg):
        from lora_trainer.models.factory import load_backend

        return load_backend(cfg)

    def release_backend(self, backend) -> None:
        if backend is not None:
            for module in backend.components().values():
                if module is not None:
                    remove_lora(module)

    def native_image_size(self, base_model: str | None = None) -> int:
        """The base model's own image size, read from its config files (no model is loaded for it)."""
        from lora_trainer.models.tiny import TINY_NAME, TINY_RESOLUTION

        base_model = base_model or self.base_model
        if base_model == TINY_NAME:
            return TINY_RESOLUTION
        folder = Path(base_model).expanduser()
        try:
            unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
            vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
            return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            return 512  # a single-file checkpoint: SD 1.x is the only kind the app loads from one

    def sample(self, backend, prompt: str, seed: int, steps: int = 20):
        res = backend.unet.config.sample_size * backend.pipe.vae_scale_factor
        generator = torch.Generator(backend.device).manual_seed(seed)
        with torch.no_grad(), backend.encoders_on_device():
            return backend.pipe(prompt, num_inference_steps=steps, height=res, width=res, generator=generator).images[0]

    def publish(self, lora_path: Path, name: str) -> Path:
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        return write_new(self.lora_dir / f"{name}.safetensors", lambda p: shutil.copyfile(lora_path, p))

    def sweep(self, lora_path: Path, prompt: str, negative: str, strengths: list[float], seed: int,
              base_model: str | None = None, steps: int = SWEEP_STEPS,
              size: int | None = None) -> list[tuple[float, object]]:
        """The same prompt, seed, size and steps at each LoRA strength (0 = the base model)."""
        base_model = base_model or self.base_model
        from lora_trainer.models.diffusers_backend import load_pipeline
        from lora_trainer.models.factory import DTYPES, pick_device

        device, precision = pick_device("auto")
        with self._lock:
            pipe, _ = load_pipeline(base_model, DTYPES[precision])
            pipe.to(device)
            pipe.load_lora_weights(str(Path(lora_path).parent), weight_name=Path(lora_path).name,
                                   adapter_name=SWEEP_ADAPTER)
            size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
            images = []
            for strength in strengths:
                pipe.set_adapters([SWEEP_ADAPTER], adapter_weights=[strength])
                generator = torch.Generator(device).manual_seed(seed)
                with torch.no_grad():
                    image = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, height=size,
                                 width=size, generator=generator).images[0]
                images.append((strength, image))
        return images
