"""Pre-flight: before a model loads, how much device memory a run will need at its peak and about how long a step
takes; whether that fits the device, and which settings would fit (``training.auto_fit`` applies them).

Nothing is allocated and nothing computed: the run's model is built from its configs alone (``model_configs``) with
fake tensors (torch's FakeTensorMode: shapes and dtypes, no data) on the run's device, the run's own set-up code
puts the LoRA layers in and switches checkpointing, attention and fp8 storage as training will (``engine.run``), and
one training step is run on it (``diffusion_loss``, backward) while every tensor storage made and freed is counted
(``LiveBytes``), with the FLOPs by ``torch.utils.flop_counter``'s formulas. The peak of a step is the weights kept
on the device during steps, the LoRA parameters with their optimizer state (and the NaN guard's copy), and that
traced peak; before the steps the model is loaded and set up with every weight on the device, then the VAE encodes
the latent cache one image at a time (where the run loads its own model, on a GPU, the UNet waits on the CPU from
its load until the cache is built: models.offload); sample images add a VAE decode. Where the device is a GPU the
fake tensors are CUDA ones and autocast is CUDA's, so the kernels chosen (SDPA's flash / memory-efficient) and the
dtypes kept for backward are the GPU's.

Not counted: the CUDA context and the caching allocator's slack (``CUDA_OVERHEAD`` adds a measured figure), kernel
workspaces, torch.compile's graphs. On the CPU the estimate is the bytes the tensors need; glibc's allocator keeps
freed blocks, so the process may grow more than that (1.6-2.4x a step's tensors with the tiny model, measured:
bench/RESULTS.md; ``MALLOC_MMAP_THRESHOLD_=65536`` makes it return them). The WebUI's model is A1111's, not
diffusers': its estimate traces the diffusers model of the same family (the same layers and shapes).

A trace costs seconds of CPU (SDXL's step is tens of thousands of operations on fake tensors): each is kept, in this
process and on disk (``engine.preflight_store``), under what it depends on, so the same settings never trace twice.

Time per step: the FLOPs at a share of the device's matmul rate (measured here in a fraction of a second) and a
cost per operation (a GPU: the slower of the two, as it computes while Python queues; a CPU: their sum); rough until
the run's first steps measure it (``engine.run.Run._measure_time`` logs the measured rate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lora_trainer.engine import preflight_store
from lora_trainer.engine.guard import optimizer_state_bytes, size_text
from lora_trainer.models.base import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from lora_trainer.models.offload import module_bytes  # noqa: F401 (the hosts' count of their loaded model: Where)

log = logging.getLogger(__name__)

CUDA_OVERHEAD = 941 * 2**20  # CUDA context + allocator slack, measured: SD 1.5 batch 1 on an H100 (bench/RESULTS.md)
# time model: a step's FLOPs at this share of the device's measured matmul rate, plus this much per operation
# (bench/RESULTS.md, section Pre-flight, says how they were set)
EFFICIENCY = {"cuda": 0.1, "cpu": 0.35}
OP_SECONDS = {"cuda": 8e-6, "cpu": 6e-6}
CAPTION = " ".join(["word"] * 60)  # a caption that fills most of the 77 tokens


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensor storages made inside it that are still alive, their peak, how many operations ran and
    their FLOPs (torch.utils.flop_counter's formulas; its FlopCounterMode itself keeps what gradient checkpointing
    frees). Storages that existed before (``existing``: the weights) are not counted, nor are views of them."""

    def __init__(self, existing=()):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self._flops = flop_registry
        self._keep = [t.untyped_storage() for t in existing]
        self._refs = {id(s): None for s in self._keep}
        self.now = self.peak = self.ops = self.flops = 0

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._refs:
            return
        size = storage.nbytes()

        def freed(_, key=key, size=size):
            self._refs.pop(key, None)
            self.now -= size

        self._refs[key] = weakref.ref(storage, freed)
        self.now += size
        self.peak = max(self.peak, self.now)

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        count = self._flops.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **(kwargs or {}), out_val=out)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


# --- the model's shapes, from configs alone
def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


SD2_UNET = {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
SD2_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
            "hidden_act": "gelu", "projection_dim": 512}  # OpenCLIP ViT-H, its last layer dropped (penultimate)


def model_configs(base_model: str | None, family: str | None) -> dict | None:
    """The component configs (``unet``, ``text_encoder``, ``text_encoder_2``, ``vae``, ``scheduler``: dicts) and the
    tokenizer folders of a run's model, read without loading a weight: a diffusers folder's own, a built-in tiny
    model's, else the shipped configs of its family (a single file, the WebUI's model). None: not known."""
    from lora_trainer.models.single_file import CONFIGS

    folder = None
    if base_model:
        from lora_trainer.models.factory import BUILTIN_MODELS

        if base_model in BUILTIN_MODELS:
            from lora_trainer.models.diffusers_backend import resolve_base_model
            from lora_trainer.models.sdxl_backend import is_sdxl_model, resolve_sdxl_model

            folder = (resolve_sdxl_model if is_sdxl_model(base_model) else resolve_base_model)(base_model)
        elif Path(base_model).expanduser().is_dir():
            folder = Path(base_model).expanduser()
    sd2 = family in ("sd_v2", "sd_v2_768_v")
    if folder is None and family is not None:
        folder = CONFIGS["sdxl" if family == "sdxl" else "sd_v1"]
    if folder is None or _json(folder / "unet" / "config.json") is None:
        return None
    out = {name: _json(folder / name / "config.json") for name in ("unet", "text_encoder", "text_encoder_2", "vae")}
    out["scheduler"] = _json(folder / "scheduler" / "scheduler_config.json") or {}
    if sd2 and folder in CONFIGS.values():  # (an SD 2.x single file or WebUI model: SD 1.5's with 2.x's widths)
        out["unet"] = {**out["unet"], **SD2_UNET}
        out["text_encoder"] = {**out["text_encoder"], **SD2_TEXT}
        if family == "sd_v2_768_v":
            out["scheduler"] = {**out["scheduler"], "prediction_type": "v_prediction"}
    out["tokenizers"] = {name: folder / name for name in ("tokenizer", "tokenizer_2") if (folder / name).is_dir()}
    return out


def _meta_pipe(configs: dict) -> SimpleNamespace:
    """The components as a backend takes them (a pipeline's attributes), on the meta device (no memory)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_trainer.models.single_file import _tokenizers

    def tokenizer(name):
        path = configs["tokenizers"].get(name) or configs["tokenizers"].get("tokenizer")
        if path is None:
            return None
        shipped = _tokenizers(path.parent).get(path.name)  # (the shipped SDXL configs have no vocabulary files)
        return shipped or CLIPTokenizer.from_pretrained(str(path), local_files_only=True)

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                 "vae": AutoencoderKL.from_config(configs["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
                 "scheduler": DDPMScheduler.from_config(configs["scheduler"]), "tokenizer": tokenizer("tokenizer")}
        if configs.get("text_encoder_2"):
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
            parts["tokenizer_2"] = tokenizer("tokenizer_2")
    return SimpleNamespace(**parts)


def _fake_on(module: torch.nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of ``module`` (meta tensors) replaced by a fake tensor on ``device`` of the same
    shape, strides and dtype. Inside a FakeTensorMode."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                fake = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device=device)
                m._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.zeros(b.size(), dtype=b.dtype, device=device)


def _fp8_bytes(unet: torch.nn.Module, checkpointing: bool) -> int:
    """The UNet's weight bytes with training.fp8_base (models.fp8): its Linear and Conv weights in float8, the rest as
    they are; without checkpointing the backward pass keeps each layer's upcast weights, so they count in full."""
    total = 0
    for m in unet.modules():
        cast = isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and checkpointing
        for p in m.parameters(recurse=False):
            if not p.requires_grad:
                total += p.numel() * (1 if cast else p.element_size())
    return total


# --- the estimate
@dataclass
class Estimate:
    """A run's estimated peak device memory (bytes, by part) and time; ``free``: what the device has free for it."""

    device: str
    weights: dict[str, int]  # on the device during steps, by component
    lora: int  # LoRA parameters (fp32), their optimizer state, the NaN guard's copy of both
    lora_params: int  # how many LoRA parameters
    step: int  # a step's traced peak beyond the weights
    cache_build: int  # the peak before the steps: the weights on the device (not a waiting UNet), the VAE's encode
    samples: int  # the peak while a sample image decodes (0: no samples)
    overhead: int  # CUDA context and allocator slack (0 on the CPU: see the module's notes)
    seconds_per_step: float
    flops_per_step: float
    settings: dict  # the settings estimated (batch_size, gradient_accumulation_steps, gradient_checkpointing, ...)
    free: int | None = None
    proposal: dict = field(default_factory=dict)  # settings that fit, where these do not
    proposal_peak: int | None = None

    @property
    def training_peak(self) -> int:
        return sum(self.weights.values()) + self.lora + self.step + self.overhead

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.cache_build + self.overhead, self.samples + self.overhead)

    @property
    def fits(self) -> bool | None:
        return None if self.free is None else self.peak <= self.free

    def summary(self, total_steps: int | None = None) -> str:
        where = f"{size_text(self.free)} free on {self.device}" if self.free is not None else self.device
        parts = ", ".join(f"{k} {size_text(v)}" for k, v in self.weights.items())
        text = (f"pre-flight: peak ~{size_text(self.peak)} of {where} (weights {parts}; LoRA + optimizer "
                f"{size_text(self.lora)}; a step {size_text(self.step)}; latent cache build "
                f"{size_text(self.cache_build)}{'; samples ' + size_text(self.samples) if self.samples else ''}"
                f"{'; CUDA context and allocator slack ' + size_text(self.overhead) if self.overhead else ''}); "
                f"~{self.seconds_per_step:.2g} s/step")
        if total_steps:
            text += f", ~{duration_text(self.seconds_per_step * total_steps)} for {total_steps} steps"
        text += " (a rough time: the first steps measure it)"
        if self.fits is False:
            if self.proposal:
                text += (f". Does NOT fit; these settings would (~{size_text(self.proposal_peak)}): "
                         + ", ".join(f"training.{k}: {yaml_value(v)}" for k, v in self.proposal.items())
                         + " (set them, or training.auto_fit: true)")
            else:
                text += (". Does NOT fit, even at batch 1 with gradient checkpointing: lower data.resolution, or "
                         "train on a device with more memory")
        return text


def yaml_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def free_memory(device: torch.device) -> int | None:
    """Bytes the device has free: the GPU's (torch.cuda.mem_get_info), the machine's available memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul on ``device`` in ``dtype``, measured in a fraction of a second."""
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a  # (warm-up)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < 0.1 or reps < 3:
        a @ a
        sync()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(seen.values())


@dataclass
class _Traced:
    weights: dict[str, int]  # every component on the device
    lora_params: int
    step: int  # peak beyond the weights of one micro-batch's forward and backward
    lora_grads: int
    encode: int
    decode: int
    flops: float
    ops: int


def _trace(cfg, configs: dict, device: torch.device, precision: str, samples: bool) -> _Traced:
    """One micro-batch of the run (set up by engine.run's own functions) on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lora_trainer.engine.loss import LossSettings, NoiseSettings, diffusion_loss
    from lora_trainer.engine.run import add_lora_layers, prepare_backend
    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.models.factory import DTYPES
    from lora_trainer.models.sdxl_backend import SdxlBackend

    t, d = cfg.training, cfg.data
    quiet = [logging.getLogger(name) for name in ("lora_trainer", "diffusers")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)  # (set-up's info lines are the real run's to say)
    try:
        # set up on the meta device as the run will (fp8 storage is counted, not traced: its casts need real
        # parameters), then every tensor made a fake one on the run's device
        pipe = _meta_pipe(configs)
        cls = SdxlBackend if getattr(pipe, "text_encoder_2", None) is not None else DiffusersBackend
        backend = cls(pipe, "pre-flight", torch.device("meta"), DTYPES[precision], cfg.model.prediction_type)
        run_cfg = dataclasses.replace(cfg, training=dataclasses.replace(t, compile_unet=False, fp8_base=False))
        modules, _ = add_lora_layers(run_cfg, backend)
        prepare_backend(run_cfg, backend)
        parts = {UNET: backend.unet, TEXT_ENCODER: backend.text_encoder, "VAE": backend.vae,
                 TEXT_ENCODER_2: getattr(backend, "text_encoder_2", None)}
        parts = {k: m for k, m in parts.items() if m is not None}
        with FakeTensorMode(allow_non_fake_inputs=True):
            for m in parts.values():
                _fake_on(m, device)
            backend.device = device
            lora = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
            weights = {k: sum(x.untyped_storage().nbytes() for x in [*m.parameters(), *m.buffers()]
                              if not x.requires_grad) for k, m in parts.items()}
            if t.fp8_base:
                weights[UNET] = _fp8_bytes(backend.unet, t.gradient_checkpointing) + sum(
                    x.untyped_storage().nbytes() for x in backend.unet.buffers())
            existing = [x for m in parts.values() for x in [*m.parameters(), *m.buffers()]]
            b, side = t.batch_size, d.resolution // (2 ** (len(configs["vae"]["block_out_channels"]) - 1))
            autocast = (torch.autocast(device.type, dtype=DTYPES[precision]) if precision != "no"
                        else contextlib.nullcontext())
            live = LiveBytes(existing)
            with live:
                latents = torch.empty(b, backend.unet.config.in_channels, side, side, dtype=backend.weight_dtype,
                                      device=device)
                with autocast:
                    with torch.no_grad() if not t.trains_text_encoders else contextlib.nullcontext():
                        cond = backend.encode_prompts([CAPTION] * b)
                    if backend.uses_time_ids:
                        cond = cond.with_time_ids(torch.zeros(b, 6, device=device))
                    loss = diffusion_loss(backend, latents, cond, None, NoiseSettings.of(t), LossSettings.of(t))
                loss.backward()
                del loss, cond, latents
            step, ops, step_flops = live.peak, live.ops, live.flops
            grads = _storage_bytes(p.grad for p in lora if p.grad is not None)
            for p in lora:
                p.grad = None
            live = LiveBytes(existing)
            with live, torch.no_grad():
                backend.encode_image_dist(torch.empty(1, 3, d.resolution, d.resolution, device=device))
            encode = live.peak
            decode = 0
            if samples:
                live = LiveBytes(existing)
                with live, torch.no_grad():
                    backend.vae.decode(torch.empty(1, backend.vae.config.latent_channels, side, side,
                                                   dtype=backend.vae.dtype, device=device))
                decode = live.peak
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return _Traced(weights, sum(p.numel() for p in lora), step, grads, encode, decode, step_flops, ops)


_TRACES: dict = {}  # (what a trace depends on) → _Traced: the tab asks again as settings change


def _trace_key(cfg, configs, device, precision, samples) -> str:
    """What a trace depends on: the model's configs, the device (a GPU's model: its SDPA kernels) and the settings
    that shape a step (a LoRA dropout keeps a copy of each LoRA layer's input; 0 keeps none)."""
    t, d = cfg.training, cfg.data
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return json.dumps([configs, str(device), gpu, precision, samples, d.resolution, t.batch_size,
                       t.gradient_checkpointing, t.fp8_base, t.lora_rank, t.conv_rank, t.lora_dropout > 0,
                       list(t.target_modules), t.train_text_encoder, t.train_text_encoder_2,
                       list(t.text_encoder_target_modules), t.attention, t.channels_last, t.min_snr_gamma is not None,
                       cfg.model.prediction_type],
                      sort_keys=True, default=str)


def _traced(cfg, configs, device, precision, samples) -> _Traced:
    """The trace of these settings: from this process's memory, else from disk (engine.preflight_store), else run."""
    key = _trace_key(cfg, configs, device, precision, samples)
    if key not in _TRACES:
        kept = preflight_store.load(key)
        try:
            traced = _Traced(**kept) if kept is not None else None
        except TypeError:  # (another version's fields)
            traced = None
        if traced is None:
            traced = _trace(cfg, configs, device, precision, samples)
            preflight_store.store(key, dataclasses.asdict(traced))
        _TRACES[key] = traced
    return _TRACES[key]


def _estimate_from(traced: _Traced, cfg, device: torch.device, rate: float, samples: bool,
                   batch: int | None = None, unet_waits: bool = False) -> Estimate:
    """The estimate for ``cfg``'s settings from a trace of them (``batch``: another batch size than the trace's,
    the step's activations scaled to it; ``unet_waits``: the UNet's weights are off the device while the latent
    cache is built, as where the run loads its own model: models.offload)."""
    from lora_trainer.engine.run import caches_text

    t = cfg.training
    cached_latents = t.cache_latents
    cached_text = caches_text(cfg)
    idle = {"VAE"} if cached_latents else set()
    idle |= {TEXT_ENCODER, TEXT_ENCODER_2} if cached_text else set()
    weights = {k: v for k, v in traced.weights.items() if k not in idle}
    state = optimizer_state_bytes(t)
    guard = t.nan_guard_every > 0 and t.nan_max_retries > 0
    lora = traced.lora_params * (4 + state + (4 + state if guard else 0))
    step = traced.step
    if batch is not None and batch != t.batch_size:
        step = traced.lora_grads + round((traced.step - traced.lora_grads) * batch / t.batch_size)
    if not cached_latents:  # each step encodes its images first (one VAE call per batch), then frees all but latents
        step = max(step, traced.encode * (batch or t.batch_size))
    everything = sum(traced.weights.values()) + traced.lora_params * 4
    dev = device.type
    caching = everything + traced.encode
    if unet_waits and dev == "cuda":  # the UNet waits on the CPU from its load until the cache is built
        caching -= traced.weights.get(UNET, 0)  # (its LoRA with it: counted here all the same)
    flops = traced.flops * (batch or t.batch_size) / t.batch_size * t.gradient_accumulation_steps
    compute = flops / (rate * EFFICIENCY.get(dev, 0.1))
    launches = OP_SECONDS.get(dev, 8e-6) * traced.ops * t.gradient_accumulation_steps
    # a GPU computes while Python queues the next kernels: the slower of the two; a CPU does both in turn
    seconds = compute + launches if dev == "cpu" else max(compute, launches)
    settings = {"batch_size": batch or t.batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
                "gradient_checkpointing": t.gradient_checkpointing, "cache_latents": t.cache_latents}
    return Estimate(str(device), weights, lora, traced.lora_params, step,
                    caching if cached_latents else 0, everything + traced.decode if samples else 0,
                    CUDA_OVERHEAD if dev == "cuda" else 0, seconds, flops, settings)


def estimate_run(cfg, configs: dict, device: torch.device, precision: str, free: int | None = None,
                 resident: int = 0, unet_waits: bool = False) -> Estimate:
    """The estimate for ``cfg`` on ``device`` at ``precision`` ("no" | "fp16" | "bf16"), against ``free`` bytes
    (default: what the device has free now) plus ``resident`` (bytes of this model already on the device: the
    WebUI's). Where it does not fit, ``proposal`` holds the first settings that do, in this order: gradient
    checkpointing on, latents cached, then a smaller batch (a divisor of it) with more accumulation (the same
    effective batch)."""
    samples = bool(cfg.output.sample_prompts)
    rate = matmul_rate(device, torch.float32 if precision == "no" or device.type == "cpu" else
                       {"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    est = _estimate_from(_traced(cfg, configs, device, precision, samples), cfg, device, rate, samples,
                         unet_waits=unet_waits)
    free = free_memory(device) if free is None else free
    est.free = None if free is None else free + resident
    if est.fits is not False:
        return est
    t = cfg.training
    changes: dict = {}
    candidate = cfg
    for change in ({"gradient_checkpointing": True}, {"cache_latents": True}):
        key, value = next(iter(change.items()))
        if getattr(t, key) != value:
            changes.update(change)
            candidate = dataclasses.replace(candidate, training=dataclasses.replace(candidate.training, **change))
            trial = _estimate_from(_traced(candidate, configs, device, precision, samples), candidate, device,
                                   rate, samples, unet_waits=unet_waits)
            if trial.peak <= est.free:
                est.proposal, est.proposal_peak = changes, trial.peak
                return est
    traced = _traced(candidate, configs, device, precision, samples)
    for batch in sorted((b for b in range(1, t.batch_size) if t.batch_size % b == 0), reverse=True):
        accumulation = t.gradient_accumulation_steps * t.batch_size // batch  # (the same effective batch)
        trial = _estimate_from(traced, candidate, device, rate, samples, batch=batch, unet_waits=unet_waits)
        if trial.peak <= est.free:
            est.proposal = {**changes, "batch_size": batch, "gradient_accumulation_steps": accumulation}
            est.proposal_peak = trial.peak
            return est
    return est


def with_proposal(cfg, est: Estimate):
    """``cfg`` with the estimate's proposed settings (training.auto_fit)."""
    if not est.proposal:
        return cfg
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **est.proposal),
                               explicit=cfg.explicit | set(est.proposal))


@dataclass(frozen=True)
class Where:
    """Where a run will train, known before its model loads: the model (``base_model``: a path or built-in name whose
    configs are read; None: the family's shipped configs, as for the WebUI's loaded model), its family, the device,
    and the bytes of this model already on that device (the WebUI's: they count as free for the run). A run that
    loads its own model (``base_model`` given) keeps its UNet off a GPU while the latent cache is built."""

    base_model: str | None
    family: str | None
    device: torch.device
    resident: int = 0


def estimate_for(cfg, where: Where, free: int | None = None) -> Estimate | None:
    """The pre-flight estimate of ``cfg`` (its family's defaults applied) at ``where``; None where the model's shapes
    cannot be known without loading it."""
    from lora_trainer.config import resolve_mixed_precision, with_family_defaults

    configs = model_configs(where.base_model, where.family)
    if configs is None:
        return None
    cfg = with_family_defaults(cfg, where.family)[0]
    bf16 = where.device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = resolve_mixed_precision(cfg.training.mixed_precision, where.device.type, bf16)
    return estimate_run(cfg, configs, where.device, precision, free=free, resident=where.resident,
                        unet_waits=where.base_model is not None)


def total_steps_of(cfg) -> int | None:
    """The run's steps where its dataset folder can be counted now (a quick scan, nothing decoded; the images'
    buckets from their file headers), at the config's resolution."""
    from lora_trainer.data.dataset import scan_dataset
    from lora_trainer.data.regularization import with_regularization
    from lora_trainer.data.split import split_validation
    from lora_trainer.engine.batches import Plan
    from lora_trainer.engine.run import training_dataset
    from lora_trainer.errors import LoraTrainerError

    d = cfg.data
    if not d.train_data_dir or not Path(d.train_data_dir).is_dir():
        return None
    try:
        scan = scan_dataset(d.train_data_dir, metadata_path=d.metadata_path, caption_extension=d.caption_extension,
                            caption_priority=d.caption_priority, recursive=d.recursive)
        if d.validation_split:  # (held out before the regularization images are balanced, as the trainer does)
            scan = split_validation(scan, d.validation_split, cfg.training.seed)[0]
        scan = with_regularization(d, scan)
        groups = training_dataset(cfg, scan).epoch_groups()
    except LoraTrainerError:
        return None
    return Plan.from_config(cfg, len(scan.samples), groups).total_steps


def preflight(cfg, where: Where, total_steps) -> tuple[object, Estimate | None]:
    """Before the model loads (engine.trainer): the estimate logged; where it does not fit, a warning with the settings
    that would, or with ``training.auto_fit`` the config returned with them. ``total_steps``: a function of a config.
    An estimate that fails is logged and skipped: it never stops a run."""
    try:
        est = estimate_for(cfg, where)
    except Exception as e:  # noqa: BLE001 (an estimate must not stop a run it cannot judge)
        log.warning("pre-flight: no memory estimate (%s: %s); training without one", type(e).__name__, e)
        return cfg, None
    if est is None:
        log.info("pre-flight: no memory estimate for this model (its shapes are not known before it loads)")
        return cfg, est
    log.log(logging.WARNING if est.fits is False else logging.INFO, "%s", est.summary(total_steps(cfg)))
    if est.fits is False and est.proposal and cfg.training.auto_fit:
        cfg = with_proposal(cfg, est)
        log.warning("training.auto_fit: training with %s",
                    ", ".join(f"{k} {yaml_value(v)}" for k, v in est.proposal.items()))
    return cfg, est
