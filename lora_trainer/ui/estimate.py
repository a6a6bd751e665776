"""The tab's memory estimate before Train (engine.preflight), with no gradio: where the host's run would train, and
the estimate's line as the tab shows it."""

from __future__ import annotations

import logging
from pathlib import Path

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


def _total_steps(cfg) -> int | None:
    """The run's steps where its dataset folder can be counted now (a quick scan, nothing decoded twice)."""
    from lora_trainer.data.dataset import scan_dataset
    from lora_trainer.engine.batches import Plan
    from lora_trainer.errors import LoraTrainerError

    d = cfg.data
    if not d.train_data_dir or not Path(d.train_data_dir).is_dir():
        return None
    try:
        scan = scan_dataset(d.train_data_dir, metadata_path=d.metadata_path, caption_extension=d.caption_extension,
                            caption_priority=d.caption_priority, recursive=d.recursive)
    except LoraTrainerError:
        return None
    return Plan.from_config(cfg, len(scan.samples)).total_steps


def estimate_message(host, cfg) -> tuple[str, str]:
    """(the estimate's line, its kind: "ok" where it fits, "error" where it does not, "hint" where unknown)."""
    from lora_trainer.engine.preflight import estimate_for

    where = preflight_where(host, cfg)
    est = estimate_for(cfg, where) if where is not None else None
    if est is None:
        return ("No estimate: the model's shapes are not known before it loads (load a model in the WebUI, or choose "
                "a diffusers folder, a .safetensors checkpoint or tiny-demo)", "hint")
    text = est.summary(_total_steps(cfg)).replace("pre-flight: ", "Estimate: ", 1)
    return text, {True: "ok", False: "error", None: "hint"}[est.fits]
