"""CLIP token counts of captions, against the 75-token window SD 1.x's text encoder sees.

The tokenizer is SD 1.5's own (openai/clip-vit-large-patch14 vocabulary), shipped with the package,
so counting works offline and matches what training tokenizes. Counts are of the caption the trainer
uses (markdown already stripped), without the start and end tokens.
"""

from __future__ import annotations

from functools import lru_cache

TOKEN_WINDOW = 75  # 77 positions minus the start and end tokens


@lru_cache(maxsize=1)
def clip_tokenizer():
    from transformers import CLIPTokenizer

    from lora_trainer.models.single_file import SD15_CONFIG

    return CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer")


def count_tokens(captions: list[str]) -> list[int]:
    """The number of CLIP tokens of each caption (start/end tokens not counted)."""
    if not captions:
        return []
    ids = clip_tokenizer()(list(captions), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return [len(i) for i in ids]
