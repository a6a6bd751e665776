"""Auto-captioning a dataset folder: ``python -m lora_trainer label`` and the tab's Caption button.

Captions are written to metadata.csv through the caption set's save (atomic, the previous file backed
up first). With ``only-missing`` (the default) every image that already has a caption, in
metadata.csv or a ``.txt`` file, keeps it and the model is not even loaded when none is missing.
"""

from __future__ import annotations

import contextlib
import logging
import string
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.data.caption_set import CaptionSet
from lora_trainer.data.captioners import make_captioner
from lora_trainer.data.images import ImageError, load_image, prefetch, strict_decoding
from lora_trainer.errors import LoraTrainerError

log = logging.getLogger(__name__)
MODES = ("only-missing", "overwrite")
# captioners see at most 512 px (BLIP 384, CLIP 224-336, DeepDanbooru 512): large JPEGs decode at a reduced
# scale still this large
CAPTION_DRAFT_PX = 768


@dataclass
class LabelResult:
    csv_path: Path
    captioned: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    backup: Path | None = None

    def summary(self) -> str:
        text = (f"captioned {len(self.captioned)} images, kept {len(self.kept)} existing captions, "
                f"skipped {len(self.skipped)}")
        if self.captioned:
            text += f"; written to {self.csv_path}"
        if self.backup:
            text += f" (the previous captions are in {self.backup})"
        return text


def check_template(template: str) -> str:
    """The template, if it is valid and holds {caption}; else a clear error."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        template.format(caption="x")
    except (KeyError, IndexError, ValueError) as e:
        raise LoraTrainerError(f"caption template {template!r} is not valid ({e}); write it like "
                               "'**{caption}**, high quality' ({caption} is the model's text)") from None
    if "caption" not in fields:
        raise LoraTrainerError(f"caption template {template!r} has no {{caption}}: where should the model's "
                               "text go? e.g. '**{caption}**, high quality'")
    return template


def _check_label_args(input_dir, output_csv, template: str, mode: str, batch_size: int) -> tuple[Path, Path]:
    """The input folder and the CSV to write, or a LoraTrainerError naming what is wrong."""
    check_template(template)
    if mode not in MODES:
        raise LoraTrainerError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if batch_size < 1:
        raise LoraTrainerError(f"batch size must be at least 1, not {batch_size}")
    root = Path(input_dir).expanduser()
    if not root.is_dir():
        raise LoraTrainerError(f"input folder {root} " + ("is a file, not a folder" if root.exists()
                                                           else "does not exist"))
    csv_path = Path(output_csv).expanduser() if output_csv else root / "metadata.csv"
    if not csv_path.parent.is_dir():
        raise LoraTrainerError(f"output {csv_path}: its folder {csv_path.parent} does not exist")
    return root, csv_path


def _caption_batch(captioner, captions: CaptionSet, decoded, prefix: str, template: str, result: LabelResult) -> None:
    """Caption one batch of (item index, (image, reason it could not be read)) into ``captions``."""
    batch, images = [], []
    for i, (img, reason) in decoded:
        if reason is None:
            images.append(img)
            batch.append(i)
        else:
            result.skipped.append((captions.items[i].rel, reason))
            log.warning("skipped %s: %s", captions.items[i].rel, reason)
    texts = list(captioner.caption(images)) if images else []
    if len(texts) != len(images):
        raise LoraTrainerError(f"captioner {getattr(captioner, 'name', captioner)} returned "
                               f"{len(texts)} captions for {len(images)} images")
    for i, text in zip(batch, texts):
        item = captions.items[i]
        text = " ".join(str(text or "").split())
        if not text:
            result.skipped.append((item.rel, "the captioner returned no text"))
            log.warning("skipped %s: the captioner returned no text", item.rel)
            continue
        captions.set_caption(i, prefix + template.format(caption=text))
        item.source = "csv"  # the output of this command is metadata.csv
        result.captioned.append(item.rel)


def label_dataset(input_dir, captioner="blip", output_csv=None, template: str = "{caption}", prefix: str = "",
                  mode: str = "only-missing", batch_size: int = 4, progress: bool = True, on_progress=None,
                  model: str | None = None, download: bool = False) -> LabelResult:
    """Caption the images of ``input_dir``; ``captioner`` is a name (blip, clip-tags), a captioner object,
    or a function that makes one (called only if some image needs a caption).

    ``on_progress(done, total)`` is called after each batch (for a UI). Nothing is written if no image
    was captioned.
    """
    root, csv_path = _check_label_args(input_dir, output_csv, template, mode, batch_size)
    captions = CaptionSet.load(root, metadata_path=csv_path if csv_path.is_file() else None)
    captions.csv_path = csv_path.resolve()
    result = LabelResult(captions.csv_path)
    todo = []
    for i, item in enumerate(captions.items):  # (a kohya folder's class tokens are no caption of the image's own)
        missing = not item.caption.strip() or item.source == "folder"
        (todo.append(i) if mode == "overwrite" or missing else result.kept.append(item.rel))
    if not todo:
        log.info("every image already has a caption (mode only-missing): nothing to do")
        return result
    captioner = captioner() if callable(captioner) and not hasattr(captioner, "caption") else \
        make_captioner(captioner, model=model, download=download)
    log.info("captioning %d images with %s", len(todo), getattr(captioner, "name", captioner))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="captioning", unit="img")

    def decode(i: int):
        try:
            return load_image(captions.items[i].path, draft=CAPTION_DRAFT_PX), None
        except ImageError as e:
            return None, e.reason

    try:
        # the next images decode in threads while the captioner works on these
        with strict_decoding(), contextlib.closing(prefetch(decode, todo, ahead=2 * batch_size)) as decoded:
            for start in range(0, len(todo), batch_size):
                _caption_batch(captioner, captions, zip(todo[start:start + batch_size], decoded), prefix, template,
                               result)
                done = min(start + batch_size, len(todo))
                if bar is not None:
                    bar.update(done - bar.n)
                if on_progress is not None:
                    on_progress(done, len(todo))
    finally:
        if bar is not None:
            bar.close()
        if result.captioned:  # what was captioned before an interrupt is kept
            result.backup = captions.save().backup
    log.info("%s", result.summary())
    return result
