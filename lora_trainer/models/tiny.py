"""A tiny random Stable-Diffusion-shaped model, built in code: no download, ever.

It has the SD 1.x structure (UNet2DConditionModel with cross-attention blocks, AutoencoderKL,
CLIPTextModel, a CLIP byte-level BPE tokenizer) at a size that trains in seconds on a CPU. The demo
and the tests use it; it is written as a normal diffusers folder so it loads through the same code
path as a user's model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_NAME = "tiny-demo"
TINY_VERSION = "3"  # bump when the folder written below changes; the cache folder is keyed by it
TINY_RESOLUTION = 64


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table (as in CLIP's tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(folder: Path, merges: list[tuple[str, str]] = ()) -> None:
    """Write CLIP tokenizer files (vocab.json, merges.txt) with a byte-level vocabulary.

    CLIP's vocabulary is: the 256 byte symbols, the same with ``</w>``, one entry per merge, then the
    start/end tokens. With no merges every character is one token, which is all a tiny model needs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tiny_components(seed: int = 0) -> dict:
    """The five components of a tiny SD 1.x pipeline, with deterministic random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64),  # three blocks: latents are 1/4 of the image size
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=256 * 2 + 2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        layer_norm_eps=1e-5,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def save_tiny_model(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers folder (``model_index.json``, components, tokenizer)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    parts = build_tiny_components(seed)
    # the vocabulary files stay beside what save_pretrained adds: transformers 5 writes only tokenizer.json,
    # which 4.x's CLIPTokenizer cannot read, so one cached folder serves the WebUI's pins and the newest alike
    tok_dir = folder / "tokenizer"
    write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    pipe = StableDiffusionPipeline(
        **parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def cache_root() -> Path:
    return Path(os.environ.get("LORA_TRAINER_CACHE", Path.home() / ".cache" / "lora_trainer"))


def built_once(target: Path, save, call: str) -> Path:
    """``target``, written by ``save(folder)`` on first use, atomically: a crash leaves none, and of processes building
    it at once the first to finish wins (the others use its folder). ``call``: the same, as Python code for a fresh
    process: a process of a multi-process run (torch.distributed up) builds there, because transformers 5 writes
    nothing from a rank other than 0 (its save_pretrained checks), which would leave an empty text encoder folder."""
    import subprocess
    import sys

    from lora_trainer.utils.fsio import atomic_dir

    if (target / "model_index.json").exists():
        return target
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        subprocess.run([sys.executable, "-c", call], check=True)
        return target
    try:
        with atomic_dir(target) as tmp:
            save(tmp)
    except OSError:  # (FileExistsError, or the rename's "not empty"): another process built it meanwhile
        if not (target / "model_index.json").exists():
            raise
    return target


def tiny_model_path() -> Path:
    """The tiny model's folder in the cache, built on first use (``built_once``)."""
    return built_once(cache_root() / f"{TINY_NAME}-v{TINY_VERSION}", save_tiny_model,
                      "from lora_trainer.models.tiny import tiny_model_path; tiny_model_path()")
