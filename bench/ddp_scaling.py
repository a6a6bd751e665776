"""Multi-GPU scaling: images per second of one config trained by 1, 2, 4, … processes (torchrun), and the
efficiency against perfect scaling (N × one process's rate).

    python bench/ddp_scaling.py --config my.yaml --procs 1,2,4,8 [--warmup 5] [--steps 20]
    python bench/ddp_scaling.py --procs 1,2                     # the tiny demo model on the CPU (gloo): a smoke run

Each count runs twice, ``warmup`` steps and ``warmup + steps`` steps, and the rate is taken from the difference of
the two wall times (summary.json), so start-up, model loading and latent caching cancel out. batch_size in the config
is per process (as in training), so N processes train N times the images a step. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: Path, procs: int, steps: int, out: Path) -> dict:
    """One run of ``steps`` steps by ``procs`` processes; its summary.json."""
    overrides = [f"max_train_steps={steps}", f"output_dir={out}", "save_steps=0", "save_every_n_epochs=0",
                 "log_with=none", "sample_prompts=null", "validation_split=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
           str(free_port()), "-m", "lora_trainer", "train", "-c", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{procs} process(es), {steps} steps failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a training config (default: the tiny demo model on a generated set)")
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated (at most the GPUs)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = Path(args.config) if args.config else demo_config(tmp)
        rows, base = [], None
        for n in [int(x) for x in args.procs.split(",")]:
            short = run(config, n, args.warmup, tmp / f"p{n}-short")
            long = run(config, n, args.warmup + args.steps, tmp / f"p{n}-long")
            seconds = (long["wall_time_s"] - short["wall_time_s"]) / args.steps
            images = long["effective_batch"] / seconds
            base = base or images / n
            rows.append((n, long["effective_batch"], seconds, images, images / (n * base)))
    print("| processes | images a step | s/step | images/s | efficiency |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, batch, seconds, images, eff in rows:
        print(f"| {n} | {batch} | {seconds:.3f} | {images:.1f} | {eff:.0%} |")


def demo_config(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from lora_trainer.data.demo_set import make_demo_dataset

    data = make_demo_dataset(tmp / "data", n=16, resolution=64, seed=0)
    config = tmp / "demo.json"
    config.write_text(json.dumps({"data": {"train_data_dir": str(data), "resolution": 64},
                                  "model": {"base_model": "tiny-demo"},
                                  "training": {"batch_size": 4, "gradient_accumulation_steps": 1, "lora_rank": 4},
                                  "output": {"output_name": "bench"}}))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return config


if __name__ == "__main__":
    main()
