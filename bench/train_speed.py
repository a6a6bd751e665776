"""Training speed and memory: our trainer against the plain diffusers + peft recipe, same data and weights.

    python bench/train_speed.py [--device cpu|cuda] [--model tiny|tiny-sdxl|sd15-shape|sdxl-shape] [--resolution 64]
                                [--batch 4] [--rank 8] [--images 16] [--photo-size WxH] [--steps 60] [--rounds 6]
                                [--gradient-checkpointing] [--variant NAME:key=value,key=value ...] [--no-reference]
                                [--alone] [--mixed-aspect]

Models: the built-in tiny SD (``tiny``) and SDXL (``tiny-sdxl``) models, or SD 1.5's / SDXL base's real shapes with
random weights, built once from configs in the work folder (``sd15-shape``; ``sdxl-shape``: 2.6 B UNet parameters,
7 GB of fp16 files, about 14 GB of RAM while it is built). "reference" is the LoRA training loop of the diffusers
examples (bench/reference_loop.py: train_text_to_image_lora.py, or train_text_to_image_lora_sdxl.py for an SDXL
model: VAE and text encoder(s) every step, no caching, default attention); "ours" is
``lora_trainer.engine.trainer.train`` with its defaults, and each ``--variant`` is ours with some training
keys changed (``compile:compile_unet=true``). Two measurements:

- speed: each of our loops in one process with the reference, on the same data and weights, taking turns
  (bench/turns.py): after warm-up each runs --steps/--rounds steps while the other waits, --rounds times.
  Steps/s is the median over the turns; "× ref" the median of each round's ratio (with its range).
- memory and start-up: each loop alone in its own child process (so each peak is its own): peak memory
  (CUDA: max_memory_allocated, and the whole device's use, CUDA context and allocator cache included,
  polled every 20 ms; CPU: peak RSS) and time to the first step.

``--mixed-aspect``: the images in four shapes (4:3, 3:4, 1:1, 2:1); "ours" trains them in aspect-ratio buckets
(data.enable_bucket, buckets from half the resolution, steps of a quarter) and a "square" loop center-cropped, and
the two are compared at their pixels per image (a bucket holds at most resolution² pixels).

On CUDA one more child counts the FLOPs of one step with torch.utils.flop_counter (VAE encode, text
encoder, UNet forward + backward with LoRA) for the model FLOPs utilisation (MFU) against --peak-tflops.
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

from reference_loop import TARGETS, count_flops, reference_steps  # noqa: E402  (after the path is set)


def base_model(kind: str, folder: Path) -> str:
    """The model folder of ``kind``: a built-in name, or SD 1.5's / SDXL base's real shapes with random weights (no
    download), built once into ``folder`` by a child process (the weights drawn on the GPU where there is one, and
    none of its memory left in this process to count against the loops measured after it)."""
    if kind in ("tiny", "tiny-sdxl"):
        return {"tiny": "tiny-demo"}.get(kind, kind)
    target = folder / kind
    if not (target / "model_index.json").exists():
        code = (f"import sys; sys.path[:0] = [{str(ROOT / 'bench')!r}, {str(ROOT)!r}]; import train_speed; "
                f"train_speed.build_shape_model({kind!r}, {str(target)!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
    return str(target)


def build_shape_model(kind: str, target: str) -> None:
    """Save ``kind`` (sd15-shape: from the shipped SD 1.5 configs; sdxl-shape: bench/sdxl_shapes.py) in fp16 (half the
    disk; each run loads it in its own dtype), its random weights drawn where it is fastest."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "sdxl-shape":
        from sdxl_shapes import build_sdxl_shape_pipeline

        build_sdxl_shape_pipeline(torch.float16, device).save_pretrained(target)
        return
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_trainer.models.single_file import SD15_CONFIG

    with torch.device(device):
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer"),
            scheduler=DDPMScheduler.from_pretrained(SD15_CONFIG / "scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=torch.float16).save_pretrained(target)


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # this process's own high-water mark: ru_maxrss would also count the parent's memory, which Linux carries
    # over to a child through fork + exec (a 13 MB child of a 500 MB parent reports 513 MB)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (not Linux) KiB, parent included


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


def ours_config(args, data: Path, model: str, steps: int, overrides: dict):
    from lora_trainer.config import config_from_dict

    return config_from_dict({
        "train_data_dir": str(data), "base_model": model, "resolution": args.resolution, "batch_size": args.batch,
        "gradient_accumulation_steps": 1, "max_train_steps": steps, "save_steps": 0,
        "lora_rank": args.rank, "lora_alpha": args.rank, "lora_dropout": 0.0, "target_modules": TARGETS,
        "learning_rate": 1e-4,
        "log_with": "none",
        "output_dir": str(Path(tempfile.mkdtemp()) / "run"), "save_diffusers_format": False,
        "mixed_precision": "auto" if args.device == "cuda" else "no",
        "gradient_checkpointing": args.gradient_checkpointing, **overrides})


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def alone(args, data: Path, model: str, overrides: dict | None) -> dict:
    """One loop in this process: time to the first step and the peak memory (``overrides`` None: reference)."""
    from lora_trainer.engine.events import Callbacks
    from lora_trainer.engine.trainer import train

    steps = args.warmup + args.steps
    start, times, sync = time.perf_counter(), [], _sync(args.device)
    if overrides is None:
        for _, _ in zip(range(steps), reference_steps(args, data, model)):
            times.append(time.perf_counter())
    else:
        class Clock(Callbacks):
            def on_step(self, info):
                sync()
                times.append(time.perf_counter())

        train(ours_config(args, data, model, steps, overrides), callbacks=Clock(), progress=False)
    return {"first_step_s": times[0] - start, "alone_steps_per_s": args.steps / (times[-1] - times[args.warmup - 1])}


def in_turns(args, data: Path, model: str, overrides: dict, reference: bool) -> dict[str, list[float]]:
    """Ours (with ``overrides``) and the reference in this process, taking turns; the seconds of each block."""
    from turns import TakeTurns

    from lora_trainer.engine.trainer import train

    block = args.steps // args.rounds
    turns = TakeTurns(reference_steps(args, data, model) if reference else None, args.warmup, block, args.rounds,
                      sync=_sync(args.device))
    train(ours_config(args, data, model, args.warmup + args.rounds * block, overrides), callbacks=turns,
          progress=False)
    return turns.times


def child(args) -> None:
    data = Path(args.data)
    model = base_model(args.model, Path(args.work))
    if args.mode == "flops":
        print(json.dumps({"flops": count_flops(args, model)}))
        return
    (name, overrides), = json.loads(args.loops)
    if args.mode == "turns":
        print(json.dumps(in_turns(args, data, model, overrides, reference=not args.no_reference)))
        return
    poller = DeviceMemoryPoller() if args.device == "cuda" else contextlib.nullcontext()
    with poller:
        row = {"mode": name, **alone(args, data, model, overrides)}
    row["peak_memory_mb"] = peak_memory_mb(args.device)
    if args.device == "cuda":
        row["device_peak_mb"] = poller.peak / 2**20
    print(json.dumps(row))


def photo_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: WIDTHxHEIGHT, e.g. 4000x3000") from None
    return w, h


def as_photos(demo: Path, folder: Path, size: tuple[int, int]) -> Path:
    """The demo set as camera-sized JPEGs (upscaled, fine noise added so they compress like photos)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = (demo / "metadata.csv").read_text(encoding="utf-8").splitlines()
    out = [rows[0]]
    for row in rows[1:]:
        name, caption = row.split(",", 1)
        jpg = Path(name).with_suffix(".jpg").name
        out.append(f"{jpg},{caption}")
        if (folder / jpg).exists():
            continue
        big = np.asarray(Image.open(demo / name).convert("RGB").resize(size, Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / jpg, quality=90)
    (folder / "metadata.csv").write_text("\n".join(out) + "\n", encoding="utf-8")
    return folder


MIXED_SHAPES = ((4, 3), (3, 4), (1, 1), (2, 1))  # --mixed-aspect: width:height of the images, in turn


def as_mixed(demo: Path, folder: Path, resolution: int) -> Path:
    """The demo set in MIXED_SHAPES, each about twice the resolution's pixels a side (scaled down as it loads)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = (demo / "metadata.csv").read_text(encoding="utf-8").splitlines()
    for k, row in enumerate(rows[1:]):
        name = row.split(",", 1)[0]
        w, h = MIXED_SHAPES[k % len(MIXED_SHAPES)]
        scale = 2 * resolution / (w * h) ** 0.5
        if not (folder / name).exists():
            Image.open(demo / name).convert("RGB").resize((round(w * scale), round(h * scale)),
                                                          Image.BICUBIC).save(folder / name)
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def bucket_overrides(resolution: int) -> dict:
    """--mixed-aspect: buckets that differ at the bench's small resolutions (kohya's 256..1024 in steps of 64 are
    for 512)."""
    return {"enable_bucket": True, "min_bucket_reso": max(64, resolution // 2),
            "bucket_reso_steps": max(8, resolution // 4 // 8 * 8)}


def pixels_per_image(data: Path, resolution: int, overrides: dict) -> float:
    """The mean pixels an image trains at: its bucket's, or the resolution's square."""
    from lora_trainer.config import config_from_dict
    from lora_trainer.data.dataset import scan_dataset
    from lora_trainer.engine.run import training_dataset

    cfg = config_from_dict({"train_data_dir": str(data), "resolution": resolution, **overrides})
    dataset = training_dataset(cfg, scan_dataset(data))
    sizes = [dataset.target(i) for i in range(len(dataset))]
    return sum(w * h for w, h in sizes) / len(sizes)


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` → (NAME, {key: YAML value})."""
    import yaml

    name, _, rest = text.partition(":")
    pairs = [kv.split("=", 1) for kv in rest.split(",") if kv]
    if not name or any(len(kv) != 2 for kv in pairs):
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value,key=value")
    return name, {k.strip(): yaml.safe_load(v) for k, v in pairs}


def spawn(args, mode: str, loops, data: Path, work: Path, shared: list[str]) -> dict | None:
    cmd = [sys.executable, __file__, "--mode", mode, "--loops", json.dumps(loops), "--data", str(data),
           "--work", str(work)] + shared
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if proc.returncode:
        print(f"{mode} {[n for n, _ in loops]}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # as each child ends (a run cut short by its time limit still says what it measured)
    print(f"[{time.perf_counter() - start:.0f} s] {mode} {[n for n, _ in loops]}: {json.dumps(result)[:400]}",
          file=sys.stderr, flush=True)
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["tiny", "tiny-sdxl", "sd15-shape", "sdxl-shape"], default="tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank) of every loop")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--photo-size", metavar="WxH", type=photo_size,
                   help="train on JPEGs of this size made from the demo images (camera photos: 4000x3000) "
                        "instead of PNGs at the training resolution")
    p.add_argument("--steps", type=int, default=60, help="timed steps of each loop, after --warmup")
    p.add_argument("--rounds", type=int, default=6, help="turns each loop takes (--steps are split among them)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gradient-checkpointing", action="store_true", help="in every loop, the reference's too")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="also run ours with these training keys changed (repeatable)")
    p.add_argument("--compile", action="store_true", help="same as --variant compile:compile_unet=true")
    p.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    p.add_argument("--alone", action="store_true",
                   help="with --no-reference: each loop only alone in its own process, its speed from there (no "
                        "turns: a compiled loop compiles once)")
    p.add_argument("--mixed-aspect", action="store_true",
                   help="images of four aspect ratios: ours in buckets against a square-cropped loop")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--out", default="bench/train_speed.json")
    p.add_argument("--work", help="folder for the generated data and model, kept and reused (default: a new temp one)")
    for hidden in ("mode", "data", "loops"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.mode:
        return child(args)
    if not 1 <= args.rounds <= args.steps or args.steps % args.rounds:
        raise SystemExit(f"--rounds {args.rounds}: between 1 and --steps ({args.steps}), and dividing it")
    if args.warmup < 1:
        raise SystemExit("--warmup: at least 1 (the first step compiles, allocates and loads; it is never timed)")
    if args.alone and not args.no_reference:
        raise SystemExit("--alone: with --no-reference only (ours and the reference are compared taking turns)")

    from lora_trainer.data.demo_set import make_demo_dataset

    mixed = bucket_overrides(args.resolution) if args.mixed_aspect else {}
    variants = [("ours", mixed)] + [(n, {**mixed, **o}) for n, o in map(parse_variant, args.variant)]
    if args.compile:
        variants.append(("compile", {**mixed, "compile_unet": True}))
    if args.mixed_aspect:
        variants.append(("square", {"enable_bucket": False}))
    loops = ([] if args.no_reference else [("reference", None)]) + variants
    work = Path(args.work or tempfile.mkdtemp(prefix="lora-bench-"))
    data = make_demo_dataset(work / f"data-{args.images}-{args.resolution}", n=args.images,
                             resolution=max(args.resolution, 64))
    if args.photo_size:
        data = as_photos(data, work / f"photos-{args.images}-{args.resolution}-{'x'.join(map(str, args.photo_size))}",
                         args.photo_size)
    if args.mixed_aspect:
        data = as_mixed(data, work / f"mixed-{args.images}-{args.resolution}", args.resolution)
    start = time.perf_counter()
    base_model(args.model, work)  # build once, outside the timed children
    print(f"[{time.perf_counter() - start:.0f} s] model {args.model} ready", file=sys.stderr, flush=True)
    block = args.steps // args.rounds
    shared = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k in ("device", "model", "resolution", "batch", "rank", "steps", "rounds", "warmup")]
    shared += ["--gradient-checkpointing"] if args.gradient_checkpointing else []

    shared += ["--no-reference"] if args.no_reference else []
    rows = alone_rows(args, loops, data, work, shared) if args.alone else turn_rows(args, loops, variants, data,
                                                                                     work, shared, block)
    flops = (spawn(args, "flops", [], data, work, shared) or {}).get("flops") if args.device == "cuda" else None
    if flops:  # the FLOPs each loop does per image: the reference encodes images and captions every step
        for r in rows:
            cached_text = r["mode"] != "reference" and r["overrides"].get("cache_text_embeddings", True)
            cached = r["mode"] != "reference" and r["overrides"].get("cache_latents", True)
            per_image = flops["unet_step"] + (0 if cached else flops["vae_encode"]) + (
                0 if cached and cached_text else flops["text_encoder"])
            r["tflop_per_image"] = per_image / 1e12
            r["mfu"] = per_image * r["images_per_s"] / (args.peak_tflops * 1e12)
    summary = {"config": {k: v for k, v in vars(args).items() if k not in ("mode", "data", "work", "loops")},
               "flops_per_image": flops, "rows": rows}
    if args.mixed_aspect:
        summary["buckets_vs_square"] = compare_buckets(rows, data, args.resolution)
    if args.device == "cuda":
        import torch

        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print_table(rows, args.rounds, args.alone)
    if flops:
        print("TFLOP per image: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in flops.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


def turn_rows(args, loops, variants, data: Path, work: Path, shared: list[str], block: int) -> list[dict]:
    """Speed: each of our loops in one process with the reference, taking turns; memory: each alone."""
    turns = {name: spawn(args, "turns", [(name, o)], data, work, shared) for name, o in variants}
    rows = []
    for name, overrides in loops:
        pair = turns["ours" if name == "reference" else name]
        if pair is None:
            continue
        row = spawn(args, "alone", [(name, overrides)], data, work, shared) or {"mode": name}
        row["overrides"] = overrides or {}
        row["turn_s"] = pair["reference" if name == "reference" else "ours"]
        row["steps_per_s"] = block / statistics.median(row["turn_s"])
        row["images_per_s"] = row["steps_per_s"] * args.batch
        if pair["reference"]:
            row["ratios"] = [r / t for r, t in zip(pair["reference"], row["turn_s"])]
        rows.append(row)
    return rows


def alone_rows(args, loops, data: Path, work: Path, shared: list[str]) -> list[dict]:
    """--alone: speed and memory from one child per loop (a compiled loop compiles once, not twice)."""
    rows = []
    for name, overrides in loops:
        row = spawn(args, "alone", [(name, overrides)], data, work, shared)
        if row is not None:
            row["overrides"] = overrides or {}
            row["steps_per_s"] = row["alone_steps_per_s"]
            row["images_per_s"] = row["steps_per_s"] * args.batch
            rows.append(row)
    return rows


def compare_buckets(rows: list[dict], data: Path, resolution: int) -> dict | None:
    """--mixed-aspect: bucketed ("ours") against square ("square") steps/s, and per million pixels trained."""
    by = {r["mode"]: r for r in rows}
    if "ours" not in by or "square" not in by:
        return None
    px = {"ours": pixels_per_image(data, resolution, by["ours"]["overrides"]),
          "square": pixels_per_image(data, resolution, {"enable_bucket": False})}
    out = {name: {"steps_per_s": by[name]["steps_per_s"], "pixels_per_image": px[name],
                  "mpx_per_s": by[name]["images_per_s"] * px[name] / 1e6} for name in px}
    out["steps_ratio"] = out["ours"]["steps_per_s"] / out["square"]["steps_per_s"]
    out["pixel_rate_ratio"] = out["ours"]["mpx_per_s"] / out["square"]["mpx_per_s"]
    print(f"buckets vs square: {out['steps_ratio']:.2f}x steps/s, {out['pixel_rate_ratio']:.2f}x pixels/s "
          f"({px['ours']:.0f} vs {px['square']:.0f} pixels per image)")
    return out


def print_table(rows: list[dict], rounds: int, alone: bool = False) -> None:
    def num(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    ref = next((r for r in rows if r["mode"] == "reference"), None)
    print(f"{'loop':<16}{'steps/s':>9}{'images/s':>10}{'× ref':>7}{'range':>12}{'peak MB':>9}{'device MB':>10}"
          f"{'first s':>9}{'MFU':>7}")
    for r in rows:
        ratio = f"{statistics.median(r['ratios']):.2f}" if "ratios" in r else "-"
        spread = f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}" if "ratios" in r else "-"
        print(f"{r['mode']:<16}{r['steps_per_s']:>9.2f}{r['images_per_s']:>10.2f}{ratio:>7}{spread:>12}"
              f"{num(r, 'peak_memory_mb', '.0f'):>9}{num(r, 'device_peak_mb', '.0f'):>10}"
              f"{num(r, 'first_step_s', '.1f'):>9}{num(r, 'mfu', '.1%'):>7}")
    print("(speed, memory and first step: each loop alone in its own process)" if alone else
          f"(speed: each loop in one process with the reference, {rounds} turns each, medians; memory and "
          "first step: each loop alone in its own process)")
    if ref and "peak_memory_mb" in ref:
        for r in rows:
            if r is not ref and "peak_memory_mb" in r:
                print(f"{r['mode']}/reference: {statistics.median(r['ratios']):.2f}x steps/s "
                      f"({min(r['ratios']):.2f}-{max(r['ratios']):.2f} over the rounds), "
                      f"{r['peak_memory_mb'] / ref['peak_memory_mb']:.2f}x peak memory")


if __name__ == "__main__":
    main()
