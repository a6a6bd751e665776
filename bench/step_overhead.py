"""How much of our training step is not the UNet's own work: ours against a bare UNet + LoRA + AdamW loop.

    python bench/step_overhead.py [--resolution 64] [--batch 4] [--block 10] [--rounds 6]

The bare loop is the least any trainer can do per step with latents and text embeddings cached: the tiny
UNet with peft LoRA on the attention projections, MSE loss, backward, gradient clipping, AdamW. It takes
turns with our train() in one process (bench/turns.py), so machine drift slows both alike. A ratio of 1
means our step has no overhead left beyond the UNet's forward and backward. CPU only (the tiny model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_loop import TARGETS  # after the path is set
from turns import TakeTurns


def bare_steps(batch: int, latent: int):
    import torch
    from peft import LoraConfig

    from lora_trainer.models.tiny import build_tiny_components

    unet = build_tiny_components()["unet"]
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    latents, cond = torch.randn(batch, 4, latent, latent), torch.randn(batch, 77, 32)
    unet.train()
    while True:
        t = torch.randint(0, 1000, (batch,))
        loss = torch.nn.functional.mse_loss(unet(latents, t, cond).sample, torch.randn_like(latents))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        yield


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=10, help="steps per turn")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()

    from lora_trainer.config import config_from_dict
    from lora_trainer.data.demo_set import make_demo_dataset
    from lora_trainer.engine.trainer import train

    work = Path(tempfile.mkdtemp(prefix="lora-overhead-"))
    data = make_demo_dataset(work / "data", n=16, resolution=args.resolution)
    turns = TakeTurns(bare_steps(args.batch, args.resolution // 4), args.warmup, args.block, args.rounds)
    train(config_from_dict({
        "train_data_dir": str(data), "base_model": "tiny-demo", "resolution": args.resolution,
        "batch_size": args.batch, "gradient_accumulation_steps": 1, "lora_rank": 8, "lora_alpha": 8,
        "lora_dropout": 0.0, "target_modules": TARGETS, "learning_rate": 1e-4, "save_steps": 0,
        "max_train_steps": args.warmup + args.block * args.rounds, "log_with": "none", "mixed_precision": "no",
        "output_dir": str(work / "run"), "save_diffusers_format": False}), callbacks=turns, progress=False)
    ours, bare = turns.times["ours"], turns.times["reference"]
    ratios = [b / o for o, b in zip(ours, bare)]
    print(f"ours {statistics.median(ours) / args.block * 1000:.1f} ms/step, bare UNet loop "
          f"{statistics.median(bare) / args.block * 1000:.1f} ms/step (medians of {args.rounds} turns)")
    print(f"bare/ours: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f} over the rounds)")


if __name__ == "__main__":
    main()
