"""lora-trainer: train a LoRA for Stable Diffusion and drop it where the WebUI finds it."""

__version__ = "0.1.0"
