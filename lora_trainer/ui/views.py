"""What the Train LoRA tab shows, as text and HTML: the status, the loss plot, skipped images, messages.

No gradio here: every function takes plain values and returns a string, so tests check the output directly.
"""

from __future__ import annotations

import html
import math
import re
import time
from pathlib import Path

PREFIX = "lora_trainer_"
# The status's loss is the mean of the last 20 steps, as the engine averages it (engine/trainer.py keeps a
# deque of 20); the plot's smoothed line is the same moving average, so its last point is the status's number.
LOSS_WINDOW = 20
# The strength sweep compares strengths, not final quality: with A1111's default sampler (DPM++ 2M) an image
# has its composition by 10-15 steps, and 5 strengths x 12 steps cost 60 sampling steps instead of 100.
SWEEP_STEPS = 12
MAX_POINTS = 400  # points drawn per series (longer runs are thinned evenly; the smoothing uses every step)
# the field that continues a stopped run (training.resume_from_checkpoint: latest), named in the Stop message too
CONTINUE_LABEL = "Continue this name's stopped run (from its newest checkpoint; none: a new run)"


# --- small formats
def format_speed(steps_per_s: float) -> str:
    """``2.50 it/s``, or ``33 s/step`` when slower than one step a second (0.03 it/s is hard to read)."""
    if steps_per_s >= 1:
        return f"{steps_per_s:.2f} it/s"
    seconds = 1 / steps_per_s
    return f"{seconds:.1f} s/step" if seconds < 10 else f"{seconds:.0f} s/step"


def format_eta(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(seconds, 0)))


def moving_average(values: list[float], window: int = LOSS_WINDOW) -> list[float]:
    """The trailing mean of up to ``window`` values at each position."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_text(losses: list[tuple[int, float]]) -> str | None:
    """``loss 0.1234 (avg of last 20 steps)``: what the status line shows, named for what it is."""
    if not losses:
        return None
    values = [v for _, v in losses]
    n = min(len(values), LOSS_WINDOW)
    return f"loss {moving_average(values)[-1]:.4f} (avg of last {n} step{'s' if n > 1 else ''})"


# --- the loss plot
def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) inside [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 3
    return f"{value:.{decimals}f}"


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / MAX_POINTS
    picked = [points[int(i * stride)] for i in range(MAX_POINTS)]
    return picked if picked[-1] == points[-1] else picked + [points[-1]]


def loss_svg(losses: list[tuple[int, float]], validation: list[tuple[int, float]] | None = None,
             width: int = 480, height: int = 210) -> str:
    """The loss as inline SVG (no plotting library, the same in every gradio): steps on x, loss on y, each step's
    loss as a dot, the moving average as a line, and an optional validation series (dashed)."""
    if len(losses) < 2:
        return f"<div class='{PREFIX}loss_empty'>the loss curve appears here</div>"
    left, right, top, bottom = 52, 12, 26, 34
    steps = [s for s, _ in losses] + [s for s, _ in validation or []]
    values = [v for _, v in losses] + [v for _, v in validation or []]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 0.05
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def px(step: float) -> float:
        return left + (step - x0) / (x1 - x0) * (width - left - right)

    def py(value: float) -> float:
        return height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f"<svg class='{PREFIX}loss' viewBox='0 0 {width} {height}' width='100%' role='img' "
             f"aria-label='training loss by step' xmlns='http://www.w3.org/2000/svg' font-size='11'>"]
    parts += _axes(px, py, (x0, x1), (y0, y1), width, height, left, bottom, top)
    raw = _thin([(float(s), v) for s, v in losses])
    r = 2.6 if len(raw) <= 100 else 1.8  # (a few points: larger, so they are seen)
    parts.append(f"<g class='{PREFIX}loss_raw' fill='#4f86f7' fill-opacity='0.6'>"
                 + "".join(f"<circle cx='{px(s):.1f}' cy='{py(v):.1f}' r='{r}'/>" for s, v in raw) + "</g>")
    smooth = _thin(list(zip([float(s) for s, _ in losses], moving_average([v for _, v in losses]))))
    parts.append(_polyline(smooth, px, py, f"{PREFIX}loss_avg", "stroke='#e8710a' stroke-width='2'"))
    legend = [("dot", "#4f86f7", "loss of each step"), ("line", "#e8710a", f"average of last {LOSS_WINDOW} steps")]
    if validation:
        parts.append(_polyline(_thin([(float(s), v) for s, v in validation]), px, py, f"{PREFIX}loss_val",
                               "stroke='#2ca02c' stroke-width='2' stroke-dasharray='5 3'"))
        legend.append(("dash", "#2ca02c", "validation loss"))
    parts.append(_legend(legend, left))
    parts.append("</svg>")
    return "".join(parts)


def _polyline(points, px, py, css: str, style: str) -> str:
    pts = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in points)
    return f"<polyline class='{css}' fill='none' {style} stroke-linejoin='round' points='{pts}'/>"


def _axes(px, py, xr, yr, width, height, left, bottom, top) -> list[str]:
    """Axis lines, ticks with labels, light grid lines, and the axis names."""
    base, out = height - bottom, [f"<g class='{PREFIX}loss_axes' stroke='currentColor' fill='currentColor'>"]
    out.append(f"<line x1='{left}' y1='{top}' x2='{left}' y2='{base}' stroke-opacity='0.6'/>")
    out.append(f"<line x1='{left}' y1='{base}' x2='{width - 8}' y2='{base}' stroke-opacity='0.6'/>")
    y_ticks = nice_ticks(*yr, count=6)
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 0
    for v in y_ticks:
        y = py(v)
        out.append(f"<line x1='{left - 4}' y1='{y:.1f}' x2='{width - 8}' y2='{y:.1f}' stroke-opacity='0.12'/>")
        out.append(f"<text x='{left - 6}' y='{y + 3.5:.1f}' text-anchor='end' stroke='none' "
                   f"class='{PREFIX}ytick'>{_tick_label(v, y_step)}</text>")
    for s in (t for t in nice_ticks(*xr, count=6) if float(t).is_integer()):
        x = px(s)
        out.append(f"<line x1='{x:.1f}' y1='{base}' x2='{x:.1f}' y2='{base + 4}' stroke-opacity='0.6'/>")
        out.append(f"<text x='{x:.1f}' y='{base + 15}' text-anchor='middle' stroke='none' "
                   f"class='{PREFIX}xtick'>{int(s)}</text>")
    out.append(f"<text x='{width - 8}' y='{height - 3}' text-anchor='end' stroke='none'>step</text>")
    out.append(f"<text x='4' y='{top - 10}' stroke='none'>loss</text></g>")
    return out


def _legend(items: list[tuple[str, str, str]], left: int) -> str:
    out, x = [f"<g class='{PREFIX}loss_legend'>"], left + 30
    for kind, color, label in items:
        if kind == "dot":
            out.append(f"<circle cx='{x + 6}' cy='12' r='2.5' fill='{color}'/>")
        else:
            dash = " stroke-dasharray='5 3'" if kind == "dash" else ""
            out.append(f"<line x1='{x}' y1='12' x2='{x + 14}' y2='12' stroke='{color}' stroke-width='2'{dash}/>")
        out.append(f"<text x='{x + 18}' y='16' fill='currentColor'>{html.escape(label)}</text>")
        x += 26 + 6 * len(label)
    return "".join(out) + "</g>"


# --- the status
def status_line(s) -> str:
    """One plain line for a ``session.Status``: step/total, loss (and what it is), speed, ETA, what happens now."""
    if s.state in ("idle", "loading") or not s.total_steps:
        return s.message
    parts = [f"step {s.step}/{s.total_steps}"]
    loss = loss_text(s.losses)
    if loss:
        parts.append(loss)
    if s.steps_per_s:
        parts.append(format_speed(s.steps_per_s))
    if s.eta_s is not None and s.running:
        parts.append(f"ETA {format_eta(s.eta_s)}")
    return " · ".join(parts) + (f" — {s.message}" if s.message else "")


def _run_name(run_dir: Path | None) -> str:
    if run_dir is None:
        return ""
    return (f"<div class='{PREFIX}run'>run <span class='{PREFIX}run_name' title='{html.escape(str(run_dir))}'>"
            f"{html.escape(Path(run_dir).name)}</span></div>")


def images_text(used: int, skipped: int) -> str:
    return f"{used} images used, {skipped} skipped" if skipped else f"{used} images used"


def skipped_html(skipped: list[dict], used: int, count: int | None = None) -> str:
    """``16 images used, 6 skipped`` and, one click away, each skipped file with its reason."""
    count = len(skipped) if count is None else count
    text = html.escape(images_text(used, count))
    if not count:
        return f"<div class='{PREFIX}images'>{text}</div>"
    rows = "".join(f"<li><code>{html.escape(Path(str(item.get('path', '?'))).name)}</code>: "
                   f"{html.escape(str(item.get('reason', '')), quote=False)}</li>" for item in skipped)
    if len(skipped) < count:
        rows += f"<li>(and {count - len(skipped)} more: see summary.json in the run folder)</li>"
    return (f"<details class='{PREFIX}skipped'><summary>{text} (why?)</summary>"
            f"<ul>{rows}</ul></details>")


def status_html(s, labels: dict[str, str] | None = None) -> str:
    """The tab's status box for a ``session.Status``: the line, the run's name (path on hover), images used."""
    css = {"error": "error", "done": "done", "stopped": "done"}.get(s.state, "running")
    if s.state == "error":
        return message_html(name_fields(s.message, labels or {}), "error")
    body = f"<div>{html.escape(status_line(s), quote=False)}</div>"
    if s.result is not None and hasattr(s.result, "images_used"):
        body += skipped_html(s.skipped, s.result.images_used, s.result.images_skipped)
    elif s.result is not None:  # (a language model's run: llm.trainer.LlmResult)
        body += f"<div>{html.escape(rows_text(s.result), quote=False)}</div>"
    body += _run_name(s.run_dir)
    return f"<div class='{PREFIX}status {PREFIX}{css}'>{body}</div>"


def rows_text(result) -> str:
    """A language model's run in a line: its rows, and the last held-out loss and perplexity where it had some."""
    text = f"{result.rows_trained} rows trained"
    if result.rows_held_out:
        text += f", {result.rows_held_out} held out"
    if result.evaluations:
        last = result.evaluations[-1]
        text += f" · eval loss {last['eval_loss']:.4f}, perplexity {last['perplexity']:.3f}"
    return text


def message_html(text: str, kind: str = "error") -> str:
    """A message box (``error``, ``info`` or ``hint``); line breaks are kept."""
    return f"<div class='{PREFIX}status {PREFIX}{kind}'>{html.escape(text, quote=False)}</div>"


# --- config keys → the tab's field labels
SECTIONS = ("data", "model", "training", "output")


def short_label(label: str) -> str:
    """``Max steps (0 = use epochs)`` → ``Max steps``."""
    return re.sub(r"\s*\(.*\)\s*$", "", label).strip() or label


def name_fields(message: str, labels: dict[str, str]) -> str:
    """Name config keys by the tab's field labels: ``data.train_data_dir: … is not an existing folder`` →
    ``Dataset folder: … is not an existing folder``; ``lower training.batch_size`` → ``lower 'Batch size'``.

    A key is matched with its section (``data.resolution``), or bare when it has an underscore
    (``gradient_accumulation_steps``): a bare ``resolution`` or ``seed`` is an ordinary word.
    """
    if not labels:
        return message
    sections = "|".join(SECTIONS)
    keys = "|".join(re.escape(k) for k in sorted(labels, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.])(?:(?:{sections})\.({keys})|({keys}))(?!\w)(?!\.\w)(:?)")

    def replace(m: re.Match) -> str:
        key = m.group(1) or m.group(2)
        if m.group(2) and "_" not in key:
            return m.group(0)
        label = short_label(labels[key])
        return f"{label}:" if m.group(3) else f"'{label}'"

    return pattern.sub(replace, message)
