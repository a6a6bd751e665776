"""The caption grid's view of a ``CaptionSet``: pages, slots and the HTML around them (no gradio here).

A page shows ``PER_PAGE`` slots. Only the thumbnails of the page on screen are read, so a 1,000-image
set pages as fast as a 10-image one.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from PIL import Image

from lora_trainer.data.augment import CaptionAugment
from lora_trainer.data.caption_set import CaptionSet, CaptionView
from lora_trainer.data.images import ImageError, load_image
from lora_trainer.data.tokens import TOKEN_WINDOW

PER_PAGE = 12
THUMB_PX = 256
P = "lora_trainer_"


@dataclass
class GridState:
    """One browser session's grid: the set, the images shown (after a filter) and the page."""

    captions: CaptionSet
    order: list[int] = field(default_factory=list)  # indices into captions.items, in display order
    page: int = 0
    discard_ok: bool = False  # Load was pressed once with unsaved edits: a second press discards them
    augment: CaptionAugment | None = None  # the tab's caption augmentation: each caption shows an example draw

    def __post_init__(self):
        if not self.order:
            self.order = list(range(len(self.captions)))

    @property
    def pages(self) -> int:
        return max(1, math.ceil(len(self.order) / PER_PAGE))

    def on_page(self) -> list[int]:
        self.page = min(max(self.page, 0), self.pages - 1)
        return self.order[self.page * PER_PAGE:(self.page + 1) * PER_PAGE]

    def apply_edits(self, captions: list[str]) -> int:
        """Take the slot textboxes' text into the set (the slots of the current page, in order)."""
        changed = sum(self.captions.set_caption(i, text) for i, text in zip(self.on_page(), captions))
        if changed:
            self.discard_ok = False
        return changed


@dataclass(frozen=True)
class Slot:
    visible: bool
    label: str = ""
    caption: str = ""
    thumb: Image.Image | None = None
    info: str = ""


def thumbnail(path) -> Image.Image | None:
    try:
        img = load_image(path, draft=THUMB_PX)
    except ImageError:
        return None
    img.thumbnail((THUMB_PX, THUMB_PX))
    return img


def augment_of(prefix: str, shuffle=False, keep_tokens=0, tag_dropout=0.0, dropout=0.0,
               seed=0) -> CaptionAugment | None:
    """The tab's caption augmentation fields → data.augment's CaptionAugment (None: all off), drawing with the run's
    seed as training will. Fields left empty count as off; the config's checks name bad values when training starts."""
    def number(value, kind):
        try:
            return max(kind(value or 0), 0)
        except (TypeError, ValueError):
            return kind(0)

    aug = CaptionAugment(bool(shuffle), number(keep_tokens, int), dropout_rate=min(number(dropout, float), 1.0),
                         tag_dropout_rate=min(number(tag_dropout, float), 1.0), prefix=prefix or "",
                         seed=number(seed, int))
    return aug if aug.active else None


def info_html(view: CaptionView, example: str | None = None) -> str:
    """Under each caption: what the trainer tokenizes, its token count against the window, core tags; with caption
    augmentation, ``example``: one draw of what a step encodes."""
    over = view.truncated
    tokens = (f"<span class='{P}tokens{' ' + P + 'over' if over else ''}'>{view.tokens}/{TOKEN_WINDOW} tokens"
              f"{' — cut off in training' if over else ''}</span>")
    core = (f" · core: {html.escape(', '.join(view.core_tags))}" if view.core_tags else "")
    drawn = ""
    if example is not None:
        drawn = (f"<div class='{P}trainer_example' title='shuffled and dropped anew each time the image trains "
                 f"(each epoch, each repeat)'>e.g. one epoch: "
                 f"{html.escape(example) or '(no caption: dropped this time)'}</div>")
    return (f"<div class='{P}caption_info'>{tokens}{core}"
            f"<div class='{P}trainer_text' title='what the trainer tokenizes'>{html.escape(view.text) or '(empty)'}"
            f"</div>{drawn}</div>")


def page_slots(state: GridState) -> list[Slot]:
    """PER_PAGE slots for the current page; the unused ones hidden."""
    indices = state.on_page()
    views = state.captions.views(indices)
    slots = []
    for i, view in zip(indices, views):
        item = state.captions.items[i]
        thumb = thumbnail(item.path)
        label = item.rel + ("" if thumb is not None else " (cannot be read: skipped in training)")
        drawn = state.augment is not None and view.text  # (an empty caption has nothing to draw from)
        example = state.augment.caption(view.text, view.core_tags, i, 0) if drawn else None
        slots.append(Slot(True, label, item.caption, thumb, info_html(view, example)))
    return slots + [Slot(False)] * (PER_PAGE - len(slots))


def page_label(state: GridState) -> str:
    shown, total = len(state.order), len(state.captions)
    what = f"{shown} of {total} images (filtered)" if shown != total else f"{total} images"
    changed = len(state.captions.changed)
    return f"page {state.page + 1}/{state.pages} · {what}" + (f" · {changed} unsaved" if changed else "")


def tag_table_html(table: list[tuple[str, int]], total: int, limit: int = 150) -> str:
    if not table:
        return f"<div class='{P}tag_table'>no tags yet</div>"
    rows = "".join(f"<tr><td>{html.escape(tag)}</td><td>{n}</td><td>{n / max(total, 1):.0%}</td></tr>"
                   for tag, n in table[:limit])
    more = f"<div>… and {len(table) - limit} more tags</div>" if len(table) > limit else ""
    return (f"<div class='{P}tag_table'><table><thead><tr><th>tag</th><th>images</th><th>share</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>{more}</div>")


def report_html(report) -> str:
    """The dataset check as a list: severity, message, files, fix."""
    items = []
    for f in sorted(report.findings, key=lambda f: ("error", "warning", "info").index(f.severity)):
        files = ", ".join(html.escape(x) for x in f.files[:12]) + (f" (+{len(f.files) - 12} more)"
                                                                    if len(f.files) > 12 else "")
        items.append(f"<li class='{P}{f.severity}'><b>{f.severity}</b>: {html.escape(f.message)}"
                     + (f"<div class='{P}files'>{files}</div>" if files else "")
                     + (f"<div class='{P}fix'>fix: {html.escape(f.fix)}</div>" if f.fix else "") + "</li>")
    head = (f"{report.images} images · {report.count('error')} errors · {report.count('warning')} warnings · "
            f"{report.count('info')} notes")
    if report.reg_root:  # (as the text report names them)
        head += f" · regularization images of {report.reg_root}: {report.reg_images}"
    body = f"<ul>{''.join(items)}</ul>" if items else "<div>no problems found</div>"
    return f"<div class='{P}check'><div>{html.escape(head)}</div>{body}{buckets_html(report.buckets)}</div>"


def buckets_html(buckets: list[dict]) -> str:
    """The dataset check's aspect-ratio buckets as a bar per bucket (width × height, images); empty without."""
    if not buckets:
        return ""
    most = max(b["count"] for b in buckets)
    rows = "".join(f"<tr><td>{w}×{h}</td><td>{b['count']}</td><td><div class='{P}bar' style='width:"
                   f"{100 * b['count'] / most:.0f}%'>&nbsp;</div></td></tr>"
                   for b in buckets for w, h in [b["resolution"]])
    return (f"<div class='{P}buckets'><div>aspect-ratio buckets ({len(buckets)}; a batch holds one bucket's "
            f"images)</div><table><thead><tr><th>size</th><th>images</th><th></th></tr></thead><tbody>{rows}"
            "</tbody></table></div>")
