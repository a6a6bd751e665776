"""SDXL base 1.0's real shapes, without its weights: the configs of stabilityai/stable-diffusion-xl-base-1.0
(``unet/config.json``, ``text_encoder/config.json``, ``text_encoder_2/config.json``, ``vae/config.json``,
``scheduler/scheduler_config.json``), written out so nothing is downloaded. Models built from them have the
published parameter counts: UNet 2,567,463,684; CLIP ViT-L text encoder 123,060,480; OpenCLIP ViT-bigG text
encoder with projection 694,659,840 (tests/test_sdxl_loader_keys.py checks them).

``build_sdxl_shape_pipeline`` makes a StableDiffusionXLPipeline of these shapes with random weights (the
tokenizers are SD 1.5's shipped CLIP tokenizer files; SDXL's second pads with ``!``).
"""

from __future__ import annotations

UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# CLIP ViT-L/14 (CLIPTextModel) and OpenCLIP ViT-bigG/14 (CLIPTextModelWithProjection)
TEXT_ENCODER = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                "projection_dim": 768, "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2,
                "pad_token_id": 1}
TEXT_ENCODER_2 = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                  "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
                  "projection_dim": 1280, "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2,
                  "pad_token_id": 1}
VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
       "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025}
SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "interpolation_type": "linear",
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
             "trained_betas": None, "use_karras_sigmas": False}


def build_sdxl_models(device=None, dtype=None) -> dict:
    """UNet and both text encoders of SDXL's shapes with random weights: on ``device`` (``"meta"`` allocates
    nothing), each cast to ``dtype`` as soon as it is built (the fp32 UNet alone is 10.3 GB)."""
    import contextlib

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    builders = {"unet": lambda: UNet2DConditionModel.from_config(UNET),
                "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)),
                "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))}
    models = {}
    with torch.device(device) if device else contextlib.nullcontext():
        for name, build in builders.items():
            models[name] = build() if dtype is None else build().to(dtype)
    return models


def build_sdxl_shape_pipeline(dtype=None, device=None):
    """A StableDiffusionXLPipeline of SDXL's shapes with random weights, on ``device`` (the CPU if None; a GPU draws
    the 3.5 B random weights in seconds where the CPU takes minutes), in ``dtype`` (fp32 if None)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from lora_trainer.models.single_file import SD15_CONFIG

    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer", pad_token="!")
    vae = AutoencoderKL.from_config(VAE).to(device)
    return StableDiffusionXLPipeline(vae=vae if dtype is None else vae.to(dtype), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
                                     **build_sdxl_models(device=device, dtype=dtype))
