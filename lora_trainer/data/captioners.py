"""Auto-captioners: a BLIP caption model and a CLIP tagger, both through transformers.

- ``blip``: a sentence per image ("a red circle on a white background").
- ``clip-tags``: CLIP scores each image against a tag vocabulary (built in, or a file with one tag a
  line) and keeps the best tags: the tag-list captioner, the other common caption style. (WD14-style
  ONNX taggers need onnxruntime, which neither the WebUI nor we install; inside the WebUI its DeepBooru
  tagger is offered instead.)

Models load from a folder or from the local Hugging Face cache, never from the network, unless the user
asks for the download (``--download`` / the tab's checkbox); then the log says what and how large, and
only the config, tokenizer and safetensors files are fetched. Weights are read from safetensors only
(openai/clip-vit-base-patch32 keeps them in its conversion commit, pinned in REVISIONS).
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
# Hub ids whose main branch has pickled weights only: the commit of their safetensors conversion.
REVISIONS = {"openai/clip-vit-base-patch32": "c237dc49a33fc61debc9276459120b7eac67e7ef"}
MODEL_FILES = ["*.json", "*.txt", "model.safetensors", "model-*-of-*.safetensors"]  # what a download fetches


class Captioner(Protocol):
    name: str

    def caption(self, images: list) -> list[str]:
        """One caption per PIL image."""


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _looks_like_path(model: str) -> bool:
    """``./models/blip``, ``/abs``, ``~/x``, ``C:\\x``, ``a/b/c``: a folder, never a hub id (``org/name``)."""
    return (model.startswith((".", "/", "~", "\\")) or "\\" in model or model.count("/") > 1
            or model[1:2] == ":")


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def resolve_model(kind: str, model: str | None = None, download: bool = False) -> Path:
    """The local folder that holds ``model``: the folder given, or its snapshot in the Hugging Face cache.

    Hub models are looked up in the cache only; the network is used only when ``download`` is set, and
    then only the config, tokenizer and safetensors files are fetched (not the repo's .bin/.h5 copies).
    """
    model = model or DEFAULTS[kind][0]
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or _looks_like_path(model):
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise LoraTrainerError(f"{kind} model folder {path} {what}")
    from huggingface_hub import constants, snapshot_download

    default = model == DEFAULTS[kind][0]
    size = DEFAULTS[kind][1] if default else "size: see the model's page"
    revision = REVISIONS.get(model)
    try:
        folder = Path(snapshot_download(model, revision=revision, allow_patterns=MODEL_FILES,
                                        local_files_only=True))
    except (OSError, ValueError):  # not in the cache, or not a valid hub id
        folder = None
    if folder is not None and _complete(folder):
        return folder
    if not download:
        state = "is not downloaded yet" if folder is None else "is only partly in the Hugging Face cache"
        raise LoraTrainerError(
            f"the {kind} model {model} {state} ({size}); run again with --download (in the tab: tick "
            "'Download the model') to fetch it once into the Hugging Face cache; later runs need no network"
            + ("" if default or folder else f" (if {model} is meant as a folder: there is no such folder)"))
    if constants.HF_HUB_OFFLINE:
        raise LoraTrainerError(f"cannot download {model}: HF_HUB_OFFLINE is set; unset it for this run")
    log.info("downloading the %s model %s (%s) into the Hugging Face cache; later runs use it offline",
             kind, model, size)
    try:
        folder = Path(snapshot_download(model, revision=revision, allow_patterns=MODEL_FILES))
    except (OSError, ValueError) as e:
        raise LoraTrainerError(f"could not download {model}: {e}") from None
    if not _complete(folder):
        raise LoraTrainerError(f"{model} has no config.json and .safetensors weights (pickled .bin "
                               "weights are never loaded); pick another model, or a folder with model.safetensors")
    return folder


def _load(cls, folder: Path, kind: str):
    """``cls.from_pretrained`` on a local folder: no network, safetensors weights only (never unpickled)."""
    from transformers import PreTrainedModel

    extra = {"use_safetensors": True} if issubclass(cls, PreTrainedModel) else {}
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError) as e:
        raise LoraTrainerError(f"{folder}: cannot load a {kind} model from this folder ({e})") from None


class BlipCaptioner:
    """A BLIP image-captioning model: one sentence per image."""

    def __init__(self, model: str | None = None, device: str | None = None, download: bool = False,
                 max_new_tokens: int = 40):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        model = model or DEFAULTS["blip"][0]
        self.name, self.device, self.max_new_tokens = f"blip ({model})", _device(device), max_new_tokens
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        folder = resolve_model("blip", model, download)
        self.processor = _load(BlipProcessor, folder, "blip")
        self.model = _load(BlipForConditionalGeneration, folder, "blip")
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
    """CLIP interrogation: the tags of a vocabulary that match an image best.

    Keeps the ``top_k`` best tags, and of those only the ones whose cosine similarity to the image is at
    least ``threshold`` (CLIP ViT-B/32 gives roughly 0.2-0.35 for a good match); the best tag is always kept,
    so no image gets an empty caption.
    """

    def __init__(self, model: str | None = None, device: str | None = None, download: bool = False,
                 tags: list[str] | None = None, top_k: int = 6, threshold: float | None = None):
        from transformers import CLIPModel, CLIPProcessor

        model = model or DEFAULTS["clip-tags"][0]
        if top_k < 1:
            raise LoraTrainerError(f"clip-tags: top_k must be at least 1, not {top_k}")
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise LoraTrainerError(f"clip-tags: threshold is a cosine similarity in [-1, 1], not {threshold}")
        self.name, self.device = f"clip-tags ({model})", _device(device)
        self.top_k, self.threshold = top_k, threshold
        self.tags = list(tags or BUILTIN_TAGS)
        folder = resolve_model("clip-tags", model, download)
        self.processor = _load(CLIPProcessor, folder, "clip-tags")
        self.model = _load(CLIPModel, folder, "clip-tags").to(self.device).eval()
        with torch.no_grad():
            text = self.processor(text=[f"a picture of {t}" for t in self.tags], return_tensors="pt",
                                  padding=True)
            self._text = self._unit(self.model.get_text_features(**text.to(self.device)))

    @staticmethod
    def _unit(x) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 5 may return an output
        return x / x.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def caption(self, images: list) -> list[str]:
        rgb = [im.convert("RGB") for im in images]
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
        scores = self._unit(self.model.get_image_features(pixel_values=pixels.to(self.device))) @ self._text.T
        best = scores.topk(min(self.top_k, len(self.tags)), dim=-1)
        out = []
        for values, indices in zip(best.values.tolist(), best.indices.tolist()):
            keep = [i for rank, (v, i) in enumerate(zip(values, indices))
                    if rank == 0 or self.threshold is None or v >= self.threshold]
            out.append(", ".join(self.tags[i] for i in keep))
        return out


CAPTIONERS = {"blip": BlipCaptioner, "clip-tags": ClipTagger}


def captioner_options(kind: str, tags_file=None, top_k: int | None = None, threshold: float | None = None) -> dict:
    """The options given for ``kind``, checked before any model loads (the tag options are clip-tags')."""
    if kind not in CAPTIONERS:
        raise LoraTrainerError(f"unknown captioner {kind!r}; choose one of: {', '.join(CAPTIONERS)}")
    options = {k: v for k, v in {"tags": tags_file, "top_k": top_k, "threshold": threshold}.items() if v is not None}
    if options and kind != "clip-tags":
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise LoraTrainerError(f"{flags}: only for the clip-tags captioner, not {kind}")
    return options


def make_captioner(kind="blip", model: str | None = None, download: bool = False, device: str | None = None,
                   tags_file=None, top_k: int | None = None, threshold: float | None = None) -> Captioner:
    """A captioner by name (``blip``, ``clip-tags``), or ``kind`` itself if it already is one (e.g. the
    WebUI's interrogators, lora_trainer.webui.captioners)."""
    if hasattr(kind, "caption"):
        return kind
    options = captioner_options(kind, tags_file, top_k, threshold)
    if tags_file:
        options["tags"] = read_tags(tags_file)
    return CAPTIONERS[kind](model, device=device, download=download, **options)
