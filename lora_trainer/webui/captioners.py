"""The WebUI's own interrogators as captioners: BLIP (with CLIP flavours) and DeepBooru.

They are what the WebUI's img2img "Interrogate" buttons run, so they need no model of ours; the WebUI
fetches their weights itself the first time one is used. Both run under the WebUI's queue lock.
"""

from __future__ import annotations

import re

from lora_trainer.errors import LoraTrainerError

KINDS = {"webui-blip": "WebUI BLIP (interrogate CLIP)", "webui-deepbooru": "WebUI DeepBooru (anime tags)"}


class WebUIInterrogator:
    def __init__(self, kind: str):
        if kind not in KINDS:
            raise LoraTrainerError(f"unknown WebUI interrogator {kind!r}; one of {', '.join(KINDS)}")
        self.kind, self.name = kind, KINDS[kind]

    def caption(self, images: list) -> list[str]:
        from modules import call_queue

        with call_queue.queue_lock:
            return self._blip(images) if self.kind == "webui-blip" else self._deepbooru(images)

    def _blip(self, images: list) -> list[str]:
        from modules import shared

        out = []
        for img in images:
            text = shared.interrogator.interrogate(img.convert("RGB"))
            if not text or text.endswith("<error>"):  # the WebUI reports the exception in its console
                raise LoraTrainerError("the WebUI's BLIP interrogator failed; its console has the error")
            out.append(text)
        return out

    def _deepbooru(self, images: list) -> list[str]:
        from modules import deepbooru, shared

        # the WebUI escapes brackets for its prompts (Settings: "deepbooru: escape (\\) brackets"); a caption file
        # holds the text as written: "hatsune miku (vocaloid)" (training escapes it again, or reads it as a prompt
        # with data.weighted_captions)
        escaped = getattr(shared.opts, "deepbooru_escape", True)
        deepbooru.model.start()
        try:
            tags = [deepbooru.model.tag_multi(img.convert("RGB"), force_disable_ranks=True) for img in images]
            return [_unescape(t) for t in tags] if escaped else tags
        finally:
            deepbooru.model.stop()


def _unescape(tags: str) -> str:
    return re.sub(r"\\([()\[\]\\])", r"\1", tags)


class QueueLocked:
    """One of our captioners, run under the WebUI's queue lock (the GPU is not shared with generation)."""

    def __init__(self, inner):
        self.inner, self.name = inner, getattr(inner, "name", type(inner).__name__)

    def caption(self, images: list) -> list[str]:
        from modules import call_queue

        with call_queue.queue_lock:
            return self.inner.caption(images)
