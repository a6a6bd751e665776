"""Captions → CLIP conditioning for a diffusers text encoder, literal or with the WebUI's emphasis weights.

One caption is one 77-token window: BOS, the first 75 tokens, EOS, padding (longer captions are cut,
as kohya's trainer does by default; the dataset check names them). With ``weighted`` the caption's
``(word:1.2)`` syntax is read as AUTOMATIC1111 reads it (``data.emphasis``): each span's tokens are
tokenized apart, the text encoder's output rows are multiplied by their weights, and the whole is rescaled
to its mean before weighting (the WebUI's default emphasis mode, "Original"). A caption without emphasis
encodes exactly as the plain tokenizer call does.
"""

from __future__ import annotations

import torch

from lora_trainer.data.emphasis import BREAK, parse_emphasis

WINDOW = 77  # CLIP's context: BOS + 75 tokens + EOS


def weighted_tokens(tokenizer, caption: str) -> tuple[list[int], list[float]]:
    """The 77 token ids of ``caption``'s first window and one weight per token (1 for BOS/EOS/padding)."""
    ids: list[int] = []
    weights: list[float] = []
    limit = WINDOW - 2
    for text, weight in parse_emphasis(caption):
        if weight == BREAK:  # the rest goes to a next window, which training does not use
            break
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
        if len(ids) >= limit:
            break
    ids, weights = ids[:limit], weights[:limit]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rest = limit - len(ids)
    return ([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[pad] * rest],
            [1.0, *weights, 1.0, *[1.0] * rest])


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Emphasis as the WebUI's "Original" mode: rows × weights, then back to the mean the output had."""
    if bool((weights == 1).all()):
        return z
    mean = z.mean()
    z = z * weights.to(z.dtype)[..., None]
    return z * (mean / z.mean())


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """A CLIP text model's last layer norm (transformers 5 has it on the model, 4.x on its ``text_model``)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def encode_captions(tokenizer, text_encoder, captions: list[str], device, weighted: bool,
                    clip_skip: int = 1) -> torch.Tensor:
    """Captions → B×77×D; literal captions in one batch (the text encoder treats each row on its own). ``clip_skip``
    (training.clip_skip): the output of the layer that many from the end, through the final layer norm, as the
    WebUI's "Clip skip" and kohya's --clip_skip take it (1: the last layer's, the model's own)."""
    def encode(ids: torch.Tensor) -> torch.Tensor:
        if clip_skip == 1:
            return text_encoder(ids)[0]
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
        return final_layer_norm(text_encoder)(hidden)

    if not weighted:
        ids = tokenizer(captions, padding="max_length", max_length=WINDOW, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return encode(ids)
    out = []
    for caption in captions:  # one at a time: the rescale is over the caption's own output
        ids, weights = weighted_tokens(tokenizer, caption)
        z = encode(torch.tensor([ids], device=device))
        out.append(apply_weights(z, torch.tensor([weights], device=device)))
    return torch.cat(out)
