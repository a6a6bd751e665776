"""Training speed and memory: our trainer against the plain diffusers + peft recipe, same data and weights.

    python bench/train_speed.py [--device cpu|cuda] [--model tiny|sd15-shape] [--resolution 64] [--batch 4]
                                [--gradient-checkpointing] [--variant NAME:key=value,key=value ...] [--repeat N]

Each loop runs in its own child process (so each peak memory is its own): "reference" is the LoRA
training loop as the diffusers documentation describes it (VAE and text encoder every step, no caching,
default attention); "ours" is ``lora_trainer.engine.trainer.train`` with its defaults, and each
``--variant`` is ours with some training keys changed (``compile:compile_unet=true``). Reported after
warm-up: steps/s, images/s, peak memory (CUDA: max_memory_allocated, and the whole device's use, CUDA
context and allocator cache included, polled every 20 ms; CPU: peak RSS), time to first step. On CUDA
one more child counts the FLOPs of one step with torch.utils.flop_counter (VAE encode, text encoder,
UNet forward + backward with LoRA) for the model FLOPs utilisation (MFU) against --peak-tflops.
Prints one table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
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
        import torch
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
        pipe.to(dtype=torch.float16).save_pretrained(target)  # half the disk; loaded in the run dtype
    return str(target)


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class DeviceMemoryPoller:
    """The peak of the whole GPU's used memory (this process's CUDA context and cached blocks included)."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.peak, self._interval, self._stop = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_ours(args, data: Path, model: str, overrides: dict) -> dict:
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
        "mixed_precision": "auto" if args.device == "cuda" else "no",
        "gradient_checkpointing": args.gradient_checkpointing, **overrides})
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
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
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


def count_flops(args, model: str) -> dict:
    """FLOPs of one training step per image, by part (torch.utils.flop_counter), without checkpointing."""
    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from lora_trainer.models.diffusers_backend import resolve_base_model

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model(model), local_files_only=True,
                                                   safety_checker=None).to(device, dtype=dtype)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    b, r = args.batch, args.resolution
    pixels = torch.randn(b, 3, r, r, device=device, dtype=dtype)
    ids = torch.randint(0, pipe.tokenizer.vocab_size, (b, pipe.tokenizer.model_max_length), device=device)
    flops = {}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        latents = pipe.vae.encode(pixels).latent_dist.sample()
    flops["vae_encode"] = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        cond = pipe.text_encoder(ids)[0]
    flops["text_encoder"] = fc.get_total_flops()
    t = torch.randint(0, 1000, (b,), device=device)
    with FlopCounterMode(display=False) as fc, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = pipe.unet(latents, t, cond).sample
        F.mse_loss(pred.float(), torch.randn_like(pred.float())).backward()
    flops["unet_step"] = fc.get_total_flops()
    return {k: v / b for k, v in flops.items()}


def child(args) -> None:
    data = Path(args.data)
    model = base_model(args.model, Path(args.work))
    if args.mode == "flops":
        print(json.dumps({"mode": "flops", "per_image": count_flops(args, model)}))
        return
    poller = DeviceMemoryPoller() if args.device == "cuda" else contextlib.nullcontext()
    with poller:
        if args.mode == "reference":
            result = run_reference(args, data, model)
        else:
            result = run_ours(args, data, model, json.loads(args.overrides or "{}"))
    steps_per_s = args.steps / result["timed"]
    row = {"mode": args.name or args.mode, "steps_per_s": steps_per_s, "images_per_s": steps_per_s * args.batch,
           "peak_memory_mb": peak_memory_mb(args.device), "first_step_s": result["first_step_s"]}
    if args.device == "cuda":
        row["device_peak_mb"] = poller.peak / 2**20
    print(json.dumps(row))


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """One row per loop: the median of each measure over the rounds, and each round's steps/s ratio to the
    reference of the same round (``ratios``)."""
    names = list(dict.fromkeys(row["mode"] for rows in rounds for row in rows))
    out = []
    for name in names:
        mine = [(rows, next(row for row in rows if row["mode"] == name)) for rows in rounds
                if any(row["mode"] == name for row in rows)]
        row = dict(mine[0][1])
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = statistics.median(m[k] for _, m in mine)
        row["ratios"] = [m["steps_per_s"] / ref["steps_per_s"] for rows, m in mine
                         for ref in rows if ref["mode"] == "reference"]
        out.append(row)
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` → (NAME, {key: YAML value})."""
    import yaml

    name, _, rest = text.partition(":")
    pairs = [kv.split("=", 1) for kv in rest.split(",") if kv]
    if not name or any(len(kv) != 2 for kv in pairs):
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value,key=value")
    return name, {k.strip(): yaml.safe_load(v) for k, v in pairs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["tiny", "sd15-shape"], default="tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="timed steps, after --warmup")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every loop, taking turns; the table shows the medians (3-5 on a busy machine)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="in every loop, the reference's too")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="also run ours with these training keys changed (repeatable)")
    p.add_argument("--compile", action="store_true", help="same as --variant compile:compile_unet=true")
    p.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--out", default="bench/train_speed.json")
    p.add_argument("--work", help="folder for the generated data and model, kept and reused (default: a new temp one)")
    for hidden in ("mode", "data", "name", "overrides"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return child(args)

    from lora_trainer.data.demo_set import make_demo_dataset

    variants = [("ours", {})] + [parse_variant(v) for v in args.variant]
    if args.compile:
        variants.append(("compile", {"compile_unet": True}))
    work = Path(args.work or tempfile.mkdtemp(prefix="lora-bench-"))
    data = make_demo_dataset(work / f"data-{args.images}-{args.resolution}", n=args.images,
                             resolution=max(args.resolution, 64))
    base_model(args.model, work)  # build once, outside the timed children
    shared = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k in ("device", "model", "resolution", "batch", "steps", "warmup")]
    shared += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    runs = ([] if args.no_reference else [("reference", "reference", {})]) + [("ours", n, o) for n, o in variants]
    if args.device == "cuda":
        runs.append(("flops", "flops", {}))
    rounds: list[list[dict]] = []  # per round, one row per loop
    flops = None
    for r in range(args.repeat):
        # the loops take turns, and each round starts with another one, so a slow spell of the machine
        # falls on every loop alike; the median over rounds is reported
        shift = r % len(runs)
        order = runs[shift:] + runs[:shift]
        rows_of_round = []
        for mode, name, overrides in order:
            if mode == "flops" and flops is not None:
                continue
            cmd = [sys.executable, __file__, "--mode", mode, "--name", name, "--overrides", json.dumps(overrides),
                   "--data", str(data), "--work", str(work)] + shared
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if proc.returncode:
                print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if mode == "flops":
                flops = result["per_image"]
            else:
                result["overrides"] = overrides
                rows_of_round.append(result)
        rounds.append(sorted(rows_of_round, key=lambda row: [n for _, n, _ in runs].index(row["mode"])))
        if args.repeat > 1:
            print(f"round {r + 1}/{args.repeat}: " + ", ".join(f"{row['mode']} {row['steps_per_s']:.2f} steps/s"
                                                             for row in rounds[-1]), flush=True)
    rows = median_rows(rounds)
    if flops:  # the FLOPs each loop does per image: the reference encodes images and captions every step
        for r in rows:
            cached_text = r["mode"] != "reference" and r["overrides"].get("cache_text_embeddings", True)
            cached = r["mode"] != "reference" and r["overrides"].get("cache_latents", True)
            per_image = flops["unet_step"] + (0 if cached else flops["vae_encode"]) + (
                0 if cached and cached_text else flops["text_encoder"])
            r["tflop_per_image"] = per_image / 1e12
            r["mfu"] = per_image * r["images_per_s"] / (args.peak_tflops * 1e12)
    ref = next((r for r in rows if r["mode"] == "reference"), None)
    summary = {"rounds": rounds, "config": {k: v for k, v in vars(args).items() if k not in ("mode", "data", "work", "name",
                                                                           "overrides")},
               "flops_per_image": flops, "rows": rows}
    if args.device == "cuda":
        import torch

        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(f"{'loop':<16}{'steps/s':>9}{'images/s':>10}{'peak MB':>9}{'device MB':>10}{'first s':>9}{'MFU':>7}"
          f"{'× ref':>7}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        dev = f"{r['device_peak_mb']:.0f}" if "device_peak_mb" in r else "-"
        ratio = f"{r['steps_per_s'] / ref['steps_per_s']:.2f}" if ref else "-"
        print(f"{r['mode']:<16}{r['steps_per_s']:>9.2f}{r['images_per_s']:>10.2f}{r['peak_memory_mb']:>9.0f}"
              f"{dev:>10}{r['first_step_s']:>9.1f}{mfu:>7}{ratio:>7}")
    if ref:
        for r in rows:
            if r is not ref:
                spread = ""
                if len(r["ratios"]) > 1:
                    spread = f" (median of {len(r['ratios'])} rounds; {min(r['ratios']):.2f}-{max(r['ratios']):.2f})"
                print(f"{r['mode']}/reference: {r['steps_per_s'] / ref['steps_per_s']:.2f}x steps/s, "
                      f"{r['peak_memory_mb'] / ref['peak_memory_mb']:.2f}x peak memory; per-round steps/s ratio "
                      f"{statistics.median(r['ratios']):.2f}x{spread}")
    if flops:
        print("TFLOP per image: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in flops.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
