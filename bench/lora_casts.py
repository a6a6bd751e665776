"""What skipping peft's LoRA input casts under autocast saves (engine.lora.lora_input_casts_off): the operators of one
forward + backward of SD 1.5's UNet (random weights, frozen in bf16, LoRA rank 8 in fp32 on the attention
projections, bench/reference_loop.TARGETS) under bf16 autocast, counted by torch.profiler with peft's casts and
without; the bytes autograd keeps for the backward pass (each storage once: a cast's copy is a tensor of its own, the
uncast input is the one the frozen layer keeps anyway); and the step's time each way, the two ways in turn.

    python bench/lora_casts.py [--device cpu|cuda] [--batch 1] [--latent 8] [--repeats 3]

On the CPU the counts are what matters (each operator is a launch on a GPU: the H200 profile found SD 1.5's step
launch-bound at batch 8); the times there are the CPU's own arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from ldm_attention import SavedForBackward  # noqa: E402  (after the path is set)
from reference_loop import TARGETS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latent", type=int, default=8, help="latent side (64 = 512² images)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps each way, after one warm-up")
    args = p.parse_args()
    import torch
    from diffusers import UNet2DConditionModel

    from lora_trainer.engine.lora import add_lora, lora_input_casts_off, uncastable_lora_layers
    from lora_trainer.models.single_file import SD15_CONFIG

    torch.manual_seed(0)
    device = torch.device(args.device)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet"))
    unet.to(device, torch.bfloat16)
    add_lora(unet, rank=8, alpha=8, dropout=0.0, target_modules=TARGETS)
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    layers = uncastable_lora_layers([unet])
    if not layers:
        raise SystemExit("this peft casts every LoRA input (no cast_input_dtype_enabled, peft < 0.15): nothing to skip")
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
    cond = torch.randn(args.batch, 77, 768, device=device)
    t = torch.full((args.batch,), 10, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(off: bool, saved=None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16), lora_input_casts_off(layers if off else []):
            with saved or contextlib.nullcontext():
                out = unet(x, t, encoder_hidden_states=cond).sample
        out.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)
        sync()

    print(f"SD 1.5 UNet, {len(layers)} LoRA layers ({', '.join(TARGETS)}), batch {args.batch}, latents "
          f"{args.latent}², bf16 autocast, {args.device}")
    # the times first, the two ways in turn (a drift of the clocks hits both alike), before any profiler runs
    times: dict[bool, list[float]] = {False: [], True: []}
    step(False), step(True)
    for _ in range(args.repeats):
        for off in (False, True):
            start = time.perf_counter()
            step(off)
            times[off].append(time.perf_counter() - start)
    for off in (False, True):
        step(off, saved := SavedForBackward())
        with torch.profiler.profile() as prof:
            step(off)
        counts = {e.key: e.count for e in prof.key_averages()}
        print(f"{'casts skipped' if off else 'peft casts   '}: {counts.get('aten::_to_copy', 0):6d} aten::_to_copy, "
              f"{sum(counts.values()):7d} operator events, {saved.bytes / 2**20:8.1f} MB kept for backward, "
              f"{statistics.median(times[off]) * 1000:8.1f} ms a step (median of {args.repeats}; "
              f"{min(times[off]) * 1000:.1f}-{max(times[off]) * 1000:.1f})")

if __name__ == "__main__":
    main()
