"""A language model's LoRA merged into its base: safetensors shards and the tokenizer in a new folder that
``AutoModelForCausalLM.from_pretrained`` loads like any model (built under a temp name; nothing is overwritten)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lora_trainer.errors import LoraTrainerError
from lora_trainer.llm.generate import DTYPES, load_with_adapter
from lora_trainer.llm.outputs import ADAPTER_CONFIG
from lora_trainer.utils.fsio import atomic_dir

log = logging.getLogger(__name__)


def base_dtype(base: str) -> torch.dtype:
    """The dtype the base model's config.json names (``torch_dtype`` / ``dtype``), else fp32."""
    try:
        config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def merge_adapter(adapter: Path, output: str, base: str | None = None, dtype: str = "auto",
                  max_shard_size: str = "2GB", trust_remote_code: bool = False) -> Path:
    """Merge ``adapter`` into its base (in fp32, on the CPU), save it in ``dtype`` (auto: the base's) to ``output``."""
    out = Path(output).expanduser()
    if out.exists():
        raise LoraTrainerError(f"--output: {out.resolve()} already exists; not overwriting it (choose a new folder)")
    model, tok = load_with_adapter(adapter, base, trust_remote_code, device=torch.device("cpu"))
    base = base or json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    target = base_dtype(base) if dtype == "auto" else DTYPES[dtype]
    merged = model.merge_and_unload().to(target)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        tok.save_pretrained(str(tmp))
    log.info("merged %s into %s: %s (%s)", adapter, base, out, str(target).replace("torch.", ""))
    return out
