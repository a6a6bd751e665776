"""The training loop: one function, readable top to bottom.

No gradio and no WebUI in here: the loop reaches the model only through the backend protocol
(``lora_trainer.models.base.TrainingBackend``), so the same code trains a diffusers model on the
command line and the WebUI's loaded model in the tab, and all of it runs in CI on a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from lora_trainer.config import Config, resolve_mixed_precision, save_config, validate_paths
from lora_trainer.data.check import check_scan, image_facts
from lora_trainer.data.dataset import ImageDataset, scan_dataset
from lora_trainer.engine import checkpoint as ckpt
from lora_trainer.engine.batches import Plan, batch_stream
from lora_trainer.engine.cache import EncodedCache, LatentStore
from lora_trainer.engine.diagnose import StepInputs, diagnose_nonfinite_loss
from lora_trainer.engine.events import Callbacks, CallbackList, StepInfo, TrainResult
from lora_trainer.engine.lora import add_lora, load_trainable_state, trainable_state
from lora_trainer.engine.loss import diffusion_loss
from lora_trainer.engine.optim import build_optimizer, check_optimizer
from lora_trainer.engine.outputs import export_lora, write_summary
from lora_trainer.engine.run_dir import holds_a_run, latent_cache_dir, prepare_run_dir, remove_run, run_log_file
from lora_trainer.errors import DatasetError, LoraTrainerError
from lora_trainer.models.attention import resolve_attention
from lora_trainer.models.base import TEXT_ENCODER, UNET
from lora_trainer.models.compiling import check_compile

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(LoraTrainerError):
    """Training went wrong in a way the user can act on (NaN loss, out of memory)."""


def pick_device(mixed_precision: str) -> tuple[torch.device, str]:
    """The GPU if there is one, and the precision ``mixed_precision`` resolves to on it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return device, resolve_mixed_precision(mixed_precision, device.type, bf16)


class _CtrlC:
    """First Ctrl-C: stop after this step and save. Second: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _tensorboard(log_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(log_dir))


def train(cfg: Config, backend=None, callbacks: Callbacks | None = None, progress: bool = True,
          make_backend: Callable[[], object] | None = None) -> TrainResult:
    """Train a LoRA as ``cfg`` says and export it; returns where everything went.

    ``backend`` defaults to a diffusers model loaded from ``cfg.model.base_model``; the WebUI passes
    its own. A UI's host passes ``make_backend`` instead: it is called once the checks of the input have
    passed, so a bad dataset or setting is reported before its model loads (or the WebUI's is touched).
    ``callbacks`` get progress and may ask the loop to stop (it then saves and exports).
    """
    started = time.time()
    t, d = cfg.training, cfg.data
    # --- everything that can be wrong with the input is checked before any model loads
    validate_paths(cfg, check_base_model=backend is None and make_backend is None)
    check_optimizer(t.optimizer)
    resolve_attention(t.attention)
    device_type = None
    if t.compile_unet:
        device_type = (backend.device if backend is not None else pick_device(t.mixed_precision)[0]).type
        check_compile(device_type)
    scan = scan_dataset(d.train_data_dir, metadata_path=d.metadata_path, caption_extension=d.caption_extension,
                        caption_priority=d.caption_priority, caption_prefix=d.caption_prefix, recursive=d.recursive,
                        inspect=image_facts)
    log.info(scan.summary())
    log.info(check_scan(scan, d.resolution, d.caption_prefix, progress=progress).summary())
    plan = Plan.from_config(cfg, len(scan.samples))
    run_dir, resume_from = prepare_run_dir(cfg.output.output_dir, t.resume_from_checkpoint)
    restored = ckpt.load_checkpoint(resume_from) if resume_from else None
    settings = ckpt.run_settings(t, plan.num_images, plan.total_steps, d)
    if restored is not None:
        ckpt.check_resume(restored, settings, resume_from)

    fresh_run = restored is None and not holds_a_run(run_dir)
    prepared = _Prepared(run_dir, scan, plan, restored, resume_from, settings, started)
    try:
        if make_backend is not None:
            backend = make_backend()
            if t.compile_unet and backend.device.type != device_type:  # (a WebUI started with --use-cpu, say)
                check_compile(backend.device.type)
        return _train_in(cfg, backend, callbacks, progress, prepared)
    except BaseException:
        if fresh_run and not ckpt.list_checkpoints(run_dir):
            remove_run(run_dir)  # failed before any checkpoint: leave no empty run behind
        raise


@dataclass(frozen=True)
class _Prepared:
    """What the checks before any model loads found out."""

    run_dir: Path
    scan: object  # data.dataset.DatasetScan
    plan: Plan
    restored: ckpt.Restored | None
    resume_from: Path | None
    settings: dict
    started: float


def _train_in(cfg: Config, backend, callbacks, progress: bool, prepared: _Prepared) -> TrainResult:
    run_dir, scan, plan, restored = prepared.run_dir, prepared.scan, prepared.plan, prepared.restored
    resume_from, settings, started = prepared.resume_from, prepared.settings, prepared.started
    t, d = cfg.training, cfg.data
    with run_log_file(run_dir) as log_dir, _CtrlC() as ctrl_c:
        # --- model, precision, LoRA layers
        if backend is None:
            from lora_trainer.models.diffusers_backend import load_diffusers_backend

            device, precision = pick_device(t.mixed_precision)
            backend = load_diffusers_backend(cfg.model.base_model, device, DTYPES[precision],
                                             cfg.model.prediction_type)
        else:
            device = backend.device
            precision = {v: k for k, v in DTYPES.items()}[backend.weight_dtype]
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(t, mixed_precision=precision))
        t = cfg.training
        save_config(cfg, run_dir / "config.yaml")
        log.info("run folder %s; %d steps (%d epochs of %d), batch %d × accumulation %d, %s on %s",
                 run_dir, plan.total_steps, plan.epochs, plan.steps_per_epoch, t.batch_size,
                 t.gradient_accumulation_steps, precision if precision != "no" else "fp32", device)

        components = backend.components()
        modules = {UNET: components[UNET]}
        if t.train_text_encoder:
            modules[TEXT_ENCODER] = components[TEXT_ENCODER]
        torch.manual_seed(t.seed)  # LoRA A's initialisation
        groups = []
        for name, module in modules.items():
            te = name == TEXT_ENCODER
            params = add_lora(module, rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout,
                              target_modules=t.text_encoder_target_modules if te else t.target_modules,
                              key="training.text_encoder_target_modules" if te else "training.target_modules")
            cast_training_params(module, dtype=torch.float32)  # LoRA in fp32, frozen base in compute dtype
            groups.append({"params": params, "lr": t.text_encoder_lr if te else t.learning_rate})
            module.train()
        if t.gradient_checkpointing:
            backend.enable_gradient_checkpointing(text_encoder=t.train_text_encoder)
        backend.use_attention(t.attention)
        if t.channels_last:
            if hasattr(backend, "use_channels_last"):
                backend.use_channels_last()
            else:
                log.warning("channels_last: this model backend cannot change its layout; training without")
        if t.compile_unet:
            if hasattr(backend, "compile_unet"):
                backend.compile_unet(t.compile_mode)  # after the LoRA layers are in, so the graph has them
            else:
                log.warning("compile_unet: this model backend cannot compile its UNet; training without")

        optimizer = build_optimizer(t, groups, device)
        sched_name = t.lr_scheduler
        if sched_name == "constant" and t.lr_warmup_steps:
            sched_name = "constant_with_warmup"
        lr_scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                     num_training_steps=plan.total_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        autocast = (torch.autocast(device.type, dtype=DTYPES[precision]) if precision != "no"
                    else contextlib.nullcontext())
        generator = torch.Generator(device=device).manual_seed(t.seed)

        step = 0
        if restored is not None:
            load_trainable_state(modules, {k: v.to(device) for k, v in restored.weights.items()})
            optimizer.load_state_dict(restored.state["optimizer"])
            lr_scheduler.load_state_dict(restored.state["lr_scheduler"])
            scaler.load_state_dict(restored.state["scaler"])
            ckpt.set_rng_state(restored.state["rng"], generator)
            step = restored.step
            log.info("resumed from %s at step %d of %d", resume_from, step, plan.total_steps)

        dataset = ImageDataset(scan.samples, d.resolution, d.fast_jpeg_decode)
        cache = None
        if t.cache_latents:
            digests = [getattr(scan.facts.get(s.path), "digest", "") or None for s in scan.samples]
            store = LatentStore(latent_cache_dir(cfg.output.output_dir)) if t.cache_latents_to_disk else None
            cache = EncodedCache.build(backend, dataset, t.seed, flips=d.random_flip,
                                       texts=t.cache_text_embeddings and not t.train_text_encoder,
                                       progress=progress, digests=digests, store=store, weighted=d.weighted_captions)
        cbs = CallbackList([callbacks])
        cbs.on_start(plan.total_steps, run_dir)
        writer = _tensorboard(log_dir, cfg.output.log_with == "tensorboard")
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.total_steps, initial=step, desc="training", unit="step", disable=not progress,
                   dynamic_ncols=True)
        losses: deque[float] = deque(maxlen=20)
        first_loss = restored.info.get("first_loss") if restored else None
        last_saved = step if restored else -1
        loop_start, start_step = time.time(), step

        def save(reason: str) -> None:
            nonlocal last_saved
            if last_saved == step:
                return
            state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": ckpt.rng_state(generator)}
            info = {"reason": reason, "epoch": step // plan.steps_per_epoch, "total_steps": plan.total_steps,
                    "loss": losses[-1] if losses else None, "first_loss": first_loss, "settings": settings}
            path = ckpt.save_checkpoint(run_dir, step, trainable_state(modules), state, info,
                                        keep=t.checkpoints_total_limit)
            last_saved = step
            if path is not None:
                cbs.on_checkpoint(path)

        def one_micro_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """The loss of one micro-batch, and its inputs (latents, conditioning) for a diagnosis."""
            flip = None
            if d.random_flip:
                flip = torch.rand(len(batch["captions"]), generator=generator, device=device) < 0.5
            if cache is not None:
                latents = cache.latents(batch["indices"], flip, device)
            else:
                pixels = batch["pixel_values"].to(device)
                if flip is not None:
                    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
                latents = backend.encode_images(pixels, generator)
            with autocast:
                if cache is not None and cache.has_text:
                    cond = cache.text(batch["captions"], device)
                elif t.train_text_encoder:
                    cond = backend.encode_prompts(batch["captions"], weighted=d.weighted_captions)
                else:
                    with torch.no_grad():
                        cond = backend.encode_prompts(batch["captions"], weighted=d.weighted_captions)
                loss = diffusion_loss(backend, latents, cond, generator, noise_offset=t.noise_offset,
                                      min_snr_gamma=t.min_snr_gamma)
            return loss, latents, cond

        def diagnosis(value: float, batch, latents, cond, rng_before) -> str:
            """Why the loss of this micro-batch is ``value`` (engine.diagnose); re-runs it once."""
            def rerun():
                generator.set_state(rng_before)
                return one_micro_batch(batch)[0]

            inputs = StepInputs(latents, cond, [scan.samples[int(i)].path for i in batch["indices"]],
                                list(batch["captions"]))
            return diagnose_nonfinite_loss(value, step + 1, precision, inputs,
                                           [p for g in groups for p in g["params"]], grad_norm,
                                           backend.components(), rerun, backend.explain_nonfinite_text)

        stopped = False
        grad_norm = None  # the last optimizer step's gradient norm (a tensor), where gradients are clipped
        bpe = plan.batches_per_epoch
        stream = batch_stream(plan, t.seed, step, None if cache is not None else dataset,
                              [x.caption for x in scan.samples], t.dataloader_num_workers,
                              pin_memory=device.type == "cuda")
        try:
            if cache is not None and hasattr(backend, "offload_idle_encoders"):
                backend.offload_idle_encoders(text_encoder=cache.has_text)
            step_loss = 0.0
            for epoch, i, batch in stream:
                group_size = min(plan.grad_accum, bpe - (i // plan.grad_accum) * plan.grad_accum)
                rng_before = generator.get_state()
                loss, latents, cond = one_micro_batch(batch)
                loss_value = loss.item()  # the one host sync of a micro-batch
                if not math.isfinite(loss_value):
                    raise TrainingError(diagnosis(loss_value, batch, latents, cond, rng_before))
                scaler.scale(loss / group_size).backward()
                step_loss += loss_value / group_size
                if (i + 1) % plan.grad_accum and i + 1 < bpe:
                    continue
                # --- one optimizer step
                if t.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]],
                                                               t.max_grad_norm)  # (kept for a diagnosis, no sync)
                scaler.step(optimizer)
                scaler.update()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss)
                first_loss = step_loss if first_loss is None else first_loss
                lr = lr_scheduler.get_last_lr()[0]
                elapsed = time.time() - loop_start
                info = StepInfo(step, plan.total_steps, epoch + 1, step_loss, sum(losses) / len(losses), lr,
                                elapsed, (step - start_step) / elapsed if elapsed > 0 else 0.0)
                bar.update(1)
                bar.set_postfix(loss=f"{info.loss_avg:.4f}", lr=f"{lr:.2e}", epoch=epoch + 1)
                if writer is not None:
                    writer.add_scalar("train/loss", step_loss, step)
                    writer.add_scalar("train/lr", lr, step)
                cbs.on_step(info)
                step_loss = 0.0
                epochs_done, mid_epoch = divmod(step, plan.steps_per_epoch)
                if step < plan.total_steps:  # the last step's state is the exported LoRA
                    if t.save_steps and step % t.save_steps == 0:
                        save("save_steps")
                    if not mid_epoch and t.save_every_n_epochs and epochs_done % t.save_every_n_epochs == 0:
                        save("save_every_n_epochs")
                if ctrl_c.requested or cbs.should_stop():
                    stopped = True
                    break
        except (TrainingError, DatasetError, torch.cuda.OutOfMemoryError) as e:  # (DatasetError: an image
            # that changed after the scan, when they are read each step)
            # the weights are still those of the last complete step: keep them, so nothing trained is lost
            optimizer.zero_grad(set_to_none=True)
            if step > 0:
                save("error")
                log.warning("saved the last good state (step %d); fix the cause and resume with "
                            "resume_from_checkpoint: latest", step)
            if not isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            raise TrainingError(
                "out of GPU memory: lower training.batch_size (and raise gradient_accumulation_steps to keep the "
                "effective batch), turn on training.gradient_checkpointing, or lower data.resolution") from e
        finally:
            stream.close()
            bar.close()
            if writer is not None:
                writer.close()
            if hasattr(backend, "restore_encoders"):
                backend.restore_encoders()

        if stopped:
            save("stopped")
            log.warning("stopped at step %d of %d; resume with resume_from_checkpoint: latest", step, plan.total_steps)
        status = "stopped" if stopped else "finished"
        lora_path, diffusers_path = export_lora(run_dir, cfg, backend, modules, scan, started, step, plan)
        result = TrainResult(status=status, run_dir=run_dir, lora_path=lora_path, diffusers_path=diffusers_path,
                             steps=step, total_steps=plan.total_steps,
                             final_loss=sum(losses) / len(losses) if losses else None, first_loss=first_loss,
                             images_used=len(scan.samples), images_skipped=len(scan.skipped),
                             wall_time_s=time.time() - started)
        write_summary(run_dir, result, scan)
        log.info("%s after %d steps: %s", status, step, lora_path)
        cbs.on_end(result)
        return result
