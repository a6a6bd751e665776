"""Trying a language model's LoRA: find the adapter (its folder, or the run folder that holds it), load it on its base
model with peft, and generate text, greedy or sampled, streamed to the terminal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.llm.data import token_ids
from lora_trainer.llm.model import load_model, load_tokenizer, read_model_config
from lora_trainer.llm.outputs import ADAPTER_CONFIG, is_adapter

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_NEW_TOKENS = 128  # (the generate command's default; the samples while training too)


def find_adapter(path: str) -> Path:
    """An adapter folder as given, or the one a run folder holds (its summary.json's, else the newest)."""
    p = Path(path).expanduser()
    if is_adapter(p):
        return p
    if p.is_dir():
        try:
            named = Path(json.loads((p / "summary.json").read_text(encoding="utf-8"))["adapter_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            named = None
        if named is not None and is_adapter(named):
            return named
        found = sorted((c for c in p.iterdir() if is_adapter(c)), key=lambda c: c.stat().st_mtime)
        if found:
            return found[-1]
    raise LoraTrainerError(f"--adapter: {p.resolve()} is neither a PEFT adapter folder ({ADAPTER_CONFIG}) nor a run "
                           "folder holding one")


def load_with_adapter(adapter: Path, base: str | None = None, trust_remote_code: bool = False,
                      device: torch.device | None = None, dtype: torch.dtype = torch.float32):
    """(peft model, tokenizer): the base (``base``, else the adapter's base_model_name_or_path) with the adapter."""
    from peft import PeftModel

    base = base or json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise LoraTrainerError(f"{adapter / ADAPTER_CONFIG} names no base model; give it with --base")
    read_model_config(base, trust_remote_code)
    has_tokenizer = any((adapter / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    tok = load_tokenizer(str(adapter) if has_tokenizer else base, trust_remote_code)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(base, dtype, device, trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).to(device)
    model.eval()
    return model, tok


def sample_prompts(value: str | list[str] | None) -> list[str]:
    """``output.sample_prompts`` for a language model: a list of prompts, or a file of them, one a line (blank lines
    and lines starting with ``#`` skipped); taken as written (kohya's ``--n``-style options are the images')."""
    if not value:
        return []
    if isinstance(value, list):
        return [v.strip() for v in value]
    path = Path(value).expanduser()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"output.sample_prompts: cannot read {path.resolve()} ({e})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise ConfigError(f"output.sample_prompts: {path.resolve()} holds no prompt (one a line; # starts a comment)")
    return prompts


def chat_prompt(tok, prompt: str) -> str:
    """``prompt`` as a user turn in the tokenizer's chat template, ready for the assistant's answer."""
    if not getattr(tok, "chat_template", None) or not hasattr(tok, "apply_chat_template"):
        raise LoraTrainerError("--chat: the tokenizer has no chat template; leave --chat out to send the prompt as is")
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def stop_ids(model, tok) -> list[int]:
    """The tokens that end generation: the model's own (generation_config.json's eos_token_id: a chat model's end of
    turn, Llama-3's <|eot_id|>, Gemma's <end_of_turn>) and the tokenizer's end of text."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [own] if isinstance(own, int) else list(own or [])
    return ids + [tok.eos_token_id] if tok.eos_token_id is not None and tok.eos_token_id not in ids else ids


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS, sample: bool = False,
             temperature: float = 0.8, top_p: float = 0.95, stream: bool = False, seed: int | None = None,
             templated: bool = False) -> tuple[str, list[int]]:
    """(the new text, its token ids); greedy unless ``sample``; ``stream`` prints the text as it comes.
    ``templated``: the prompt is a chat template's text, which holds its special tokens (BOS) already: none are added,
    as training tokenized the conversations."""
    from transformers import TextStreamer

    special = not templated  # (and one BOS where the prompt starts with it: as training tokenized the rows)
    ids = token_ids(tok, prompt, special) or list(tok(prompt, add_special_tokens=special)["input_ids"])
    ids = torch.tensor([ids], device=model.device)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=stop_ids(model, tok), streamer=streamer,
                         use_cache=True, **kwargs)  # (a model set up for training has config.use_cache off)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), new
