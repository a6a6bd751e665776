"""A language model's frozen base in 4-bit or 8-bit (``training.quantize_base``; QLoRA): bitsandbytes through
transformers' ``BitsAndBytesConfig`` (4-bit: NF4 with double quantization, computing in the run's mixed precision),
then peft's ``prepare_model_for_kbit_training``. CUDA only; what is missing is said before the model loads."""

from __future__ import annotations

import importlib.util
import sys

import torch

from lora_trainer.errors import ConfigError

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
DESCRIBED = {"4bit": "4-bit NF4 with double quantization (QLoRA)", "8bit": "8-bit (LLM.int8)"}


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check_quantization(mode: str) -> None:
    """Refuse ``training.quantize_base`` where it cannot run: no CUDA GPU, or no bitsandbytes."""
    if mode == "no":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"training.quantize_base: {mode!r} needs a CUDA GPU (bitsandbytes quantizes on CUDA only) "
                          "and none is available here; set training.quantize_base: no to train on the base in the "
                          "run's precision")
    if not bitsandbytes_installed():
        raise ConfigError(f"training.quantize_base: {mode!r} needs the bitsandbytes package, which is not installed "
                          f"in this Python ({sys.executable}): pip install bitsandbytes; or set "
                          "training.quantize_base: no")


def quantization_config(mode: str, precision: str):
    """transformers' BitsAndBytesConfig for ``mode`` ("4bit" | "8bit"); None for "no". ``precision``: the run's mixed
    precision ("bf16" | "fp16" | "no"), the 4-bit layers' compute dtype."""
    if mode == "no":
        return None
    from transformers import BitsAndBytesConfig

    try:
        if mode == "4bit":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=COMPUTE_DTYPES[precision])
        return BitsAndBytesConfig(load_in_8bit=True)
    except (ImportError, ValueError, LookupError) as e:  # (e.g. a bitsandbytes too old for this transformers)
        raise ConfigError(f"training.quantize_base: {mode!r}: transformers refused the bitsandbytes set-up: "
                          f"{str(e).splitlines()[0][:300]}") from None


def prepare_for_training(model, gradient_checkpointing: bool):
    """peft's preparation of a quantized base for LoRA training: layer norms and the output layer in fp32, the inputs'
    gradients on, and (if asked) gradient checkpointing, non-reentrant."""
    from peft import prepare_model_for_kbit_training

    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}} if gradient_checkpointing else {}
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing, **kwargs)
