"""What ``training.fp8_base`` saves (issue 16): the UNet's weight bytes, and the peak memory of LoRA training steps.

    python bench/fp8_memory.py [--device cpu|cuda] [--models tiny-sdxl sdxl-quarter] [--latent 32] [--steps 3]
                               [--rank 16] [--out fp8.json]

1. Weight bytes, exact from the parameters: the tiny SDXL model's UNet, and SDXL base's and SD 1.5's real UNet shapes
   built on the meta device (no memory, no weights), in bf16 (what a GPU run stores) and with fp8_base as models.fp8
   applies it (diffusers' layerwise casting: float8 Linear/Conv weights; norms and the rest stay bf16).
2. Peak memory of training steps, measured, each setting in its own process: the UNet with LoRA layers (rank --rank on
   to_q/to_k/to_v/to_out.0, set up as the trainer does: LoRA, then checkpointing, then models.fp8), AdamW on the LoRA,
   --steps steps of one image at --latent² latents (s/step: the median after the first). CPU: fp32 compute (as the
   trainer runs there), the RSS after set-up (weights at rest) and the peak during the steps (VmHWM, reset after
   set-up; blocks of 64 kB and more mapped and unmapped one by one, so the RSS follows the bytes alive). CUDA:
   bf16, the allocator's bytes. Models: ``tiny-sdxl``, and ``sdxl-quarter``: SDXL base's UNet at a
   quarter of its width (channels 80/160/320, 16 norm groups; its blocks, 10-layer transformers, cross-attention
   width 2048 and added embeddings kept), random weights.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "lora_trainer" / "models" / "configs"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet_config(name: str) -> dict:
    from diffusers import UNet2DConditionModel

    folder = {"sdxl": CONFIGS / "sdxl" / "unet", "sd15": CONFIGS / "sd15" / "unet"}[name.split("-")[0]]
    config = dict(UNet2DConditionModel.load_config(folder))
    if name == "sdxl-quarter":
        config.update(block_out_channels=[c // 4 for c in config["block_out_channels"]], norm_num_groups=16)
    return config


def build_unet(name: str, device: str = "cpu"):
    import torch
    from diffusers import UNet2DConditionModel

    if name == "tiny-sdxl":
        from lora_trainer.models.tiny_sdxl import tiny_sdxl_model_path

        return UNet2DConditionModel.from_pretrained(tiny_sdxl_model_path(), subfolder="unet").to(device)
    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DConditionModel.from_config(_unet_config(name))


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def weight_bytes(name: str) -> dict:
    """bf16 and fp8_base bytes of a UNet's parameters (real shapes on the meta device)."""
    import torch

    unet = build_unet(name, "cpu" if name == "tiny-sdxl" else "meta").to(torch.bfloat16)
    bf16 = _bytes(unet)
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    fp8_params = sum(p.numel() for p in unet.parameters() if p.dtype == torch.float8_e4m3fn)
    total = sum(p.numel() for p in unet.parameters())
    return {"model": name, "params": total, "params_in_fp8": fp8_params, "fp32_bytes": 4 * total, "bf16_bytes": bf16,
            "fp8_base_bytes": _bytes(unet)}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _inputs(unet, latent: int, device, dtype):
    import torch

    c = unet.config
    g = torch.Generator().manual_seed(0)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled, generator=g).to(device, dtype),
             "time_ids": torch.tensor([[8.0 * latent, 8 * latent, 0, 0, 8 * latent, 8 * latent]], device=device,
                                      dtype=dtype)}
    return (torch.randn(1, c.in_channels, latent, latent, generator=g).to(device, dtype),
            torch.randn(1, 77, c.cross_attention_dim, generator=g).to(device, dtype), added)


def child(args) -> dict:
    """One setting: set up as the trainer does, then --steps LoRA training steps; memory at rest and at the peak."""
    import torch
    from diffusers.training_utils import cast_training_params

    from lora_trainer.engine.lora import add_lora
    from lora_trainer.models.base import UNET
    from lora_trainer.models.fp8 import store_unet_in_fp8

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    unet = build_unet(args.model, args.device).to(dtype).requires_grad_(False)
    params = add_lora(unet, rank=args.rank, alpha=args.rank, dropout=0.0, target_modules=TARGETS)
    cast_training_params(unet, dtype=torch.float32)
    unet.train()
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    if args.fp8:
        store_unet_in_fp8(SimpleNamespace(components=lambda: {UNET: unet}, weight_dtype=dtype, can_fp8_base=True),
                          checkpointing=args.checkpointing)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x, ctx, added = _inputs(unet, args.latent, args.device, dtype)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        rest = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed set-up memory back to the system before "at rest"
        rest = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from here
    times = []
    for step in range(args.steps):
        started = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=cuda):
            out = unet(x, torch.tensor([100 + 300 * step], device=args.device), ctx, added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(out.float(), x.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times[1:] or times)  # (the first step warms up)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return {"model": args.model, "fp8_base": args.fp8, "gradient_checkpointing": args.checkpointing,
            "unet_weight_bytes": _bytes(unet), "rest_bytes": rest, "peak_bytes": peak, "s_per_step": seconds,
            "loss_finite": bool(torch.isfinite(loss).item())}


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", default=["tiny-sdxl", "sdxl-quarter"])
    parser.add_argument("--latent", type=int, default=32, help="latent size (pixels / 8)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "FP8", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, fp8, ckpt = args.child
        print(json.dumps(child(argparse.Namespace(**vars(args), model=model, fp8=fp8 == "1",
                                                  checkpointing=ckpt == "1"))))
        return
    weights = [weight_bytes(name) for name in ("tiny-sdxl", "sdxl-quarter", "sdxl", "sd15")]
    print("UNet weights (exact, from the parameters; real shapes on the meta device)")
    print(f"{'model':<14}{'params':>15}{'in fp8':>15}{'fp32 MB':>12}{'bf16 MB':>12}{'fp8_base MB':>13}{'saved':>8}")
    for w in weights:
        saved = 1 - w["fp8_base_bytes"] / w["bf16_bytes"]
        print(f"{w['model']:<14}{w['params']:>15,}{w['params_in_fp8']:>15,}{_mb(w['fp32_bytes']):>12}"
              f"{_mb(w['bf16_bytes']):>12}{_mb(w['fp8_base_bytes']):>13}{saved:>8.1%}")
    runs = []
    for model in args.models:
        for ckpt in ("0", "1"):
            for fp8 in ("0", "1"):
                cmd = [sys.executable, __file__, "--device", args.device, "--latent", str(args.latent), "--steps",
                       str(args.steps), "--rank", str(args.rank), "--child", model, fp8, ckpt]
                # large blocks straight from and back to the system (glibc's default keeps freed ones for reuse):
                # the RSS then follows the bytes alive, not what the allocator kept from earlier steps
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                if done.returncode:
                    sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    where = "RSS" if args.device == "cpu" else "allocated"
    print(f"\nTraining steps ({args.device}, latent {args.latent}², batch 1, LoRA rank {args.rank}, {args.steps} "
          f"steps; MB of {where})")
    print(f"{'model':<14}{'checkpointing':>14}{'fp8_base':>9}{'UNet weights':>14}{'at rest':>10}{'peak':>10}"
          f"{'peak - rest':>13}{'s/step':>8}")
    for r in runs:
        print(f"{r['model']:<14}{str(r['gradient_checkpointing']):>14}{str(r['fp8_base']):>9}"
              f"{_mb(r['unet_weight_bytes']):>14}{_mb(r['rest_bytes']):>10}{_mb(r['peak_bytes']):>10}"
              f"{_mb(r['peak_bytes'] - r['rest_bytes']):>13}{r['s_per_step']:>8.2f}")
    if args.out:
        args.out.write_text(json.dumps({"weights": weights, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
