"""Training a language model's LoRA (``model.task_type: text-generation``): the checks before the model loads, set-up,
the loop, and the finish (a PEFT adapter folder and summary.json in the run folder).

The run folder, checkpoints, resume, Ctrl-C and the TensorBoard writer are the image trainer's own (engine.run_dir,
engine.checkpoint, engine.interrupt); what reads the data and the model lives beside this file."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_trainer.config import Config, resolve_mixed_precision, save_config
from lora_trainer.engine import checkpoint as ckpt
from lora_trainer.engine.events import CallbackList, Callbacks
from lora_trainer.engine.interrupt import CtrlC, tensorboard_writer
from lora_trainer.engine.optim import build_optimizer, check_optimizer, lora_groups, lr_schedule
from lora_trainer.engine.output_checks import check_output
from lora_trainer.engine.run_dir import dropped_on_error, holds_a_run, prepare_run_dir, remove_run, run_log_file
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.llm import data as llm_data
from lora_trainer.llm.generate import sample_prompts
from lora_trainer.llm.model import (
    add_lora,
    context_length,
    default_targets,
    keeps_packed_rows_apart,
    load_model,
    load_tokenizer,
    read_model_config,
)
from lora_trainer.llm.outputs import export_adapter, write_summary
from lora_trainer.llm.quantize import DESCRIBED, check_quantization, prepare_for_training, quantization_config
from lora_trainer.llm.rows import read_rows
from lora_trainer.llm.run import LlmPlan, LlmRun, NonFiniteLoss
from lora_trainer.utils.checkpointing import enable_lora_checkpointing

log = logging.getLogger(__name__)
# (besides engine.checkpoint's SHOULD_MATCH): a resume with another value warns
DATA_SETTINGS = ("max_seq_length", "packing", "train_on_prompt", "quantize_base")


@dataclass
class LlmResult:
    status: str  # "finished" | "stopped"
    run_dir: Path
    adapter_dir: Path
    steps: int
    total_steps: int
    first_loss: float | None
    final_loss: float | None
    rows_trained: int
    rows_held_out: int
    wall_time_s: float
    evaluations: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Prepared:
    """What the checks before the model loads found out."""

    model_config: dict
    tokenizer: object
    examples: list
    held_out: list
    plan: LlmPlan
    targets: list[str]
    settings: dict
    quantization: object = None  # transformers' BitsAndBytesConfig (training.quantize_base), or None
    prompts: tuple = ()  # output.sample_prompts
    chat: bool = False  # the training rows are conversations (the sample prompts go through the chat template)


def _with_model_facts(cfg: Config) -> tuple[Config, dict]:
    """``cfg`` with the base model's folder as an absolute path (the adapter's config names its base by it: a
    relative one would load only from this folder) and data.max_seq_length within the model's context: its own
    length where the config left the default, a ConfigError where the config asked for more; and its config.json."""
    m, d = cfg.model, cfg.data
    folder = Path(m.base_model).expanduser()
    config = read_model_config(m.base_model, m.trust_remote_code)
    model = dataclasses.replace(m, base_model=str(folder.resolve()))
    limit = context_length(config)
    data = d
    if limit is not None and d.max_seq_length > limit:
        if "max_seq_length" in cfg.explicit:
            raise ConfigError(f"data.max_seq_length: {d.max_seq_length} tokens is more than the model takes "
                              f"({limit} positions, {folder.resolve() / 'config.json'}); set it to {limit} or less")
        log.info("data.max_seq_length: %d, the model's context (the default, %d, is longer)", limit, d.max_seq_length)
        data = dataclasses.replace(d, max_seq_length=limit)
    return dataclasses.replace(cfg, model=model, data=data), config


def _prepare(cfg: Config, model_config: dict) -> _Prepared:
    t, d, m = cfg.training, cfg.data, cfg.model
    check_quantization(t.quantize_base)
    quantization = None if t.quantize_base == "no" else quantization_config(t.quantize_base,
                                                                             _device_and_precision(t)[1])
    check_output(cfg.output.output_dir, cfg.output.output_name)
    check_optimizer(t)
    prompts = sample_prompts(cfg.output.sample_prompts)  # (read now: a mistake in them stops nothing later)
    rows = read_rows(d.train_data_dir, d.metadata_path, d.recursive)
    fraction = llm_data.auto_split(d.validation_split, "validation_split" in cfg.explicit, len(rows))
    train_rows, held_rows = llm_data.split_rows(rows, fraction, t.seed)
    tok = load_tokenizer(m.base_model, m.trust_remote_code)
    examples = llm_data.encode_rows(tok, train_rows, d.max_seq_length, d.train_on_prompt)
    held = llm_data.encode_rows(tok, held_rows, d.max_seq_length, d.train_on_prompt, held_out=True) if held_rows else []
    if d.packing:
        examples = llm_data.pack(examples, d.max_seq_length, t.seed)
    log.info("%d training rows%s from %s", len(train_rows),
             f", {len(held_rows)} held out for the eval loss ({fraction:.0%})" if held_rows else
             " (none held out: data.validation_split)", d.metadata_path or d.train_data_dir)
    plan = LlmPlan.from_config(t, len(examples))
    targets = t.target_modules if "target_modules" in cfg.explicit else default_targets(model_config.get("model_type"))
    settings = {"lora_rank": t.lora_rank, "lora_alpha": t.lora_alpha, "target_modules": list(targets),
                "batch_size": t.batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
                "seed": t.seed, "num_images": len(examples), "total_steps": plan.total_steps,
                "max_seq_length": d.max_seq_length, "packing": d.packing, "train_on_prompt": d.train_on_prompt,
                "quantize_base": t.quantize_base, "optimizer": t.optimizer, "optimizer_args": dict(t.optimizer_args),
                "loraplus_lr_ratio": t.loraplus_lr_ratio}
    return _Prepared(model_config, tok, examples, held, plan, list(targets), settings, quantization, tuple(prompts),
                     any(r.messages is not None for r in train_rows))


def _check_resumable(restored, resume_from: Path, prepared: _Prepared) -> None:
    """A checkpoint this run can continue: a language model's, of the same LoRA, with steps left."""
    if restored is None:
        return
    if restored.info.get("task_type") != "text-generation":
        raise ConfigError(f"training.resume_from_checkpoint: {resume_from} is an image LoRA's checkpoint")
    ckpt.check_resume(restored, prepared.settings, resume_from)
    saved = restored.info.get("settings", {})
    differ = [f"{k} {saved[k]!r} → {prepared.settings[k]!r}" for k in DATA_SETTINGS
              if k in saved and saved[k] != prepared.settings[k]]
    if differ:
        log.warning("resuming with changed data settings (%s): training continues, but not as the uninterrupted "
                    "run would have", ", ".join(differ))
    if restored.step >= prepared.plan.total_steps:
        raise ConfigError(f"training.resume_from_checkpoint: {resume_from} is at step {restored.step}, the run "
                          f"has {prepared.plan.total_steps}: nothing is left; raise training.epochs or "
                          "max_train_steps to train further")


def train_llm(cfg: Config, callbacks: Callbacks | None = None, progress: bool = True) -> LlmResult:
    """Train a language model's LoRA as ``cfg`` says and export the adapter; returns where everything went.
    ``callbacks`` get progress and may ask the loop to stop (it then saves a checkpoint and exports)."""
    started = time.time()
    cfg, model_config = _with_model_facts(cfg)
    prepared = _prepare(cfg, model_config)
    run_dir, resume_from, restored = prepare_run_dir(cfg.output.output_dir, cfg.training.resume_from_checkpoint)
    fresh = not holds_a_run(run_dir)  # (a new run, or a branch of an earlier checkpoint)
    with dropped_on_error(run_dir, fresh):
        _check_resumable(restored, resume_from, prepared)
    try:
        with run_log_file(run_dir) as log_dir, CtrlC() as ctrl_c:
            ctrl_c.setting_up = True  # (the model loading: nothing to save yet)
            run = _set_up(cfg, prepared, run_dir, log_dir, callbacks, progress)
            if restored is not None:
                run.resume(restored, resume_from)
                run.cbs.on_resume(run.step)
                run.bar.update(run.step)
            ctrl_c.setting_up = False
            stopped = _loop(run, ctrl_c)
            return _finish(run, stopped, started)
    except BaseException:
        if fresh and not ckpt.list_checkpoints(run_dir):
            remove_run(run_dir)  # failed before any checkpoint: leave no empty run behind
        raise


def _device_and_precision(t) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        device = torch.device("cuda")
        return device, resolve_mixed_precision(t.mixed_precision, "cuda", torch.cuda.is_bf16_supported())
    return torch.device("cpu"), resolve_mixed_precision(t.mixed_precision, "cpu", False)


def _set_up(cfg: Config, prepared: _Prepared, run_dir: Path, log_dir: Path, callbacks, progress: bool) -> LlmRun:

    t, m = cfg.training, cfg.model
    device, precision = _device_and_precision(t)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = load_model(m.base_model, dtype, device, m.trust_remote_code, prepared.quantization)
    model.config.use_cache = False
    rows_apart = cfg.data.packing and keeps_packed_rows_apart(model)
    if cfg.data.packing:
        log.info("packing: %s", "each row attends within itself (its own positions, as trl's packing)" if rows_apart
                 else "the joined rows attend to each other (this model or transformers release builds no per-row "
                      "mask from positions)")
    if prepared.quantization is not None:
        log.info("the frozen base is quantized: %s", DESCRIBED[t.quantize_base])
        model = prepare_for_training(model, t.gradient_checkpointing)
    elif t.gradient_checkpointing:
        enable_lora_checkpointing(model)
    torch.manual_seed(t.seed)  # (the LoRA's initial weights, and dropout: the same run for the same seed)
    model = add_lora(model, t, prepared.targets)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = lora_groups(model.named_parameters(), t.learning_rate, "LoRA", t.loraplus_lr_ratio)
    prepared.settings["learning_rates"] = [g["lr"] for g in groups]  # (a resume applies the ones changed since)
    optimizer = build_optimizer(t, groups, device)
    scheduler = lr_schedule(t, optimizer, prepared.plan.total_steps)
    save_config(cfg, run_dir / "config.yaml")
    plan = prepared.plan
    log.info("run folder %s; %d steps (%d epoch%s of %d steps), batch %d × accumulation %d, %s on %s; LoRA rank %d "
             "on %s (%d trainable parameters)", run_dir, plan.total_steps, plan.epochs, "s" * (plan.epochs != 1),
             plan.steps_per_epoch, t.batch_size,
             t.gradient_accumulation_steps, precision if precision != "no" else "fp32", device, t.lora_rank,
             ", ".join(prepared.targets), sum(p.numel() for p in trainable))
    run = LlmRun(cfg, model, prepared.tokenizer, device, precision, plan, prepared.examples, prepared.held_out,
                 run_dir, prepared.settings, optimizer, scheduler,
                 torch.amp.GradScaler(device.type, enabled=precision == "fp16"), CallbackList([callbacks]))
    run.writer = tensorboard_writer(log_dir, cfg.output.log_with == "tensorboard")
    run.prompts, run.chat, run.rows_apart = list(prepared.prompts), prepared.chat, rows_apart
    from tqdm.auto import tqdm

    run.bar = tqdm(total=plan.total_steps, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    run.cbs.on_start(plan.total_steps, run_dir)
    return run


def _loop(run: LlmRun, ctrl_c: CtrlC) -> bool:
    """Steps until the last (or a stop); True if stopped early. The held-out loss at the end of every epoch."""
    plan = run.plan
    run.loop_start, run.start_step = time.time(), run.step
    try:
        if run.step == 0 and run.cfg.output.sample_at_first:
            run.sample()  # (the base model's answers, to compare)
        while run.step < plan.total_steps:
            epoch = run.step // plan.steps_per_epoch
            groups = run.epoch_groups(epoch)
            for s in range(run.step % plan.steps_per_epoch, len(groups)):
                run.report(run.train_step(groups[s]), epoch)
                epoch_done = epoch + 1 if s + 1 == len(groups) else None
                if epoch_done:
                    run.evaluate(epoch_done)
                if run.sample_due(epoch_done):
                    run.sample()
                run.save_if_due(epoch_done)
                if run.step >= plan.total_steps:
                    break
                if ctrl_c.requested or run.cbs.should_stop():
                    return True
        return False
    except (NonFiniteLoss, torch.cuda.OutOfMemoryError) as e:
        run.optimizer.zero_grad(set_to_none=True)
        if run.step > 0:
            run.save("error")
            log.warning("saved the last good state (step %d); resume with resume_from_checkpoint: latest", run.step)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise LoraTrainerError("out of GPU memory: lower training.batch_size or data.max_seq_length (raise "
                                "gradient_accumulation_steps to keep the effective batch), or turn on "
                                "training.gradient_checkpointing") from e
        raise
    finally:
        run.bar.close()
        if run.writer is not None:
            run.writer.close()


def _finish(run: LlmRun, stopped: bool, started: float) -> LlmResult:
    t = run.cfg.training
    if stopped:
        run.save("stopped")
        log.warning("stopped at step %d of %d; resume with resume_from_checkpoint: latest", run.step,
                    run.plan.total_steps)
    else:
        if not run.evaluations or run.evaluations[-1]["step"] != run.step:
            run.evaluate(run.plan.epochs)  # (max_train_steps ended the run within an epoch)
        if t.save_steps or t.save_every_n_epochs:
            run.save("finished")
    status = "stopped" if stopped else "finished"
    with ckpt.stops_on_full_disk(run.run_dir, f"the adapter of step {run.step}"):
        adapter = export_adapter(run.model, run.tokenizer, run.run_dir, run.cfg.output.output_name, run.step)
    recent = run.losses[-10:]
    elapsed = time.time() - run.loop_start
    result = LlmResult(status, run.run_dir, adapter, run.step, run.plan.total_steps, run.first_loss,
                       sum(recent) / len(recent) if recent else None, len(run.examples), len(run.held_out),
                       time.time() - started, run.evaluations,
                       extra={"tokens_per_s": round(run.tokens_trained / elapsed, 1) if elapsed > 0 else None})
    if run.prompts:
        result.extra["samples"] = [str(p.relative_to(run.run_dir)) for p in run.samples]
    write_summary(run.run_dir, result)
    log.info("%s after %d steps: adapter %s", status, run.step, adapter)
    run.cbs.on_end(result)
    return result
