"""SDPA's backends on the attention shapes of a Stable Diffusion UNet (issue 23): forward + backward of
``torch.nn.functional.scaled_dot_product_attention`` pinned to each backend in turn (flash, cuDNN, memory-efficient,
math), the median time and the TFLOP/s it reaches.

    python bench/sdpa_backends.py [--device cpu|cuda] [--batch 8] [--dtype bf16] [--repeats 20] [--out FILE.json]

Shapes (SD 1.5 at 512²; the head width grows as the tokens shrink): self-attention at 64² latents (4096 tokens,
8 heads of 40), 32² (1024 tokens, heads of 80) and 16² (256 tokens, heads of 160), and cross-attention to 77 text
tokens at 64². SDXL's 1024² (64² tokens in heads of 64, 32² in heads of 64) with --sdxl. A backend that refuses a
shape (flash takes heads up to 256 wide, cuDNN needs a recent GPU) is listed as refused, with torch's reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

SD15 = [("self 64² (4096 tok, d40)", 4096, 4096, 8, 40), ("self 32² (1024 tok, d80)", 1024, 1024, 8, 80),
        ("self 16² (256 tok, d160)", 256, 256, 8, 160), ("cross 64² → 77 (d40)", 4096, 77, 8, 40)]
SDXL = [("sdxl self 64² (4096 tok, 10×d64)", 4096, 4096, 10, 64), ("sdxl self 32² (1024 tok, 20×d64)", 1024, 1024,
                                                                    20, 64),
        ("sdxl cross 64² → 77 (10×d64)", 4096, 77, 10, 64)]
BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def time_backend(backend: str, batch: int, q_len: int, kv_len: int, heads: int, dim: int, dtype, device: str,
                 repeats: int) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not hasattr(SDPBackend, backend):
        return {"refused": f"this torch has no SDPBackend.{backend}"}
    q = torch.randn(batch, heads, q_len, dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, heads, kv_len, dim, device=device, dtype=dtype, requires_grad=True) for _ in "kv")
    grad = torch.randn(batch, heads, q_len, dim, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.backward(grad)

    caught: list = []
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the refusal's reason comes as a warning, then a RuntimeError
            step()
            sync()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
    except RuntimeError as e:
        why = [str(w.message).splitlines()[0] for w in caught] or [str(e).splitlines()[0]]
        return {"refused": " / ".join(why)[:240]}
    ms = statistics.median(times) * 1000
    flops = 4 * batch * heads * q_len * kv_len * dim * 3.5  # forward 2 matmuls (4·b·h·n·m·d) + backward 2.5×
    return {"ms": ms, "tflops": flops / (ms / 1000) / 1e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sdxl", action="store_true", help="also SDXL's shapes at 1024²")
    p.add_argument("--scale", type=int, default=1, help="divide every token count by this (a quick CPU run)")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = p.parse_args()
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = []
    for name, q_len, kv_len, heads, dim in SD15 + (SDXL if args.sdxl else []):
        q_len, kv_len = max(1, q_len // args.scale), max(1, kv_len // args.scale)
        for backend in BACKENDS:
            r = time_backend(backend, args.batch, q_len, kv_len, heads, dim, dtype, args.device, args.repeats)
            rows.append({"shape": name, "backend": backend, **r})
            shown = r["refused"] if "refused" in r else f"{r['ms']:8.2f} ms {r['tflops']:7.1f} TFLOP/s"
            print(f"{name:<34} {backend:<20} {shown}", flush=True)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    Path(args.out).write_text(json.dumps({"args": vars(args), "gpu": gpu, "torch": torch.__version__,
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
