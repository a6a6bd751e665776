"""What a run leaves behind: the kohya LoRA for the WebUI, the diffusers file, and summary.json."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from lora_trainer.engine.lora import lora_alphas, lora_state_dict
from lora_trainer.export.diffusers_format import save_diffusers_lora
from lora_trainer.export.kohya import peft_to_kohya, save_kohya_lora
from lora_trainer.export.metadata import ModelFacts, RunFacts, build_metadata
from lora_trainer.models.base import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from lora_trainer.utils.fsio import atomic_write_json

log = logging.getLogger(__name__)
# what summary.json says of the validation loss and the sample images, where the run had them
TIMING = ("preflight", "seconds_per_step")
BUCKETS = ("buckets", "mean_img_ar_error")  # the aspect-ratio buckets and their image counts (engine.run.log_buckets)
BATCH = ("world_size", "effective_batch")  # processes, and images an optimizer step (engine.batches.Plan)
EVALUATIONS = ("validation_loss", "validation_images", "validation_losses", "sample_images")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def set_aside_interim_exports(run_dir: Path, names: list[str]) -> None:
    """A resumed run's earlier export (a stop's, an error's, a finished run continued) in its own folder: moved to
    ``<stem>-step<N><suffix>`` (N: the steps summary.json says it had), so the documented names hold the newest
    weights and nothing is lost. Run folders hold one run each: these files (or, a language model's adapter,
    folders) are this run's own."""
    import json

    from lora_trainer.utils.fsio import free_name

    present = [run_dir / n for n in names if (run_dir / n).exists()]
    if not present:
        return
    try:
        steps = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("steps")
    except (OSError, ValueError):
        steps = None
    for path in present:
        kept = free_name(path.with_name(f"{path.stem}-step{steps if steps is not None else 'interim'}{path.suffix}"))
        path.rename(kept)
        log.info("the export of the run's step %s stays as %s; %s takes the newest weights", steps, kept.name,
                 path.name)


def export_lora(run_dir: Path, cfg, backend, modules: dict, scan, started_at: float, steps: int, plan,
                bucket_info: dict | None = None):
    """Write ``<output_name>.safetensors`` (kohya) and, if asked, the diffusers file; return both paths.
    ``bucket_info``: the run's aspect-ratio buckets (ImageDataset.bucket_info: kohya's ss_bucket_info)."""
    from lora_trainer.export.diffusers_format import WEIGHT_NAME

    t, out = cfg.training, cfg.output
    states = {name: lora_state_dict(module) for name, module in modules.items()}
    set_aside_interim_exports(run_dir, [f"{out.output_name}.safetensors", WEIGHT_NAME])
    lora_path = _kohya_file(run_dir / f"{out.output_name}.safetensors", states, cfg, backend, modules, scan,
                            started_at, steps, plan, bucket_info)
    diffusers_path = None
    if out.save_diffusers_format:
        diffusers_path = save_diffusers_lora(run_dir, states[UNET], states.get(TEXT_ENCODER),
                                             rank=t.lora_rank, alpha=t.lora_alpha,
                                             dtype=SAVE_DTYPES[out.save_precision],
                                             text_encoder_2_state=states.get(TEXT_ENCODER_2),
                                             unet_alphas=lora_alphas(modules[UNET]))
    return lora_path, diffusers_path


def export_epoch_lora(run_dir: Path, cfg, backend, modules: dict, scan, started_at: float, steps: int, plan,
                      bucket_info: dict | None = None) -> Path:
    """The LoRA at the end of an epoch (training.save_every_n_epochs) as kohya names it,
    ``<output_name>-<epoch, 6 digits>.safetensors``: to compare the epochs (an X/Y plot of them in the WebUI)."""
    states = {name: lora_state_dict(module) for name, module in modules.items()}
    epoch = -(-steps // plan.steps_per_epoch)
    path = _kohya_file(run_dir / f"{cfg.output.output_name}-{epoch:06d}.safetensors", states, cfg, backend, modules,
                       scan, started_at, steps, plan, bucket_info)
    log.info("the LoRA of epoch %d: %s", epoch, path)
    return path


def _kohya_file(path: Path, states: dict, cfg, backend, modules: dict, scan, started_at: float, steps: int, plan,
                bucket_info: dict | None) -> Path:
    """The kohya LoRA of ``states`` (peft's state of each trained component) with its ss_* metadata, at ``path``."""
    import time

    t, out = cfg.training, cfg.output
    tensors = {}
    for name, state in states.items():  # (peft_to_kohya names CLIP layers as the WebUI does; the family tells it
        # whether SD 2.x's open_clip text encoder needs all four attention projections, not the encoder's width)
        tensors.update(peft_to_kohya(state, backend.kohya_prefixes[name], t.lora_alpha,
                                    dtype=SAVE_DTYPES[out.save_precision],
                                    rename=lambda path, name=name: backend.kohya_module_path(name, path),
                                    family=backend.family, alphas=lora_alphas(modules[name])))
    model = ModelFacts(backend.family, backend.prediction_type, backend.model_name, getattr(backend, "clip_skip", None))
    facts = RunFacts(steps=steps, max_train_steps=plan.total_steps, epoch=-(-steps // plan.steps_per_epoch),
                     num_epochs=plan.epochs, num_train_images=sum(s.repeats for s in scan.samples if not s.is_reg),
                     tag_frequency=scan.tag_frequencies(),
                     trained_text_encoder=TEXT_ENCODER in modules, trained_text_encoder_2=TEXT_ENCODER_2 in modules,
                     started_at=started_at, finished_at=time.time(), bucket_info=bucket_info)
    # kohya's ss_total_batch_size: batch_size × processes × gradient_accumulation_steps
    trained = [s for s in scan.samples if not s.is_reg]
    extra = {"ss_total_batch_size": plan.effective_batch,
             "ss_dataset_dirs": scan.folders() or {scan.root.name: {"n_repeats": 1, "img_count": len(trained)}}}
    if len(trained) < len(scan.samples):  # (data.reg_data_dir; kohya counts them with their folders' repeats)
        extra.update(ss_reg_dataset_dirs=scan.reg_dirs, ss_prior_loss_weight=t.prior_loss_weight,
                     ss_num_reg_images=sum(f["n_repeats"] * f["img_count"] for f in scan.reg_dirs.values()))
    metadata = build_metadata(cfg, model, facts, extra=extra)
    return save_kohya_lora(path, tensors, metadata)


def write_summary(run_dir: Path, result) -> Path:
    import diffusers
    import peft

    summary = {
        "status": result.status,
        "steps": result.steps,
        "total_steps": result.total_steps,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "images_used": result.images_used,
        "images_skipped": result.images_skipped,
        "skipped": result.skipped,
        "nan_rollbacks": result.extra.get("nan_rollbacks", []),  # the NaN guard's (engine.guard)
        "wall_time_s": round(result.wall_time_s, 2),
        "lora_file": str(result.lora_path) if result.lora_path else None,
        "diffusers_file": str(result.diffusers_path) if result.diffusers_path else None,
        **{key: result.extra[key] for key in EVALUATIONS if key in result.extra},  # (engine.validation, .samples)
        **{key: result.extra[key] for key in TIMING if key in result.extra},  # (engine.preflight, Run.timing)
        **{key: result.extra[key] for key in BUCKETS if key in result.extra},
        **{key: result.extra[key] for key in BATCH if key in result.extra},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
    }
    return atomic_write_json(run_dir / "summary.json", summary)
