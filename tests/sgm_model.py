"""Test helper: a tiny stand-in for the SDXL model A1111 v1.10 loads (an sgm DiffusionEngine after its hijack).

``sgm`` is not on the package index; the stand-in keeps what the trainer relies on, from the sources
(Stability-AI/generative-models 45c443b3, A1111 v1.10.1 modules/sd_models_xl.py, sd_hijack.py, sd_hijack_clip.py):
- ``model.diffusion_model``: a REAL LDM UNetModel (stable-diffusion-sdkit: the module names sgm's shares,
  ``input_blocks.N.1.transformer_blocks.0.attn1.to_q``, linear proj_in/out) with sgm's ``label_emb.0.0/.0.2`` over
  the vector, and ``apply_model(x, t, {"crossattn", "vector"})`` → ``diffusion_model(x, t, context=, y=)``;
- ``conditioner`` (also ``cond_stage_model``, as the hijack sets for two text encoders) = GeneralConditioner:
  embedders in order CLIP-L wrapper (``.wrapped.transformer``, hidden states[-2]), bigG wrapper (``.wrapped.model``,
  penultimate hidden states + pooled), then three ConcatTimestepEmbedderND(outdim) over original size, crop and
  target size; each run under no_grad unless ``is_trainable``; outputs joined by rank (3: crossattn on dim 2,
  2: vector on dim 1);
- ``get_learned_conditioning(batch)`` as A1111's: sizes from the batch's width/height (default 1024), crop from
  the settings (0, 0);
- ``encode_first_stage`` returns the scaled sample (no_grad), ``get_first_stage_encoding`` is the identity;
  ``alphas_cumprod`` (and ``alphas_cumprod_original``), no ``betas``; ``parameterization``; ``is_sdxl``.
The text encoders, tokenizers and VAE are the tiny SDXL model's (lora_trainer.models.tiny_sdxl).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from ldm_model import webui_encode
from torch import nn

openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel",
                                  reason="the LDM code: pip install --no-deps stable-diffusion-sdkit==2.1.5")

OUTDIM = 8  # tiny_sdxl.TIME_EMBED_DIM: each size number's embedding width


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """sgm.modules.diffusionmodules.util.timestep_embedding (repeat_only False)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConcatTimestepEmbedderND(nn.Module):
    """sgm.modules.encoders.modules.ConcatTimestepEmbedderND: each number embedded, the embeddings side by side."""

    def __init__(self, outdim: int, input_key: str):
        super().__init__()
        self.outdim, self.input_key, self.is_trainable = outdim, input_key, False

    def forward(self, x):
        b, dims = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, dims * self.outdim)


class _Frozen(nn.Module):
    """sgm's FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder2 as far as the hijack's wrappers use them."""

    def __init__(self, encoder, tokenizer, attr: str):
        super().__init__()
        setattr(self, attr, encoder)
        self.tokenizer = tokenizer


class TextEmbedder(nn.Module):
    """A1111's FrozenCLIPEmbedderForSDXLWithCustomWords (``pooled`` False) / FrozenOpenCLIPEmbedder2WithCustomWords
    (``pooled`` True: returns (hidden states, pooled))."""

    def __init__(self, wrapped: _Frozen, encoder: nn.Module, pooled: bool, owner):
        super().__init__()
        self.wrapped, self.return_pooled, self._owner = wrapped, pooled, [owner]
        self.input_key, self.is_trainable = "txt", False
        self._encoder = [encoder]

    def forward(self, texts):
        encoder, pooled = self._encoder[0], []

        def encode(ids):
            out = encoder(ids, output_hidden_states=True)
            if self.return_pooled:
                pooled.append(out.text_embeds)
            return out.hidden_states[-2]

        z = webui_encode(self.wrapped.tokenizer, encode, list(texts), self._owner[0].emphasis)
        return (z, pooled[0]) if self.return_pooled else z


class GeneralConditioner(nn.Module):
    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2}

    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)
        self.wrapped = nn.Module()  # sd_models_xl.extend_sdxl sets it

    def forward(self, batch):
        output = {}
        for embedder in self.embedders:
            with nullcontext() if embedder.is_trainable else torch.no_grad():
                out = embedder(batch[embedder.input_key])
            for emb in out if isinstance(out, (list, tuple)) else [out]:
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                output[key] = emb if key not in output else torch.cat((output[key], emb), self.KEY2CATDIM[key])
        return output


class TinySgmDiffusion(nn.Module):
    emphasis = "Original"  # Settings → Emphasis mode
    sdxl_crop = (0, 0)  # Settings → opts.sdxl_crop_top, sdxl_crop_left

    def __init__(self, seed: int = 0, parameterization: str = "eps"):
        super().__init__()
        from diffusers import DDPMScheduler

        from lora_trainer.models.sdxl_backend import load_sdxl_pipeline
        from lora_trainer.models.tiny_sdxl import TE_WIDTH

        pipe, _ = load_sdxl_pipeline("tiny-sdxl")
        parts = pipe.components
        torch.manual_seed(seed)
        self.model = nn.Module()
        unet = openaimodel.UNetModel(
            image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
            num_res_blocks=2, channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
            transformer_depth=1, context_dim=2 * TE_WIDTH, legacy=False, use_linear_in_transformer=True,
            num_classes=1)  # sgm's "sequential": label_emb over the vector, replaced below
        adm = TE_WIDTH + 3 * 2 * OUTDIM
        ted = unet.time_embed[0].out_features
        unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm, ted), nn.SiLU(), nn.Linear(ted, ted)))
        with torch.no_grad():  # LDM zero-initialises out and each proj_out (a trained model has not)
            for p in unet.parameters():
                if not p.any():
                    p.normal_(0, 0.05)
        self.model.diffusion_model = unet
        te1 = TextEmbedder(_Frozen(parts["text_encoder"], parts["tokenizer"], "transformer"), parts["text_encoder"],
                           pooled=False, owner=self)
        te2 = TextEmbedder(_Frozen(parts["text_encoder_2"], parts["tokenizer_2"], "model"), parts["text_encoder_2"],
                           pooled=True, owner=self)
        sizes = [ConcatTimestepEmbedderND(OUTDIM, k) for k in
                 ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
        self.conditioner = GeneralConditioner([te1, te2, *sizes])
        for p in self.conditioner.parameters():  # sgm's GeneralConditioner freezes every non-trainable embedder
            p.requires_grad_(False)
        self.cond_stage_model = self.conditioner
        self.first_stage_model = parts["vae"]
        self.scale_factor = parts["vae"].config.scaling_factor
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        self.alphas_cumprod = self.alphas_cumprod_original = sched.alphas_cumprod.float()
        self.parameterization = parameterization
        self.is_sdxl, self.is_sd2 = True, False
        self.eval()

    def get_learned_conditioning(self, batch):
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        n = len(batch)
        return self.conditioner({
            "txt": batch,
            "original_size_as_tuple": torch.tensor([height, width]).repeat(n, 1),
            "crop_coords_top_left": torch.tensor(list(self.sdxl_crop)).repeat(n, 1),
            "target_size_as_tuple": torch.tensor([height, width]).repeat(n, 1),
        })

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"])

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).latent_dist.sample() * self.scale_factor

    def get_first_stage_encoding(self, x):
        return x
