"""training.attention: the LDM UNet trains with a memory-efficient kernel, computes the same, and gets its own back."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lora_trainer.config import config_from_dict
from lora_trainer.engine.lora import add_lora
from lora_trainer.errors import ConfigError
from lora_trainer.models.attention import (
    resolve_attention,
    restore_ldm_attention,
    use_diffusers_attention,
    use_ldm_attention,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def ldm_unet():
    from ldm_model import TinyLatentDiffusion  # skips without the LDM code

    unet = TinyLatentDiffusion().model.diffusion_model
    torch.manual_seed(1)
    add_lora(unet, rank=4, alpha=4, dropout=0.0, target_modules=TARGETS, key="training.target_modules")
    with torch.no_grad():  # LoRA B starts at zero: give it weights, so its gradients flow everywhere
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return unet


def step(unet, size: int = 16, batch: int = 2):
    """Outputs and LoRA gradients of one forward + backward on fixed inputs."""
    torch.manual_seed(3)
    x, t, cond = torch.randn(batch, 4, size, size), torch.tensor([20, 600][:batch]), torch.randn(batch, 77, 32)
    unet.zero_grad(set_to_none=True)
    out = unet(x, t, context=cond)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return out.detach(), grads


def saved_bytes(unet, size: int) -> int:
    """What autograd keeps for the backward pass of one forward."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from ldm_attention import SavedForBackward
    finally:
        sys.path.pop(0)
    x, t, cond = torch.randn(1, 4, size, size), torch.tensor([500]), torch.randn(1, 77, 32)
    with SavedForBackward() as saved:
        unet(x, t, context=cond)
    return saved.bytes


def test_sdpa_computes_what_the_ldm_attention_does_and_is_taken_out_again(ldm_unet):
    own_out, own_grads = step(ldm_unet)
    layers = sum(type(m).__name__ == "CrossAttention" for m in ldm_unet.modules())
    assert layers == 14  # 7 transformer blocks x (self, cross) in the tiny UNet
    assert use_ldm_attention(ldm_unet, "auto") == layers
    out, grads = step(ldm_unet)
    assert torch.allclose(out, own_out, atol=1e-5)
    assert own_grads.keys() == grads.keys() and len(grads) > 0
    for n, g in grads.items():
        assert torch.allclose(g, own_grads[n], rtol=1e-3, atol=1e-6), n
    assert restore_ldm_attention(ldm_unet) == layers
    assert not any("forward" in m.__dict__ for m in ldm_unet.modules())
    back, _ = step(ldm_unet)
    assert torch.equal(back, own_out)


def test_sdpa_keeps_no_attention_matrix_for_the_backward_pass(ldm_unet):
    # 32x32 latents (a 256 px image): 1024 tokens, so each self-attention matrix is 2 heads x 1024 x 1024
    own = saved_bytes(ldm_unet, 32)
    use_ldm_attention(ldm_unet, "sdpa")
    ours = saved_bytes(ldm_unet, 32)
    matrix = 2 * 1024 * 1024 * 4  # one self-attention's softmax in fp32
    assert own - ours >= 3 * matrix, (own, ours)  # the three self-attentions at full size keep none
    assert ours < own / 2


def test_mask_and_upcast(ldm_unet, monkeypatch):
    attn = next(m for m in ldm_unet.modules() if type(m).__name__ == "CrossAttention")
    torch.manual_seed(4)
    x, context = torch.randn(2, 10, attn.to_q.in_features), torch.randn(2, 7, attn.to_k.in_features)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3:] = False
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: seen.append(q.dtype) or sdpa(q, *a, **kw))
    with torch.no_grad():
        own = attn(x, context, mask=mask)
        use_ldm_attention(ldm_unet, "sdpa")
        ours = attn(x, context, mask=mask)
        assert torch.allclose(ours, own, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn(x, context, mask=mask)
        use_ldm_attention(ldm_unet, "sdpa", upcast=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            upcast = attn(x, context, mask=mask)
    assert seen == [torch.float32, torch.bfloat16, torch.float32]  # upcast: the kernel runs in fp32
    assert low.dtype == upcast.dtype == torch.bfloat16  # and gives back what the layer computes in
    assert torch.allclose(upcast.float(), own, atol=0.05)


def test_another_instance_forward_is_kept_and_put_back(ldm_unet):
    attns = [m for m in ldm_unet.modules() if type(m).__name__ == "CrossAttention"]
    theirs = attns[0].forward  # another extension's hook on one instance (bound to it, as theirs would be)
    attns[0].forward = theirs
    use_ldm_attention(ldm_unet, "sdpa")
    use_ldm_attention(ldm_unet, "sdpa")  # twice: still theirs underneath
    assert all(m.forward.__func__.__name__ == "_ldm_forward" for m in attns)
    replaced_later = attns[1].forward = lambda *a, **kw: None  # someone replaced ours during training
    restore_ldm_attention(ldm_unet)
    assert attns[0].__dict__["forward"] is theirs
    assert attns[1].__dict__["forward"] is replaced_later
    assert not any("forward" in m.__dict__ for m in attns[2:])
    assert not any(k.startswith("_lora_trainer") for m in attns for k in m.__dict__)


def test_diffusers_unet_gets_sdpa_processors():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from lora_trainer.models.tiny import build_tiny_components

    unet = build_tiny_components()["unet"]
    unet.set_attn_processor(AttnProcessor())
    use_diffusers_attention(unet, "auto")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_without_xformers_is_a_clear_error_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.attention: 'xformers' needs the xformers package"):
        resolve_attention("xformers")
    from lora_trainer.engine.trainer import train

    cfg = config_from_dict({"train_data_dir": str(tmp_path), "base_model": "tiny-demo", "attention": "xformers",
                            "output_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="xformers"):
        train(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_attention_key_is_checked():
    with pytest.raises(ConfigError, match=r"attention.*auto.*sdpa.*xformers"):
        config_from_dict({"attention": "flash"})


def test_a_scale_other_than_the_default_is_kept(ldm_unet):
    attn = next(m for m in ldm_unet.modules() if type(m).__name__ == "CrossAttention")
    attn.scale = 0.5  # LDM's own is dim_head ** -0.5, SDPA's default (then no scale is passed: torch 2.0 has none)
    x = torch.randn(1, 12, attn.to_q.in_features)
    with torch.no_grad():
        own = attn(x)
        use_ldm_attention(ldm_unet, "sdpa")
        assert torch.allclose(attn(x), own, atol=1e-5)
