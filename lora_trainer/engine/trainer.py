"""Training: the checks before any model loads, then set-up, a short loop, and the finish.

No gradio and no WebUI in here: the loop reaches the model only through the backend protocol
(``lora_trainer.models.base.TrainingBackend``), so the same code trains a diffusers model on the
command line and the WebUI's loaded model in the tab, and all of it runs in CI on a CPU. What a run
holds and the operations the loop calls live in ``engine.run``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.config import Config, save_config, validate_paths, with_family_defaults
from lora_trainer.data.augment import CaptionAugment
from lora_trainer.data.buckets import BucketSpec
from lora_trainer.data.check import check_scan, image_facts
from lora_trainer.data.dataset import scan_dataset
from lora_trainer.data.regularization import scan_regularization, with_regularization
from lora_trainer.engine import checkpoint as ckpt
from lora_trainer.engine.batches import Plan
from lora_trainer.engine.distributed import Group, ProcessLost
from lora_trainer.engine.events import CallbackList, Callbacks, TrainResult
from lora_trainer.engine.guard import NanGuard, NonFinite, check_free_space, disk_estimate, skip_step
from lora_trainer.engine.interrupt import CtrlC as _CtrlC
from lora_trainer.engine.interrupt import tensorboard_writer as _tensorboard
from lora_trainer.engine.optim import check_optimizer
from lora_trainer.engine.output_checks import check_output
from lora_trainer.engine.outputs import export_lora, write_summary
from lora_trainer.engine.preflight import Where, preflight
from lora_trainer.engine.run import (
    Run,
    TrainingError,
    add_lora_layers,
    build_cache,
    log_buckets,
    model_family,
    optimization,
    prepare_backend,
    resume,
    training_dataset,
    with_model_defaults,
    with_noise_schedule,
    with_precision,
)
from lora_trainer.engine.run_dir import (
    dropped_on_error,
    holds_a_run,
    latent_cache_dir,
    prepare_run_dir,
    remove_run,
    run_log_file,
)
from lora_trainer.engine.samples import SampleMaker, load_sample_prompts
from lora_trainer.engine.validation import Validator, validation_samples
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.models.attention import resolve_attention
from lora_trainer.models.compiling import check_compile
from lora_trainer.models.factory import BUILTIN_MODELS, load_backend, pick_device, precision_of
from lora_trainer.models.family import family_of
from lora_trainer.models.fp8 import check_fp8_base
from lora_trainer.models.sdxl_backend import check_clip_skip

__all__ = ["TrainingError", "train"]
log = logging.getLogger(__name__)


def train(cfg: Config, backend=None, callbacks: Callbacks | None = None, progress: bool = True,
          make_backend: Callable[[], object] | None = None, family: str | None = None,
          where: Where | None = None, group: Group | None = None) -> TrainResult:
    """Train a LoRA as ``cfg`` says and export it; returns where everything went.

    ``backend`` defaults to a diffusers model loaded from ``cfg.model.base_model``; the WebUI passes
    its own. A UI's host passes ``make_backend`` instead: it is called once the checks of the input have
    passed, so a bad dataset or setting is reported before its model loads (or the WebUI's is touched).
    ``callbacks`` get progress and may ask the loop to stop (it then saves and exports). ``family``: the model's
    family where the caller knows it before the model loads (a UI's host); the dataset check runs at the resolution
    the run will use (``checked_resolution``). ``where``: where a host's run will train (engine.preflight.Where),
    for the memory estimate before its model loads; the command line's is read from the config. ``group``: this
    process's place in a multi-process run (engine.distributed; the command line under torchrun), where rank 0
    alone writes; the result of the other ranks has no files.
    """
    started = time.time()
    t, d = cfg.training, cfg.data
    # --- everything that can be wrong with the input is checked before any model loads
    validate_paths(cfg, check_base_model=backend is None and make_backend is None, builtin_models=BUILTIN_MODELS)
    check_output(cfg.output.output_dir, cfg.output.output_name)
    check_optimizer(t)
    resolve_attention(t.attention)
    if t.fp8_base:
        check_fp8_base(backend)
    device_type = None
    if t.compile_unet:
        device_type = (backend.device if backend is not None else pick_device(t.mixed_precision)[0]).type
        check_compile(device_type)
    scan = scan_dataset(d.train_data_dir, metadata_path=d.metadata_path, caption_extension=d.caption_extension,
                        caption_priority=d.caption_priority, caption_prefix=d.caption_prefix, recursive=d.recursive,
                        inspect=image_facts)
    log.info(scan.summary())
    resolution = checked_resolution(cfg, backend, make_backend, family)
    reg = (scan_regularization(d.reg_data_dir, d.caption_extension, d.caption_priority, d.recursive,
                               inspect=image_facts) if d.reg_data_dir else None)  # (checked, then trained)
    log.info(check_scan(scan, resolution, d.caption_prefix, progress=progress,
                        buckets=BucketSpec.from_data(d, resolution), reg=reg).summary())
    scan, held_out = validation_samples(cfg, scan)  # (data.validation_split / validation_dir)
    scan = with_regularization(d, scan, inspect=image_facts, reg=reg)  # (data.reg_data_dir: after the subject's)
    buckets = training_dataset(cfg, scan, resolution).epoch_groups()
    world = group.world_size if group is not None else 1
    cfg, estimate = _preflight(cfg, backend, make_backend, family, where, len(scan.samples), buckets, world)
    t = cfg.training
    prompts = load_sample_prompts(cfg.output.sample_prompts)  # (read now: a mistake in them stops nothing later)
    plan = Plan.from_config(cfg, len(scan.samples), buckets, world)
    if group is not None:
        _check_agreement(group, cfg, plan, scan)

    def run_folder():
        run_dir, resume_from, restored = prepare_run_dir(cfg.output.output_dir, t.resume_from_checkpoint)
        fresh = not holds_a_run(run_dir)  # (a new run, or a branch of an earlier checkpoint)
        if restored is not None:
            with dropped_on_error(run_dir, fresh):
                _check_resumable(restored, resume_from, run_dir, plan.total_steps)
        return run_dir, resume_from, restored, fresh

    # (rank 0 picks the folder and reads the checkpoint; the others get them: they need not see its disk)
    run_dir, resume_from, restored, fresh_run = (run_folder() if group is None else
                                                 group.from_rank0(run_folder, "choosing the run folder"))
    settings = ckpt.run_settings(t, plan.num_images, plan.total_steps, d, cfg.model, world, plan.images_per_epoch)
    pending = ckpt.left_to_the_model(cfg)  # (checked once the model is loaded)
    if restored is not None:
        with dropped_on_error(run_dir, fresh_run and (group is None or group.main)):
            ckpt.check_resume(restored, settings, resume_from, keys=set(settings) - set(pending))

    prepared = _Prepared(run_dir, scan, plan, restored, resume_from, pending, started, held_out, prompts, estimate,
                         group)
    try:
        if make_backend is not None:
            backend = make_backend()
            if t.compile_unet and backend.device.type != device_type:  # (a WebUI started with --use-cpu, say)
                check_compile(backend.device.type)
        return _train_in(cfg, backend, callbacks, progress and (group is None or group.main), prepared)
    except BaseException:
        if fresh_run and (group is None or group.main) and not ckpt.list_checkpoints(run_dir):
            remove_run(run_dir)  # failed before any checkpoint: leave no empty run behind
        raise


def checked_resolution(cfg: Config, backend=None, make_backend=None, family: str | None = None) -> int:
    """The resolution the run will train at, known before a model loads: the config's, or its model family's
    default where the config set none (SDXL: 1024), so the dataset check warns about the right sizes. The family:
    ``family`` (a UI's host knows it), else the given backend's, else read from ``model.base_model``'s files when
    train loads the model itself; a host's ``make_backend`` without ``family``: unknown, the config's value."""
    family = known_family(cfg, backend, make_backend, family)
    if family == "sdxl" and cfg.training.clip_skip != 1:  # (else found once the model is in: models.sdxl_backend)
        check_clip_skip(cfg.training.clip_skip)
    return with_family_defaults(cfg, family)[0].data.resolution


def known_family(cfg: Config, backend=None, make_backend=None, family: str | None = None) -> str | None:
    """The model's family before a model loads: ``family`` (a UI's host knows it), else the given backend's, else
    read from ``model.base_model``'s files where train loads the model itself; None: not known yet."""
    if family is None and backend is not None:
        return model_family(backend)
    if family is None and make_backend is None:
        return family_of(cfg.model.base_model, cfg.model.prediction_type)
    return family


def _preflight(cfg: Config, backend, make_backend, family, where: Where | None, num_images: int, buckets,
               world_size: int = 1):
    """The memory and time estimate before the model loads (engine.preflight): on a GPU, or anywhere with
    training.auto_fit; with it, settings that fit are applied. A run with a loaded backend was estimated by its host.
    ``buckets``: the images' indices by bucket, for the step count (engine.batches.Plan)."""
    if where is None and backend is None and make_backend is None:
        where = Where(cfg.model.base_model, family_of(cfg.model.base_model, cfg.model.prediction_type),
                      pick_device(cfg.training.mixed_precision)[0])
    if where is None or (where.device.type == "cpu" and not cfg.training.auto_fit):
        return cfg, None
    return preflight(cfg, where, lambda c: Plan.from_config(c, num_images, buckets, world_size).total_steps)


def _check_agreement(group: Group, cfg: Config, plan: Plan, scan) -> None:
    """The processes of a multi-process run must train the same images in the same steps: refused, naming each
    process's values, where a dataset differs between machines or training.auto_fit chose differently on GPUs of
    different memory."""
    import hashlib

    t = cfg.training
    digest = hashlib.sha256("\n".join(f"{s.path.name}\t{s.caption}\t{s.repeats}" for s in scan.samples).encode()
                            ).hexdigest()[:12]
    mine = {"images": plan.num_images, "dataset digest": digest, "batch_size": t.batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "steps": plan.total_steps}
    every = group.gather(mine, "comparing the processes' settings")
    differ = [k for k in mine if len({str(m[k]) for m in every}) > 1]
    if differ:
        raise ConfigError("the processes of this run disagree on " + "; ".join(
            f"{k} ({', '.join(f'rank {r}: {m[k]}' for r, m in enumerate(every))})" for k in differ)
            + ": every machine needs the same dataset (data.train_data_dir) and the same settings; set "
              "training.batch_size and gradient_accumulation_steps in the config instead of training.auto_fit "
              "where the GPUs differ")


def _check_resumable(restored, resume_from: Path, run_dir: Path, total_steps: int) -> None:
    """A run that finished has nothing to resume unless the config now asks for more steps; then it continues from
    its final checkpoint (kept where the run saves checkpoints), else from its last one, saying so."""
    import json

    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    finished = summary.get("steps") if summary.get("status") == "finished" else None
    if finished is not None and finished >= total_steps:  # (a run stopped at its last step resumes to finish)
        raise ConfigError(f"training.resume_from_checkpoint: the run in {run_dir} finished at step {finished} of "
                          f"{total_steps}: nothing is left to resume. To train it further, raise training.epochs or "
                          "max_train_steps and resume again; for a new run, remove resume_from_checkpoint")
    if finished is not None and restored.step < finished:
        log.warning("the run in %s finished at step %d but kept no checkpoint of its end (training.save_steps 0): "
                    "it continues from %s (step %d) to step %d", run_dir, finished, resume_from, restored.step,
                    total_steps)


@dataclass(frozen=True)
class _Prepared:
    """What the checks before any model loads found out."""

    run_dir: Path
    scan: object  # data.dataset.DatasetScan
    plan: Plan
    restored: ckpt.Restored | None
    resume_from: Path | None
    pending: tuple[str, ...]  # resume settings the model decides (engine.checkpoint.left_to_the_model)
    started: float
    held_out: list = ()  # the validation images (engine.validation)
    prompts: list = ()  # the sample prompts (engine.samples)
    estimate: object = None  # the pre-flight's (engine.preflight.Estimate), or None
    group: Group | None = None  # a multi-process run's (engine.distributed)

    @property
    def main(self) -> bool:
        return self.group is None or self.group.main


def _train_in(cfg: Config, backend, callbacks, progress: bool, prepared: _Prepared) -> TrainResult:
    # (a process of several also stops on SIGTERM: torchrun's signal to every process on Ctrl-C, by torch version)
    logs = run_log_file(prepared.run_dir) if prepared.main else contextlib.nullcontext(prepared.run_dir / "logs")
    with logs as log_dir, _CtrlC(sigterm=prepared.group is not None) as ctrl_c:
        ctrl_c.setting_up = True  # (the caches: minutes on a large set, and nothing to save yet)
        run = _set_up(cfg, backend, callbacks, progress, prepared, log_dir)
        ctrl_c.setting_up = False
        stopped = _loop(run, ctrl_c)
        return _finish(run, stopped, prepared.started)


def _set_up(cfg: Config, backend, callbacks, progress: bool, prepared: _Prepared, log_dir: Path) -> Run:
    """The model at its precision with LoRA layers in, the optimizer, the resume, the caches: a Run."""
    if backend is None:
        backend = load_backend(cfg)
    if cfg.training.fp8_base:  # (a host's backend is known only now: refused before anything in it changes)
        check_fp8_base(backend)
    precision = precision_of(backend)
    cfg, noise_scheduler = with_noise_schedule(with_model_defaults(with_precision(cfg, precision), backend), backend)
    t, plan, run_dir = cfg.training, prepared.plan, prepared.run_dir
    dataset = training_dataset(cfg, prepared.scan)
    replanned = Plan.from_config(cfg, plan.num_images, dataset.epoch_groups(), plan.world_size)
    if replanned.buckets != plan.buckets:  # (the resolution was the model family's, known only now)
        plan = replanned
    group = prepared.group
    settings = ckpt.run_settings(t, plan.num_images, plan.total_steps, cfg.data, cfg.model, plan.world_size,
                                 plan.images_per_epoch)
    if prepared.restored is not None and prepared.pending:
        ckpt.check_resume(prepared.restored, settings, prepared.resume_from, keys=prepared.pending)
    if prepared.main:
        save_config(cfg, run_dir / "config.yaml")
    processes = f" × {plan.world_size} processes" if plan.world_size > 1 else ""
    log.info("run folder %s; %d steps (%d epoch%s of %d steps), batch %d%s × accumulation %d = %d images a step, "
             "%s on %s",
             run_dir, plan.total_steps, plan.epochs, "s" * (plan.epochs != 1), plan.steps_per_epoch, t.batch_size,
             processes,
             t.gradient_accumulation_steps, plan.effective_batch, precision if precision != "no" else "fp32",
             backend.device)
    modules, groups = add_lora_layers(cfg, backend)
    settings["learning_rates"] = [g["lr"] for g in groups]  # (a resume applies the ones changed since)
    prepare_backend(cfg, backend)
    if prepared.main:
        check_free_space(run_dir, disk_estimate(cfg, plan, sum(p.numel() for g in groups for p in g["params"]),
                                                latent_cache_dir(cfg.output.output_dir)))
    run = Run(cfg, backend, precision, plan, prepared.scan, run_dir, settings, modules, groups, None, None, None,
              torch.Generator(device=backend.device).manual_seed(t.seed),
              dataset, CallbackList([callbacks]), noise_scheduler=noise_scheduler, guard=NanGuard.from_config(t),
              estimate=prepared.estimate, group=group)
    run.buckets, run.started_at = log_buckets(dataset), prepared.started
    run.augment = CaptionAugment.from_config(cfg.data, t.seed)
    if run.augment is not None:
        log.info("captions augmented: %s", run.augment.describe())
    try:  # (from here the encoders the steps need not may wait on the CPU: _loop puts them back at its end)
        _build_caches(run, prepared, progress)
        # the UNet is on the device from here (it may have waited on the CPU since it loaded): what holds its LoRA
        if group is not None:  # (the same seed made them alike; rank 0's, to be sure)
            group.broadcast_parameters([p for g in groups for p in g["params"]])
        run.optimizer, run.lr_scheduler, run.scaler = optimization(cfg, groups, backend.device, precision,
                                                                   plan.total_steps)
        if prepared.restored is not None:
            resume(run, prepared.restored, prepared.resume_from)
        if group is not None and not group.main:  # (LoRA dropout's masks: another sequence than rank 0's, the
            torch.manual_seed(t.seed + 1_000_003 * group.rank + 7_919 * run.step)  # same on a resume at this step)
        if run.main:  # (rank 0 alone: the validation loss, the samples and TensorBoard)
            run.sampler = SampleMaker.for_run(run, list(prepared.prompts))
        run.cbs.on_start(plan.total_steps, run_dir)
        if prepared.restored is not None:
            run.cbs.on_resume(run.step)
        run.writer = _tensorboard(log_dir, cfg.output.log_with == "tensorboard") if run.main else None
        from tqdm.auto import tqdm

        run.bar = tqdm(total=plan.total_steps, initial=run.step, desc="training", unit="step",
                       disable=not progress, dynamic_ncols=True)
    except BaseException:
        backend.restore_encoders()
        raise
    run.loop_start, run.start_step = time.time(), run.step
    return run


def _build_caches(run: Run, prepared: _Prepared, progress: bool) -> None:
    """The latents and captions (the validation images' too) encoded once, while the UNet waits off the GPU where
    the run loaded its own model (from its load: ``models.factory.load_backend``); then the encoders the steps need
    not leave the GPU before the UNet comes, so the two never share it (SDXL: a 5.1 GB UNet, 1.8 GB of encoders and
    VAE; models.offload; the pre-flight counts both phases). The optimizer is made after (fused AdamW checks where
    its parameters are)."""
    waiting = run.backend.unet_waits_for_cache() if run.cfg.training.cache_latents else contextlib.nullcontext()
    with waiting:
        run.cache = build_cache(run, progress)
        if run.main:  # (rank 0 alone: the validation loss)
            run.validator = Validator.for_run(run, list(prepared.held_out), progress, prepared.scan.facts)
        if run.cache is not None:  # steps need neither the VAE nor (with captions cached) the text encoder
            run.backend.offload_idle_encoders(text_encoder=run.cache.has_text)


def _loop(run: Run, ctrl_c: _CtrlC) -> bool:
    """Steps until the last (or a stop); True if stopped early. A non-finite loss or gradient rolls back to the
    guard's last good state and the steps go on from there (engine.guard), or ends the run with its diagnosis."""
    try:
        run.evaluate_at_start()  # (the baseline samples, output.sample_at_first)
        run.guard.take(run)
        while True:
            try:
                return _steps(run, ctrl_c)
            except NonFinite as e:
                run.guard.recover(run, e)  # rolled back; else raises the diagnosis as a TrainingError
    except (TrainingError, DatasetError, ProcessLost, torch.cuda.OutOfMemoryError) as e:  # (DatasetError: an
        # image that changed after the scan, when they are read each step; ProcessLost: another process of several)
        _keep_last_good_state(run)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise TrainingError(
                "out of GPU memory: lower training.batch_size (and raise gradient_accumulation_steps to keep the "
                "effective batch), turn on training.gradient_checkpointing, or lower data.resolution") from e
        raise
    finally:
        run.bar.close()
        if run.writer is not None:
            run.writer.close()
        run.backend.restore_encoders()


def _steps(run: Run, ctrl_c: _CtrlC) -> bool:
    """Micro-batches from the run's step to the last (or a stop); True if stopped early. Those the NaN guard
    skips are not trained (a step of only such is taken without an update)."""
    plan, stream, guard = run.plan, run.batches(), run.guard
    bpe = plan.batches_per_epoch
    try:
        step_loss, trained = 0.0, 0
        for epoch, i, batch in stream:
            group_size = min(plan.grad_accum, bpe - (i // plan.grad_accum) * plan.grad_accum)
            if not guard.skips(epoch, i):
                guard.training(epoch, i, batch)
                step_loss += run.backward(batch, group_size) / group_size
                trained += 1
            if (i + 1) % plan.grad_accum and i + 1 < bpe:
                continue  # gradients accumulate
            if trained:
                step_loss = run.optimizer_step(step_loss)  # (summed over the processes, where several)
                run.report(step_loss if trained == group_size else step_loss * group_size / trained, epoch)
            else:
                skip_step(run)
            step_loss, trained = 0.0, 0
            run.evaluate_if_due(epoch + 1 if i + 1 >= bpe else None)  # (validation loss, sample images)
            run.save_if_due()
            guard.after_step(run)
            if run.should_stop(ctrl_c.requested):
                run.evaluate_if_due(None, stopping=True)  # (the validation loss where it stopped)
                return True
        return False
    finally:
        stream.close()


def _keep_last_good_state(run: Run) -> None:
    """After an error the weights are still those of the last complete step: keep them, so nothing is lost."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.step > 0 and run.main:
        run.save("error")
        log.warning("saved the last good state (step %d); fix the cause and resume with "
                    "resume_from_checkpoint: latest", run.step)


def _finish(run: Run, stopped: bool, started: float) -> TrainResult:
    """A checkpoint if stopped early, then the LoRA files, summary.json and the callbacks' on_end."""
    if stopped:
        run.save("stopped")
        if run.main:
            log.warning("stopped at step %d of %d; resume with resume_from_checkpoint: latest", run.step,
                        run.plan.total_steps)
    elif run.cfg.training.save_steps or run.cfg.training.save_every_n_epochs:
        run.save("finished")  # (a resume with more epochs or steps continues from here)
    status = "stopped" if stopped else "finished"
    lora_path = diffusers_path = None  # (rank 0 alone writes them, where several processes train)
    if run.main:
        with ckpt.stops_on_full_disk(run.run_dir, f"the LoRA files of step {run.step} into {run.run_dir}"):
            lora_path, diffusers_path = export_lora(run.run_dir, run.cfg, run.backend, run.modules, run.scan,
                                                    started, run.step, run.plan,
                                                    bucket_info=run.dataset.bucket_info())
    result = TrainResult(status=status, run_dir=run.run_dir, lora_path=lora_path, diffusers_path=diffusers_path,
                         steps=run.step, total_steps=run.plan.total_steps,
                         final_loss=sum(run.losses) / len(run.losses) if run.losses else None,
                         first_loss=run.first_loss, images_used=sum(not s.is_reg for s in run.scan.samples),
                         images_skipped=len(run.scan.skipped), wall_time_s=time.time() - started,
                         skipped=[{"path": str(s.path), "reason": s.reason} for s in run.scan.skipped],
                         extra={"nan_rollbacks": run.guard.rollbacks, **run.timing(), **run.buckets,
                                "world_size": run.plan.world_size, "effective_batch": run.plan.effective_batch})
    result.extra.update(run.evaluations())  # (the validation loss, the sample images)
    if not run.main:
        run.cbs.on_end(result)
        return result
    write_summary(run.run_dir, result)
    log.info("%s after %d steps: %s", status, run.step, lora_path)
    run.cbs.on_end(result)
    return result
