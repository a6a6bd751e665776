"""Where a training step's time goes (issue 23): our trainer under torch.profiler for a few steps after warm-up, the
top kernels (CUDA) or operators (CPU) by time, and the shares of the kinds that matter for the MFU gap: matrix
multiplies and convolutions (the useful FLOPs), attention, normalisation, element-wise work, copies and the rest.

    python bench/profile_step.py [--device cpu|cuda] [--model tiny|sd15-shape|sdxl-shape] [--resolution 64]
                                 [--batch 4] [--rank 8] [--steps 3] [--warmup 3] [--gradient-checkpointing]
                                 [--set key=value ...] [--trace FILE.json] [--out FILE.json]

``--set`` changes training keys (``--set compile_unet=true --set attention=sdpa``) to profile one candidate at a
time. ``--trace`` writes a Chrome trace (chrome://tracing, ui.perfetto.dev). Uses train_speed.py's models and data.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import base_model, ours_config, parse_variant  # noqa: E402  (after the path is set)

# kernel / operator name → kind (the first pattern that matches); the rest is "other"
KINDS = [("attention", r"flash|fmha|attention|sdpa|softmax|efficient_attention|cudnn.*mha"),
         ("copy/cast", r"copy|memcpy|memset|(?<!no)cast|contiguous|cat\b|transpose|nchwtonhwc|nhwctonchw"),
         ("matmul/conv", r"gemm|matmul|\bmm\b|addmm|bmm|conv|cutlass|sm\d\d_xmma|cublas|nvjet|linear|"
                         r"implicit_convolve"),
         ("norm", r"norm"),
         ("optimizer", r"adam|multi_tensor|foreach"),
         ("elementwise", r"elementwise|vectorized|silu|gelu|mul|add|div|sigmoid|reduce|sum|mean|pow|sqrt|exp")]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def profile(args) -> dict:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    from lora_trainer.data.demo_set import make_demo_dataset
    from lora_trainer.engine.events import Callbacks
    from lora_trainer.engine.trainer import train

    work = Path(args.work or tempfile.mkdtemp(prefix="lora-profile-"))
    data = make_demo_dataset(work / f"data-{args.batch * 2}-{args.resolution}", n=max(args.batch * 2, 4),
                             resolution=max(args.resolution, 64))
    model = base_model(args.model, work)
    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=activities, record_shapes=False)

    class Window(Callbacks):  # the profiler on from the end of warm-up to the end of --steps more steps
        count, clock = 0, []

        def on_step(self, info):
            self.count += 1
            if cuda:
                torch.cuda.synchronize()
            self.clock.append(time.perf_counter())
            if self.count == args.warmup:
                prof.__enter__()
            elif self.count == args.warmup + args.steps:
                prof.__exit__(None, None, None)

    overrides = parse_variant("set:" + ",".join(args.set))[1]
    window = Window()
    train(ours_config(args, data, model, args.warmup + args.steps, overrides), callbacks=window, progress=False)
    # the wall time of a step without the profiler (warm-up steps after the first two) and under it: the kernels'
    # share of the unprofiled wall time is how busy the device is (the rest: launches, host syncs, Python)
    gaps = [b - a for a, b in zip(window.clock, window.clock[1:])]
    wall = statistics.median(gaps[1:args.warmup - 1] or gaps[:1]) * 1000
    if args.trace:
        prof.export_chrome_trace(args.trace)
    events = prof.key_averages()
    if cuda:  # the kernels (and copies) themselves: an operator's own device time is its kernels' again
        rows = [(e.key, e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total,
                 e.count) for e in events if e.device_type != DeviceType.CPU]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    rows = sorted([r for r in rows if r[1] > 0], key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows) or 1
    kinds: dict[str, float] = {}
    for name, t, _ in rows:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0) + t
    return {"config": {k: v for k, v in vars(args).items() if k not in ("work",)},
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "ms_per_step": total / 1000 / args.steps,
            "wall_ms_per_step": wall, "busy_share": round(total / 1000 / args.steps / wall, 4),
            "kinds": {k: round(v / total, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:120], "ms_per_step": t / 1000 / args.steps, "share": round(t / total, 4),
                     "calls_per_step": c / args.steps, "kind": kind_of(n)} for n, t, c in rows[:args.top]]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["tiny", "tiny-sdxl", "sd15-shape", "sdxl-shape"], default="tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps profiled, after --warmup")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training key changed")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", help="write a Chrome trace here")
    p.add_argument("--work", help="folder for the generated data and model (kept, reused)")
    p.add_argument("--out", default="bench/profile_step.json")
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps: at least 1 each")
    result = profile(args)
    print(f"{result['wall_ms_per_step']:.1f} ms a step unprofiled; {result['ms_per_step']:.1f} ms of "
          f"{'kernel' if args.device == 'cuda' else 'operator'} time a step ({result['busy_share']:.0%}); by "
          "kind: " + ", ".join(f"{k} {v:.1%}" for k, v in result["kinds"].items()))
    for row in result["top"]:
        print(f"  {row['share']:6.1%} {row['ms_per_step']:8.2f} ms {row['calls_per_step']:6.1f}x  {row['kind']:<12} "
              f"{row['name']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
