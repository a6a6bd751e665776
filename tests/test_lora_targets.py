"""training.target_modules: every name must name a layer (peft drops one that matches nothing when another does, and
fails on a block of layers only once the model is in)."""

from __future__ import annotations

import pytest
from torch import nn

from lora_trainer.engine.lora import add_lora
from lora_trainer.errors import ConfigError


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.to_out = nn.ModuleList([nn.Linear(8, 8), nn.Dropout(0.0)])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3)
        self.attn1 = Attention()


def lora(targets):
    return add_lora(Block(), rank=2, alpha=2, dropout=0.0, target_modules=targets)


def test_each_name_must_name_a_layer():
    assert len(lora(["to_q", "to_out.0", "conv1"])) == 6
    with pytest.raises(ConfigError, match=r"training.target_modules: 'to_v' names no layer of this model; its layer "
                                          r"names: to_k, to_out.0, to_q, conv1"):
        lora(["to_q", "to_v"])
    with pytest.raises(ConfigError, match=r"none of \['to_v', 'k'\] match a layer of this model"):
        lora(["to_v", "k"])
    with pytest.raises(ConfigError, match=r"'to_out' is a block of layers \(to_out.0, to_out.1\)"):
        lora(["to_q", "to_out"])
