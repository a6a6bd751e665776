"""The tab's dataset panel: the caption grid with its batch tools, the dataset check, auto-captioning.

Every event first takes the text of the slots on screen into the set, so an edit is never lost by
paging, filtering or a batch tool; nothing reaches the disk until Save (which keeps a backup).
"""

from __future__ import annotations

import functools
import html
import logging
import threading

import gradio as gr

from lora_trainer.data.caption_set import CaptionSet
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui import compat
from lora_trainer.ui.caption_grid import (
    PER_PAGE,
    GridState,
    augment_of,
    page_label,
    page_slots,
    report_html,
    tag_table_html,
)

log = logging.getLogger(__name__)
P = "lora_trainer_"
SCOPES = ["all images", "the filtered images"]
MODES = ["only missing captions", "overwrite all captions"]
POLL_S = 0.5


def _msg(text: str, kind: str = "done") -> str:
    return f"<div class='{P}status {P}{kind}'>{html.escape(text)}</div>"


def render(state: GridState | None, message: str = "", kind: str = "done") -> list:
    """Values for [state, status, page label, tag table, then per slot: image, caption, info].

    An unused slot hides its parts but keeps its column, so a short last page keeps the grid's widths.
    """
    status = _msg(message, kind) if message else ""
    if state is None:
        hidden = [gr.update(value=None, visible=False), gr.update(value="", visible=False),
                  gr.update(value="", visible=False)]
        return [None, status, "", tag_table_html([], 0)] + hidden * PER_PAGE
    out = [state, status, page_label(state), tag_table_html(state.captions.tag_table(), len(state.captions))]
    for slot in page_slots(state):
        out += [gr.update(value=slot.thumb, visible=slot.visible),
                gr.update(value=slot.caption, label=slot.label, visible=slot.visible),
                gr.update(value=slot.info, visible=slot.visible)]
    return out


def _take_edits(state, args) -> tuple:
    """Put the slot textboxes' text (the first PER_PAGE inputs) into the set; return the other inputs."""
    if state is not None:
        state.apply_edits(list(args[:PER_PAGE]))
    return args[PER_PAGE:]


def _handler(fn, extra_outputs: int = 0):
    """Wrap a grid action: take the slots' text first, turn errors into a status message."""

    def run(state, *args):
        try:
            return fn(state, *_take_edits(state, args))
        except LoraTrainerError as e:
            return [gr.update()] * extra_outputs + render(state, str(e), "error")

    return run


def _need(state):
    if state is None:
        raise LoraTrainerError("load the captions first (the dataset folder above, then 'Load captions')")
    return state


AUGMENT_FIELDS = ("shuffle_caption", "keep_tokens", "caption_tag_dropout_rate", "caption_dropout_rate",  # (their order
                  "seed")
# is caption_grid.augment_of's)


def load_captions(state, folder, prefix_text, *augment):
    """``augment``: the tab's AUGMENT_FIELDS values (each caption then shows an example draw)."""
    if state is not None and state.captions.changed and not state.discard_ok:
        state.discard_ok = True
        return render(state, f"{len(state.captions.changed)} unsaved caption edits: press Save, or press "
                      "Load again to discard them", "error")
    if not str(folder or "").strip():
        raise LoraTrainerError("choose the dataset folder first")
    cs = CaptionSet.load(str(folder).strip(), prefix=prefix_text or "")
    missing = sum(not i.caption for i in cs.items)
    return render(GridState(cs, augment=augment_of(prefix_text, *augment)), f"loaded {len(cs)} images from {cs.root}" +
                  (f"; {missing} have no caption" if missing else ""))


def set_augment(state, prefix_text, *augment):
    """The prefix or the augmentation fields changed: the text under each caption and its example draw follow."""
    if state is None:
        return render(None)
    state.captions.prefix = prefix_text or ""  # (what the trainer tokenizes, under each caption, follows it too)
    state.augment = augment_of(prefix_text, *augment)
    return render(state)


def turn_page(delta):
    def go(state):
        state = _need(state)
        state.page += delta
        return render(state)
    return go


def do_filter(state, has_text, has_not_text):
    state = _need(state)
    state.order, state.page = state.captions.filter(has_text, has_not_text), 0
    return render(state, f"{len(state.order)} images match")


def clear_filter(state):
    state = _need(state)
    state.order, state.page = list(range(len(state.captions))), 0
    return render(state)


def _targets(state, scope_value):
    return None if scope_value == SCOPES[0] else list(state.order)


def do_replace(state, find_text, repl_text, is_regex, scope_value):
    state = _need(state)
    n = state.captions.replace(find_text, repl_text or "", bool(is_regex), _targets(state, scope_value))
    return render(state, f"changed {n} captions (not saved yet)")


def tag_tool(action):
    def run(state, tag_text, scope_value):
        state = _need(state)
        idx = _targets(state, scope_value)
        if action == "remove":
            n = state.captions.remove_tag(tag_text, idx)
        elif action == "sort":
            n = state.captions.sort_tags(idx)
        else:
            n = state.captions.add_tag(tag_text, action, idx)
        return render(state, f"changed {n} captions (not saved yet)")
    return run


def save_captions(state):
    state = _need(state)
    result = state.captions.save()
    if not result.changed:
        return render(state, "nothing to save")
    backup = f"; the previous captions are in {result.backup}" if result.backup else ""
    return render(state, f"saved {result.changed} captions to "
                  f"{', '.join(p.name for p in result.written[:3])}{'…' if len(result.written) > 3 else ''}{backup}")


def run_check(state, folder, res, prefix_text, buckets=True, reg_dir=None):
    """The dataset check at the tab's resolution, with its aspect-ratio buckets where ``buckets`` (the field), and of
    the regularization images where ``reg_dir`` (the field) names their folder."""
    from lora_trainer.data.check import check_dataset

    if not str(folder or "").strip():
        raise LoraTrainerError("choose the dataset folder first")
    report = check_dataset(str(folder).strip(), resolution=int(res or 512), caption_prefix=prefix_text or "",
                           buckets=True if buckets else None, reg_data_dir=str(reg_dir or "").strip() or None)
    unsaved = len(state.captions.changed) if state is not None else 0
    note = f" ({unsaved} unsaved edits are not in it: the check reads the files)" if unsaved else ""
    return [report_html(report)] + render(state, f"checked{note}")


def auto_caption(host, state, folder, kind, model_name, template_text, mode_value, allow_download, prefix_text):
    """Caption the folder in a thread; yields the progress, then the reloaded grid."""
    from lora_trainer.data.label import check_template, label_dataset

    if state is not None and state.captions.changed:
        raise LoraTrainerError("save the caption edits first (or press Load twice to drop them)")
    if not str(folder or "").strip():
        raise LoraTrainerError("choose the dataset folder first")
    template_text = check_template(template_text or "{caption}")
    progress, outcome = {"done": 0, "total": 0}, {}

    def work():
        try:
            outcome["result"] = label_dataset(
                str(folder).strip(), captioner=lambda: host.make_captioner(kind, (model_name or "").strip() or None,
                                                                           bool(allow_download)),
                template=template_text, mode="overwrite" if mode_value == MODES[1] else "only-missing",
                progress=False, on_progress=lambda done, total: progress.update(done=done, total=total))
        except Exception as e:  # noqa: BLE001 - shown in the tab
            outcome["error"] = e

    thread = threading.Thread(target=work, name="lora_trainer_caption", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_S)
        text = (f"captioning: {progress['done']}/{progress['total']} images" if progress["total"]
                else "loading the captioner…")
        yield _status_only(text, "running")
    if "error" in outcome:
        e = outcome["error"]
        if not isinstance(e, LoraTrainerError):
            log.error("auto-captioning failed", exc_info=e)
        yield render(state, f"auto-caption failed: {e}", "error")
        return
    cs = CaptionSet.load(str(folder).strip(), prefix=prefix_text or "")
    yield render(GridState(cs, augment=state.augment if state is not None else None),
                 f"auto-caption: {outcome['result'].summary()}")


def _status_only(message: str, kind: str) -> list:
    """An update of the status line alone (the grid stays as it is)."""
    return [gr.update(), _msg(message, kind)] + [gr.update()] * (2 + 3 * PER_PAGE)


def _stream(fn):
    """_handler for a generator action."""

    def run(state, *args):
        try:
            yield from fn(state, *_take_edits(state, args))
        except LoraTrainerError as e:
            yield render(state, str(e), "error")

    return run


def create_dataset_panel(host, data_dir, fields: dict):
    """The panel's components and events, inside the tab; ``fields``: the tab's advanced fields by config key (the
    prefix, resolution, buckets, caption augmentation and regularization folder are read from them)."""
    prefix, resolution, buckets = fields["caption_prefix"], fields["resolution"], fields["enable_bucket"]
    augment = [fields[key] for key in AUGMENT_FIELDS]
    with gr.Accordion("Dataset: captions, check, auto-caption", open=False, elem_id=f"{P}dataset"):
        with gr.Row():
            load_btn = gr.Button("Load captions", elem_id=f"{P}load_captions")
            save_btn = gr.Button("Save captions", variant="primary", elem_id=f"{P}save_captions")
            check_btn = gr.Button("Check dataset", elem_id=f"{P}check")
        status = gr.HTML(elem_id=f"{P}grid_status")
        with gr.Accordion("Auto-caption", open=False, elem_id=f"{P}autocaption"):
            choices = host.captioners()
            with gr.Row():
                captioner = gr.Dropdown(label="Captioner", choices=list(choices), value=next(iter(choices)),
                                        elem_id=f"{P}captioner")
                model = gr.Textbox(label="Model (empty = the captioner's default; a folder or hub id)",
                                   elem_id=f"{P}caption_model")
                template = gr.Textbox(label="Template ({caption} = the model's text)", value="{caption}",
                                      elem_id=f"{P}caption_template")
            with gr.Row():
                mode = gr.Radio(label="Which images", choices=MODES, value=MODES[0], elem_id=f"{P}caption_mode")
                download = gr.Checkbox(label="Download the model if it is not cached (once; size in the message)",
                                       value=False, elem_id=f"{P}caption_download")
                label_btn = gr.Button("Caption images", elem_id=f"{P}label")
        check_out = gr.HTML(elem_id=f"{P}check_report")
        with gr.Row():
            has = gr.Textbox(label="Filter: has tags", placeholder="red, circle", elem_id=f"{P}filter_has")
            has_not = gr.Textbox(label="has not", elem_id=f"{P}filter_has_not")
            filter_btn = gr.Button("Filter", elem_id=f"{P}filter")
            clear_btn = gr.Button("Show all", elem_id=f"{P}filter_clear")
        with gr.Row():
            find = gr.Textbox(label="Find", elem_id=f"{P}find")
            repl = gr.Textbox(label="Replace with", elem_id=f"{P}replace_with")
            regex = gr.Checkbox(label="Regular expression", value=False, elem_id=f"{P}regex")
            replace_btn = gr.Button("Replace", elem_id=f"{P}replace")
        with gr.Row():
            tag = gr.Textbox(label="Tag", placeholder="mytrigger", elem_id=f"{P}tag")
            front_btn = gr.Button("Add at front", elem_id=f"{P}add_front")
            end_btn = gr.Button("Add at end", elem_id=f"{P}add_end")
            remove_btn = gr.Button("Remove everywhere", elem_id=f"{P}remove_tag")
            sort_btn = gr.Button("Sort tags by frequency", elem_id=f"{P}sort_tags")
            scope = gr.Radio(label="Apply to", choices=SCOPES, value=SCOPES[0], elem_id=f"{P}scope")
        with gr.Row():
            prev_btn = gr.Button("◀ Previous", elem_id=f"{P}prev_page")
            page_md = gr.Markdown(elem_id=f"{P}page_label")
            next_btn = gr.Button("Next ▶", elem_id=f"{P}next_page")
        slots, captions = [], []
        for row in range(PER_PAGE // 4):
            with gr.Row():
                for k in range(row * 4, row * 4 + 4):
                    with gr.Column(min_width=160, elem_classes=[f"{P}slot"]):
                        img = compat.image(f"{P}thumb_{k}", visible=False)
                        cap = gr.Textbox(lines=3, max_lines=8, elem_id=f"{P}caption_{k}", show_label=True,
                                         visible=False)
                        info = gr.HTML(elem_id=f"{P}caption_info_{k}", visible=False)
                    slots += [img, cap, info]
                    captions.append(cap)
        with gr.Accordion("Tag frequency", open=False, elem_id=f"{P}tag_freq"):
            table = gr.HTML(tag_table_html([], 0))
    state = gr.State(None)
    ui = dict(locals())
    _wire(host, ui, [state, status, page_md, table, *slots], data_dir, prefix, resolution, buckets, augment,
          fields["reg_data_dir"])
    return state


def _wire(host, ui: dict, outputs: list, data_dir, prefix, resolution, buckets, augment: list, reg_dir) -> None:
    """The panel's events: each takes the slots' text first (``_handler``) and renders the grid."""
    state, captions, check_out = ui["state"], ui["captions"], ui["check_out"]
    has, has_not, find, repl, regex, tag, scope = (ui[k] for k in ("has", "has_not", "find", "repl", "regex", "tag",
                                                                   "scope"))
    grid_in = [state]
    events = [
        ("load_btn", load_captions, [data_dir, prefix, *augment]), ("prev_btn", turn_page(-1), []),
        ("next_btn", turn_page(1), []), ("filter_btn", do_filter, [has, has_not]), ("clear_btn", clear_filter, []),
        ("replace_btn", do_replace, [find, repl, regex, scope]),
        ("front_btn", tag_tool("front"), [tag, scope]), ("end_btn", tag_tool("end"), [tag, scope]),
        ("remove_btn", tag_tool("remove"), [tag, scope]), ("sort_btn", tag_tool("sort"), [tag, scope]),
        ("save_btn", save_captions, []),
    ]
    for button, fn, extra in events:
        ui[button].click(_handler(fn), inputs=grid_in + captions + extra, outputs=outputs)
    ui["check_btn"].click(_handler(run_check, extra_outputs=1),
                          inputs=grid_in + captions + [data_dir, resolution, prefix, buckets, reg_dir],
                          outputs=[check_out] + outputs)
    for field in (prefix, *augment):
        field.change(_handler(set_augment), inputs=grid_in + captions + [prefix, *augment], outputs=outputs)
    labelling = [ui[k] for k in ("captioner", "model", "template", "mode", "download")]
    ui["label_btn"].click(_stream(functools.partial(auto_caption, host)),
                          inputs=grid_in + captions + [data_dir, *labelling, prefix], outputs=outputs)
    for box in (has, has_not):
        box.submit(_handler(do_filter), inputs=grid_in + captions + [has, has_not], outputs=outputs)
