"""Sample images while training from the command line (and the standalone app's runs): ``output.sample_prompts``.

The prompts are written as in kohya's sd-scripts (``library/train_util.py``, ``line_to_prompt_dict``): one a line,
options after `` --``: ``--n`` negative prompt, ``--s`` steps, ``--d`` (or ``--seed``) seed, ``--w`` / ``--h``
size, ``--l`` CFG scale; blank lines and lines starting with ``#`` are skipped. kohya's options for other samplers
and models (``--ss``, ``--g``, ``--f``, ``--cn``, ``--ctr``, ``--rcfg``, ``--fs``) are read and ignored, with a
warning. A prompt without ``--d`` takes the run's seed, so the images of every step compare.

Images are made by the pipeline of the model being trained (its LoRA layers active), on the run's noise schedule
(``engine.sampling``: the one function the standalone app samples with too), and go to ``<run>/samples/`` as
``<output_name>_step000100_prompt00.png`` and to TensorBoard (``samples/prompt00``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.engine.loss import has_zero_terminal_snr
from lora_trainer.engine.sampling import evaluating, guidance_rescale, sample_image, sampling_scheduler
from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)

KEY = "output.sample_prompts"
DEFAULT_STEPS = 20
# option → (field, kind); kind "int", "float" or "text"
OPTIONS = {"n": ("negative", "text"), "s": ("steps", "int"), "d": ("seed", "int"), "seed": ("seed", "int"),
           "w": ("width", "int"), "h": ("height", "int"), "l": ("scale", "float")}
IGNORED = ("ss", "g", "f", "cn", "ctr", "rcfg", "fs")  # kohya's, for other samplers and models
LIMITS = {"steps": (1, 1000), "width": (64, 4096), "height": (64, 4096)}


@dataclass(frozen=True)
class SamplePrompt:
    index: int  # its place in the list (the file names count from 0)
    prompt: str
    negative: str | None = None
    steps: int | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    scale: float | None = None  # classifier-free guidance scale; None: the pipeline's (7.5)


def _value(field: str, kind: str, text: str, where: str):
    text = text.strip()
    try:
        value = int(text) if kind == "int" else float(text) if kind == "float" else text
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    if not text or (kind == "float" and not value > 0):
        raise ConfigError(f"{where}: expected {'a text' if kind == 'text' else 'a number > 0'}, got {text!r}")
    lo, hi = LIMITS.get(field, (None, None))
    if lo is not None and not lo <= value <= hi:
        raise ConfigError(f"{where}: {value} is out of range: must be >= {lo} and <= {hi}")
    if field in ("width", "height") and value % 8:
        raise ConfigError(f"{where}: {value} must be a multiple of 8 (e.g. {value - value % 8})")
    if field == "seed" and value < 0:
        raise ConfigError(f"{where}: a seed is >= 0, got {value}")
    return value


def parse_prompt(line: str, index: int, where: str = KEY) -> SamplePrompt:
    """One prompt in kohya's syntax: ``a cat --n blurry --s 20 --d 5 --w 512 --h 768 --l 7``."""
    prompt, *options = (" " + line.strip()).split(" --")
    prompt = prompt.strip()
    if not prompt:
        raise ConfigError(f"{where}: {line!r} has no prompt before its options")
    fields = {}
    for option in options:
        name, _, text = option.strip().partition(" ")
        name = name.lower()
        if name in IGNORED:
            log.warning("%s: --%s (kohya's, for another sampler or model) is ignored here", where, name)
        elif name in OPTIONS:
            field, kind = OPTIONS[name]
            fields[field] = _value(field, kind, text, f"{where}: --{name}")
        else:
            known = ", ".join(f"--{k}" for k in OPTIONS)
            raise ConfigError(f"{where}: unknown option --{option.strip()!r} in {line!r}; the options are {known} "
                              "(negative prompt, steps, seed, width, height, CFG scale)")
    return SamplePrompt(index, prompt, **fields)


def load_sample_prompts(value: str | list[str] | None) -> list[SamplePrompt]:
    """``output.sample_prompts`` (a list of prompts, or a file of them) parsed; a mistake is a ConfigError that
    names the key (and the file's line)."""
    if not value:
        return []
    if isinstance(value, str):
        path = Path(value).expanduser()
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{KEY}: cannot read {path.resolve()} ({e})") from None
        numbered = [(f"{KEY} ({path.name} line {n})", text.strip()) for n, text in enumerate(lines, 1)]
        numbered = [(where, text) for where, text in numbered if text and not text.startswith("#")]
        if not numbered:
            raise ConfigError(f"{KEY}: {path.resolve()} holds no prompt (one a line; # starts a comment)")
    else:
        numbered = [(f"{KEY}[{i}]", text.strip()) for i, text in enumerate(value)]
    return [parse_prompt(text, i, where) for i, (where, text) in enumerate(numbered)]


class SampleMaker:
    """The run's sample images: when they are due, and making them."""

    def __init__(self, prompts: list[SamplePrompt], output, seed: int, resolution: int, folder: Path):
        self.prompts, self.output, self.seed, self.resolution = prompts, output, seed, resolution
        self.folder = folder
        self._sampler = None
        self.made: list[Path] = []

    @classmethod
    def for_run(cls, run, prompts: list[SamplePrompt]) -> SampleMaker | None:
        if not prompts:
            return None
        if getattr(run.backend, "pipe", None) is None:
            log.warning("output.sample_prompts: this model backend (%s) has no pipeline to make sample images with; "
                        "training without them", type(run.backend).__name__)
            return None
        cfg = run.cfg
        return cls(prompts, cfg.output, cfg.training.seed, cfg.data.resolution, run.run_dir / "samples")

    def due(self, step: int, total_steps: int, epoch_done: int | None) -> bool:
        """Whether samples are due after optimizer step ``step``: every sample_every_n_steps, at the end of every
        sample_every_n_epochs (``epoch_done``: the epoch that step finished, else None), and at the last step."""
        o = self.output
        return bool(step >= total_steps or (o.sample_every_n_steps and step % o.sample_every_n_steps == 0)
                    or (epoch_done and o.sample_every_n_epochs and epoch_done % o.sample_every_n_epochs == 0))

    def make(self, run, step: int) -> list[Path]:
        """Every prompt's image at ``step``, into the samples folder and TensorBoard; a failure is a warning (the
        training goes on)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._sampler is None:
            backend, zero_snr = run.backend, has_zero_terminal_snr(run.noise_scheduler or run.backend.noise_scheduler)
            backend.pipe.set_progress_bar_config(disable=True)  # (the training's bar and the log say it)
            self._sampler = (sampling_scheduler(backend.pipe.scheduler, backend.prediction_type, zero_snr),
                             guidance_rescale(backend.prediction_type, zero_snr))
        made = []
        with evaluating(run.backend.components().values()):
            for p in self.prompts:
                path = self.folder / f"{self.output.output_name}_step{step:06d}_prompt{p.index:02d}.png"
                try:
                    image = sample_image(run.backend, p.prompt, self.seed if p.seed is None else p.seed,
                                         p.steps or DEFAULT_STEPS, *self._sampler, negative=p.negative,
                                         size=(p.width or self.resolution, p.height or self.resolution),
                                         guidance_scale=p.scale)
                    image.save(path)
                except Exception as e:  # a failed sample must not end the training
                    log.warning("sample %d at step %d failed: %s", p.index, step, e)
                    continue
                made.append(path)
                if run.writer is not None:
                    import numpy as np

                    run.writer.add_image(f"samples/prompt{p.index:02d}", np.asarray(image.convert("RGB")), step,
                                         dataformats="HWC")
        log.info("step %d: %d sample image(s) in %s", step, len(made), self.folder)
        self.made += made
        if made:
            run.cbs.on_samples(step, made)
        return made

