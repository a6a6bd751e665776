"""What a language-model run leaves behind: the PEFT adapter folder (adapter_config.json, adapter_model.safetensors
and the tokenizer), built under a temp name and renamed, never over an earlier one; and summary.json."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from lora_trainer.engine.outputs import set_aside_interim_exports
from lora_trainer.utils.fsio import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def export_adapter(model, tokenizer, run_dir: Path, name: str, steps: int) -> Path:
    """``<run>/<name>/``: what ``peft.PeftModel.from_pretrained`` (and vLLM's LoRA loading) reads, in safetensors."""
    final = Path(run_dir) / name
    set_aside_interim_exports(Path(run_dir), [name])  # (a resumed run's earlier adapter: <name>-step<N>)
    with atomic_dir(final) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    if not (final / ADAPTER_WEIGHTS).is_file():
        raise OSError(f"{final}: the adapter was written without {ADAPTER_WEIGHTS}")
    return final


def write_summary(run_dir: Path, result) -> Path:
    import peft
    import transformers

    summary = {
        "task_type": "text-generation",
        "status": result.status,
        "steps": result.steps,
        "total_steps": result.total_steps,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "rows_trained": result.rows_trained,
        "rows_held_out": result.rows_held_out,
        "evaluations": result.evaluations,
        "eval_loss": result.evaluations[-1]["eval_loss"] if result.evaluations else None,
        "perplexity": result.evaluations[-1]["perplexity"] if result.evaluations else None,
        "adapter_dir": str(result.adapter_dir),
        "wall_time_s": round(result.wall_time_s, 2),
        **result.extra,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
    }
    return atomic_write_json(Path(run_dir) / "summary.json", summary)
