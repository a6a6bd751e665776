"""Every gradio-version switch of the tab, in one place.

A1111 v1.10 runs gradio 3.41.2, Forge 4.40 (with its own shims), the standalone app the newest release.
"""

from __future__ import annotations

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def gallery(label: str, elem_id: str, columns: int = 5, height: int | None = None) -> gr.Gallery:
    """An image gallery: ``columns=`` since gradio 4, ``.style(grid=...)`` before."""
    if GRADIO_MAJOR >= 4:
        kwargs = {"columns": columns, "object_fit": "contain"}
        if height:
            kwargs["height"] = height
        return gr.Gallery(label=label, elem_id=elem_id, show_label=True, **kwargs)
    return gr.Gallery(label=label, elem_id=elem_id, show_label=True).style(grid=columns, height=height or "auto")


def image(elem_id: str, height: int = 180, visible: bool = True) -> gr.Image:
    """A read-only thumbnail."""
    return gr.Image(type="pil", interactive=False, show_label=False, height=height, elem_id=elem_id, visible=visible)


def page_assets(fn, css: str | None, js: str | None) -> dict:
    """The app's CSS and key-binding script, for whichever of Blocks() / launch() takes them here.

    gradio 3/4/5 take ``css`` (and 4/5 ``head``) in Blocks(); gradio 6 moved both to launch().
    """
    import inspect

    params = inspect.signature(fn).parameters
    out = {}
    if css and "css" in params:
        out["css"] = css
    if js and "head" in params:
        out["head"] = f"<script>{js}</script>"
    return out


def group():
    """A visual group: gr.Box went away in gradio 4."""
    return gr.Group()


def queue(blocks: gr.Blocks) -> gr.Blocks:
    """Generators (live progress) need the queue; its arguments changed across versions."""
    if GRADIO_MAJOR >= 4:
        return blocks.queue(default_concurrency_limit=4)
    return blocks.queue(concurrency_count=4)
