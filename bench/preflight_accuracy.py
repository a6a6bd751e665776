"""How close the pre-flight estimate (engine.preflight, issue 17) comes to the memory real runs use.

    python bench/preflight_accuracy.py [--device cpu|cuda] [--model tiny-demo|tiny-sdxl|sd15-shape] [--steps 3]
                                       [--setting RES:BATCH:CKPT ...] [--out preflight.json]

Each setting in its own process: the estimate first (nothing loaded), then the trainer's own run of --steps steps on
a generated data set. CPU: how much the process grows during the steps (VmHWM after set-up), with glibc's default
allocator and with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed blocks of 64 kB and more go back at once, so the RSS
follows the bytes in use). CUDA: ``torch.cuda.max_memory_allocated`` of the steps against the estimate's peak less
the CUDA context (``CUDA_OVERHEAD``), and ``max_memory_reserved`` beside it. ``sd15-shape``: SD 1.5's real shapes with
random weights (bench/train_speed.py builds it), CUDA only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def child(args) -> dict:
    import torch

    from lora_trainer.config import config_from_dict
    from lora_trainer.data.demo_set import make_demo_dataset
    from lora_trainer.engine.events import Callbacks
    from lora_trainer.engine.preflight import Where, estimate_for
    from lora_trainer.engine.trainer import train

    res, batch, ckpt = (int(x) for x in args.setting.split(":"))
    cuda = args.device == "cuda"
    tmp = Path(tempfile.mkdtemp())
    data = make_demo_dataset(tmp / "data", n=max(8, 2 * batch), resolution=res, seed=0)
    sys.path.insert(0, str(ROOT / "bench"))
    from train_speed import base_model  # (bench/, beside this file: the tiny names, or a shape model built once)

    model = base_model({"tiny-demo": "tiny"}.get(args.model, args.model), Path(args.work))
    cfg = config_from_dict({"data": {"train_data_dir": str(data), "resolution": res, "random_flip": False},
                            "model": {"base_model": model},
                            "training": {"max_train_steps": args.steps, "batch_size": batch, "save_steps": 0,
                                         "gradient_accumulation_steps": 1, "gradient_checkpointing": bool(ckpt)},
                            "output": {"output_dir": str(tmp / "out"), "log_with": "none",
                                       "save_diffusers_format": False}})
    device = torch.device(args.device)
    est = estimate_for(cfg, Where(model, None, device), free=2**50)

    class Peak(Callbacks):
        def on_start(self, total_steps, run_dir):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                Path("/proc/self/clear_refs").write_text("5")
                self.rest = _status("VmRSS")

        def on_end(self, result):
            if cuda:
                self.allocated, self.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            else:
                self.grown = _status("VmHWM") - self.rest

    peak = Peak()
    train(cfg, callbacks=peak, progress=False)
    out = {"model": args.model, "setting": args.setting, "device": args.device,
           "estimate_step_bytes": est.lora + est.step, "estimate_peak_bytes": est.training_peak - est.overhead,
           "estimate_s_per_step": est.seconds_per_step,
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    if cuda:
        out.update(measured_allocated_bytes=peak.allocated, measured_reserved_bytes=peak.reserved)
    else:
        out.update(measured_growth_bytes=peak.grown)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="tiny-demo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--setting", action="append", help="RESOLUTION:BATCH:CHECKPOINTING (0/1); repeatable")
    p.add_argument("--out")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lora_trainer_bench"),
                   help="folder for the shape models (built once)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(argparse.Namespace(**{**vars(args), "setting": args.setting[0]}))))
        return
    settings = args.setting or (["128:2:0", "256:4:0", "192:2:1", "384:1:0"] if args.device == "cpu"
                                else ["512:8:0", "512:1:1", "512:4:1"])
    rows = []
    for setting in settings:
        for threshold in ([None, "65536"] if args.device == "cpu" else [None]):
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            if threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = threshold
            cmd = [sys.executable, __file__, "--child", "--device", args.device, "--model", args.model,
                   "--steps", str(args.steps), "--setting", setting, "--work", args.work]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    mib = 2**20
    print(f"{'model':<11}{'res:batch:ckpt':>15}{'allocator':>12}{'estimate MiB':>14}{'measured MiB':>14}{'ratio':>7}")
    for r in rows:
        if r["device"] == "cuda":
            est, meas, how = r["estimate_peak_bytes"], r["measured_allocated_bytes"], "allocated"
        else:
            est, meas = r["estimate_step_bytes"], r["measured_growth_bytes"]
            how = "mmap 64k" if r["malloc_mmap_threshold"] else "glibc"
        print(f"{r['model']:<11}{r['setting']:>15}{how:>12}{est / mib:>14.1f}{meas / mib:>14.1f}{meas / est:>7.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
