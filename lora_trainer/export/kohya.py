"""The kohya-format LoRA file that AUTOMATIC1111, Forge, ComfyUI and diffusers load.

Keys: ``<prefix><module path, '.'→'_'>.lora_down.weight`` ([r, in], conv [r, in, k, k]),
``.lora_up.weight`` ([out, r], conv [out, r, 1, 1]) and ``.alpha`` (0-d, the true lora_alpha: the
strength scale is alpha / r; in the save dtype, as kohya writes it, and where that dtype cannot hold it exactly
lora_up takes the rounding: ``alpha_tensor``).
Prefixes: ``lora_unet_``, ``lora_te_`` (SD1/SD2), ``lora_te1_``/``lora_te2_`` (SDXL).
UNet module names: an SD 1.x/2.x LoRA keeps diffusers' (``down_blocks_0_attentions_0_…``); an SDXL LoRA gets
the original (LDM/sgm) block names (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), as kohya writes
them, through ``LdmUnetNames``; a file never mixes the two.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from lora_trainer.export.hashes import legacy_hash, model_hash
from lora_trainer.utils.fsio import write_new

log = logging.getLogger(__name__)

PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# <module path>.lora_A.weight, or with peft's adapter name: <module path>.lora_A.default.weight
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_WRAPPER = "base_model.model."  # what a PeftModel puts in front of every path
# transformers >= 5 dropped CLIPTextModel's ``text_model`` level; checkpoints and the WebUI keep it
_CLIP_TOP_LEVELS = ("embeddings.", "encoder.", "final_layer_norm.")


def split_peft_key(key: str) -> tuple[str, str]:
    """``'a.b.lora_A.default.weight'`` → ``('a.b', 'A')``; ValueError naming a key that is no LoRA weight."""
    m = _PEFT_KEY.match(key)
    if not m:
        raise ValueError(f"not a peft LoRA weight key: {key!r} (expected <module>.lora_A/B.weight)")
    module = m["module"].removeprefix(_PEFT_WRAPPER)
    return module, m["ab"]


def clip_text_model_path(module_path: str) -> str:
    """A CLIP text-encoder path as checkpoints and the WebUI name it: ``text_model.encoder.layers.0…``."""
    return "text_model." + module_path if module_path.startswith(_CLIP_TOP_LEVELS) else module_path


def kohya_name(module_path: str, prefix: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` → ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown kohya prefix {prefix!r}; one of {PREFIXES}")
    if prefix != "lora_unet_":
        module_path = clip_text_model_path(module_path)
    return prefix + module_path.replace(".", "_")


def peft_to_kohya(state_dict: dict, prefix: str, alpha: float, dtype: torch.dtype | None = None,
                  rename: Callable[[str], str] | None = None, family: str | None = None,
                  alphas: dict[str, float] | None = None) -> dict:
    """peft LoRA weights (from ``get_peft_model_state_dict``) → kohya tensors with the true ``alpha``.

    ``rename``: module path → the path the file names it by (``LdmUnetNames`` for an SDXL UNet). Text-encoder
    paths get CLIP's ``text_model.`` level back if the transformers version dropped it. With ``lora_te2_`` (SDXL's
    second text encoder) a layer with some of the q/k/v/out projections gets zero modules for the others, which
    AUTOMATIC1111 needs to apply any of them (``_complete_te2_attention``); so does a ``lora_te_`` text encoder that
    is SD 2.x's (open_clip's in the WebUI); any other ``lora_te_``/``lora_te1_`` layer with q/k/v projections but no
    out_proj gets a zero out_proj, which diffusers needs to read the file (``_complete_te_out_proj``).
    ``family``: the model's family where the caller knows it (``backend.family``: ``sd_v1``, ``sd_v2``,
    ``sd_v2_768_v``, ``sdxl``): SD 2.x's (``sd_v2…``) ``lora_te_`` encoder is open_clip's, any other family's is not,
    whatever its width; None (a caller that does not know): guessed from the encoder's width (1024: SD 2.x's,
    ``_open_clip_width``).
    An ``alpha`` that ``dtype`` cannot hold (0.3 in fp16: 0.30005, in bf16: 0.30078) is written as ``dtype`` holds it
    and each lora_up takes the rest (``alpha_tensor``), so the file's ``alpha / rank · up · down`` is the trained scale.
    ``alphas``: module path → its alpha where it is not ``alpha`` (``engine.lora.lora_alphas``: kohya's conv_alpha).
    Raises ValueError on a key that is not a LoRA A/B weight, or a module without both A and B.
    """
    held = {}  # alpha → (as the file holds it, lora_up's factor)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, ab = split_peft_key(key)
        a = float((alphas or {}).get(module, alpha))
        if a not in held:
            held[a] = alpha_tensor(a, dtype or torch.float32)
        written, factor = held[a]
        name = kohya_name(rename(module) if rename else module, prefix)
        target = f"{name}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"
        if target in out:
            raise ValueError(f"{key!r}: a second weight for {target} (two adapters in the state dict?)")
        tensor = tensor.detach().to("cpu")
        if ab == "B" and factor != 1.0:
            tensor = tensor.float() * factor
        out[target] = tensor.to(dtype=dtype or tensor.dtype).contiguous()
        out[f"{name}.alpha"] = written.clone()
    for name in {k.removesuffix(".alpha") for k in out if k.endswith(".alpha")}:
        for part, peft_part in (("lora_down", "lora_A"), ("lora_up", "lora_B")):
            if f"{name}.{part}.weight" not in out:
                raise ValueError(f"{name}: the state dict has no {peft_part} weight for this module")
    open_clip = family.startswith("sd_v2") if family else _open_clip_width(out)
    if prefix == "lora_te2_" or (prefix == "lora_te_" and open_clip):
        _complete_te2_attention(out)
    elif prefix in ("lora_te_", "lora_te1_"):
        _complete_te_out_proj(out)
    return out


def alpha_tensor(alpha: float, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(``alpha`` as the 0-d ``dtype`` tensor a file holds, the factor its module's lora_up takes so that the file's
    ``alpha / rank · up · down`` keeps ``alpha`` exactly): 1.0 where ``dtype`` holds ``alpha`` (within float32's
    precision); else ``alpha / (alpha in dtype)``: fp16 rounds alpha by up to 2⁻¹¹ (0.3 → 0.30005, +0.016%), bf16 by
    up to 2⁻⁸ (0.3 → 0.30078, +0.26%; 257 → 256), one error in the scale of every weight of the module, where the
    weights' own rounding errors are each their own. An alpha ``dtype`` cannot hold at all (under- or overflow), or an
    integer ``dtype``, is written in float32."""
    alpha = float(alpha)
    if not dtype.is_floating_point:  # (an integer alpha, as kohya's svd_merge_lora.py writes the rank)
        dtype = torch.float32
    written = torch.tensor(alpha, dtype=dtype)
    held = float(written)
    if alpha == 0 or held == alpha:
        return written, 1.0
    if held == 0 or not math.isfinite(held):
        return torch.tensor(alpha, dtype=torch.float32), 1.0
    factor = alpha / held
    return written, (1.0 if abs(factor - 1) <= 2**-23 else factor)


_OPEN_CLIP_ATTENTION = re.compile(r"^(?P<layer>lora_te2?_text_model_encoder_layers_\d+_self_attn_)"
                                  r"(?P<proj>q|k|v|out)_proj$")  # (lora_te_: SD 2.x's, by family or width)
_TE_ATTENTION = re.compile(r"^(?P<layer>lora_te1?_text_model_encoder_layers_\d+_self_attn_)(?P<proj>q|k|v|out)_proj$")


SD2_TEXT_WIDTH = 1024  # SD 2.x's text encoder (OpenCLIP ViT-H; SD 1.x's CLIP ViT-L is 768 wide)


def _open_clip_width(out: dict) -> bool:
    """Whether a ``lora_te_`` text encoder's attention is SD 2.x's, guessed from its width where the caller of
    peft_to_kohya does not know the family: the WebUI runs that encoder as open_clip's, whose fused attention takes
    the four projections or none, as SDXL's second encoder does."""
    return any(_TE_ATTENTION.match(k.partition(".")[0]) and k.endswith(".lora_down.weight")
               and out[k].shape[-1] == SD2_TEXT_WIDTH for k in out)


def _complete_te_out_proj(out: dict) -> None:
    """A zero ``…_self_attn_out_proj`` module for each layer of a ``lora_te_``/``lora_te1_`` text encoder that has
    q/k/v projections but no out_proj, in place (as _complete_te2_attention does for all four).

    diffusers' ``load_lora_weights`` tells the old-format text-encoder dict it converts kohya's keys to by an
    out_proj key (``to_out_lora``; 0.30 to 0.42 ``convert_state_dict_to_diffusers``): without one it stops with
    "Could not automatically infer state dict type" (``target_modules: [q_proj, v_proj]``, or the UNet's
    ``to_q..to_out.0`` which give the text encoder q, k, v only). A zero module changes nothing (up = 0).
    """
    _complete_attention(out, _TE_ATTENTION, {"out"})


def _complete_te2_attention(out: dict) -> None:
    """Zero LoRA modules for the q/k/v/out projections a layer of SDXL's second text encoder (or SD 2.x's ``lora_te_``
    one, _open_clip_width) lacks, in place.

    In AUTOMATIC1111 that encoder is open_clip's, its attention one ``nn.MultiheadAttention`` (q, k, v fused in
    ``in_proj_weight``), and the WebUI changes it only when ``…_q_proj``, ``_k_proj``, ``_v_proj`` and ``_out_proj``
    are all in the file (v1.10.1 ``extensions-builtin/Lora/networks.py`` ``network_apply_weights``): a LoRA trained
    on q and v alone would be dropped without a word. A zero module changes nothing (up = 0); the four projections
    of a CLIP layer are all hidden × hidden, so the missing ones take a present one's shapes and alpha.
    """
    _complete_attention(out, _OPEN_CLIP_ATTENTION, {"q", "k", "v", "out"})


def _complete_attention(out: dict, pattern: re.Pattern, wanted: set[str]) -> None:
    """Zero modules for the projections in ``wanted`` that a layer (``pattern``'s ``layer``) with some of its
    attention projections lacks, in place, with a present one's shapes and alpha."""
    layers: dict[str, set[str]] = {}
    for key in out:
        if m := pattern.match(key.partition(".")[0]):
            layers.setdefault(m["layer"], set()).add(m["proj"])
    for layer, present in layers.items():
        like = f"{layer}{sorted(present)[0]}_proj"
        for proj in wanted - present:
            for part in ("lora_down.weight", "lora_up.weight"):
                out[f"{layer}{proj}_proj.{part}"] = torch.zeros_like(out[f"{like}.{part}"])
            out[f"{layer}{proj}_proj.alpha"] = out[f"{like}.alpha"].clone()


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TRANSFORMER = ("norm", "proj_in", "transformer_blocks", "proj_out")
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK = re.compile(r"^(?P<where>down_blocks|up_blocks)\.(?P<i>\d+)\."
                    r"(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<j>\d+)\.(?P<rest>.+)$")
_MID = re.compile(r"^mid_block\.(?P<kind>resnets|attentions)\.(?P<j>\d+)\.(?P<rest>.+)$")


class LdmUnetNames:
    """A diffusers UNet2DConditionModel's module path → the original (LDM/sgm) UNet's, as in the checkpoints
    the WebUIs load and the files kohya writes: ``down_blocks.1.attentions.0.proj_in`` →
    ``input_blocks.4.1.proj_in``, ``up_blocks.0.resnets.1.conv1`` → ``output_blocks.1.0.in_layers.2``,
    ``add_embedding.linear_1`` → ``label_emb.0.0``. The inverse of the block arithmetic the WebUI's and
    diffusers' loaders use. Built from the UNet's config (``layers_per_block``, ``up_block_types``); a path
    it has no name for raises ValueError (a file must never mix the two namings)."""

    def __init__(self, unet_config):
        per_block = unet_config["layers_per_block"] if isinstance(unet_config, dict) else unet_config.layers_per_block
        up_types = unet_config["up_block_types"] if isinstance(unet_config, dict) else unet_config.up_block_types
        if not isinstance(per_block, int):
            raise ValueError(f"layers_per_block {per_block!r}: LDM names need one number for every level")
        self.per_block = per_block
        self.up_has_attention = ["CrossAttn" in t for t in up_types]

    def __call__(self, path: str) -> str:
        for name, ldm in _TOP.items():
            if path == name or path.startswith(name + "."):
                return ldm + path[len(name):]
        n = self.per_block
        m = _BLOCK.match(path)
        if m:
            i, j, kind, rest = int(m["i"]), int(m["j"]), m["kind"], m["rest"]
            if m["where"] == "down_blocks":
                if kind == "downsamplers" and rest.startswith("conv"):
                    return f"input_blocks.{(i + 1) * (n + 1)}.0.op{rest[len('conv'):]}"
                if kind in ("resnets", "attentions"):
                    return f"input_blocks.{1 + i * (n + 1) + j}.{self._inner(kind, rest, path, slot=True)}"
            else:
                if kind == "upsamplers" and rest.startswith("conv"):
                    slot = 2 if self.up_has_attention[i] else 1
                    return f"output_blocks.{i * (n + 1) + n}.{slot}.conv{rest[len('conv'):]}"
                if kind in ("resnets", "attentions"):
                    return f"output_blocks.{i * (n + 1) + j}.{self._inner(kind, rest, path, slot=True)}"
        m = _MID.match(path)
        if m:
            j, kind = int(m["j"]), m["kind"]
            return f"middle_block.{1 if kind == 'attentions' else 2 * j}.{self._inner(kind, m['rest'], path)}"
        raise ValueError(f"no LDM name for the UNet module {path!r}")

    @staticmethod
    def _inner(kind: str, rest: str, path: str, slot: bool = False) -> str:
        """The path inside a ResBlock or SpatialTransformer (``slot``: after its place in the level's
        TimestepEmbedSequential: 0 the ResBlock, 1 the transformer)."""
        head, _, tail = rest.partition(".")
        if kind == "attentions":  # Transformer2DModel's inner names are SpatialTransformer's
            if head not in _TRANSFORMER:
                raise ValueError(f"no LDM name for the UNet module {path!r}")
            return ("1." if slot else "") + rest
        if head not in _RESNET:
            raise ValueError(f"no LDM name for the UNet module {path!r}")
        return ("0." if slot else "") + _RESNET[head] + (f".{tail}" if tail else "")


def _check_metadata(metadata: dict) -> None:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata {key!r} must be a string, got {type(value).__name__}: {value!r}")


def serialize_with_hashes(tensors: dict, metadata: dict[str, str]) -> bytes:
    """The file's bytes with ``sshs_model_hash`` / ``sshs_legacy_hash`` added to the metadata.

    As kohya's ``precalculate_safetensors_hashes``: the hashes are taken on the file serialized with the
    ``ss_*`` metadata only (the training facts), so editing other metadata later does not change them.
    """
    _check_metadata(metadata)
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    hashed = save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash(hashed), legacy_hash(hashed)
    return save(tensors, metadata=meta)


def save_kohya_lora(path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write the LoRA with its hashes; never overwrites (``name_1.safetensors`` if the name is taken).

    Returns the path actually written. All metadata values must be ``str`` (TypeError naming the key).
    """
    data = serialize_with_hashes(tensors, metadata)
    path = Path(path)
    written = write_new(path, lambda p: p.write_bytes(data))
    if written != path:
        log.warning("%s already exists; not overwriting it: wrote %s instead", path, written.name)
    return written


def read_kohya_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
