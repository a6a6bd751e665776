"""A tiny random SDXL-shaped model, built in code: no download, ever.

SDXL's structure at a size that trains in seconds on a CPU: a UNet2DConditionModel with the
``text_time`` added embedding (pooled text + six size/crop ids), attention from the second level on with
two transformer layers per block there (so ``input_blocks.4.1.transformer_blocks.0`` exists, as in SDXL),
two CLIP text encoders (CLIPTextModel, CLIPTextModelWithProjection) whose penultimate hidden states
concatenate to the UNet's cross-attention width, the tiny SD VAE and both tokenizers (written locally,
byte-level, as for the tiny SD 1.x model; the second pads with ``!`` as SDXL's does). Saved as a normal
diffusers folder (``StableDiffusionXLPipeline.save_pretrained``) so it loads through the user's code path.
``tiny-sdxl`` is the epsilon model, ``tiny-sdxl-v`` the same weights with a v-prediction scheduler.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lora_trainer.models.tiny import (
    TINY_RESOLUTION,
    build_tiny_components,
    built_once,
    cache_root,
    write_tiny_tokenizer,
)

TINY_SDXL_NAME = "tiny-sdxl"
TINY_SDXL_V_NAME = "tiny-sdxl-v"
TINY_SDXL_NAMES = (TINY_SDXL_NAME, TINY_SDXL_V_NAME)
TINY_SDXL_VERSION = "1"  # bump when the folder written below changes; the cache folder is keyed by it
TIME_EMBED_DIM = 8  # per size/crop number; six of them plus the pooled text make the added embedding
TE_WIDTH = 32  # hidden size of each text encoder; the UNet attends to both (2 × 32)


def _text_config(projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=256 * 2 + 2,
        hidden_size=TE_WIDTH,
        intermediate_size=64,
        num_hidden_layers=3,  # the penultimate layer's output is used: keep one layer after it
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513 if not projection else 0,
        layer_norm_eps=1e-5,
        projection_dim=TE_WIDTH,
        hidden_act="gelu",
    )


def build_tiny_sdxl_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """The components of a tiny SDXL pipeline (no tokenizers), with deterministic random weights."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,  # as SDXL: input_blocks 1, 2 | 3 (downsample) | 4, 5
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,  # SDXL's proj_in/proj_out are Linear
        cross_attention_dim=2 * TE_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TE_WIDTH,
        norm_num_groups=32,
    )
    # the SD 1.x tiny model's VAE (seeded apart from its UNet): the same 1/4 latents
    vae = build_tiny_components(seed)["vae"]
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(projection=False))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection=True))
    # SDXL's scheduler: SD's betas, Euler for sampling; training reads its betas into a DDPMScheduler
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "scheduler": scheduler}


def save_tiny_sdxl_model(folder: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write the tiny SDXL model as a diffusers folder (``model_index.json``, components, both tokenizers)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    parts = build_tiny_sdxl_components(seed, prediction_type)
    tokenizers = {}
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        # vocabulary files kept beside what save_pretrained adds (transformers 5 writes only tokenizer.json,
        # which 4.x cannot read): one folder serves the WebUI's pins and the newest alike
        write_tiny_tokenizer(folder / name)
        tokenizers[name] = CLIPTokenizer(str(folder / name / "vocab.json"), str(folder / name / "merges.txt"),
                                         model_max_length=77, pad_token=pad)
    pipe = StableDiffusionXLPipeline(**parts, **tokenizers, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_sdxl_model_path(name: str = TINY_SDXL_NAME) -> Path:
    """The tiny SDXL model's folder (``tiny-sdxl`` or ``tiny-sdxl-v``) in the cache, built on first use
    (models.tiny.built_once)."""
    if name not in TINY_SDXL_NAMES:
        raise ValueError(f"not a tiny SDXL model: {name!r}; one of {TINY_SDXL_NAMES}")
    prediction = "v_prediction" if name == TINY_SDXL_V_NAME else "epsilon"
    return built_once(cache_root() / f"{name}-v{TINY_SDXL_VERSION}",
                      lambda folder: save_tiny_sdxl_model(folder, prediction_type=prediction),
                      f"from lora_trainer.models.tiny_sdxl import tiny_sdxl_model_path; tiny_sdxl_model_path({name!r})")
