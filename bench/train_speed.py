"""Training speed and memory: our trainer against the plain diffusers + peft recipe, same data and weights.

    python bench/train_speed.py [--device cpu|cuda] [--model tiny|sd15-shape] [--resolution 64] [--batch 4]

Each loop runs in its own child process (so each peak memory is its own): "reference" is the LoRA
training loop as the diffusers documentation describes it (VAE and text encoder every step, no caching,
default attention); "ours" is ``lora_trainer.engine.trainer.train`` with its defaults. Reported after
warm-up: steps/s, images/s, peak memory (CUDA: max_memory_allocated; CPU: peak RSS), time to first step.
Prints one table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def base_model(kind: str, folder: Path) -> str:
    if kind == "tiny":
        return "tiny-demo"
    # SD 1.5's real shapes with random weights (no download): built from the shipped configs
    target = folder / "sd15-shape"
    if not (target / "model_index.json").exists():
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from lora_trainer.models.single_file import SD15_CONFIG

        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer"),
            scheduler=DDPMScheduler.from_pretrained(SD15_CONFIG / "scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(target)
    return str(target)


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_ours(args, data: Path, model: str) -> dict:
    from lora_trainer.config import config_from_dict
    from lora_trainer.engine.events import Callbacks
    from lora_trainer.engine.trainer import train

    times: list[float] = []

    class Clock(Callbacks):
        def on_step(self, info):
            times.append(time.perf_counter())

    cfg = config_from_dict({
        "train_data_dir": str(data), "base_model": model, "resolution": args.resolution, "batch_size": args.batch,
        "gradient_accumulation_steps": 1, "max_train_steps": args.warmup + args.steps, "save_steps": 0,
        "lora_rank": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS, "learning_rate": 1e-4,
        "log_with": "none",
        "output_dir": str(Path(tempfile.mkdtemp()) / "run"), "save_diffusers_format": False,
        "mixed_precision": "auto" if args.device == "cuda" else "no", "compile_unet": args.compile})
    start = time.perf_counter()
    train(cfg, callbacks=Clock(), progress=False)
    return {"first_step_s": times[0] - start, "timed": times[-1] - times[args.warmup - 1]}


def run_reference(args, data: Path, model: str) -> dict:
    """The LoRA recipe of the diffusers docs (train_text_to_image_lora.py), reduced to its loop."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict  # noqa: F401

    from lora_trainer.data.dataset import ImageDataset, collate, scan_dataset
    from lora_trainer.models.diffusers_backend import resolve_base_model

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model(model), local_files_only=True,
                                                   safety_checker=None)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.to(device, dtype=dtype)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    samples = scan_dataset(data).samples
    loader = torch.utils.data.DataLoader(ImageDataset(samples, args.resolution), batch_size=args.batch,
                                         shuffle=True, collate_fn=collate)
    times: list[float] = []
    autocast = torch.autocast("cuda", dtype=dtype) if args.device == "cuda" else torch.autocast("cpu", enabled=False)
    while len(times) < args.warmup + args.steps:
        for batch in loader:
            pixels = batch["pixel_values"].to(device, dtype=dtype)
            with autocast:
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                ids = tokenizer(batch["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(device)
                encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
                pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            if len(times) >= args.warmup + args.steps:
                break
    return {"first_step_s": times[0] - start, "timed": times[-1] - times[args.warmup - 1]}


def child(args) -> None:
    data = Path(args.data)
    model = base_model(args.model, Path(args.work))
    result = (run_ours if args.mode == "ours" else run_reference)(args, data, model)
    steps_per_s = args.steps / result["timed"]
    print(json.dumps({"mode": args.mode, "steps_per_s": steps_per_s, "images_per_s": steps_per_s * args.batch,
                      "peak_memory_mb": peak_memory_mb(args.device), "first_step_s": result["first_step_s"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["tiny", "sd15-shape"], default="tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="timed steps, after --warmup")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="ours with compile_unet (compile time shows in first step)")
    p.add_argument("--out", default="bench/train_speed.json")
    p.add_argument("--mode", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return child(args)

    from lora_trainer.data.demo_set import make_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    data = make_demo_dataset(work / "data", n=args.images, resolution=max(args.resolution, 64))
    base_model(args.model, work)  # build once, outside the timed children
    rows = []
    for mode in ("reference", "ours"):
        cmd = [sys.executable, __file__, "--mode", mode, "--data", str(data), "--work", str(work)] + [
            f"--{k}={v}" for k, v in vars(args).items() if k in ("device", "model", "resolution", "batch", "steps",
                                                                  "warmup")] + (["--compile"] if args.compile else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref, ours = rows
    summary = {"config": {k: v for k, v in vars(args).items() if k not in ("mode", "data", "work")},
               "reference": ref, "ours": ours,
               "speedup": ours["steps_per_s"] / ref["steps_per_s"],
               "memory_ratio": ours["peak_memory_mb"] / ref["peak_memory_mb"]}
    print(f"{'loop':<10}{'steps/s':>10}{'images/s':>10}{'peak MB':>10}{'first step s':>14}")
    for r in rows:
        print(f"{r['mode']:<10}{r['steps_per_s']:>10.2f}{r['images_per_s']:>10.2f}{r['peak_memory_mb']:>10.0f}"
              f"{r['first_step_s']:>14.2f}")
    print(f"ours/reference: {summary['speedup']:.2f}x steps/s, {summary['memory_ratio']:.2f}x peak memory")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
