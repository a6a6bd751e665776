"""Test helper: a tiny CompVis LatentDiffusion stand-in around a REAL LDM UNet (stable-diffusion-sdkit).

It has the attributes the WebUI's ``shared.sd_model`` has for SD 1.x and A1111's module names:
``model.diffusion_model`` (ldm's UNetModel: ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``) and
``cond_stage_model.wrapped.transformer`` (an HF CLIPTextModel).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel",
                                  reason="the LDM code: pip install --no-deps stable-diffusion-sdkit==2.1.5")


class Wrapped(nn.Module):
    def __init__(self, transformer, tokenizer):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer


class CondStage(nn.Module):
    def __init__(self, transformer, tokenizer):
        super().__init__()
        self.wrapped = Wrapped(transformer, tokenizer)


def webui_encode(tokenizer, encode, prompts, emphasis: str):
    """As A1111 v1.10's hijacked CLIP encodes a batch of prompts (sd_hijack_clip + sd_emphasis), first chunk
    only: the emphasis syntax is parsed unless the mode is "None"; in "Original" and "No norm" each token's
    row is multiplied by its weight, and "Original" then rescales the whole batch, every prompt at once, to
    the mean it had before (so one prompt's rows depend on the others in its batch, and a mean of exactly
    0 gives 0/0 = NaN, as in the WebUI). The parsing is ours (lora_trainer.data.emphasis), a stand-in.
    ``encode``: token ids → hidden states."""
    from lora_trainer.models.prompts import WINDOW, weighted_tokens

    if emphasis == "None":
        ids = tokenizer(prompts, padding="max_length", max_length=WINDOW, truncation=True,
                        return_tensors="pt").input_ids
        return encode(ids)
    tokens, weights = zip(*(weighted_tokens(tokenizer, p) for p in prompts))
    z = encode(torch.tensor(tokens))
    if emphasis in ("Original", "No norm"):
        mean = z.mean()
        z = z * torch.tensor(weights, dtype=z.dtype)[..., None]
        if emphasis == "Original":
            z = z * (mean / z.mean())
    return z


class TinyLatentDiffusion(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        from diffusers import DDPMScheduler

        from lora_trainer.models.diffusers_backend import load_pipeline

        torch.manual_seed(seed)
        self.model = nn.Module()
        self.model.diffusion_model = openaimodel.UNetModel(
            image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1,
            context_dim=32, legacy=False)
        with torch.no_grad():  # LDM zero-initialises out and each proj_out (zero_module): a trained model has not
            for p in self.model.diffusion_model.parameters():
                if not p.any():
                    p.normal_(0, 0.05)
        pipe, _ = load_pipeline("tiny-demo")
        torch.manual_seed(seed + 1)  # the first load builds the tiny model and draws from the generator, later ones not
        with torch.no_grad():  # a trained text encoder's final LayerNorm is not at weight 1, bias 0: at those, every
            # output row has mean 0, and the WebUI's emphasis "Original" divides by the mean (0/0 = NaN)
            norm = next(m for n, m in pipe.text_encoder.named_modules() if n.endswith("final_layer_norm"))
            norm.weight.normal_(1.0, 0.1)
            norm.bias.normal_(0.1, 0.1)
        self.first_stage_model = pipe.vae
        self.cond_stage_model = CondStage(pipe.text_encoder, pipe.tokenizer)
        self.scale_factor = pipe.vae.config.scaling_factor
        self.register_buffer("betas", torch.tensor(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                 beta_end=0.012).betas))
        self.parameterization = "eps"
        self.is_sd2 = self.is_sdxl = False
        self.eval()

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).latent_dist

    def get_first_stage_encoding(self, posterior):
        return posterior.sample() * self.scale_factor

    emphasis = "Original"  # A1111's Settings → Emphasis mode (opts.emphasis): None, Ignore, Original, No norm

    def get_learned_conditioning(self, prompts):
        w = self.cond_stage_model.wrapped
        return webui_encode(w.tokenizer, lambda ids: w.transformer(ids)[0], prompts, self.emphasis)

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond)
