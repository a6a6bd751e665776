"""One training run's state: what set-up made (the model with its LoRA layers, the optimizer, the caches) and
what the loop moves (the step, the losses), with the few operations the loop in ``engine.trainer`` calls:
``backward`` one micro-batch, ``optimizer_step``, ``report``, ``save``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params

from lora_trainer.config import Config, with_family_defaults
from lora_trainer.data.augment import CaptionAugment
from lora_trainer.data.buckets import BucketSpec, histogram_text
from lora_trainer.data.dataset import ImageDataset
from lora_trainer.engine import checkpoint as ckpt
from lora_trainer.engine.batches import Plan, batch_stream
from lora_trainer.engine.cache import EncodedCache, LatentStore
from lora_trainer.engine.diagnose import StepInputs, diagnose_nonfinite_loss
from lora_trainer.engine.events import CallbackList, StepInfo
from lora_trainer.engine.guard import NanGuard, NonFinite
from lora_trainer.engine.lora import (
    add_lora,
    load_trainable_state,
    lora_input_casts_off,
    resnet_layers,
    trainable_state,
    uncastable_lora_layers,
)
from lora_trainer.engine.loss import (
    LossSettings,
    NoiseSettings,
    diffusion_loss,
    draw_noise,
    zero_terminal_snr_schedule,
)
from lora_trainer.engine.optim import build_optimizer, changed_since, group_names, lora_groups, lr_schedule
from lora_trainer.engine.outputs import export_epoch_lora
from lora_trainer.engine.preflight import duration_text
from lora_trainer.engine.run_dir import latent_cache_dir
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.models.base import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from lora_trainer.models.factory import DTYPES
from lora_trainer.models.fp8 import store_unet_in_fp8

log = logging.getLogger(__name__)
CALIBRATION_STEPS = 3  # steps after the first over which the time per step is measured


class TrainingError(LoraTrainerError):
    """Training went wrong in a way the user can act on (NaN loss, out of memory)."""


@dataclass
class Run:
    cfg: Config
    backend: object  # models.base.TrainingBackend
    precision: str  # "no" (fp32) | "fp16" | "bf16"
    plan: Plan
    scan: object  # data.dataset.DatasetScan
    run_dir: Path
    settings: dict  # what a resume must match (engine.checkpoint.run_settings)
    modules: dict  # component name → module with LoRA layers
    groups: list[dict]  # optimizer parameter groups
    optimizer: torch.optim.Optimizer | None  # (the three made after the caches: engine.trainer._set_up)
    lr_scheduler: object
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator  # noise, timesteps and flips
    dataset: ImageDataset
    cbs: CallbackList
    noise_scheduler: object = None  # the training noise schedule (with_noise_schedule); None: the backend's
    cache: EncodedCache | None = None
    step: int = 0
    first_loss: float | None = None
    last_saved: int = -1
    losses: deque = field(default_factory=lambda: deque(maxlen=20))
    grad_norm: torch.Tensor | None = None  # the last optimizer step's, where gradients are clipped (no sync)
    writer: object = None  # a TensorBoard SummaryWriter, or None
    bar: object = None  # the tqdm progress bar
    loop_start: float = 0.0
    start_step: int = 0
    sampler: object = None  # engine.samples.SampleMaker: sample images (output.sample_prompts), or None
    validator: object = None  # engine.validation.Validator: the validation loss, or None
    guard: NanGuard = field(default_factory=lambda: NanGuard(every=0))  # the NaN guard (engine.guard); off here
    estimate: object = None  # the pre-flight's memory and time estimate (engine.preflight.Estimate), or None
    measured_at: tuple | None = None  # (step, time) after the first step: the time per step is measured from it
    seconds_per_step: float | None = None  # measured (``_measure_time``)
    buckets: dict = field(default_factory=dict)  # what summary.json says of the buckets (``log_buckets``)
    augment: CaptionAugment | None = None  # caption augmentation (data.augment), or None: captions as written
    group: object = None  # engine.distributed.Group of a multi-process run, or None: a single process
    uncast: list | None = None  # the LoRA layers whose input casts autocast makes needless (``autocast``)
    loss_weights: torch.Tensor | None = None  # each image's loss weight (regularization images'), or None: all 1
    started_at: float = 0.0  # when the run started (the LoRA's ss_training_started_at)

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (a single process, or rank 0 of several)."""
        return self.group is None or self.group.main

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def params(self) -> list:
        return [p for g in self.groups for p in g["params"]]

    def __post_init__(self):
        reg = [getattr(s, "is_reg", False) for s in self.scan.samples]
        if any(reg):  # (data.regularization: training.prior_loss_weight)
            self.loss_weights = torch.tensor([self.cfg.training.prior_loss_weight if r else 1.0 for r in reg],
                                             device=self.device)

    @contextlib.contextmanager
    def autocast(self):
        """The forward's precision: autocast to fp16/bf16 (peft's LoRA input casts skipped: engine.lora), or fp32."""
        if self.precision == "no":
            yield
            return
        t = self.cfg.training
        if self.uncast is None:
            self.uncast = ([] if t.gradient_checkpointing or t.compile_unet
                           else uncastable_lora_layers(self.modules.values()))
        with torch.autocast(self.device.type, dtype=DTYPES[self.precision]), lora_input_casts_off(self.uncast):
            yield

    def batches(self):
        """The rest of the run's micro-batches: (epoch, index in epoch, batch)."""
        t = self.cfg.training
        stream = batch_stream(self.plan, t.seed, self.step, None if self.cache is not None else self.dataset,
                              [x.caption for x in self.scan.samples], t.dataloader_num_workers,
                              pin_memory=self.device.type == "cuda", rank=self.group.rank if self.group else 0)
        return stream if self.augment is None else self._augmented(stream)

    def _augmented(self, stream):
        """The stream with each caption as data.augment makes it for its image, epoch and repeat (an image trained
        several times an epoch, kohya's folders, gets a new draw each time, as kohya's trainer gives it)."""
        samples, aug = self.scan.samples, self.augment
        try:
            for epoch, i, batch in stream:
                indices = batch["indices"].tolist()
                repeats = batch["repeats"].tolist() if "repeats" in batch else [0] * len(indices)
                captions = [aug.caption(samples[j].caption, samples[j].core_tags, j, epoch, r)
                            for j, r in zip(indices, repeats)]
                yield epoch, i, {**batch, "captions": captions}
        finally:
            stream.close()

    # --- one micro-batch
    def micro_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor, object]:
        """The loss of one micro-batch, and its inputs (latents, conditioning) for a diagnosis."""
        d, t, cache, backend = self.cfg.data, self.cfg.training, self.cache, self.backend
        rows = batch.get("rows")  # a process's rows of the micro-batch (engine.distributed); None: all of it
        rows = rows.to(self.device) if rows is not None else None
        flip = None
        if d.random_flip:  # (drawn for the whole micro-batch, as a single process does)
            flip = torch.rand(batch["of"] if rows is not None else len(batch["captions"]), generator=self.generator,
                              device=self.device) < 0.5
            flip = flip[rows] if rows is not None else flip
        if cache is not None:
            latents = cache.latents(batch["indices"], flip, self.device)
        else:
            pixels = batch["pixel_values"].to(self.device)
            if flip is not None:
                pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
            latents = backend.encode_images(pixels, self.generator)
        with self.autocast():
            if cache is not None and cache.has_text:
                cond = cache.text(batch["captions"], self.device)
            else:
                with torch.no_grad() if not t.trains_text_encoders else contextlib.nullcontext():
                    cond = backend.encode_prompts(batch["captions"], weighted=d.weighted_captions)
            if backend.uses_time_ids:  # SDXL: each image's size and crop offset (mirrored with it)
                ids = self.dataset.time_ids(batch["indices"], flip, batch.get("crops"))  # (crops: cut at random)
                cond = cond.with_time_ids(ids.to(self.device))
            if rows is None:
                loss = diffusion_loss(backend, latents, cond, self.generator, NoiseSettings.of(t),
                                      LossSettings.of(t), scheduler=self.noise_scheduler,
                                      sample_weights=self._loss_weights(batch))
            else:  # the noise and timesteps of the whole micro-batch, this process's rows of them
                scheduler = backend.noise_scheduler if self.noise_scheduler is None else self.noise_scheduler
                noise, timesteps, noised_with = draw_noise(scheduler, (batch["of"], *latents.shape[1:]),
                                                           self.generator, latents.device, latents.dtype,
                                                           NoiseSettings.of(t))
                loss = diffusion_loss(backend, latents, cond, self.generator, loss_settings=LossSettings.of(t),
                                      scheduler=self.noise_scheduler, noise=noise[rows], timesteps=timesteps[rows],
                                      sample_weights=self._loss_weights(batch), noised_with=noised_with[rows])
        return loss, latents, cond

    def _loss_weights(self, batch) -> torch.Tensor | None:
        """The loss weight of each image of the batch (regularization images': training.prior_loss_weight)."""
        if self.loss_weights is None:
            return None
        return self.loss_weights[torch.as_tensor(batch["indices"]).to(self.device)]

    def backward(self, batch, group_size: int) -> float:
        """Forward and backward of one micro-batch (of ``group_size`` in this optimizer step); its loss (a process of
        several: its share of the micro-batch's loss, ``weight``). A non-finite loss raises guard.NonFinite that says
        why (engine.diagnose); with several processes, on every process (the one it happened on has the diagnosis)."""
        rng_before = self.generator.get_state()
        loss, latents, cond = self.micro_batch(batch)
        value = loss.item()  # the one host sync of a micro-batch
        if self.group is not None:
            bad = self.group.flags(not math.isfinite(value), "checking the loss")
            if any(bad) and math.isfinite(value):
                raise NonFinite(f"the loss of process {bad.index(True)} was not finite at step {self.step + 1} "
                                "(its log has the diagnosis)", "loss")
        if not math.isfinite(value):
            raise NonFinite(self._diagnosis(value, batch, latents, cond, rng_before), "loss")
        weight = batch.get("weight", 1.0)
        self.scaler.scale(loss * weight / group_size).backward()
        return value * weight

    def _diagnosis(self, value: float, batch, latents, cond, rng_before) -> str:
        def rerun():
            self.generator.set_state(rng_before)
            return self.micro_batch(batch)[0]

        inputs = StepInputs(latents, cond, [self.scan.samples[int(i)].path for i in batch["indices"]],
                            list(batch["captions"]))
        return diagnose_nonfinite_loss(value, self.step + 1, self.precision, inputs, self.params(), self.grad_norm,
                                       self.backend.components(), rerun, self.backend.explain_nonfinite_text)

    # --- one optimizer step
    def optimizer_step(self, loss: float = 0.0) -> float:
        """The step's update; returns its ``loss`` (summed over the processes with the gradients, where several)."""
        t = self.cfg.training
        if self.group is not None:
            loss = self.group.sum_gradients(self.params(), loss)
        if t.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params(), t.max_grad_norm)
        self.guard.check_gradients(self)  # non-finite gradients raise guard.NonFinite (with the guard on)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss

    def should_stop(self, requested: bool) -> bool:
        """Whether the run stops after this step: asked for here (Ctrl-C, a UI) or, with several processes, by any
        of them (all stop after the same step)."""
        requested = requested or self.cbs.should_stop()
        return self.group.any(requested, "agreeing on a stop") if self.group is not None else requested

    def report(self, step_loss: float, epoch: int) -> None:
        """Progress out: the bar, TensorBoard, the callbacks (a UI)."""
        self.losses.append(step_loss)
        self.first_loss = step_loss if self.first_loss is None else self.first_loss
        lr = self.lr_scheduler.get_last_lr()[0]
        elapsed = time.time() - self.loop_start
        info = StepInfo(self.step, self.plan.total_steps, epoch + 1, step_loss, sum(self.losses) / len(self.losses),
                        lr, elapsed, (self.step - self.start_step) / elapsed if elapsed > 0 else 0.0)
        self._measure_time()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{info.loss_avg:.4f}", lr=f"{lr:.2e}", epoch=epoch + 1)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", step_loss, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
        self.cbs.on_step(info)

    def _measure_time(self) -> None:
        """The time per step measured over the steps after the first (whose set-up and warm-up are left out), logged
        once beside the pre-flight's estimate, with the time left."""
        done = self.step - self.start_step
        if done == 1:
            self.measured_at = (self.step, time.time())
        elif done == 1 + CALIBRATION_STEPS and self.measured_at is not None:
            self.seconds_per_step = (time.time() - self.measured_at[1]) / CALIBRATION_STEPS
            left = (self.plan.total_steps - self.step) * self.seconds_per_step
            estimated = (f" (the pre-flight estimated {self.estimate.seconds_per_step:.3g})"
                         if self.estimate is not None else "")
            log.info("time: %.3g s/step measured over %d steps%s; about %s left", self.seconds_per_step,
                     CALIBRATION_STEPS, estimated, duration_text(left))

    def timing(self) -> dict:
        """What summary.json says of the time per step: the pre-flight's estimate and the measured rate."""
        out = {}
        if self.estimate is not None:
            est = self.estimate
            out["preflight"] = {"peak_bytes": est.peak, "free_bytes": est.free, "fits": est.fits,
                                "seconds_per_step": round(est.seconds_per_step, 4)}
        if self.seconds_per_step is not None:
            out["seconds_per_step"] = round(self.seconds_per_step, 4)
        return out

    # --- sample images and the validation loss
    def evaluate_at_start(self) -> None:
        """The baseline sample images before step 1 (output.sample_at_first)."""
        if self.sampler is not None and self.cfg.output.sample_at_first and self.step == 0:
            self.sampler.make(self, 0)

    def evaluate_if_due(self, epoch_done: int | None, stopping: bool = False) -> None:
        """After an optimizer step (``epoch_done``: the epoch it finished, else None): the validation loss and the
        sample images where they fall; ``stopping`` (a stop asked for): the validation loss at this last step."""
        last = stopping or self.step >= self.plan.total_steps
        if self.validator is not None and (last or self.validator.due(self.step, self.plan.total_steps)):
            if not self.validator.history or self.validator.history[-1][0] != self.step:
                self.validator.evaluate(self, self.step)
        if self.sampler is not None and not stopping and self.sampler.due(self.step, self.plan.total_steps,
                                                                          epoch_done):
            self.sampler.make(self, self.step)

    def evaluations(self) -> dict:
        """What summary.json says of the validation loss and the samples."""
        out = self.validator.summary() if self.validator is not None else {}
        if self.sampler is not None:
            out["sample_images"] = [str(p.relative_to(self.run_dir)) for p in self.sampler.made]
        return out

    # --- checkpoints
    def save(self, reason: str) -> None:
        if self.last_saved == self.step:
            return
        if not self.main:  # (rank 0 writes the run's checkpoints)
            self.last_saved = self.step
            return
        state = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(self.generator)}
        info = {"reason": reason, "epoch": self.step // self.plan.steps_per_epoch, "total_steps": self.plan.total_steps,
                "loss": self.losses[-1] if self.losses else None, "first_loss": self.first_loss,
                "settings": self.settings}
        path = ckpt.save_checkpoint(self.run_dir, self.step, trainable_state(self.modules), state, info,
                                    keep=self.cfg.training.checkpoints_total_limit)
        self.last_saved = self.step
        if path is not None:
            self.cbs.on_checkpoint(path)

    def save_if_due(self) -> None:
        """A checkpoint where save_steps or save_every_n_epochs fall (the last step's state is the export)."""
        t, step = self.cfg.training, self.step
        if step >= self.plan.total_steps:
            return
        if t.save_steps and step % t.save_steps == 0:
            self.save("save_steps")
        epochs_done, mid_epoch = divmod(step, self.plan.steps_per_epoch)
        if not mid_epoch and t.save_every_n_epochs and epochs_done % t.save_every_n_epochs == 0:
            self.save("save_every_n_epochs")
            if self.main:  # (and the epoch's LoRA, as kohya writes it: to compare the epochs)
                with ckpt.stops_on_full_disk(self.run_dir, f"the LoRA of epoch {epochs_done} into {self.run_dir}"):
                    export_epoch_lora(self.run_dir, self.cfg, self.backend, self.modules, self.scan, self.started_at,
                                      step, self.plan, bucket_info=self.dataset.bucket_info())


# --- set-up
def trained_modules(cfg: Config, backend) -> dict:
    """The components that get LoRA layers: the UNet, and each text encoder the config trains. A second text
    encoder on a model without one (SD 1.x/2.x) is refused here, before any step."""
    t = cfg.training
    components = backend.components()
    if t.train_text_encoder_2 and components.get(TEXT_ENCODER_2) is None:
        raise ConfigError(f"training.train_text_encoder_2: this model ({backend.family}) has one text encoder; "
                          "set train_text_encoder_2: false (train_text_encoder trains its text encoder)")
    wanted = {UNET: True, TEXT_ENCODER: t.train_text_encoder, TEXT_ENCODER_2: t.train_text_encoder_2}
    return {name: components[name] for name, on in wanted.items() if on}


def add_lora_layers(cfg: Config, backend) -> tuple[dict, list[dict]]:
    """LoRA layers into the UNet (and each text encoder that trains); returns them and the parameter groups,
    each text encoder with its own learning rate (with LoRA+, each part's B matrices in a group of their own)."""
    t = cfg.training
    modules = trained_modules(cfg, backend)
    lrs = {UNET: t.learning_rate, TEXT_ENCODER: t.text_encoder_lr, TEXT_ENCODER_2: t.text_encoder_2_learning_rate}
    torch.manual_seed(t.seed)  # LoRA A's initialisation
    groups = []
    for name, module in modules.items():
        te = name != UNET
        layers = resnet_layers(module, t.lora_rank, t.lora_alpha, t.conv_rank, t.conv_lora_alpha) if (
            t.conv_rank and not te) else None  # (kohya's conv_dim: the UNet's ResNet blocks too)
        params = add_lora(module, rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout,
                          target_modules=t.text_encoder_target_modules if te else t.target_modules,
                          key="training.text_encoder_target_modules" if te else "training.target_modules",
                          custom_modules=getattr(backend, "lora_custom_modules", None), layers=layers)
        cast_training_params(module, dtype=torch.float32)  # LoRA in fp32, frozen base in compute dtype
        lora = {id(p) for p in params}
        groups += lora_groups(((n, p) for n, p in module.named_parameters() if id(p) in lora), lrs[name], name,
                              t.loraplus_lr_ratio)
        module.train()
    return modules, groups


def prepare_backend(cfg: Config, backend) -> None:
    """The model-wide switches: checkpointing, float8 UNet weights, attention kernel, memory layout, compile (after
    the LoRA layers are in, so the compiled graph has them)."""
    t = cfg.training
    if t.gradient_checkpointing:
        second = {"text_encoder_2": True} if t.train_text_encoder_2 else {}  # (only SDXL's backend has one)
        backend.enable_gradient_checkpointing(text_encoder=t.train_text_encoder, **second)
    if t.fp8_base:  # after the LoRA layers (they stay fp32) and the checkpointing (models.fp8 says why)
        store_unet_in_fp8(backend, checkpointing=t.gradient_checkpointing)
    backend.use_attention(t.attention)
    if t.clip_skip != 1 or "clip_skip" in cfg.explicit:
        backend.use_clip_skip(t.clip_skip)
    if t.channels_last:
        if backend.can_channels_last:
            backend.use_channels_last()
        else:
            log.warning("channels_last: this model backend cannot change its layout; training without")
    if t.compile_unet:
        if backend.can_compile:
            backend.compile_unet(t.compile_mode)
        else:
            log.warning("compile_unet: this model backend cannot compile its UNet; training without")


def optimization(cfg: Config, groups: list[dict], device, precision: str, total_steps: int):
    """The optimizer, its learning-rate schedule and the fp16 gradient scaler."""
    t = cfg.training
    optimizer = build_optimizer(t, groups, device)
    lr_scheduler = lr_schedule(t, optimizer, total_steps)
    return optimizer, lr_scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def resume(run: Run, restored: ckpt.Restored, resume_from: Path) -> None:
    """A checkpoint's LoRA weights, optimizer, schedule, scaler, RNG and step into ``run``."""
    load_trainable_state(run.modules, {k: v.to(run.device) for k, v in restored.weights.items()})
    configured = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    names, lrs = group_names(run.optimizer), list(run.lr_scheduler.base_lrs)
    run.optimizer.load_state_dict(restored.state["optimizer"])
    run.lr_scheduler.load_state_dict(restored.state["lr_scheduler"])
    changed = changed_since(run.optimizer, run.lr_scheduler, names, configured, lrs,
                            restored.info.get("settings", {}), run.cfg.training.optimizer_args)
    if changed:
        log.info("resuming with the settings changed since the checkpoint: %s", "; ".join(changed))
    run.scaler.load_state_dict(restored.state["scaler"])
    ckpt.set_rng_state(restored.state["rng"], run.generator)
    run.step = run.last_saved = restored.step
    run.first_loss = restored.info.get("first_loss")
    log.info("resumed from %s at step %d of %d", resume_from, run.step, run.plan.total_steps)


def training_dataset(cfg: Config, scan, resolution: int | None = None) -> ImageDataset:
    """The run's images as the trainer sees them: in their aspect-ratio buckets (data.enable_bucket) at
    ``resolution`` (default: the config's), their sizes from the dataset scan."""
    d = cfg.data
    resolution = resolution or d.resolution
    sizes = [getattr(scan.facts.get(s.path), "size", None) for s in scan.samples]
    return ImageDataset(scan.samples, resolution, d.fast_jpeg_decode, BucketSpec.from_data(d, resolution),
                        sizes if all(sizes) else None, d.random_crop, cfg.training.seed)


def log_buckets(dataset: ImageDataset) -> dict:
    """The run log's line of the buckets and their image counts; what summary.json says of them."""
    info = dataset.bucket_info()
    if info is None:
        log.info("buckets: off (data.enable_bucket false): every image center-cropped to %d×%d", dataset.resolution,
                 dataset.resolution)
        return {}
    log.info("images in %s (mean aspect-ratio error %.3f)", histogram_text(dataset.fits), info["mean_img_ar_error"])
    return {"buckets": list(info["buckets"].values()), "mean_img_ar_error": round(info["mean_img_ar_error"], 6)}


def caches_text(cfg: Config) -> bool:
    """Whether the caption embeddings are cached with the latents: not where a text encoder trains or the captions
    change from epoch to epoch (data.augment)."""
    t = cfg.training
    return (t.cache_latents and t.cache_text_embeddings and not t.trains_text_encoders
            and CaptionAugment.from_config(cfg.data, t.seed) is None)


def build_cache(run: Run, progress: bool) -> EncodedCache | None:
    """Every image through the VAE once (and every caption through the frozen text encoder), before step 1."""
    cfg, t, d = run.cfg, run.cfg.training, run.cfg.data
    if not t.cache_latents:
        return None
    digests = [getattr(run.scan.facts.get(s.path), "digest", "") or None for s in run.scan.samples]
    store = LatentStore(latent_cache_dir(cfg.output.output_dir)) if t.cache_latents_to_disk else None
    if t.cache_text_embeddings and not t.trains_text_encoders and run.augment is not None:
        log.info("caption embeddings: encoded each step, not cached (the captions change: %s)",
                 run.augment.describe())
    return EncodedCache.build(run.backend, run.dataset, t.seed, flips=d.random_flip, texts=caches_text(cfg),
                              progress=progress,
                              digests=digests, store=store, weighted=d.weighted_captions, group=run.group)


def with_noise_schedule(cfg: Config, backend) -> tuple[Config, object]:
    """model.zero_terminal_snr decided on the loaded model (auto: as its scheduler says): the training noise
    schedule, and the config saying what is used (true / false), for the snapshot, the resume settings and the
    metadata. The backend's own scheduler is left as it is."""
    scheduler, zero_snr = zero_terminal_snr_schedule(backend.noise_scheduler, cfg.model.zero_terminal_snr,
                                                     backend.prediction_type)
    if zero_snr:
        log.info("zero terminal SNR: the noise schedule's betas are rescaled (the last timestep is pure noise)%s",
                 " as the model's scheduler says" if cfg.model.zero_terminal_snr == "auto" else "")
    model = dataclasses.replace(cfg.model, zero_terminal_snr="true" if zero_snr else "false")
    return dataclasses.replace(cfg, model=model), scheduler


def model_family(backend) -> str:
    """The family whose defaults (config.FAMILY_DEFAULTS) a model takes: sdxl, sd_v2_768_v, sd_v2, sd_v1."""
    if backend.family == "sd_v2" and backend.prediction_type == "v_prediction":
        return "sd_v2_768_v"
    return backend.family


def with_model_defaults(cfg: Config, backend) -> Config:
    """The model family's defaults for what the config did not set (SDXL: resolution 1024, rank 32, ...), each one
    logged; the config returned is the one used (the snapshot and the resume settings take it)."""
    cfg, applied = with_family_defaults(cfg, model_family(backend))
    for line in applied:
        log.info(line)
    return cfg


def with_precision(cfg: Config, precision: str) -> Config:
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, mixed_precision=precision))
