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
    trains_text_encoder_2 = True  # SDXL's second text encoder is a transformers CLIP model here (peft wraps it)

    def __init__(self, lora_dir: str | Path = "output/Lora", run_root: str | Path = "output/runs",
                 base_model: str = "tiny-demo"):
        self.lora_dir, self.run_root = Path(lora_dir), Path(run_root)
        self.image_size = None  # (the standalone sweep defaults to the model's own size; see tab.default_sweep_size)
        self.base_model = base_model
        self._lock = threading.Lock()
        self._run_cfg = None  # the config of the run whose backend make_backend made last (its samples follow it)
        self._sampler = None  # (backend, scheduler, guidance_rescale) for that run's samples

    @staticmethod
    def gpu_count() -> int:
        """The GPUs a run may take (the tab offers more than one where there are: ui.launched_session)."""
        return torch.cuda.device_count() if torch.cuda.is_available() else 1

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

        backend = load_backend(cfg)
        self._run_cfg, self._sampler = cfg, None
        return backend

    def preflight_where(self, cfg):
        from lora_trainer.engine.preflight import Where
        from lora_trainer.models.factory import pick_device

        base = cfg.model.base_model or self.base_model
        return Where(base, self.model_family(base), pick_device(cfg.training.mixed_precision)[0])

    def release_backend(self, backend) -> None:
        self._run_cfg = self._sampler = None  # (the sampler holds the backend: let its memory go)
        if backend is not None:
            for module in backend.components().values():
                if module is not None:
                    remove_lora(module)

    def model_family(self, base_model: str | None = None) -> str | None:
        """The base model's family (sdxl, sd_v2_768_v, sd_v2, sd_v1) read from its files, nothing loaded: a diffusers
        folder's model_index.json and configs, a single file's key names, a tiny model's name; None if they do not
        say (a path that is not there yet, say)."""
        from lora_trainer.models.family import family_of

        return family_of(base_model or self.base_model)

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
        except (OSError, ValueError, KeyError, TypeError):  # a single-file checkpoint: by its family
            return {"sdxl": 1024, "sd_v2_768_v": 768}.get(self.model_family(base_model), 512)

    def _sampling(self, backend) -> tuple[object, float]:
        """The scheduler and guidance rescale for samples of the run ``backend`` trains: the run's prediction type
        and noise schedule (engine.run.with_noise_schedule decides it from the run's config and the model)."""
        if self._sampler is None or self._sampler[0] is not backend:
            from lora_trainer.engine.loss import has_zero_terminal_snr
            from lora_trainer.engine.run import with_noise_schedule
            from lora_trainer.engine.sampling import guidance_rescale, sampling_scheduler

            zero_snr = False
            if self._run_cfg is not None:
                zero_snr = has_zero_terminal_snr(with_noise_schedule(self._run_cfg, backend)[1])
            prediction = backend.prediction_type
            self._sampler = (backend, sampling_scheduler(backend.pipe.scheduler, prediction, zero_snr),
                             guidance_rescale(prediction, zero_snr))
        return self._sampler[1], self._sampler[2]

    def sample(self, backend, prompt: str, seed: int, steps: int = 20):
        """One image from the model with the LoRA as trained so far, sampled on the run's noise schedule (the same
        function makes the command line's samples)."""
        from lora_trainer.engine.sampling import sample_image

        scheduler, rescale = self._sampling(backend)
        return sample_image(backend, prompt, seed, steps, scheduler, rescale)

    def publish(self, lora_path: Path, name: str) -> Path:
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        return write_new(self.lora_dir / f"{name}.safetensors", lambda p: shutil.copyfile(lora_path, p))

    def merge_into_model(self, lora_path: Path, weight: float, base_model: str | None = None) -> Path:
        """The LoRA merged into the base model (a single file or a diffusers folder), written beside the Lora folder
        in ``Stable-diffusion/`` (never over anything there); the base-model field can name it then."""
        from lora_trainer.export.merge import merge_into_folder_of
        from lora_trainer.models.diffusers_backend import resolve_base_model

        return merge_into_folder_of(resolve_base_model(base_model or self.base_model), lora_path, weight,
                                    self.lora_dir.parent / "Stable-diffusion")

    def sweep(self, lora_path: Path, prompt: str, negative: str, strengths: list[float], seed: int,
              base_model: str | None = None, steps: int = SWEEP_STEPS,
              size: int | None = None) -> list[tuple[float, object]]:
        """The same prompt, seed, size and steps at each LoRA strength (0 = the base model), sampled on the noise
        schedule the LoRA was trained with (its metadata: prediction type, zero terminal SNR)."""
        from lora_trainer.models.factory import DTYPES, pick_device

        device, precision = pick_device("auto")
        with self._lock:
            pipe, rescale, clip_skip = self._sweep_pipeline(base_model or self.base_model, Path(lora_path),
                                                            DTYPES[precision])
            pipe.to(device)
            size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
            extra = {"guidance_rescale": rescale} if rescale else {}
            if clip_skip > 1:  # (as the LoRA was trained: ss_clip_skip; diffusers counts the layers skipped)
                extra["clip_skip"] = clip_skip - 1
            images = []
            for strength in strengths:
                pipe.set_adapters([SWEEP_ADAPTER], adapter_weights=[strength])
                generator = torch.Generator(device).manual_seed(seed)
                with torch.no_grad():
                    image = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, height=size,
                                 width=size, generator=generator, **extra).images[0]
                images.append((strength, image))
        return images

    @staticmethod
    def _sweep_pipeline(base_model: str, lora_path: Path, dtype) -> tuple[object, float, int]:
        """The base model's pipeline (SD or SDXL) with the LoRA loaded as an adapter and a sampler on the LoRA's
        noise schedule; its guidance rescale; the CLIP layer its captions came from (ss_clip_skip; SD 1.x/2.x)."""
        from safetensors import safe_open

        from lora_trainer.engine.sampling import guidance_rescale, sampling_scheduler, trained_schedule
        from lora_trainer.models.diffusers_backend import load_pipeline
        from lora_trainer.models.sdxl_backend import is_sdxl_model, load_sdxl_pipeline

        pipe, _ = (load_sdxl_pipeline if is_sdxl_model(base_model) else load_pipeline)(base_model, dtype)
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name=SWEEP_ADAPTER)
        with safe_open(str(lora_path), framework="pt") as f:
            meta = f.metadata() or {}
        prediction, zero_snr = trained_schedule(meta, pipe.scheduler)
        pipe.scheduler = sampling_scheduler(pipe.scheduler, prediction, zero_snr)
        skip = meta.get("ss_clip_skip", "")
        clip_skip = int(skip) if skip.isdigit() and not is_sdxl_model(base_model) else 1
        return pipe, guidance_rescale(prediction, zero_snr), clip_skip
