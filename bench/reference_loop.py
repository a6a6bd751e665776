"""The LoRA training loops of the diffusers examples, reduced to their steps: train_text_to_image_lora.py (SD 1.x/2.x)
and train_text_to_image_lora_sdxl.py (SDXL).

What the benchmark compares our trainer with: VAE and text encoder(s) every step, images decoded by a
DataLoader every step, default attention (SDPA), torch AdamW, bf16 autocast on CUDA. The two scripts share the
loop; what differs is ``Recipe``'s: SDXL's conditioning is both encoders' penultimate hidden states side by side
plus the second's pooled embedding and each image's six size/crop ids (``add_time_ids``), and its VAE stays in
fp32 ("to avoid NaN losses", as the script keeps it without --pretrained_vae_model_name_or_path). Also the FLOP
count of one training step, for the model FLOPs utilisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class Recipe:
    """The model parts of the diffusers script for ``model`` (an SD or SDXL diffusers folder or built-in name)."""

    def __init__(self, model: str, device, dtype):
        import torch
        from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        from lora_trainer.models.diffusers_backend import resolve_base_model
        from lora_trainer.models.sdxl_backend import is_sdxl_model, resolve_sdxl_model

        self.sdxl, self.device, self.dtype = is_sdxl_model(model), device, dtype
        if self.sdxl:
            pipe = StableDiffusionXLPipeline.from_pretrained(resolve_sdxl_model(model), local_files_only=True)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model(model), local_files_only=True,
                                                           safety_checker=None)
        self.unet, self.vae = pipe.unet, pipe.vae
        self.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.sdxl else [])
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.sdxl else [])
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.vae_dtype = torch.float32 if self.sdxl else dtype
        for m in (self.unet, *self.text_encoders):
            m.requires_grad_(False)
            m.to(device, dtype=dtype)
        self.vae.requires_grad_(False)
        self.vae.to(device, dtype=self.vae_dtype)

    def latents(self, pixels):
        latents = self.vae.encode(pixels.to(self.device, dtype=self.vae_dtype)).latent_dist.sample()
        return (latents * self.vae.config.scaling_factor).to(self.dtype)

    def token_ids(self, captions: list[str]) -> list:
        return [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(self.device) for tok in self.tokenizers]

    def condition(self, ids: list, time_ids=None):
        """(encoder_hidden_states, added_cond_kwargs) as each script computes them (SDXL: its encode_prompt)."""
        import torch

        if not self.sdxl:
            return self.text_encoders[0](ids[0], return_dict=False)[0], None
        states = []
        for text_encoder, input_ids in zip(self.text_encoders, ids):
            out = text_encoder(input_ids, output_hidden_states=True, return_dict=False)
            pooled, hidden = out[0], out[-1][-2]  # the last encoder's pooled output; each one's penultimate layer
            states.append(hidden)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(self.device, dtype=self.dtype)}
        return torch.cat(states, dim=-1), added


def reference_steps(args, data: Path, model: str) -> Iterator[None]:
    """Yields after each optimizer step (on CUDA, after the GPU finished it), for as long as it is asked."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from lora_trainer.data.dataset import ImageDataset, collate, scan_dataset

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    recipe = Recipe(model, device, dtype)
    unet = recipe.unet
    rank = getattr(args, "rank", 8)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    dataset = ImageDataset(scan_dataset(data).samples, args.resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=collate)
    autocast = torch.autocast("cuda", dtype=dtype) if args.device == "cuda" else torch.autocast("cpu", enabled=False)
    scheduler = recipe.noise_scheduler
    while True:
        for batch in loader:
            with autocast:
                latents = recipe.latents(batch["pixel_values"])
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                # SDXL: (original size, crop top-left, target size) of each image, as the script's compute_time_ids
                time_ids = dataset.time_ids(batch["indices"]) if recipe.sdxl else None
                context, added = recipe.condition(recipe.token_ids(batch["captions"]), time_ids)
                pred = unet(noisy, timesteps, context, added_cond_kwargs=added, return_dict=False)[0]
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
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    recipe = Recipe(model, device, dtype)
    rank = getattr(args, "rank", 8)
    recipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    b, r = args.batch, args.resolution
    pixels = torch.randn(b, 3, r, r, device=device)
    ids = [torch.randint(0, tok.vocab_size, (b, tok.model_max_length), device=device) for tok in recipe.tokenizers]
    time_ids = torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=torch.float32)
    flops = {}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        latents = recipe.latents(pixels)
    flops["vae_encode"] = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        cond, added = recipe.condition(ids, time_ids)
    flops["text_encoder"] = fc.get_total_flops()
    t = torch.randint(0, 1000, (b,), device=device)
    with FlopCounterMode(display=False) as fc, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = recipe.unet(latents, t, cond, added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), torch.randn_like(pred.float())).backward()
    flops["unet_step"] = fc.get_total_flops()
    return {k: v / b for k, v in flops.items()}
