"""What a UI needs from the program it runs in: the WebUI (``lora_trainer.webui.host.WebUIHost``) or the
standalone app (``lora_trainer.ui.standalone_host.DiffusersHost``). No gradio here."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Host(Protocol):
    name: str  # for logs and messages ("webui", "standalone")
    chooses_base_model: bool  # the tab shows a base-model field (the WebUI trains the model it has loaded)
    sends_to_txt2img: bool  # the tab offers "Send to txt2img" (a WebUI with a txt2img tab to send to)
    # the tab offers "Train the second text encoder (SDXL)" on an SDXL model (the WebUI's second encoder is open_clip,
    # which peft 0.13.2 cannot wrap); the UI reads it with getattr(host, "trains_text_encoder_2", False)
    trains_text_encoder_2: bool
    run_root: Path  # run folders go under it, one per LoRA name
    lora_dir: Path  # where published LoRAs go
    image_size: int | None  # the last training's resolution (samples and sweeps are made at it); None before one

    def defaults(self) -> dict:
        """Config values the tab starts from (flat keys), on top of the config's own defaults."""

    def lock(self):
        """A context manager held for the whole run: the GPU is the run's alone (no generation meanwhile)."""

    def captioners(self) -> dict[str, str]:
        """The auto-captioners the tab offers: name → what it is."""

    def make_captioner(self, kind: str, model: str | None, download: bool):
        """A captioner (``caption(images) -> list[str]``) of ``kind``."""

    def make_backend(self, cfg):
        """The TrainingBackend to train; raise LoraTrainerError with a clear message if there is none."""

    def release_backend(self, backend) -> None:
        """Take the LoRA layers out again and leave the model exactly as it was (also after errors)."""

    def sample(self, backend, prompt: str, seed: int):
        """One image from the model as it is now (with the LoRA being trained), or None."""

    def sweep(self, lora_path: Path, prompt: str, negative: str, strengths: list[float], seed: int,
              base_model: str | None = None, steps: int | None = None, size: int | None = None) -> list:
        """(strength, image) for each strength: the same prompt and seed with the LoRA at that strength."""

    def publish(self, lora_path: Path, name: str) -> Path:
        """Put the finished LoRA where generation finds it (never over an existing file); return where."""

    def merge_into_model(self, lora_path: Path, weight: float, base_model: str | None = None) -> Path:
        """The LoRA at ``weight`` merged into the base model's file, written as a new checkpoint where generation
        finds it (never over an existing file), the checkpoint list refreshed; return where."""

    def model_family(self, base_model: str | None = None) -> str | None:
        """The model's family as config.FAMILY_DEFAULTS names it (sdxl, sd_v2_768_v, sd_v2, sd_v1), None if unknown
        (no model loaded, or a base model that cannot be read without loading it)."""

    def native_image_size(self, base_model: str | None = None) -> int:
        """The model's own image size (512 for SD 1.x, 1024 for SDXL)."""

    def preflight_where(self, cfg):
        """Where ``cfg``'s run would train (engine.preflight.Where: the model's shapes, device, the bytes of it
        already there), for the memory estimate before the model loads; None where that is not known."""
