"""utils/checkpointing.py: a checkpointed text encoder's LoRA layers get their gradient in every transformers release
the hosts pin (A1111's 4.30.2 only has the reentrant checkpoint, which gives a frozen embedding's layers none), and
turning it off leaves no hook behind."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from lora_trainer.engine.lora import add_lora
from lora_trainer.utils.checkpointing import disable_lora_checkpointing, enable_lora_checkpointing


def test_every_checkpointed_layer_s_lora_gets_its_gradient_and_nothing_is_left_after():
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                            vocab_size=99, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    encoder = CLIPTextModel(config).requires_grad_(False)
    params = add_lora(encoder, rank=4, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj", "fc1"])
    for name, p in encoder.named_parameters():
        if "lora_B" in name:  # (B starts at zero: A's gradient would be zero; any value makes both flow)
            torch.nn.init.normal_(p, std=0.1)
    encoder.train()
    enable_lora_checkpointing(encoder)
    assert encoder.is_gradient_checkpointing
    ids = torch.randint(3, 99, (2, 8))
    encoder(ids).last_hidden_state.square().mean().backward()
    assert len(params) == 3 * 3 * 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    disable_lora_checkpointing(encoder)
    assert not encoder.is_gradient_checkpointing
    assert not any(m._forward_hooks for m in encoder.modules())  # (4.30.2's input hook is out again)
    disable_lora_checkpointing(encoder)  # (off already: nothing to do)
