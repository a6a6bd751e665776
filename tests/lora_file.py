"""What a written LoRA file learned: the kohya prefixes (``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``)
of the modules whose up weights moved from their zero start."""

from __future__ import annotations

from safetensors import safe_open


def learned_prefixes(path) -> set[str]:
    learned = set()
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith(".lora_up.weight") and f.get_tensor(key).abs().max() > 0:
                learned.add(key.split("text_model_")[0] if "_text_model_" in key else "lora_unet_")
    return learned
