"""An ESTIMATE of an SDXL LoRA step's GPU memory and FLOPs, from SDXL's real shapes, on any machine: nothing is
allocated and nothing computed (torch FakeTensorMode: every tensor has its shape and dtype, no data).

    python bench/sdxl_memory_estimate.py [--resolution 1024] [--batch 1] [--rank 16] [--no-checkpointing]

- weights: counted from the configs (bench/sdxl_shapes.py), bf16 frozen, LoRA (to_q/to_k/to_v/to_out.0) fp32;
- one training step of the diffusers UNet (bf16 autocast, MSE, backward, AdamW, two steps so AdamW's states exist),
  as our loop runs it with latents and captions cached: the peak of the tensor bytes it holds beyond the weights
  (activations, with or without gradient checkpointing; LoRA gradients; AdamW's two states), tracked storage by
  storage as tensors are made and freed;
- the latent cache's VAE encode (one image per call, as our cache builds it, no grad) likewise;
- FLOPs per image (torch.utils.flop_counter): VAE encode, both text encoders, the UNet's forward and its whole
  step (forward + backward, with checkpointing's recomputed forward).
Not included: the CUDA context and the caching allocator's slack (the whole-process figure adds them), and kernel
workspaces. The fake tensors are CPU ones: SDPA takes the CPU flash kernel, which like CUDA's flash and
memory-efficient kernels never holds the tokens × tokens matrix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdxl_shapes  # noqa: E402  (bench/, beside this file)

from lora_trainer.engine.preflight import LiveBytes  # noqa: E402  (the storages alive, the same counter as the trainer's)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MiB = 2**20


def fake_weights(model: torch.nn.Module) -> None:
    """Fake tensors in place of ``model``'s (meta) weights: trainable ones fp32, the rest bf16. Inside a fake mode."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                dtype = torch.float32 if p.requires_grad else torch.bfloat16
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype),
                                                              requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def models(rank: int, checkpointing: bool) -> dict:
    """SDXL's UNet (with LoRA), text encoders and VAE on the meta device, bf16."""
    from diffusers import AutoencoderKL
    from peft import LoraConfig

    torch.set_default_dtype(torch.bfloat16)
    try:
        out = sdxl_shapes.build_sdxl_models("meta")
        with torch.device("meta"):
            out["vae"] = AutoencoderKL.from_config(sdxl_shapes.VAE)
    finally:
        torch.set_default_dtype(torch.float32)
    for m in out.values():
        m.requires_grad_(False)
    out["unet"].add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    if checkpointing:
        out["unet"].enable_gradient_checkpointing()
    out["unet"].train()
    return out


def unet_inputs(batch: int, resolution: int) -> tuple:
    bf16 = torch.bfloat16
    added = {"text_embeds": torch.empty(batch, 1280, dtype=bf16), "time_ids": torch.empty(batch, 6, dtype=bf16)}
    latents = torch.empty(batch, 4, resolution // 8, resolution // 8, dtype=bf16)
    return latents, torch.zeros(batch, dtype=torch.long), torch.empty(batch, 77, 2048, dtype=bf16), added


def step_memory(unet, batch: int, resolution: int) -> int:
    """Peak bytes one training step holds beyond the weights (the second step: AdamW's states exist by then)."""
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    latents, timesteps, context, added = unet_inputs(batch, resolution)
    live = LiveBytes([*unet.parameters(), *unet.buffers(), latents, timesteps, context, *added.values()])
    with live:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = unet(latents, timesteps, context, added_cond_kwargs=added).sample
                loss = F.mse_loss(pred.float(), latents.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del pred, loss
    return live.peak


def encode_memory(vae, resolution: int) -> int:
    pixels = torch.empty(1, 3, resolution, resolution, dtype=torch.bfloat16)
    live = LiveBytes([*vae.parameters(), *vae.buffers(), pixels])
    with live, torch.no_grad():
        vae.encode(pixels).latent_dist.sample()
    return live.peak


def flops_per_image(parts: dict, resolution: int) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        parts["vae"].encode(torch.empty(1, 3, resolution, resolution, dtype=torch.bfloat16)).latent_dist.sample()
    out["vae_encode"] = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ids = torch.zeros(1, 77, dtype=torch.long)
        for name in ("text_encoder", "text_encoder_2"):
            parts[name](ids, output_hidden_states=True)
    out["text_encoders"] = fc.get_total_flops()
    latents, timesteps, context, added = unet_inputs(1, resolution)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = parts["unet"](latents, timesteps, context, added_cond_kwargs=added).sample
        out["unet_forward"] = fc.get_total_flops()
        F.mse_loss(pred.float(), latents.float()).backward()
    out["unet_step"] = fc.get_total_flops()
    return out


def main() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-checkpointing", action="store_true")
    args = p.parse_args()
    parts = models(args.rank, not args.no_checkpointing)
    counts = {name: sum(t.numel() for t in m.parameters() if not t.requires_grad) for name, m in parts.items()}
    lora = sum(t.numel() for t in parts["unet"].parameters() if t.requires_grad)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in parts.values():
            fake_weights(m)
        step = step_memory(parts["unet"], args.batch, args.resolution)
        encode = encode_memory(parts["vae"], args.resolution)
        flops = flops_per_image(parts, args.resolution)
    print(f"parameters: {', '.join(f'{k} {v:,}' for k, v in counts.items())}; LoRA rank {args.rank} {lora:,}")
    print(f"bf16 weights MB: {', '.join(f'{k} {2 * v / 1e6:,.1f}' for k, v in counts.items())}; "
          f"LoRA fp32 {4 * lora / 1e6:.1f}")
    print(f"training step at {args.resolution}², batch {args.batch}, "
          f"{'no checkpointing' if args.no_checkpointing else 'gradient checkpointing'}: peak beyond the weights "
          f"{step / 1e6:,.1f} MB ({step / MiB:,.0f} MiB; LoRA grads {4 * lora / 1e6:.1f} MB and AdamW states "
          f"{8 * lora / 1e6:.1f} MB included)")
    print(f"latent cache, VAE encode of one {args.resolution}² image: peak {encode / 1e6:,.1f} MB")
    print("TFLOP per image: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in flops.items()))


if __name__ == "__main__":
    main()
