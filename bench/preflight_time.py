"""How long the pre-flight estimate (engine.preflight) takes before a run's model loads: the first time a setting is
seen (its step traced on fake tensors) and the next time, in a new process (the trace read from the cache folder,
engine.preflight_store).

    python bench/preflight_time.py [--device cpu|cuda] [--case FAMILY:RESOLUTION:BATCH:CKPT ...] [--out time.json]

Each case runs twice, each time in a fresh process sharing one empty cache folder. The process first imports what a
run imports anyway (the trainer and diffusers), timed apart, then times ``estimate_for`` on the family's shipped
configs (the real model's shapes; no weights): SD 1.5 (``sd_v1``), SD 2.x (``sd_v2``), SDXL (``sdxl``).
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


def child(args) -> dict:
    import time

    start = time.perf_counter()
    import torch

    import lora_trainer.engine.trainer  # noqa: F401 (what a run imports before its pre-flight)
    from lora_trainer.config import config_from_dict
    from lora_trainer.engine.preflight import Where, estimate_for

    imports = time.perf_counter() - start
    family, resolution, batch, checkpointing = args.child.split(":")
    cfg = config_from_dict({"data": {"train_data_dir": "unused", "resolution": int(resolution)},
                            "training": {"batch_size": int(batch), "gradient_checkpointing": checkpointing == "1"}})
    start = time.perf_counter()
    est = estimate_for(cfg, Where(None, family, torch.device(args.device)), free=2**40)
    return {"imports_s": imports, "estimate_s": time.perf_counter() - start, "peak": est.peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", nargs="+", default=["sd_v1:512:1:1", "sdxl:1024:1:1"])
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LORA_TRAINER_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        for case in args.case:
            for attempt in ("traced", "from disk"):
                done = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", case],
                                      env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"{case}: {done.stderr[-2000:]}")
                row = {"case": case, "attempt": attempt, **json.loads(done.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"{case:<18} {attempt:<10} estimate {row['estimate_s']:6.1f} s   (imports before it "
                      f"{row['imports_s']:.1f} s)   peak {row['peak'] / 2**30:.2f} GiB", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
