"""The app's "Try the adapter": a language model's adapter (its folder, or the run folder that holds it) loaded on
its base model once and kept while it is the one asked for, and text generated from a prompt with
``llm.generate``. No gradio here: the panel turns the answer into its fields."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from lora_trainer.errors import LoraTrainerError
from lora_trainer.llm.generate import chat_prompt, find_adapter, generate, load_with_adapter
from lora_trainer.llm.outputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lora_trainer.ui.session import FREE_BEFORE_RUN, TrainingSession

MAX_NEW_TOKENS = 4096
_loaded: dict = {}  # the adapter kept loaded: {"key": (folder, mtime), "model", "tok"}


def release() -> None:
    """Let the kept model go (a training is about to start, or another adapter is asked for)."""
    if _loaded:
        _loaded.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if release not in FREE_BEFORE_RUN:
    FREE_BEFORE_RUN.append(release)


def loaded_adapter(folder: Path):
    """(peft model, tokenizer) for the adapter ``folder``: loaded again only when another one (or a newer file) is
    asked for. On CUDA in bf16 where the GPU has it, else fp32."""
    weights = folder / ADAPTER_WEIGHTS
    key = (str(folder.resolve()), (weights if weights.is_file() else folder / ADAPTER_CONFIG).stat().st_mtime_ns)
    if _loaded.get("key") != key:
        release()  # (the previous model's memory goes first)
        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        model, tok = load_with_adapter(folder, device=torch.device("cuda" if cuda else "cpu"), dtype=dtype)
        _loaded.update(key=key, model=model, tok=tok)
    return _loaded["model"], _loaded["tok"]


def try_adapter(host, adapter: str, prompt: str, max_new_tokens, sample: bool, chat: bool,
                seed) -> tuple[str, str]:
    """(the generated text, a line about it). Raises LoraTrainerError naming the field that is wrong."""
    path = str(adapter or "").strip()
    if not path:
        raise LoraTrainerError("Adapter: train one first, or put the path of an adapter folder (adapter_config.json) "
                               "or of a run folder there")
    if not str(prompt or "").strip():
        raise LoraTrainerError("Prompt: write the text to continue")
    n = int(max_new_tokens or 0)
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise LoraTrainerError(f"Max new tokens: {n} must be from 1 to {MAX_NEW_TOKENS}")
    active = TrainingSession.active()
    if active is not None and active.status.running:
        raise LoraTrainerError("a training is running on this machine; try the adapter when it has ended")
    try:
        folder = find_adapter(path)
    except LoraTrainerError as e:
        raise LoraTrainerError(str(e).replace("--adapter:", "Adapter:", 1)) from None
    with host.lock():
        model, tok = loaded_adapter(folder)
        text = prompt
        if chat:
            try:
                text = chat_prompt(tok, prompt)
            except LoraTrainerError:
                raise LoraTrainerError("As a chat turn: the tokenizer has no chat template; untick it to send the "
                                       "prompt as it is") from None
        out, ids = generate(model, tok, text, max_new_tokens=n, sample=bool(sample),
                            seed=int(seed) if seed is not None else None, templated=chat)
    how = f"sampled, seed {int(seed)}" if sample and seed is not None else "sampled" if sample else "greedy"
    return out, f"{folder.name}: {len(ids)} new tokens ({how})"
