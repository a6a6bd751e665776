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

    def get_learned_conditioning(self, prompts):
        w = self.cond_stage_model.wrapped
        ids = w.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return w.transformer(ids)[0]

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond)
