"""Caption augmentation, with kohya sd-scripts' meaning (library/train_util.BaseDataset.process_caption): the
comma-separated tags shuffled each time an image is trained (``shuffle_caption``), the first ``keep_tokens`` tags in
place, each other tag left out with ``tag_dropout_rate``, the whole caption replaced by the empty prompt with
``dropout_rate`` or every ``dropout_every_n_epochs``-th epoch. Beyond kohya: the caption prefix (data.caption_prefix)
and the caption's markdown core tags (``**core style**``) are never shuffled away or dropped: the prefix stays in
place, the core tags follow the kept tags, in their order, so a trigger word written in bold needs no counting.

Every draw is a pure function of (seed, epoch, image, repeat), so a resumed run sees the captions the whole run would
have; ``repeat`` counts the times an epoch trained the image before (kohya's ``<repeats>_<name>`` folders train it
several times an epoch, and kohya draws anew each time).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lora_trainer.data.captions import split_tags


@dataclass(frozen=True)
class CaptionAugment:
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    prefix: str = ""  # data.caption_prefix: its tags stay first, in place
    seed: int = 0

    @classmethod
    def from_config(cls, data, seed: int) -> CaptionAugment | None:
        """The augmentation of a DataConfig, or None where every switch is off (captions as written)."""
        aug = cls(data.shuffle_caption, data.keep_tokens, data.caption_dropout_rate, data.caption_tag_dropout_rate,
                  data.caption_dropout_every_n_epochs, data.caption_prefix, seed)
        return aug if aug.active else None

    @property
    def active(self) -> bool:
        return bool(self.shuffle or self.dropout_rate or self.tag_dropout_rate or self.dropout_every_n_epochs)

    def describe(self) -> str:
        """``shuffled (first 1 tag kept), 10% of tags dropped, ...`` for the run log."""
        parts = []
        if self.shuffle:
            parts.append("tags shuffled" + (f" (the first {self.keep_tokens} kept in place)" if self.keep_tokens
                                            else ""))
        if self.tag_dropout_rate:
            parts.append(f"each tag left out with p={self.tag_dropout_rate:g}")
        if self.dropout_rate:
            parts.append(f"the whole caption left out with p={self.dropout_rate:g}")
        if self.dropout_every_n_epochs:
            parts.append(f"no caption in every {self.dropout_every_n_epochs}. epoch")
        return ", ".join(parts) + "; the prefix and the **core** tags always kept"

    def caption(self, text: str, core_tags, image: int, epoch: int, repeat: int = 0) -> str:
        """What the trainer encodes for image ``image`` (its index in the run's images) in ``epoch`` (0-based), the
        ``repeat``-th time (0-based) that epoch trains it: ``text`` as the dataset read it (prefix + caption without
        markdown), ``core_tags`` its bold spans."""
        if self.dropout_every_n_epochs and (epoch + 1) % self.dropout_every_n_epochs == 0:
            return ""  # (kohya counts epochs from 1)
        # (a str seed: the same in every process; an image's first time in an epoch draws as before repeats counted)
        rng = random.Random(f"caption|{self.seed}|{epoch}|{image}" + (f"|{repeat}" if repeat else ""))
        if self.dropout_rate and rng.random() < self.dropout_rate:
            return ""
        if not (self.shuffle or self.tag_dropout_rate):
            return text
        head, tags = self._split(text)
        core = [t for t in dict.fromkeys(core_tags) if t in tags]
        kept, rest = tags[: self.keep_tokens], [t for t in tags[self.keep_tokens :] if t not in core]
        kept += [t for t in core if t not in kept]
        if self.shuffle:
            rng.shuffle(rest)
        if self.tag_dropout_rate:
            rest = [t for t in rest if rng.random() >= self.tag_dropout_rate]
        return ", ".join(head + kept + rest)

    def _split(self, text: str) -> tuple[list[str], list[str]]:
        """(the prefix's tags, the caption's tags)."""
        if self.prefix and text.startswith(self.prefix):
            return split_tags(self.prefix), split_tags(text[len(self.prefix) :])
        return [], split_tags(text)
