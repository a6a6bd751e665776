"""The WebUI's SDXL: train the sgm ``DiffusionEngine`` A1111 has loaded, in place (``SgmBackend``).

What differs from SD 1.x (``models.ldm.LdmBackend``, whose LoRA, attention kernel, compile and restore it keeps):
- Conditioning. The WebUI's ``get_learned_conditioning`` returns ``{"crossattn", "vector"}``: crossattn is both
  encoders' hidden states side by side, vector the second encoder's pooled embedding followed by the
  size/crop embeddings of the conditioner's size embedders (the WebUI fills them from the generation's size).
  Per caption we keep crossattn and the pooled part; per image, ``predict`` makes the size/crop part from the
  image's own ids (``Conditioning.time_ids``) through those same embedders (SDXL micro-conditioning).
- The first text encoder is ``conditioner.embedders[0].wrapped.transformer`` (HF CLIP-L). sgm's conditioner runs
  an embedder under no_grad unless it ``is_trainable``: set for the run when that encoder trains. The second
  (open_clip bigG, whose attention is one fused nn.MultiheadAttention) is not trained here: peft 0.13.2, the
  WebUI's pin, cannot wrap it.
- The VAE: sgm's ``encode_first_stage`` returns a scaled sample; the latent cache wants the posterior.
- Gradient checkpointing: the WebUI's hook patches ldm's blocks only, and sgm's own reentrant checkpoint asks
  for gradients of every frozen weight: each sgm BasicTransformerBlock and ResBlock instance gets torch's
  non-reentrant checkpoint around its forward for the run.
No WebUI import here (the tests run it on a stand-in with sgm's module names and contract).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_trainer.errors import LoraTrainerError
from lora_trainer.models.base import TEXT_ENCODER, UNET
from lora_trainer.models.conditioning import Conditioning
from lora_trainer.models.ldm import LdmBackend
from lora_trainer.models.prompts import WINDOW
from lora_trainer.utils.checkpointing import disable_lora_checkpointing, enable_lora_checkpointing

# sgm's size/crop embedders by input key, in the order of a time_ids row's pairs (height/top first, as A1111)
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
TEXT_KEY = "txt"
_CHECKPOINTED = ("BasicTransformerBlock", "ResBlock")
_MARK = "_lora_trainer_checkpoint"


def size_embedders(conditioner) -> list[nn.Module]:
    """The conditioner's size/crop embedders in time_ids order; LoraTrainerError for a layout other than SDXL
    base's (text embedders first, then exactly these three: a refiner has an aesthetic score, for one)."""
    keys = [getattr(e, "input_key", None) for e in conditioner.embedders]
    text = [k for k in keys if k == TEXT_KEY]
    if not text or keys[: len(text)] != text or sorted(keys[len(text):]) != sorted(SIZE_KEYS):
        raise LoraTrainerError(f"the loaded SDXL model's conditioner takes {keys}; only SDXL base models and their "
                               f"finetunes (text, then {', '.join(SIZE_KEYS)}) are trained: not a refiner")
    by_key = dict(zip(keys, conditioner.embedders))
    return [by_key[k] for k in SIZE_KEYS]


def vae_posterior(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the KL autoencoder's posterior (CompVis' and sgm's: ``encoder`` then ``quant_conv``), as
    their DiagonalGaussianDistribution computes them, before the latent scale."""
    moments = vae.quant_conv(vae.encoder(pixels))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))


def _checkpointed_forward(forward, copy_input: bool = False):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # a block that changes its input in place gets a copy inside the checkpoint: the checkpoint keeps the input
        # for the recomputation, which must see it unchanged
        fn = (lambda x, *rest, **kw: forward(x.clone(), *rest, **kw)) if copy_input else forward
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


class SgmBackend(LdmBackend):
    """LdmBackend over an sgm DiffusionEngine (the WebUI's SDXL): ``conditioner``, ``apply_model(x, t, {crossattn,
    vector})``, ``encode_first_stage`` returning the scaled latent, ``alphas_cumprod``, ``parameterization``."""

    uses_time_ids = True

    def __init__(self, sd_model, *args, **kwargs):
        from lora_trainer.models.sdxl_backend import SDXL_KOHYA_PREFIXES

        self._sizes = size_embedders(sd_model.conditioner)  # first: a refused layout leaves the model untouched
        super().__init__(sd_model, *args, **kwargs)
        self.kohya_prefixes = SDXL_KOHYA_PREFIXES  # the UNet keeps its LDM names: kohya's SDXL naming as it is
        self.conditioner = sd_model.conditioner
        self._size_width = sum(2 * int(e.outdim) for e in self._sizes)  # (h, w) pairs, outdim each
        self._te_embedder = self.conditioner.embedders[0]

    def components(self) -> dict[str, nn.Module]:
        return {UNET: self.unet, TEXT_ENCODER: self.text_encoder}

    def encode_image_dist(self, pixels):
        vae = self.sd_model.first_stage_model
        with torch.no_grad():
            return vae_posterior(vae, pixels.to(self.device, dtype=next(vae.parameters()).dtype))

    def encode_prompts(self, captions, weighted: bool = False):
        """Each caption alone through the WebUI (literal unless ``weighted``): its first 77 tokens of crossattn,
        and the pooled embedding, the vector without the WebUI's size/crop part."""
        trains = self.text_encoder is not None and any(p.requires_grad for p in self.text_encoder.parameters())
        was = getattr(self._te_embedder, "is_trainable", False)
        self._te_embedder.is_trainable = trains and torch.is_grad_enabled()  # else sgm runs it under no_grad
        try:
            rows = [self.sd_model.get_learned_conditioning([p]) for p in self._prompts(captions, weighted)]
        finally:
            self._te_embedder.is_trainable = was
        pooled_width = rows[0]["vector"].shape[1] - self._size_width
        return Conditioning(torch.cat([r["crossattn"][:, :WINDOW] for r in rows]),
                            pooled=torch.cat([r["vector"][:, :pooled_width] for r in rows]))

    def size_vector(self, time_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The size/crop part of the vector for each image's (orig h, w, crop top, left, target h, w)."""
        ids = time_ids.to(self.device, dtype=dtype)
        with torch.no_grad():
            return torch.cat([e(ids[:, 2 * i : 2 * i + 2]).to(dtype) for i, e in enumerate(self._sizes)], dim=1)

    def predict(self, noisy_latents, timesteps, cond):
        if cond.pooled is None or cond.time_ids is None:
            raise ValueError("SDXL needs the pooled text embedding and each image's size/crop ids")
        vector = torch.cat([cond.pooled, self.size_vector(cond.time_ids, cond.pooled.dtype)], dim=1)
        return self._apply(noisy_latents, timesteps, {"crossattn": cond.context, "vector": vector})

    def enable_gradient_checkpointing(self, text_encoder: bool) -> None:
        """torch's non-reentrant checkpoint around each transformer block and ResBlock of the UNet (instance
        forwards, taken out by ``disable_gradient_checkpointing``); the first encoder's own, if it trains."""
        checkpoint_blocks(self.unet)
        if text_encoder and self.text_encoder is not None:
            enable_lora_checkpointing(self.text_encoder)

    def disable_gradient_checkpointing(self) -> None:
        uncheckpoint_blocks(self.unet)
        if self.text_encoder is not None:
            disable_lora_checkpointing(self.text_encoder)


def checkpoint_blocks(unet: nn.Module, copy_inputs: tuple[str, ...] = ()) -> int:
    """torch's non-reentrant checkpoint around the forward of each BasicTransformerBlock and ResBlock instance of an
    LDM-named UNet (sgm's, Forge's: both refuse or misuse their own); returns how many. Instance attributes only:
    ``uncheckpoint_blocks`` takes them out, and a forward set on the instance before is put back. The blocks whose
    class is named in ``copy_inputs`` get a copy of their input (Forge's transformer blocks add to it in place)."""
    count = 0
    for module in unet.modules():
        name = type(module).__name__
        if name in _CHECKPOINTED and _MARK not in vars(module):
            setattr(module, _MARK, vars(module).get("forward"))
            module.forward = _checkpointed_forward(module.forward, copy_input=name in copy_inputs)
            count += 1
    return count


def restore_forwards(root: nn.Module, mark: str) -> None:
    """Put back the forward of every module of ``root`` that a wrapper marked with ``mark`` (the instance's own
    forward saved under it; None: the class's)."""
    for module in root.modules():
        state = vars(module)
        if mark in state:
            previous = state.pop(mark)
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def uncheckpoint_blocks(unet: nn.Module) -> None:
    restore_forwards(unet, _MARK)


def is_sgm_model(sd_model) -> bool:
    return isinstance(getattr(sd_model, "conditioner", None), nn.Module)

