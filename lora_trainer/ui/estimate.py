"""The tab's memory estimate before Train (engine.preflight), with no gradio: where the host's run would train, and
the estimate's line as the tab shows it."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def preflight_where(host, cfg):
    """``host.preflight_where(cfg)``; None where the host cannot say (no model loaded, a host without it)."""
    where = getattr(host, "preflight_where", None)
    if where is None:
        return None
    try:
        return where(cfg)
    except Exception as e:  # noqa: BLE001 (an estimate never stops a run)
        log.warning("no memory estimate: %s: %s", type(e).__name__, e)
        return None


def estimate_message(host, cfg) -> tuple[str, str]:
    """(the estimate's line, its kind: "ok" where it fits, "error" where it does not, "hint" where unknown)."""
    from lora_trainer.engine.preflight import estimate_for, total_steps_of

    where = preflight_where(host, cfg)
    est = estimate_for(cfg, where) if where is not None else None
    if est is None:
        return ("No estimate: the model's shapes are not known before it loads (load a model in the WebUI, or choose "
                "a diffusers folder, a .safetensors checkpoint or tiny-demo)", "hint")
    text = est.summary(total_steps_of(cfg)).replace("pre-flight: ", "Estimate: ", 1)
    return text, {True: "ok", False: "error", None: "hint"}[est.fits]
