"""Shrink a kohya-format LoRA's rank after training (``python -m lora_trainer resize``), as kohya's
networks/resize_lora.py does: each module's ``up · down`` product through an SVD, its largest singular values kept,
the new alpha set so the module's scale ``alpha / rank`` stays what it was.

A rank is fixed (``rank``: each module keeps at most that many) or chosen per module (``energy`` E, 0 < E <= 1: the
share of the module's Frobenius norm to keep). With E, a module with singular values s₁ ≥ s₂ ≥ … ≥ s_r keeps the
fewest k of them whose squares reach E² of the squared norm: the least k with s₁² + … + s_k² >= E² · (s₁² + … + s_r²)
(at least 1, at most its rank r; a zero module, s₁ <= 1e-6, keeps 1), so what it keeps is at least E of its norm
(``Resized.kept``). That is kohya's ``--dynamic_method sv_fro --dynamic_param E`` with ``--new_rank`` at the file's
rank or above, as sd-scripts computes it since its PR #2194 (``index_sv_fro``: ``searchsorted(cumsum(S²) / sum(S²),
E²)``, clamped to [0, len(S) - 1], plus 1 in ``rank_resize``); sd-scripts before that fix added 1 twice and kept one
more (at least 2) per module. Kohya's clamp to ``len(S) - 1`` (S: all min(out, in) singular values of the module,
those past its rank numerically zero) bounds its rank by the module's width; ours is bounded by the module's rank too,
which kohya's ``--new_rank`` is for: at E = 1 kohya can keep numerically-zero dimensions past the module's rank, up to
--new_rank, where this keeps the rank (the same product).

Linear and convolution (LoCon) modules are resized; other module types (LoHa, LoKr, DoRA, LyCORIS's CP-decomposed
LoCon, ...) are refused by name, never dropped. One module at a time is read from the file, so memory stays at the
LoRA's size. The new alpha is written in the file's alpha dtype; where that dtype cannot hold it exactly, the module's
lora_up takes the difference (export.kohya.alpha_tensor), so the scale is kept exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lora_trainer.errors import LoraTrainerError

PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")
MIN_SV = 1e-6  # a module whose largest singular value is at most this is zero: --energy keeps 1 (as kohya)


@dataclass(frozen=True)
class Resized:
    """One module: its name, rank before and after, and the share of its Frobenius norm kept (1.0: lossless)."""

    name: str
    rank: int
    new_rank: int
    kept: float
    norm: float  # the module's delta weight's Frobenius norm (scale included), for the overall share


@dataclass(frozen=True)
class ResizeReport:
    path: Path
    modules: list[Resized]

    @property
    def kept(self) -> float:
        """The share of the whole LoRA's Frobenius norm kept (over all modules' delta weights)."""
        total = sum(m.norm**2 for m in self.modules)
        return math.sqrt(sum((m.kept * m.norm) ** 2 for m in self.modules) / total) if total else 1.0

    def summary(self, worst: int = 5) -> str:
        ranks = sorted({m.new_rank for m in self.modules})
        shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]} (per module)"
        low = sorted(self.modules, key=lambda m: m.kept)[:worst]
        lines = [f"resized {len(self.modules)} modules to rank {shown}: {self.kept:.2%} of the Frobenius norm kept "
                 f"-> {self.path}",
                 "least kept: " + ", ".join(f"{m.name} {m.rank}->{m.new_rank} {m.kept:.2%}" for m in low)]
        return "\n".join(lines)


def open_lora(path, command: str = "resize", what: str = "--lora"):
    """``path`` opened with safetensors (``safe_open``, a context manager); a file that is not one (a pickle renamed,
    a cut-off download) is a LoraTrainerError naming it, not safetensors' own error from deep in the command."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise LoraTrainerError(f"{command}: {what} {path} is not a safetensors file, or damaged ({e}): give the "
                               ".safetensors file as it was written (pickled .ckpt/.pt files are never "
                               "loaded)") from None


def lora_out(out, command: str) -> Path:
    """``out`` as a new LoRA file's path: a name ending in .safetensors that is not a folder (else a LoraTrainerError
    naming it); a taken file name is fine (save_kohya_lora writes ``out_1`` beside it), a folder would become
    ``<folder>_1`` without a word."""
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise LoraTrainerError(f"{command}: --out {out} must end in .safetensors ({command} writes a LoRA file)")
    if out.is_dir():
        raise LoraTrainerError(f"{command}: --out {out} is a folder: give a file name ending in .safetensors")
    return out


def modules_of(keys, command: str = "resize", source="", f=None) -> list[str]:
    """The module names of a LoRA's keys (``source``: the file, for the messages); a key of another kind (LoHa's
    hada_*, LoKr's lokr_*, DoRA's dora_scale) is a LoraTrainerError naming it (and ``command``, the one that cannot
    take it), and so is a module without its lora_down or lora_up weight (an alpha alone is fine: alpha = rank),
    which could neither be merged nor dropped without changing what the file does. With ``f`` (the open file) a
    module whose lora_up does not take lora_down's rank is one too (a damaged file: its product does not exist)."""
    parts: dict[str, set[str]] = {}
    other = []
    for key in keys:
        part = next((p for p in PARTS if key.endswith(p)), None)
        if part is None:
            other.append(key)
        else:
            parts.setdefault(key[: -len(part)], set()).add(part)
    where = f" in {source}" if source else ""
    mid = sorted(k for k in other if k.endswith(".lora_mid.weight"))
    if mid:
        raise LoraTrainerError(f"{command}: {len(mid)} modules{where} have a lora_mid weight (e.g. {mid[0]}): that is "
                               "LyCORIS's CP-decomposed LoCon (a convolution split into lora_down, lora_mid and "
                               f"lora_up; LyCORIS's use_cp / use_tucker), which {command} cannot take: it takes plain "
                               "LoRA/LoCon modules only (.lora_down.weight, .lora_up.weight, .alpha)")
    if other:
        raise LoraTrainerError(f"{command}: {len(other)} tensors{where} are not LoRA up/down/alpha weights (e.g. "
                               f"{', '.join(sorted(other)[:3])}): LoHa, LoKr or DoRA modules cannot be {command}d here")
    incomplete = [f"{name} has no {need}" for name, have in sorted(parts.items())
                  for need in PARTS[:2] if need not in have]
    if incomplete:
        raise LoraTrainerError(f"{command}: {len(incomplete)} modules{where} are incomplete "
                               f"({', '.join(incomplete[:3])}): each module needs its .lora_down.weight and "
                               ".lora_up.weight (.alpha is optional); the file is damaged or not a kohya-format LoRA")
    if f is not None:
        _check_ranks(f, sorted(parts), command, where)
    return sorted(parts)


def _check_ranks(f, names: list[str], command: str, where: str) -> None:
    """A LoraTrainerError naming the modules of ``f`` whose lora_up ([out, r] or [out, r, 1, 1]) does not take the
    rank of their lora_down ([r, in] or [r, in, k, k])."""
    wrong = []
    for name in names:
        down = f.get_slice(name + ".lora_down.weight").get_shape()
        up = f.get_slice(name + ".lora_up.weight").get_shape()
        if len(down) < 2 or len(up) < 2 or up[1] != down[0] or any(n != 1 for n in up[2:]):
            wrong.append(f"{name}: lora_up {list(up)}, lora_down {list(down)}")
    if wrong:
        raise LoraTrainerError(f"{command}: {len(wrong)} modules{where} have a lora_up that does not take the rank of "
                               f"their lora_down ({'; '.join(wrong[:3])}): the file is damaged")


def svd_resize(down: torch.Tensor, up: torch.Tensor, alpha: float, rank: int | None, energy: float | None,
               device="cpu", alpha_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(new down, new up, new alpha, share of the norm kept) of one module; in float32, returned in the input's
    dtype. A convolution's down is (r, in, kh, kw) and its up (out, r, 1, 1). ``rank``: keep at most that many
    singular values; ``energy`` E: the fewest whose squares reach E² of their sum (the module docstring; kohya's
    sv_fro). The new alpha is ``alpha · new rank / old rank`` (the scale kept); with ``alpha_dtype`` it is one that
    dtype holds, the rounding taken by the new up (export.kohya.alpha_tensor)."""
    from lora_trainer.export.kohya import alpha_tensor

    old_rank = down.shape[0]
    w = up.reshape(up.shape[0], old_rank).to(device, torch.float32) @ down.reshape(old_rank, -1).to(device,
                                                                                                      torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s = s[:old_rank]  # (at most min(rows, columns, old rank) of them: a module narrower than its rank has fewer)
    energy_of = s**2
    total = float(energy_of.sum())
    if energy is not None:
        new = energy_rank(s, energy)
    else:
        new = rank
    new = max(1, min(new, len(s)))
    root = s[:new].sqrt()
    new_down = (root[:, None] * vh[:new]).reshape(new, *down.shape[1:])
    new_up = (u[:, :new] * root[None, :]).reshape(up.shape[0], new, *up.shape[2:])
    kept = math.sqrt(float(energy_of[:new].sum()) / total) if total > 0 else 1.0
    new_alpha = alpha * new / old_rank
    if alpha_dtype is not None:
        written, factor = alpha_tensor(new_alpha, alpha_dtype)
        new_alpha, new_up = float(written), new_up * factor
    new_down, new_up = new_down.to("cpu", down.dtype).contiguous(), new_up.to("cpu", up.dtype).contiguous()
    return new_down, new_up, new_alpha, kept


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The rank ``--energy`` keeps of a module with singular values ``s`` (descending): the fewest whose squares reach
    ``energy²`` of their sum (at least 1, at most len(s)); 1 for a zero module (s₁ <= MIN_SV). Kohya's sv_fro since
    sd-scripts PR #2194: ``searchsorted(cumsum(s²) / sum(s²), energy²) + 1``."""
    if not len(s) or float(s[0]) <= MIN_SV:
        return 1
    squares = s.float() ** 2
    share = torch.cumsum(squares, 0) / float(squares.sum())
    new = int(torch.searchsorted(share, torch.tensor(energy**2, device=share.device)).item()) + 1
    return max(1, min(new, len(s)))


def resize_lora(path, out, rank: int | None = None, energy: float | None = None, device: str = "cpu"):
    """Write ``path`` resized (``rank`` or ``energy``) to ``out`` (never over an existing file: ``out_1``); the
    ResizeReport. The metadata keeps the training facts, with ss_network_dim/ss_network_alpha of the new file
    ("Dynamic" where modules differ, as kohya writes) and the original rank in ss_training_comment."""
    from lora_trainer.export.kohya import alpha_tensor, save_kohya_lora
    from lora_trainer.export.merge_loras import family_metadata, lora_family

    if (rank is None) == (energy is None):
        raise LoraTrainerError("resize: give either --rank R (a number of dimensions) or --energy E (0 < E <= 1)")
    if rank is not None and rank < 1:
        raise LoraTrainerError(f"resize: --rank {rank} must be 1 or more")
    if energy is not None and not 0 < energy <= 1:
        raise LoraTrainerError(f"resize: --energy {energy} must be above 0 and at most 1 (e.g. 0.95)")
    path, out = Path(path).expanduser(), lora_out(out, "resize")
    if not path.is_file() or path.suffix != ".safetensors":
        raise LoraTrainerError(f"resize: {path} is not a .safetensors LoRA file")
    tensors, modules = {}, []
    with open_lora(path) as f:
        meta = dict(f.metadata() or {})
        names = modules_of(f.keys(), source=path, f=f)
        # the ss_* keys written below make the WebUI take a file that names no family for SD 1.x: name the one its
        # keys or widths tell (merge_loras.family_metadata)
        meta |= family_metadata(meta, lora_family(meta, f, list(f.keys()))[0])
        if not names:
            raise LoraTrainerError(f"resize: {path} holds no LoRA modules (no *.lora_down.weight tensors)")
        for name in names:
            down, up = f.get_tensor(name + ".lora_down.weight"), f.get_tensor(name + ".lora_up.weight")
            old_alpha = f.get_tensor(name + ".alpha") if name + ".alpha" in f.keys() else None  # (none: alpha = rank)
            alpha = float(old_alpha) if old_alpha is not None else float(down.shape[0])
            # (kohya's svd_merge_lora.py writes alpha as an int64 rank: a new alpha of 2.5 is written in float32)
            alpha_dtype = old_alpha.dtype if old_alpha is not None and old_alpha.is_floating_point() else torch.float32
            new_down, new_up, new_alpha, kept = svd_resize(down, up, alpha, rank, energy, device, alpha_dtype)
            scale = alpha / down.shape[0]
            norm = scale * float((up.reshape(up.shape[0], -1).float() @ down.reshape(down.shape[0], -1).float()).norm())
            tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"] = new_down, new_up
            tensors[name + ".alpha"] = alpha_tensor(new_alpha, alpha_dtype)[0]  # (svd_resize made it one it holds)
            modules.append(Resized(name, down.shape[0], new_down.shape[0], kept, norm))
    written = save_kohya_lora(out, tensors, _metadata(meta, modules, tensors))
    return ResizeReport(written, modules)


def _metadata(meta: dict[str, str], modules: list[Resized], tensors: dict) -> dict[str, str]:
    ranks = {m.new_rank for m in modules}
    alphas = {float(tensors[m.name + ".alpha"]) for m in modules}
    old = sorted({m.rank for m in modules})
    meta = dict(meta)
    meta["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    note = f"dimension is resized from {'/'.join(map(str, old))} to {meta['ss_network_dim']}"
    meta["ss_training_comment"] = note + (f"; {meta['ss_training_comment']}" if meta.get("ss_training_comment")
                                          and meta["ss_training_comment"] != "None" else "")
    meta["lora_trainer_resize"] = json.dumps({"from_rank": old, "modules": len(modules)})
    return meta
