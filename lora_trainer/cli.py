"""``python -m lora_trainer`` / ``lora-trainer``: demo, init-config, train, estimate, check, label, ui; and for a
language model's LoRA (``model.task_type: text-generation``): train, generate, merge."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lora_trainer.config import default_value
from lora_trainer.errors import ConfigError, LoraTrainerError

log = logging.getLogger("lora_trainer")

DEMO_SETTINGS = {
    "model": {"base_model": "tiny-demo"},
    "data": {"resolution": 64},
    "training": {"max_train_steps": 150, "batch_size": 4, "gradient_accumulation_steps": 1,
                 "learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 10, "save_steps": 50,
                 "lora_rank": 8, "lora_alpha": 8, "lora_dropout": 0.0,
                 # a random-weight model needs more than the attention layers to show learning
                 "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                    "ff.net.2", "conv1", "conv2"]},
    "output": {"output_name": "demo_lora", "save_precision": "fp32"},
}


def _setup_logging(verbose: bool) -> None:
    """The terminal shows what the user must act on: our own lines; Python warnings (deprecations and the like) go to
    the run's log file (engine.run_dir.run_log_file), not the terminal; the libraries' notices likewise where a
    command loads models (``_libraries_to_the_log_file``)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    for noisy in ("urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not verbose:
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").propagate = False


def _libraries_to_the_log_file() -> None:
    """transformers', diffusers' and peft's notices (warnings and up) to the run's log file only (run_dir.LIBRARIES
    there), off the terminal: their own terminal handlers are removed, their errors still shown. Imports them: only
    for the commands that load models."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_default_handler()  # (each library's stderr handler, added when it first logs)
    for name in ("diffusers", "transformers", "peft"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        if not any(getattr(h, "lora_trainer_errors", False) for h in logger.handlers):
            errors = logging.StreamHandler(sys.stderr)  # (what fails shows, as before)
            errors.setLevel(logging.ERROR)
            errors.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            errors.lora_trainer_errors = True
            logger.addHandler(errors)


def _train(cfg, events: str | None = None):
    """The run of ``cfg``, an image LoRA's or (model.task_type text-generation) a language model's, the log lines
    kept above the progress bar. Started by torchrun or accelerate launch (WORLD_SIZE > 1), the processes train one
    image LoRA together (engine.distributed); then rank 0 returns the result, the others None. ``events``: a file
    for the run's progress (engine.event_log; rank 0 writes it) and, beside it, the file that stops it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lora_trainer.config import is_text_generation
    from lora_trainer.engine.distributed import Group, world_size_of
    from lora_trainer.engine.event_log import EventLog

    if is_text_generation(cfg):
        if world_size_of() > 1:
            raise ConfigError(f"model.task_type: text-generation trains in one process, but WORLD_SIZE is "
                              f"{world_size_of()} (torchrun, accelerate launch): multi-GPU training is for image "
                              "LoRAs; start this run with python -m lora_trainer train --config …")
        from lora_trainer.llm.trainer import train_llm

        with logging_redirect_tqdm(loggers=[logging.root]):
            return train_llm(cfg, callbacks=EventLog(events) if events else None)
    from lora_trainer.engine.trainer import train

    group = Group.from_environment(cfg.training.ddp_timeout)
    if group is not None and not group.main:
        _quiet(group.rank)
    log_events = EventLog(events) if events and (group is None or group.main) else None
    try:
        with logging_redirect_tqdm(loggers=[logging.root]):
            result = train(cfg, group=group, callbacks=log_events)
    finally:
        if group is not None:
            group.close()
    return result if group is None or group.main else None


def _quiet(rank: int) -> None:
    """A process of a multi-process run other than rank 0: warnings and errors only, each line with its rank."""
    logging.getLogger("lora_trainer").setLevel(logging.WARNING)
    for handler in logging.root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))


def _report(result) -> None:
    print(f"\n{result.status}: {result.steps}/{result.total_steps} steps in {result.wall_time_s:.1f} s, "
          f"{result.images_used} images ({result.images_skipped} skipped)")
    if result.first_loss is not None and result.final_loss is not None:
        print(f"loss: first step {result.first_loss:.4f}, last steps {result.final_loss:.4f}")
    print(f"run folder:        {result.run_dir}")
    print(f"LoRA for the WebUI: {result.lora_path}")
    if result.diffusers_path:
        print(f"diffusers LoRA:    {result.diffusers_path}")
    name = Path(result.lora_path).stem
    print(f"copy it into models/Lora and prompt with <lora:{name}:0.7>")


def cmd_demo(args) -> int:
    from lora_trainer.config import apply_overrides, config_from_dict, override_origins
    from lora_trainer.data.demo_set import make_demo_dataset

    root = Path(args.output)
    data_dir = root / "dataset"
    settings = apply_overrides(DEMO_SETTINGS, [f"train_data_dir={data_dir}", f"output_dir={root / 'run'}"]
                               + [f"max_train_steps={args.steps}"] + list(args.set or []))
    cfg = config_from_dict(settings, source="demo", given=override_origins(args.set))  # (before anything is written)
    make_demo_dataset(data_dir, n=args.images, resolution=64)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # (as train: the libraries' notices to the run's log)
        _libraries_to_the_log_file()
    print(f"demo: training the built-in tiny model on {args.images} generated images in {data_dir}")
    result = _train(cfg)  # (one process: main refuses demo under a launcher)
    _report(result)
    return 130 if result.status == "stopped" else 0  # (Ctrl-C: as train exits)


def cmd_init_config(args) -> int:
    from lora_trainer.config import write_template

    path = write_template(args.path)
    print(f"wrote {path}: set data.train_data_dir and model.base_model, then run\n"
          f"  python -m lora_trainer train --config {path}")
    return 0


def cmd_train(args) -> int:
    from lora_trainer.config import is_text_generation, load_config

    cfg = load_config(args.config, overrides=args.set)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # (--verbose: the libraries' notices on the terminal)
        _libraries_to_the_log_file()
    result = _train(cfg, args.events)
    if result is not None:  # (None: a process of several other than rank 0, which reports)
        (_report_llm if is_text_generation(cfg) else _report)(result)
    # a run stopped early (Ctrl-C) exits as an interrupted command does: `train && merge` must not go on with it
    # (not a launched run's stop file: the app that wrote it reads the events)
    return 130 if result is not None and result.status == "stopped" and not args.events else 0


def _report_llm(result) -> None:
    print(f"\n{result.status}: {result.steps}/{result.total_steps} steps in {result.wall_time_s:.1f} s, "
          f"{result.rows_trained} training sequences, {result.rows_held_out} held out")
    if result.first_loss is not None and result.final_loss is not None:
        print(f"loss: first step {result.first_loss:.4f}, last steps {result.final_loss:.4f}")
    if result.evaluations:
        last = result.evaluations[-1]
        print(f"eval loss {last['eval_loss']:.4f}, perplexity {last['perplexity']:.3f} (epoch {last['epoch']})")
    print(f"run folder:   {result.run_dir}")
    print(f"PEFT adapter: {result.adapter_dir}")
    print(f"try it:       python -m lora_trainer generate --adapter {result.adapter_dir} --prompt \"...\"")


def _refuse_text_generation(cfg, command: str) -> None:
    from lora_trainer.config import is_text_generation

    if is_text_generation(cfg):
        raise LoraTrainerError(f"{command}: this config trains a language model's LoRA (model.task_type: "
                               f"text-generation); {command} is for image LoRAs")


def cmd_generate(args) -> int:
    from lora_trainer.llm.generate import DTYPES, chat_prompt, find_adapter, generate, load_with_adapter

    model, tok = load_with_adapter(find_adapter(args.adapter), args.base, args.trust_remote_code,
                                   dtype=DTYPES[args.dtype])
    prompts = [args.prompt] if args.prompt is not None else None
    while True:
        if prompts is None:
            try:
                prompt = input("> ")
            except EOFError:
                return 0
        elif not prompts:
            return 0
        else:
            prompt = prompts.pop()
        text = chat_prompt(tok, prompt) if args.chat else prompt
        generate(model, tok, text, max_new_tokens=args.max_new_tokens, sample=args.sample,
                 temperature=args.temperature, top_p=args.top_p, stream=True, seed=args.seed, templated=args.chat)
        sys.stdout.flush()


def cmd_resize(args) -> int:
    from lora_trainer.export.resize import resize_lora

    report = resize_lora(args.lora, args.out, rank=args.rank, energy=args.energy, device=args.device)
    print(report.summary())
    return 0


def cmd_sweep(args) -> int:
    from lora_trainer.sweep import parse_strengths, run_sweep

    strengths = parse_strengths(args.strengths)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        _libraries_to_the_log_file()
    paths = run_sweep(args.lora, args.out, args.prompt, strengths, args.base, args.negative, args.seed, args.steps,
                      args.size)
    print(f"grid:   {paths[0]}")
    print("images: " + ", ".join(str(p) for p in paths[1:]))
    return 0


def _lora_and_weight(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` (a Windows drive's colon is part of the file). A weight that is not a number after an
    existing file is named (``style.safetensors:O.8``), not taken for a part of the file's name."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            if Path(path).is_file() and not Path(text).exists():
                raise LoraTrainerError(f"merge: --lora {text}: the weight {weight!r} is not a number (FILE:WEIGHT, "
                                       "e.g. style.safetensors:0.8)") from None
    return text, 1.0


def cmd_merge(args) -> int:
    if args.lora:  # image LoRAs into a checkpoint (a single file or a diffusers folder), or into one LoRA
        if args.adapter:
            raise LoraTrainerError("merge: --lora is for image LoRAs and --adapter for a language model's LoRA: give "
                                   "one of them")
        loras = [_lora_and_weight(text) for text in args.lora]
        listed = ", ".join(f"{p} x{w:g}" for p, w in loras)
        if args.base:
            from lora_trainer.export.merge import merge_into_checkpoint

            if args.rank is not None:
                raise LoraTrainerError("merge: --rank resizes LoRAs merged into one LoRA; with --base the LoRAs "
                                       "are merged into the model at their full rank")
            out = merge_into_checkpoint(args.base, loras, args.output, args.dtype)
            print(f"merged {len(loras)} LoRA(s) into {out} ({listed})")
            return 0
        from lora_trainer.export.merge_loras import merge_loras

        out = merge_loras(loras, args.output, args.rank, args.dtype)
        print(f"merged {len(loras)} LoRA(s) into one LoRA: {out} ({listed}"
              + (f"; resized to rank {args.rank})" if args.rank else ")"))
        return 0
    if not args.adapter:
        raise LoraTrainerError("merge: give --lora FILE[:WEIGHT] (image LoRAs: into --base CKPT or FOLDER, or "
                               "several into one LoRA) or --adapter (a language model's LoRA)")
    from lora_trainer.llm.generate import find_adapter
    from lora_trainer.llm.merge import merge_adapter

    out = merge_adapter(find_adapter(args.adapter), args.output, args.base, args.dtype, args.max_shard_size,
                        args.trust_remote_code)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_estimate(args) -> int:
    """The pre-flight estimate of a config's run: peak memory against the device's free memory, time per step."""
    import torch

    from lora_trainer.config import load_config
    from lora_trainer.engine.preflight import Where, estimate_for, total_steps_of
    from lora_trainer.models.factory import pick_device
    from lora_trainer.models.family import family_of

    cfg = load_config(args.config, overrides=args.set)
    _refuse_text_generation(cfg, "estimate")
    device = torch.device(args.device) if args.device else pick_device(cfg.training.mixed_precision)[0]
    where = Where(cfg.model.base_model, family_of(cfg.model.base_model, cfg.model.prediction_type), device)
    est = estimate_for(cfg, where, free=None if args.free_gb is None else int(args.free_gb * 2**30))
    if est is None:
        raise LoraTrainerError(f"estimate: the shapes of model.base_model {cfg.model.base_model!r} cannot be read "
                               "without loading it (a diffusers folder, a .safetensors checkpoint or a built-in name)")
    print(est.summary(total_steps_of(cfg)))
    return 1 if est.fits is False else 0


def cmd_check(args) -> int:
    from lora_trainer.config import DataConfig, load_config, with_family_defaults
    from lora_trainer.data.buckets import BucketSpec
    from lora_trainer.data.check import check_dataset
    from lora_trainer.models.family import family_of
    from lora_trainer.utils.fsio import atomic_write_json

    d = DataConfig()  # (the config's own defaults)
    if args.config:  # its data settings, at the resolution its model trains at (SDXL: 1024 where it sets none)
        cfg = load_config(args.config)
        _refuse_text_generation(cfg, "check")
        d = with_family_defaults(cfg, family_of(cfg.model.base_model, cfg.model.prediction_type))[0].data
    settings = {"root": d.train_data_dir or None, "resolution": d.resolution, "metadata_path": d.metadata_path,
                "caption_extension": d.caption_extension, "caption_priority": d.caption_priority,
                "caption_prefix": d.caption_prefix, "recursive": d.recursive, "reg_data_dir": d.reg_data_dir}
    given = {"root": args.folder, "resolution": args.resolution, "metadata_path": args.metadata,
             "caption_extension": args.caption_extension, "caption_priority": args.caption_priority,
             "caption_prefix": args.prefix, "recursive": args.recursive or None, "reg_data_dir": args.reg_dir}
    settings.update({k: v for k, v in given.items() if v is not None})
    if settings["resolution"] < 64:
        raise LoraTrainerError(f"check --resolution: {settings['resolution']} is too small: the training resolution "
                               "is at least 64 (512 for SD 1.x, 1024 for SDXL)")
    if not settings["root"]:
        raise LoraTrainerError("check: give the dataset folder (check DIR) or a config (--config my.yaml)")
    buckets = BucketSpec.from_data(d, settings["resolution"])  # (the config's buckets; on by default)
    report = check_dataset(glossary_path=args.glossary, progress=True, buckets=buckets, **settings)
    print(report.summary(max_files=args.max_files))
    if args.json:
        print(f"report written to {atomic_write_json(args.json, report.to_dict())}")
    if report.has_errors or (args.strict and report.count("warning")):
        return 1
    return 0


def cmd_label(args) -> int:
    from lora_trainer.data.captioners import CAPTIONERS, captioner_options, make_captioner
    from lora_trainer.data.label import label_dataset

    kind, model = (args.model, None) if args.model in CAPTIONERS else (args.captioner, args.model)
    tagger = {"tags_file": args.tags, "top_k": args.top_k, "threshold": args.threshold}
    captioner_options(kind, **tagger)  # now, even if no image needs a caption (label_dataset checks the rest)
    result = label_dataset(args.input, captioner=lambda: make_captioner(kind, model, args.download, **tagger),
                           output_csv=args.output, template=args.template, prefix=args.prefix,
                           mode="overwrite" if args.overwrite else "only-missing", batch_size=args.batch_size)
    print(result.summary())
    for name, reason in result.skipped:
        print(f"  skipped {name}: {reason}")
    return 0


def cmd_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        from lora_trainer.errors import LoraTrainerError

        raise LoraTrainerError("the app needs gradio: pip install gradio") from None
    from lora_trainer.ui.app import launch

    print(f"LoRA Trainer on http://{args.host}:{args.port} (Ctrl-C to quit)")
    launch(host=args.host, port=args.port, lora_dir=args.lora_dir, base_model=args.base_model)
    return 0


def _at_least(low: int):
    """An argparse type: an integer of at least ``low``; anything else is refused with the usage line, before any
    work starts (``demo --images 0`` ended in a traceback)."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: at least {low}")
        return value

    return integer


def _add_train(sub) -> None:
    tr = sub.add_parser("train", help="train a LoRA as a YAML config says")
    tr.add_argument("--config", "-c", required=True, help="YAML config (see init-config), or kohya's .toml")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a setting, e.g. --set training.epochs=2 (repeatable)")
    tr.add_argument("--events", metavar="FILE", help="for a program that started this run: write its progress to FILE "
                    "as JSON lines (rank 0), and stop after the current step once FILE.stop exists")
    tr.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-trainer", description="Train a Stable Diffusion LoRA for the WebUI.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the built-in tiny model on a generated sample set (no download)")
    demo.add_argument("--output", default="output/demo", help="folder for the sample set and the run (default "
                      "%(default)s)")
    demo.add_argument("--steps", type=_at_least(1), default=DEMO_SETTINGS["training"]["max_train_steps"],
                      help="training steps (default %(default)s)")
    demo.add_argument("--images", type=_at_least(1), default=8, help="sample images to generate (default %(default)s)")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. --set "
                      "lora_rank=4 (repeatable)")
    demo.set_defaults(func=cmd_demo)

    init = sub.add_parser("init-config", help="write the commented default config")
    init.add_argument("path", nargs="?", default="lora_config.yaml", help="the file to write (default %(default)s; "
                      "an existing file is never overwritten)")
    init.set_defaults(func=cmd_init_config)

    _add_train(sub)
    es = sub.add_parser("estimate", help="estimate a config's peak memory and time per step, and whether it fits "
                        "the device (nothing is loaded; exit 1 when it does not fit)")
    es.add_argument("--config", "-c", required=True, help="YAML config (see init-config), or kohya's .toml")
    es.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting (repeatable)")
    es.add_argument("--device", help="cpu or cuda (default: where train would run)")
    es.add_argument("--free-gb", type=float, help="compare with this much free memory instead of the device's")
    es.set_defaults(func=cmd_estimate)
    _add_dataset_commands(sub)
    ui = sub.add_parser("ui", help="the Train LoRA tab as a standalone app on 127.0.0.1 (Task: an image LoRA, or a "
                        "language model's)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    ui.add_argument("--port", type=_at_least(1), default=7870, help="(default %(default)s)")
    ui.add_argument("--lora-dir", default="output/Lora", help="where finished LoRAs are copied (default %(default)s)")
    ui.add_argument("--base-model", default=default_value("base_model"), help="the base model the tab starts with "
                    "(default %(default)s)")
    ui.set_defaults(func=cmd_ui)
    rs = sub.add_parser("resize", help="shrink a LoRA's rank (SVD of each module; the scale kept): a fixed rank, "
                        "or per module the fewest dimensions that keep a share of it")
    rs.add_argument("--lora", required=True, help="the kohya-format .safetensors LoRA")
    size = rs.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the new rank (modules of a lower rank keep theirs)")
    size.add_argument("--energy", type=float, help="per module, keep the fewest singular values whose squares sum to "
                      "at least E² of the module's squared Frobenius norm (so at least the share E of its norm; "
                      "0 < E <= 1, e.g. 0.95): kohya's resize_lora.py --dynamic_method sv_fro --dynamic_param E as "
                      "sd-scripts computes it since its PR #2194 (older sd-scripts keeps one more)")
    rs.add_argument("--out", "-o", required=True, help="the new file (an existing one is kept: name_1 is written)")
    rs.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")
    rs.set_defaults(func=cmd_resize)
    sw = sub.add_parser("sweep", help="a LoRA at several strengths: the same prompt, seed and size, one image each and "
                        "a labelled grid (PNG)")
    sw.add_argument("--lora", required=True, help="the kohya-format .safetensors LoRA")
    sw.add_argument("--prompt", required=True, help="the prompt (the LoRA's trigger words in it)")
    sw.add_argument("--negative", default="", help="the negative prompt")
    sw.add_argument("--strengths", default="0,0.4,0.7,1", help="comma-separated (0: the base model alone; default "
                    "%(default)s)")
    sw.add_argument("--base", help="the base model (a diffusers folder or a single-file checkpoint; default: the one "
                    "the run folder's config.yaml names)")
    sw.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    sw.add_argument("--steps", type=_at_least(1), default=20, help="sampling steps (default %(default)s)")
    sw.add_argument("--size", type=_at_least(64), help="image side in pixels (default: the model's own)")
    sw.add_argument("--out", "-o", default="sweep.png", help="the grid; each image beside it as <name>_s<strength>.png "
                    "(never over a file: name_1 is written; default %(default)s)")
    sw.set_defaults(func=cmd_sweep)
    _add_llm_commands(sub)
    return p


def _add_dataset_commands(sub) -> None:
    """check and label: a dataset folder's report, its captions."""
    ck = sub.add_parser("check", help="check a dataset: unreadable, small, duplicate images, caption problems "
                        "(changes nothing)")
    ck.add_argument("folder", nargs="?", help="the dataset folder (or take it from --config)")
    ck.add_argument("--config", "-c", help="take the folder and data settings from this training config")
    ck.add_argument("--resolution", type=int, help=f"training resolution (default {default_value('resolution')})")
    ck.add_argument("--metadata", help="captions CSV (default: metadata.csv in the folder)")
    ck.add_argument("--caption-extension", help="caption sidecar extension (default .txt)")
    ck.add_argument("--caption-priority", choices=["csv", "txt"], help="which caption wins when both exist "
                    f"(default {default_value('caption_priority')})")
    ck.add_argument("--prefix", help="the trigger-word prefix training puts before every caption")
    ck.add_argument("--recursive", action="store_true", help="include subfolders")
    ck.add_argument("--reg-dir", help="the regularization (class) images' folder, checked too (default: the "
                    "config's data.reg_data_dir)")
    ck.add_argument("--glossary", help="YAML of synonym groups (adds to the built-in one)")
    ck.add_argument("--json", help="also write the report as JSON here")
    ck.add_argument("--max-files", type=_at_least(1), default=5, help="files listed per finding (default "
                    "%(default)s)")
    ck.add_argument("--strict", action="store_true", help="exit 1 on warnings too (for scripts)")
    ck.set_defaults(func=cmd_check)
    lb = sub.add_parser("label", help="auto-caption a folder of images into metadata.csv (BLIP or CLIP tags)")
    lb.add_argument("--input", "-i", required=True, help="the dataset folder")
    lb.add_argument("--output", "-o", help="the captions CSV to write (default: metadata.csv in the folder)")
    lb.add_argument("--captioner", choices=["blip", "clip-tags"], default="blip",
                    help="blip: a sentence per image; clip-tags: a tag list (default blip)")
    lb.add_argument("--model", help="blip | clip-tags | a model folder or hub id (default: the captioner's own)")
    lb.add_argument("--template", default="{caption}", help='e.g. "**{caption}**, high quality, detailed" (default '
                    '%(default)s: the caption as it is)')
    lb.add_argument("--prefix", default="", help='put before every new caption, e.g. "mytrigger, "')
    mode = lb.add_mutually_exclusive_group()
    mode.add_argument("--only-missing", action="store_true", help="caption only images without one (default)")
    mode.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    lb.add_argument("--download", action="store_true", help="download the model if it is not cached (once)")
    lb.add_argument("--tags", help="clip-tags: a text file with one tag a line (default: a built-in list)")
    lb.add_argument("--top-k", type=_at_least(1), help="clip-tags: keep at most this many tags (default 6)")
    lb.add_argument("--threshold", type=float, help="clip-tags: keep tags with CLIP similarity >= this "
                    "(about 0.2-0.35; the best tag is always kept)")
    lb.add_argument("--batch-size", type=_at_least(1), default=4, help="images captioned at once (default "
                    "%(default)s)")
    lb.set_defaults(func=cmd_label)


def _add_llm_commands(sub) -> None:
    ge = sub.add_parser("generate", help="a language model's LoRA: generate text from a prompt, streamed (without "
                        "--prompt: prompts read one per line)")
    ge.add_argument("--adapter", required=True, help="the PEFT adapter folder, or the run folder that holds it")
    ge.add_argument("--prompt", help="the prompt (default: ask for prompts until end of input)")
    ge.add_argument("--chat", action="store_true", help="send the prompt as a user turn in the chat template")
    ge.add_argument("--max-new-tokens", type=_at_least(1), default=128, help="(default %(default)s)")
    ge.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    ge.add_argument("--temperature", type=float, default=0.8, help="with --sample (default %(default)s)")
    ge.add_argument("--top-p", type=float, default=0.95, help="with --sample (default %(default)s)")
    ge.add_argument("--seed", type=int, help="with --sample: the same text each time")
    ge.add_argument("--base", help="the base model folder (default: the one the adapter names)")
    ge.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="(default %(default)s)")
    ge.add_argument("--trust-remote-code", action="store_true", help="run the Python code the model folder ships")
    ge.set_defaults(func=cmd_generate)
    me = sub.add_parser("merge", help="merge image LoRAs into a checkpoint (--base CKPT or diffusers FOLDER --lora "
                        "F[:W] ...) or into one LoRA (--lora F[:W] --lora F2[:W2] [--rank R], no --base), or a "
                        "language model's LoRA into its base (--adapter; safetensors shards and tokenizer)")
    me.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                    help="a kohya-format LoRA and its weight (1 if not given); repeat for several, merged in order")
    me.add_argument("--adapter", help="a language model's PEFT adapter folder, or the run folder that holds it")
    me.add_argument("--output", "--out", "-o", required=True,
                    help="the new file (--lora; never over an existing one: name_1) or folder (a diffusers --base, "
                    "--adapter; must not exist)")
    me.add_argument("--base", help="--lora: the single-file .safetensors checkpoint or diffusers folder (without it "
                    "the LoRAs are merged into one LoRA); --adapter: the base model folder (default: the one it names)")
    me.add_argument("--rank", type=int, help="LoRAs merged into one LoRA: cut each module to this rank by an SVD "
                    "(default: the exact sum, its rank the sum of the ranks)")
    me.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                    help="the merged weights' dtype (auto: the base model's)")
    me.add_argument("--max-shard-size", default="2GB", help="--adapter: the largest safetensors shard, e.g. 2GB or "
                    "500MB (default %(default)s)")
    me.add_argument("--trust-remote-code", action="store_true", help="run the Python code the model folder ships")
    me.set_defaults(func=cmd_merge)


def _one_process_unless_training(args) -> None:
    """Under torchrun or accelerate launch (WORLD_SIZE > 1) only ``train`` runs: every other command would run once
    per process, writing the same files (the WebUI tab and ``ui`` train on one GPU)."""
    from lora_trainer.engine.distributed import world_size_of

    if world_size_of() > 1 and args.func is not cmd_train:
        raise ConfigError(f"WORLD_SIZE is {world_size_of()} (torchrun, accelerate launch): only the train command "
                          f"runs on several processes; run {args.command!r} as python -m lora_trainer {args.command}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        _one_process_unless_training(args)
        return args.func(args)
    except LoraTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
