"""Auto-captioners: a BLIP caption model and a CLIP tagger, both through transformers.

- ``blip``: a sentence per image ("a red circle on a white background").
- ``clip-tags``: CLIP scores each image against a tag vocabulary (built in, or a file with one tag a
  line) and keeps the best tags: a tag list, the other common caption style. (WD14-style ONNX taggers
  need onnxruntime, which neither the WebUI nor we install; inside the WebUI its DeepBooru tagger is
  offered instead.)

Models load from the local Hugging Face cache or a folder, never from the network, unless the user
asks for the download (``--download`` / the tab's checkbox); then the log says what and how large.
Weights are read from safetensors only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from lora_trainer.errors import LoraTrainerError

log = logging.getLogger(__name__)

# kind -> (default model, download size)
DEFAULTS = {"blip": ("Salesforce/blip-image-captioning-base", "about 990 MB"),
            "clip-tags": ("openai/clip-vit-base-patch32", "about 600 MB")}
BUILTIN_TAGS = [
    "photo", "illustration", "painting", "oil painting", "watercolor", "sketch", "line art", "3d render",
    "pixel art", "anime style", "comic style", "digital art", "concept art", "flat colors", "cel shading",
    "portrait", "landscape", "cityscape", "interior", "still life", "close-up", "full body", "upper body",
    "a woman", "a man", "a child", "an animal", "a cat", "a dog", "a bird", "a building", "a car", "food",
    "flowers", "trees", "mountains", "the sea", "the sky", "clouds", "night", "sunset", "daylight",
    "soft light", "dramatic lighting", "backlight", "neon lights", "rim light", "warm colors", "cool colors",
    "pastel colors", "vivid colors", "muted colors", "monochrome", "black and white", "high contrast",
    "gradient background", "white background", "simple background", "detailed background", "bokeh",
    "geometric shapes", "a circle", "a square", "text", "minimalist", "intricate details", "texture",
    "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "gold", "silver",
]


class Captioner(Protocol):
    name: str

    def caption(self, images: list) -> list[str]:
        """One caption per PIL image."""


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _from_pretrained(cls, model: str, kind: str, download: bool, **kwargs):
    """Load from a folder or the local cache; from the hub only when ``download`` is set."""
    from transformers import PreTrainedModel

    extra = {"use_safetensors": True} if issubclass(cls, PreTrainedModel) else {}  # never unpickle weights
    try:
        return cls.from_pretrained(model, local_files_only=True, **extra, **kwargs)
    except (OSError, ValueError) as e:
        if Path(model).exists():
            raise LoraTrainerError(f"{model}: cannot load a {kind} model from this folder ({e})") from None
        if not download:
            size = DEFAULTS[kind][1] if model == DEFAULTS[kind][0] else "size unknown"
            raise LoraTrainerError(
                f"the {kind} model {model} is not downloaded yet ({size}); run again with --download (in the "
                "tab: tick 'Download the model') to fetch it once into the Hugging Face cache") from None
    log.info("downloading %s (%s) into the Hugging Face cache; later runs use it offline", model,
             DEFAULTS[kind][1] if model == DEFAULTS[kind][0] else "size unknown")
    try:
        return cls.from_pretrained(model, local_files_only=False, **extra, **kwargs)
    except (OSError, ValueError) as e:
        raise LoraTrainerError(f"could not download {model}: {e}") from None


class BlipCaptioner:
    """A BLIP image-captioning model: one sentence per image."""

    def __init__(self, model: str | None = None, device: str | None = None, download: bool = False,
                 max_new_tokens: int = 40):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        model = model or DEFAULTS["blip"][0]
        self.name, self.device, self.max_new_tokens = f"blip ({model})", _device(device), max_new_tokens
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.processor = _from_pretrained(BlipProcessor, model, "blip", download)
        self.model = _from_pretrained(BlipForConditionalGeneration, model, "blip", download)
        self.model.to(self.device, self.dtype).eval()

    @torch.no_grad()
    def caption(self, images: list) -> list[str]:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens)
        return [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


def read_tags(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise LoraTrainerError(f"tag list {path} does not exist (a text file, one tag a line)")
    tags = [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    tags = list(dict.fromkeys(t for t in tags if t))
    if not tags:
        raise LoraTrainerError(f"tag list {path} holds no tags (one tag a line)")
    return tags


class ClipTagger:
    """CLIP interrogation: the ``top_k`` tags of a vocabulary that match an image best."""

    def __init__(self, model: str | None = None, device: str | None = None, download: bool = False,
                 tags: list[str] | None = None, top_k: int = 6):
        from transformers import CLIPModel, CLIPProcessor

        model = model or DEFAULTS["clip-tags"][0]
        if top_k < 1:
            raise LoraTrainerError(f"clip-tags: top_k must be at least 1, not {top_k}")
        self.name, self.device, self.top_k = f"clip-tags ({model})", _device(device), top_k
        self.tags = list(tags or BUILTIN_TAGS)
        self.processor = _from_pretrained(CLIPProcessor, model, "clip-tags", download)
        self.model = _from_pretrained(CLIPModel, model, "clip-tags", download).to(self.device).eval()
        with torch.no_grad():
            text = self.processor(text=[f"a picture of {t}" for t in self.tags], return_tensors="pt", padding=True)
            self._text = self._unit(self.model.get_text_features(**text.to(self.device)))

    @staticmethod
    def _unit(x) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 5 may return an output object
        return x / x.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def caption(self, images: list) -> list[str]:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        scores = self._unit(self.model.get_image_features(pixel_values=pixels.to(self.device))) @ self._text.T
        best = scores.topk(min(self.top_k, len(self.tags)), dim=-1).indices
        return [", ".join(self.tags[i] for i in row.tolist()) for row in best]


CAPTIONERS = {"blip": BlipCaptioner, "clip-tags": ClipTagger}


def make_captioner(kind="blip", model: str | None = None, download: bool = False, device: str | None = None,
                   tags_file=None) -> Captioner:
    """A captioner by name (``blip``, ``clip-tags``), or ``kind`` itself if it already is one."""
    if hasattr(kind, "caption"):
        return kind
    if kind not in CAPTIONERS:
        raise LoraTrainerError(f"unknown captioner {kind!r}; choose one of: {', '.join(CAPTIONERS)}")
    if tags_file and kind != "clip-tags":
        raise LoraTrainerError("a tag list (--tags) is for the clip-tags captioner")
    kwargs = {"tags": read_tags(tags_file)} if tags_file else {}
    return CAPTIONERS[kind](model, device=device, download=download, **kwargs)
