"""Rows to token ids and labels, the held-out share, packing, and the batches of each epoch.

Labels are -100 (ignored by the loss) on prompt tokens (unless ``data.train_on_prompt``), on the non-assistant
turns of a conversation and on padding. A text row longer than ``max_seq_length`` is split into consecutive chunks,
any other row cut to it. Batches hold rows of similar length, padded to the longest in the batch
(not to ``max_seq_length``); which rows form them is a pure function of (seed, epoch), so a resume finds its place.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lora_trainer.errors import DatasetError
from lora_trainer.llm.rows import Row

log = logging.getLogger(__name__)
IGNORE = -100
AUTO_SPLIT, AUTO_SPLIT_MIN_ROWS = 0.05, 40  # the held-out share where data.validation_split is not set


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    positions: tuple[int, ...] | None = None  # packed rows: each row's own positions, from 0 (``pack``)


def token_ids(tok, text: str, special: bool) -> list[int]:
    """``text``'s ids, with the tokenizer's special tokens if ``special``; but one BOS where the text starts with
    the BOS token itself (rows rendered by a chat template beforehand, "<s>[INST] ..."; the tokenizer would add a
    second one, which the model never saw in its own training)."""
    ids = list(tok(text, add_special_tokens=special)["input_ids"]) if text else []
    bos = tok.bos_token_id
    if special and bos is not None and ids[:2] == [bos, bos] and text.startswith(str(tok.bos_token)):
        ids = ids[1:]
    return ids


def _render(tok, messages, source: str, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    if not hasattr(tok, "apply_chat_template"):
        raise DatasetError(f"{source}: \"messages\" rows need transformers >= 4.34 (chat templates); this one is "
                           "older: write the rows as {\"prompt\", \"completion\"}")
    if not getattr(tok, "chat_template", None):
        raise DatasetError(f"{source}: \"messages\" rows need the tokenizer's chat template, and the model's "
                           "tokenizer has none (tokenizer_config.json \"chat_template\"); add one, or write the rows "
                           "as {\"prompt\", \"completion\"}")
    from jinja2 import TemplateError

    try:
        return tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                       add_generation_prompt=generation_prompt)
    except TemplateError as e:  # (the template's own raise_exception: "System role not supported", ...)
        roles = ", ".join(r for r, _ in messages)
        raise DatasetError(f"{source}: the tokenizer's chat template refuses this conversation ({e}; its turns: "
                           f"{roles}): write it as the model's template takes it") from None


def chat_pieces(tok, row: Row) -> list[tuple[str, bool]]:
    """A conversation as (text, trained) pieces: each assistant turn trained, the rest (with the template's
    assistant header) not. The template must render a conversation as a growing prefix."""
    msgs, done, pieces = row.messages, "", []
    for k, (role, _) in enumerate(msgs):
        if role != "assistant":
            continue
        if not any(r != "assistant" for r, _ in msgs[:k]):
            raise DatasetError(f"{row.source}: the conversation starts with an assistant turn; the turn it answers "
                               "is missing (a user or system turn must come first)")
        before = _render(tok, msgs[:k], row.source, generation_prompt=True)
        after = _render(tok, msgs[:k + 1], row.source)
        if not (before.startswith(done) and after.startswith(before)):
            raise DatasetError(f"{row.source}: the tokenizer's chat template does not render the conversation turn "
                               "by turn (an earlier part changes as turns are added), so the assistant turns cannot "
                               "be told apart; write the rows as {\"prompt\", \"completion\"}")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    pieces.append((_render(tok, msgs, row.source)[len(done):], False))
    return [p for p in pieces if p[0]]


def _chat_ids(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """The conversation's ids as the model sees it at inference (the whole rendered text tokenized at once: pieces
    tokenized apart differ where a tokenizer merges across a boundary or, like SentencePiece, starts each text with
    a space) and, per token, whether it overlaps a trained piece (by the fast tokenizer's character offsets).
    A slow tokenizer has no offsets: its pieces are tokenized one by one."""
    if not getattr(tok, "is_fast", False):
        ids, trained = [], []
        for text, train in pieces:
            piece = token_ids(tok, text, special=False)
            ids, trained = ids + piece, trained + [train] * len(piece)
        return ids, trained
    spans, at = [], 0
    for text, train in pieces:
        if train:
            spans.append((at, at + len(text)))
        at += len(text)
    enc = tok("".join(text for text, _ in pieces), add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]


def encode(tok, row: Row, train_on_prompt: bool) -> Example:
    """One row's token ids and labels (prompt tokens -100 unless ``train_on_prompt``); ends with one EOS (a text or
    completion that ends with it already, as rows written for other trainers do, gets no second: trl's add_eos)."""
    def ending(ids: list[int]) -> list[int]:
        return ids + [tok.eos_token_id] if tok.eos_token_id is not None and ids[-1:] != [tok.eos_token_id] else ids

    if row.messages is not None:
        ids, trained = _chat_ids(tok, chat_pieces(tok, row))
        trained = [t or train_on_prompt for t in trained]
    elif row.text is not None:
        ids = ending(token_ids(tok, row.text, special=True))
        trained = [True] * len(ids)
    else:
        prompt = token_ids(tok, row.prompt, special=True)
        # (an empty prompt: the completion takes the special tokens, BOS, that a prompt would have started with)
        completion = ending(token_ids(tok, row.completion, special=not prompt))
        ids, trained = prompt + completion, [train_on_prompt] * len(prompt) + [True] * len(completion)
    return Example(tuple(ids), tuple(i if t else IGNORE for i, t in zip(ids, trained)))


def chunk(ex: Example, max_len: int) -> list[Example]:
    """A text row's tokens as consecutive windows of up to ``max_len`` tokens, each starting on the last token of the
    one before: the first position of a window predicts nothing, so with this one-token overlap every token of the
    document after its first is a target exactly once (HF run_clm's grouping, without losing a token per window)."""
    if len(ex.input_ids) <= max_len:
        return [ex]
    out, start = [], 0
    while True:
        out.append(Example(ex.input_ids[start:start + max_len], ex.labels[start:start + max_len]))
        if start + max_len >= len(ex.input_ids):
            return out
        start += max_len - 1


def encode_rows(tok, rows: list[Row], max_len: int, train_on_prompt: bool, held_out: bool = False) -> list[Example]:
    """Every row encoded to at most ``max_len`` tokens. A text row (a .txt document, a ``{"text"}`` row) longer than
    that is split into consecutive chunks (``chunk``), each a training row; a prompt/completion or messages row is cut
    to it (its answer means nothing without its prompt). The log counts both; rows left with nothing to learn (a
    prompt longer than ``max_len``) are dropped with a warning. ``held_out``: the rows are the held-out ones (the
    messages say so)."""
    what = "held-out rows (data.validation_split)" if held_out else "rows"
    out, cut, split, chunks, empty = [], 0, 0, 0, []
    for row in rows:
        ex = encode(tok, row, train_on_prompt)
        if len(ex.input_ids) > max_len and row.text is not None:
            pieces = chunk(ex, max_len)
            split, chunks = split + 1, chunks + len(pieces)
            out += pieces
            continue
        if len(ex.input_ids) > max_len:
            cut += 1
            ex = Example(ex.input_ids[:max_len], ex.labels[:max_len])
        if all(x == IGNORE for x in ex.labels[1:]):  # (the first label is never predicted)
            empty.append(row.source)
            continue
        out.append(ex)
    if split:
        log.info("%d of %d text rows/documents are longer than data.max_seq_length %d tokens and were split into %d "
                 "chunks of up to %d tokens", split, len(rows), max_len, chunks, max_len)
    if cut:
        log.info("%d of %d rows are longer than data.max_seq_length %d tokens and were cut to it", cut, len(rows),
                 max_len)
    if empty:
        log.warning("%d %s left out: nothing to learn within data.max_seq_length %d tokens (the prompt fills it), "
                    "e.g. %s", len(empty), what, max_len, empty[0])
    if not out:
        where = "; raise it, or set data.validation_split: 0" if held_out else "; raise it"
        raise DatasetError(f"none of the {len(rows)} {what} has a token to learn within data.max_seq_length "
                           f"{max_len} (the prompt fills it), e.g. {empty[0] if empty else rows[0].source}{where}")
    return out


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training rows, held-out rows): ``fraction`` of them, at least one, chosen by ``seed``."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def auto_split(configured: float, explicit: bool, n_rows: int) -> float:
    """data.validation_split as set, or 5% where the set has at least 40 rows and it is not set."""
    return configured if explicit else (AUTO_SPLIT if n_rows >= AUTO_SPLIT_MIN_ROWS else 0.0)


def pack(examples: list[Example], max_len: int, seed: int) -> list[Example]:
    """Short rows joined (in a seeded order) into sequences of up to ``max_len`` tokens; a row is never split.
    Each row keeps its own positions, from 0: a model that takes them as the rows' bounds (``llm.model.
    keeps_packed_rows_apart``) attends within each row only, as trl's packing does; any other attends across the
    joined rows (each begins with the tokenizer's own start token where it has one). A row's first token is no target
    (alone it never is: nothing comes before it; packed it would be guessed from the row before, and a text chunk's
    first token, the overlap, was trained in the chunk before)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    packed, ids, labels, positions = [], [], [], []
    for i in order:
        ex = examples[i]
        if ids and len(ids) + len(ex.input_ids) > max_len:
            packed.append(Example(tuple(ids), tuple(labels), tuple(positions)))
            ids, labels, positions = [], [], []
        ids, labels = ids + list(ex.input_ids), labels + [IGNORE] + list(ex.labels[1:])
        positions += range(len(ex.input_ids))
    packed.append(Example(tuple(ids), tuple(labels), tuple(positions)))
    log.info("packing: %d rows joined into %d sequences of up to %d tokens", len(examples), len(packed), max_len)
    return packed


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The rows of each batch of an epoch: shuffled, sorted by length within windows of 64 batches (so a batch
    pads little), and the batches shuffled. ``ceil(n / batch_size)`` batches every epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    window, batches = batch_size * 64, []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded to the longest row: input_ids, attention_mask, labels (-100 on padding); and for packed rows
    position_ids, each row's own (the padding goes on counting from the last row: after every real token, it is
    never attended to)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
        if e.positions is not None:
            positions[r, :n] = torch.tensor(e.positions)
            positions[r, n:] = torch.arange(e.positions[-1] + 1, e.positions[-1] + 1 + width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return batch if examples[0].positions is None else {**batch, "position_ids": positions}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens a batch's loss counts (labels shifted by one: the first position predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
