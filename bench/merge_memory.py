"""Peak memory of merging LoRAs into a checkpoint (lora_trainer.export.merge), against the checkpoint's size.

    python bench/merge_memory.py [--tensors 40] [--side 4096] [--dtype fp16] [--work DIR]
    python bench/merge_memory.py --base CKPT.safetensors [--work DIR]

Builds a random checkpoint of ``--tensors`` square weights (UNet keys, ``--side``² each) and a rank-16 LoRA for a
quarter of them (or, with ``--base``, takes that checkpoint and a random rank-16 LoRA for every attention projection
of its UNet: the modules a LoRA trains), then merges in a child process and polls its anonymous memory (RssAnon:
what it allocates; the checkpoint is memory-mapped, so its pages are page cache, in VmHWM but not here) during the
merge.
Prints one line and the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no /proc/self/status (Linux only)")


class AnonPeak:
    """The peak of the process's anonymous memory (RssAnon: what it allocated; the checkpoint, memory-mapped by
    safetensors, counts in RssFile instead: page cache the kernel can drop), polled every 5 ms."""

    def __enter__(self):
        import threading

        self.peak, self._stop = status_mb("RssAnon"), threading.Event()

        def poll():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, status_mb("RssAnon"))

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build(work: Path, tensors: int, side: int, dtype: str) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from lora_trainer.export.kohya import save_kohya_lora

    kind = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    base, lora = work / "base.safetensors", work / "lora.safetensors"
    if not base.exists():  # (written in parts would need a streaming writer too: the builder holds it once)
        gen = torch.Generator().manual_seed(0)
        save_file({f"model.diffusion_model.input_blocks.{i}.1.proj_in.weight":
                   torch.randn(side, side, generator=gen).to(kind) for i in range(tensors)}, str(base))
        parts = {}
        for i in range(0, tensors, 4):
            name = f"lora_unet_input_blocks_{i}_1_proj_in"
            parts |= {name + ".lora_down.weight": torch.randn(16, side, generator=gen).to(kind),
                      name + ".lora_up.weight": torch.randn(side, 16, generator=gen).to(kind),
                      name + ".alpha": torch.tensor(8.0)}
        save_kohya_lora(lora, parts, {})
    return base, lora


def lora_for(base: Path, work: Path) -> Path:
    """A random rank-16 LoRA (LDM names) for each attention projection (to_q/k/v/out.0) of ``base``'s UNet."""
    import torch
    from safetensors import safe_open

    from lora_trainer.export.kohya import save_kohya_lora

    gen, parts = torch.Generator().manual_seed(0), {}
    with safe_open(str(base), framework="pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model.") and key.endswith(("to_q.weight", "to_k.weight",
                                                                          "to_v.weight", "to_out.0.weight")):
                rows, cols = f.get_slice(key).get_shape()
                name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
                parts |= {name + ".lora_down.weight": torch.randn(16, cols, generator=gen).half() * 0.01,
                          name + ".lora_up.weight": torch.randn(rows, 16, generator=gen).half() * 0.01,
                          name + ".alpha": torch.tensor(8.0)}
    return save_kohya_lora(work / f"{base.stem}_lora.safetensors", parts, {})


def largest_mb(path: Path) -> float:
    """The largest tensor of a safetensors file, in MB (from its header's offsets)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return max(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__") / 2**20


def child(base: str, lora: str, out: str) -> None:
    import time

    import torch  # noqa: F401  (imported before the first reading: its own memory is not the merge's)

    from lora_trainer.export.merge import merge_into_checkpoint

    before, t0 = status_mb("RssAnon"), time.perf_counter()
    with AnonPeak() as anon:
        merge_into_checkpoint(base, [(lora, 0.8)], out)
    print(json.dumps({"before_mb": before, "peak_mb": anon.peak, "peak_rss_with_mapped_file_mb": status_mb("VmHWM"),
                      "seconds": time.perf_counter() - t0}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensors", type=int, default=40)
    p.add_argument("--side", type=int, default=4096)
    p.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16")
    p.add_argument("--work", help="folder for the generated files (default: a new temp one)")
    p.add_argument("--base", help="a real single-file checkpoint instead of the random one")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    work = Path(args.work or tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.base:
        base = Path(args.base)
        lora = lora_for(base, work)
    else:
        base, lora = build(work, args.tensors, args.side, args.dtype)
    out = work / "merged.safetensors"
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, __file__, "--child", str(base), str(lora), str(out)], capture_output=True,
                          text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    out.unlink(missing_ok=True)
    row |= {"checkpoint_mb": base.stat().st_size / 2**20, "largest_tensor_mb": largest_mb(base),
            "lora_mb": lora.stat().st_size / 2**20}
    row["merge_growth_mb"] = row["peak_mb"] - row["before_mb"]
    print(f"checkpoint {base.name} {row['checkpoint_mb']:.0f} MB (largest tensor {row['largest_tensor_mb']:.0f} MB), "
          f"LoRA {row['lora_mb']:.0f} MB: the merge raised the process's allocated memory by "
          f"{row['merge_growth_mb']:.0f} MB (peak {row['peak_mb']:.0f} MB, {row['before_mb']:.0f} before) in "
          f"{row['seconds']:.0f} s")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
