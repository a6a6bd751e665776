"""The LoRA training loop of the diffusers documentation (train_text_to_image_lora.py), reduced to its steps.

What the benchmark compares our trainer with: VAE and text encoder every step, images decoded by a
DataLoader every step, default attention (SDPA), torch AdamW, bf16 autocast on CUDA. Also the FLOP
count of one training step, for the model FLOPs utilisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def reference_steps(args, data: Path, model: str) -> Iterator[None]:
    """Yields after each optimizer step (on CUDA, after the GPU finished it), for as long as it is asked."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    from lora_trainer.data.dataset import ImageDataset, collate, scan_dataset
    from lora_trainer.models.diffusers_backend import resolve_base_model

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model(model), local_files_only=True,
                                                   safety_checker=None)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.to(device, dtype=dtype)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    samples = scan_dataset(data).samples
    loader = torch.utils.data.DataLoader(ImageDataset(samples, args.resolution), batch_size=args.batch,
                                         shuffle=True, collate_fn=collate)
    autocast = torch.autocast("cuda", dtype=dtype) if args.device == "cuda" else torch.autocast("cpu", enabled=False)
    while True:
        for batch in loader:
            pixels = batch["pixel_values"].to(device, dtype=dtype)
            with autocast:
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                ids = tokenizer(batch["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(device)
                encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
                pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if args.device == "cuda":
                torch.cuda.synchronize()
            yield


def count_flops(args, model: str) -> dict:
    """FLOPs of one training step per image, by part (torch.utils.flop_counter), without checkpointing."""
    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from lora_trainer.models.diffusers_backend import resolve_base_model

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model(model), local_files_only=True,
                                                   safety_checker=None).to(device, dtype=dtype)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    b, r = args.batch, args.resolution
    pixels = torch.randn(b, 3, r, r, device=device, dtype=dtype)
    ids = torch.randint(0, pipe.tokenizer.vocab_size, (b, pipe.tokenizer.model_max_length), device=device)
    flops = {}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        latents = pipe.vae.encode(pixels).latent_dist.sample()
    flops["vae_encode"] = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        cond = pipe.text_encoder(ids)[0]
    flops["text_encoder"] = fc.get_total_flops()
    t = torch.randint(0, 1000, (b,), device=device)
    with FlopCounterMode(display=False) as fc, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = pipe.unet(latents, t, cond).sample
        F.mse_loss(pred.float(), torch.randn_like(pred.float())).backward()
    flops["unet_step"] = fc.get_total_flops()
    return {k: v / b for k, v in flops.items()}
