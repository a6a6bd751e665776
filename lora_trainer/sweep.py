"""The strength sweep from the command line (``python -m lora_trainer sweep``): the same prompt, seed and size at each
LoRA strength, on the base model the LoRA was trained on (the run folder's config.yaml names it) or the one given;
each image and a labelled grid of them written as new PNG files beside each other (never over a file). The images are
the standalone app's sweep (ui.standalone_host.DiffusersHost.sweep): one way to make them."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from lora_trainer.errors import LoraTrainerError
from lora_trainer.utils.fsio import write_new

log = logging.getLogger(__name__)
LABEL_HEIGHT = 20


def trained_base_model(lora: Path) -> str | None:
    """The base_model of the run that wrote ``lora`` (its folder's config.yaml, as every run writes it), or None."""
    config = lora.parent / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    model = data.get("model") if isinstance(data.get("model"), dict) else data
    value = model.get("base_model")
    return str(value) if value else None


def parse_strengths(text: str) -> list[float]:
    """``"0,0.4,0.7,1"`` → the strengths; a LoraTrainerError naming the value that is not a number."""
    values = []
    for part in str(text).replace(";", ",").split(","):
        if not part.strip():
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise LoraTrainerError(f"sweep --strengths: {part.strip()!r} is not a number (e.g. 0,0.4,0.7,1)") from None
    if not values:
        raise LoraTrainerError("sweep --strengths: give one or more strengths, e.g. 0,0.4,0.7,1")
    return values


def grid(images: list[tuple[float, Image.Image]]) -> Image.Image:
    """The images in one row, each with ``strength N`` under it (0: the base model alone)."""
    w, h = images[0][1].size
    out = Image.new("RGB", (w * len(images), h + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(out)
    for k, (strength, image) in enumerate(images):
        out.paste(image.convert("RGB"), (k * w, 0))
        draw.text((k * w + 4, h + 4), "base model" if strength == 0 else f"strength {strength:g}", fill="black")
    return out


def run_sweep(lora, out, prompt: str, strengths: list[float], base_model: str | None = None, negative: str = "",
              seed: int = 0, steps: int = 20, size: int | None = None) -> list[Path]:
    """Generate the sweep and write ``<out>`` (the grid) and ``<out stem>_s<strength>.png`` (each image); their paths,
    the grid first."""
    from lora_trainer.ui.standalone_host import DiffusersHost

    lora = Path(lora).expanduser()
    if not lora.is_file() or lora.suffix.lower() != ".safetensors":
        raise LoraTrainerError(f"sweep --lora: {lora} is not a .safetensors file")
    base = base_model or trained_base_model(lora)
    if not base:
        raise LoraTrainerError(f"sweep: no --base given and {lora.parent / 'config.yaml'} does not name the base model "
                               "the LoRA was trained on: give --base (a diffusers folder or a single-file checkpoint)")
    if size is not None and (size % 8 or not 64 <= size <= 4096):
        raise LoraTrainerError(f"sweep --size: {size} must be a multiple of 8 from 64 to 4096")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise LoraTrainerError(f"sweep --out: {out} must end in .png")
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:  # (diffusers loads a LoRA into a pipeline through peft only where transformers can)
        import transformers

        raise LoraTrainerError(f"sweep: diffusers loads a LoRA into its pipeline through its PEFT backend, which needs "
                               f"transformers >= 4.34 and peft (this environment has transformers "
                               f"{transformers.__version__}, as the WebUI pins it): run the sweep from the tab, or "
                               "in an environment with newer transformers")
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("sweep of %s on %s: strengths %s, seed %d, %d steps", lora.name, base,
             ", ".join(f"{s:g}" for s in strengths), seed, steps)
    images = DiffusersHost(base_model=base).sweep(lora, prompt, negative, strengths, seed, base_model=base,
                                                  steps=steps, size=size)
    written = [write_new(out, lambda tmp: grid(images).save(tmp, format="PNG"))]
    for strength, image in images:
        path = out.with_name(f"{out.stem}_s{strength:g}.png")
        written.append(write_new(path, lambda tmp, image=image: image.save(tmp, format="PNG")))
    return written
