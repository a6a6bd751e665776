"""Tiny random caption models (BLIP, CLIP) saved as folders, for tests: seconds to build, no download."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a red blue circle square photo of the on with light soft painting style cat dog".split()
_TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)


def build_tiny_blip(out: Path) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    text = dict(_TINY, vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=2, eos_token_id=3,
                sep_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=dict(_TINY, image_size=32,
                                                                                         patch_size=8),
                                                    projection_dim=32))
    model.save_pretrained(out, safe_serialization=True)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=BertTokenizer(str(out / "vocab.txt"))).save_pretrained(out)
    return out


def build_tiny_clip(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from lora_trainer.models.single_file import SD15_CONFIG

    tok = CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer")
    text = dict(_TINY, vocab_size=tok.vocab_size, max_position_embeddings=77)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(_TINY, image_size=32, patch_size=8),
                         projection_dim=16)).save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(out)
    return out
