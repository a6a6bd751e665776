"""Training in the WebUI: the LDM UNet's own attention against ours (training.attention), speed and memory.

    python bench/ldm_attention.py [--device cpu|cuda] [--model tiny|sd15-shape] [--resolution 512] [--batch 4]
                                  [--steps 5] [--dtype fp32|fp16|bf16] [--out bench/ldm_attention.json]

Inside AUTOMATIC1111 the trainer trains the loaded CompVis UNet, whose attention is the WebUI's "cross
attention optimization". Its default (v1.10 "Automatic": Doggettx on CUDA without --xformers, InvokeAI on
the CPU) is einsum + softmax in the input dtype, in slices of queries: autograd keeps every slice's
softmax for the backward pass, the whole tokens x tokens matrix. Loops (--loops): "webui" is that
computation written again here (slices of at most 32 MB of matrix, InvokeAI's CPU rule; Doggettx slices
by free VRAM, which changes the time, not what is kept); "own" is the LDM package's stock forward (it
also upcasts the matrix to fp32 on CUDA, so it keeps more than the WebUI's there); "sdpa" is ours
(lora_trainer.models.attention); "xformers" is ours with training.attention: xformers (CUDA, where
the package is installed); "compiled" is ours with training.compile_unet (torch.compile of the
UNet's forward, as LdmBackend.compile_unet; its warm-up step is the compile, and what autograd keeps is
not counted: compiled graphs save their own tensors); "diffusers" is the diffusers UNet2DConditionModel of the same
shapes (SD 1.5's shipped config; a tiny one of the same widths for "tiny") with its default attention (SDPA), what
the command line trains: the WebUI path's step against it is what training in place costs. Each loop runs alone
in its own child process: the UNet (random weights; the real LDM module names) with peft LoRA on the attention
projections, forward and
backward of an MSE loss, the median step after one warm-up step; the bytes autograd keeps for backward in
one forward (each tensor counted once); peak memory (CPU: the child's VmHWM; CUDA: max_memory_allocated).
Needs the LDM code: pip install --no-deps stable-diffusion-sdkit==2.1.5 (plus einops, omegaconf).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import peak_memory_mb  # after the path is set

# UNetModel arguments: SD 1.5's (v1-inference.yaml) and a tiny one (tests/ldm_model.py's)
SHAPES = {
    "sd15-shape": dict(model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                       channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768),
    "tiny": dict(model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1, channel_mult=[1, 2],
                 num_heads=2, context_dim=32),
}
LOOPS = ("webui", "own", "sdpa", "xformers", "compiled", "diffusers")
SLICE_BYTES = 32 * 2**20


def webui_default_forward(self, x, context=None, mask=None, **kwargs):
    """Attention as the WebUI's default optimizations compute it: k scaled, einsum + softmax in the input
    dtype, queries in slices of at most SLICE_BYTES of attention matrix (masks: SD passes none)."""
    import torch

    context = x if context is None else context
    q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2).flatten(0, 1)  # b n (h d) -> (b h) n d
               for t in (self.to_q(x), self.to_k(context) * self.scale, self.to_v(context)))
    rows = max(1, SLICE_BYTES // (q.shape[0] * k.shape[1] * q.element_size()))
    out = torch.cat([torch.einsum("b i j, b j d -> b i d",
                                  torch.einsum("b i d, b j d -> b i j", q[:, i:i + rows], k).softmax(-1, dtype=q.dtype),
                                  v)
                     for i in range(0, q.shape[1], rows)], dim=1)
    return self.to_out(out.unflatten(0, (-1, self.heads)).transpose(1, 2).flatten(2))
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class SavedForBackward:
    """Counts the bytes autograd saves for the backward pass inside the block, each storage once."""

    def __enter__(self):
        import torch

        self._sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        self._sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())


def diffusers_unet(model: str):
    """The diffusers UNet of the same shapes as SHAPES[model] (random weights)."""
    from diffusers import UNet2DConditionModel

    from lora_trainer.models.single_file import SD15_CONFIG

    config = UNet2DConditionModel.load_config(SD15_CONFIG / "unet")
    if model == "tiny":  # SHAPES["tiny"]: widths 32, 64; attention in both levels; 2 heads; context 32
        config.update(block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=2, cross_attention_dim=32,
                      norm_num_groups=32, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    return UNet2DConditionModel.from_config(config)


def one_loop(args) -> dict:
    import torch

    from lora_trainer.engine.lora import add_lora
    from lora_trainer.models.attention import use_ldm_attention

    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    shape = SHAPES[args.model]
    torch.manual_seed(0)
    if args.loop == "diffusers":
        unet = diffusers_unet(args.model).to(device)
    else:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
                         transformer_depth=1, legacy=False, **shape).to(device)
    if device.type == "cuda":  # frozen weights in the run's dtype, as the WebUI has them (LDM's fp32 GroupNorm
        unet.to(dtype)         # does not take half weights on the CPU: there autocast alone lowers the precision)
    add_lora(unet, rank=8, alpha=8, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
             key="training.target_modules")
    for p in unet.parameters():  # LoRA in fp32, the frozen base in the run's dtype (as the trainer does)
        if p.requires_grad:
            p.data = p.data.float()
    if args.loop in ("sdpa", "xformers", "compiled"):
        use_ldm_attention(unet, "xformers" if args.loop == "xformers" else "sdpa")
    if args.loop == "compiled":
        unet.forward = torch.compile(unet.forward)
    elif args.loop == "webui":  # as the WebUI sets its choice: on the class
        from ldm.modules.attention import CrossAttention

        CrossAttention.forward = webui_default_forward
    side = args.resolution // 8
    x = torch.randn(args.batch, 4, side, side, device=device)
    cond = torch.randn(args.batch, 77, shape["context_dim"], device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        t = torch.randint(0, 1000, (args.batch,), device=device)
        with autocast:
            if args.loop == "diffusers":
                out = unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
            else:
                out = unet(x.to(dtype), t, context=cond.to(dtype))
        torch.nn.functional.mse_loss(out.float(), torch.randn_like(x)).backward()
        unet.zero_grad(set_to_none=True)
        sync()

    with SavedForBackward() if args.loop != "compiled" else contextlib.nullcontext() as saved:
        start = time.perf_counter()
        step()  # warm-up, and what autograd keeps
        first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"loop": args.loop, "step_s": statistics.median(times), "first_step_s": first,
            "saved_for_backward_mb": saved.bytes / 2**20 if saved else None,
            "peak_memory_mb": peak_memory_mb(args.device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=tuple(SHAPES), default="tiny")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype (CUDA: also the weights')")
    p.add_argument("--loops", default="webui,sdpa", help=f"comma-separated, of {', '.join(LOOPS)}")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    p.add_argument("--loop", choices=LOOPS, help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()
    if args.loop:
        print(json.dumps(one_loop(args)))
        return
    rows = []
    loops = args.loops.split(",")
    if not set(loops) <= set(LOOPS):
        p.error(f"--loops: {args.loops!r}: each must be one of {', '.join(LOOPS)}")
    for loop in loops:
        cmd = [sys.executable, __file__, "--loop", loop] + [f"--{k}={v}" for k, v in vars(args).items()
                                                             if k not in ("loop", "out", "loops")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:  # the own attention may not fit where ours does: say so, measure the other
            why = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1:]
            print(f"{loop}: failed (exit {proc.returncode}): {why}", file=sys.stderr)
            rows.append({"loop": loop, "failed": proc.returncode})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "loop"},
                                          "rows": rows}, indent=2))
    print(f"LDM UNet ({args.model}), {args.resolution}², batch {args.batch}, {args.dtype}, {args.device}")
    print(f"{'attention':<10} {'s/step':>8} {'first step s':>13} {'saved for backward MB':>22} {'peak MB':>9}")
    for r in rows:
        if "failed" in r:
            print(f"{r['loop']:<10} {'failed':>8}")
        else:
            saved = "-" if r["saved_for_backward_mb"] is None else f"{r['saved_for_backward_mb']:.0f}"
            print(f"{r['loop']:<10} {r['step_s']:>8.3f} {r['first_step_s']:>13.1f} {saved:>22} "
                  f"{r['peak_memory_mb']:>9.0f}")


if __name__ == "__main__":
    main()
