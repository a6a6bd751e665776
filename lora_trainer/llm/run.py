"""One language-model run's state (the model with its LoRA layers, the optimizer, the examples, the step) and the
operations the loop in ``llm.trainer`` calls: a training step, the held-out loss, the sample answers, a checkpoint, a
resume."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_trainer.engine import checkpoint as ckpt
from lora_trainer.engine.events import CallbackList, StepInfo
from lora_trainer.engine.optim import changed_since, group_names
from lora_trainer.errors import LoraTrainerError
from lora_trainer.llm.data import IGNORE, Example, batches_per_epoch, collate, epoch_batches, target_tokens
from lora_trainer.llm.generate import chat_prompt, generate
from lora_trainer.llm.model import load_trainable_state, trainable_state

log = logging.getLogger(__name__)


class NonFiniteLoss(LoraTrainerError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class LlmPlan:
    """How many sequences, batches and optimizer steps the run has."""

    num_examples: int
    batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def from_config(cls, t, num_examples: int) -> LlmPlan:
        spe = math.ceil(batches_per_epoch(num_examples, t.batch_size) / t.gradient_accumulation_steps)
        return cls(num_examples, t.batch_size, t.gradient_accumulation_steps, spe,
                   t.max_train_steps or spe * t.epochs)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


@dataclass
class LlmRun:
    cfg: object  # config.Config
    model: object  # a peft PeftModel
    tokenizer: object
    device: torch.device
    precision: str  # "no" | "fp16" | "bf16"
    plan: LlmPlan
    examples: list[Example]
    held_out: list[Example]
    run_dir: Path
    settings: dict
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: object
    cbs: CallbackList
    generator: torch.Generator = field(default_factory=torch.Generator)  # (the checkpoint keeps its state)
    step: int = 0
    losses: list[float] = field(default_factory=list)
    first_loss: float | None = None
    evaluations: list[dict] = field(default_factory=list)
    writer: object = None
    bar: object = None
    loop_start: float = 0.0
    start_step: int = 0
    tokens_trained: int = 0
    prompts: list[str] = field(default_factory=list)  # output.sample_prompts
    chat: bool = False  # the rows are conversations: a sample prompt goes in as a user turn of the chat template
    samples: list[Path] = field(default_factory=list)
    rows_apart: bool = False  # the model keeps packed rows apart by their positions (llm.model.keeps_packed_rows_apart)

    def autocast(self):
        if self.precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def epoch_groups(self, epoch: int) -> list[list[list[int]]]:
        """The micro-batches of each optimizer step of ``epoch`` (a pure function of seed and epoch)."""
        batches = epoch_batches([len(e.input_ids) for e in self.examples], self.plan.batch_size,
                                self.cfg.training.seed, epoch)
        a = self.plan.grad_accum
        return [batches[i:i + a] for i in range(0, len(batches), a)]

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed cross-entropy of a batch's counted tokens (labels shifted by one). Packed rows, where the model
        keeps them apart: each row's positions and no attention mask (the model then attends within each row; the
        right padding comes after every real token, which a causal model never attends to)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.rows_apart and "position_ids" in batch:
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with self.autocast():
            logits = self.model(**inputs).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE, reduction="sum")

    def train_step(self, group: list[list[int]]) -> float:
        """One optimizer step over a group of micro-batches; the loss is the mean over all their counted tokens."""
        pad = self.tokenizer.pad_token_id
        batches = [collate([self.examples[i] for i in rows], pad) for rows in group]
        tokens = max(1, sum(target_tokens(b) for b in batches))
        total = 0.0
        for batch in batches:
            loss = self.loss_sum(batch)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"the loss is not finite at step {self.step + 1}: lower training.learning_rate, "
                                    "or use mixed_precision bf16 / no instead of fp16")
            self.scaler.scale(loss / tokens).backward()
            total += loss.item()
            self.tokens_trained += int(batch["attention_mask"].sum())
        t = self.cfg.training
        if t.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / tokens

    def report(self, loss: float, epoch: int) -> None:
        self.losses.append(loss)
        if self.first_loss is None:
            self.first_loss = loss
        lr = self.lr_scheduler.get_last_lr()[0]
        elapsed = time.time() - self.loop_start
        recent = self.losses[-20:]
        info = StepInfo(self.step, self.plan.total_steps, epoch + 1, loss, sum(recent) / len(recent), lr, elapsed,
                        (self.step - self.start_step) / elapsed if elapsed > 0 else 0.0)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{info.loss_avg:.4f}")
        self.cbs.on_step(info)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict | None:
        """The held-out loss (mean over its counted tokens) and perplexity; None without held-out rows."""
        if not self.held_out:
            return None
        self.model.eval()
        order = sorted(range(len(self.held_out)), key=lambda i: len(self.held_out[i].input_ids))
        total, tokens, bs = 0.0, 0, self.plan.batch_size
        for s in range(0, len(order), bs):
            batch = collate([self.held_out[i] for i in order[s:s + bs]], self.tokenizer.pad_token_id)
            total += self.loss_sum(batch).item()
            tokens += target_tokens(batch)
        self.model.train()
        loss = total / max(1, tokens)
        result = {"epoch": epoch, "step": self.step, "eval_loss": loss,
                  "perplexity": math.exp(loss) if loss < 700 else float("inf")}
        self.evaluations.append(result)
        log.info("epoch %d (step %d): eval loss %.4f, perplexity %.3f on %d held-out rows", epoch, self.step, loss,
                 result["perplexity"], len(self.held_out))
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", loss, self.step)
            self.writer.add_scalar("eval/perplexity", result["perplexity"], self.step)
        self.cbs.on_validation(self.step, loss)
        return result

    def sample_due(self, epoch_done: int | None) -> bool:
        """Whether sample answers are due after this step: as for images (engine.samples), every
        sample_every_n_steps, at the end of every sample_every_n_epochs, and at the last step."""
        o = self.cfg.output
        return bool(self.prompts) and bool(
            self.step >= self.plan.total_steps or (o.sample_every_n_steps and self.step % o.sample_every_n_steps == 0)
            or (epoch_done and o.sample_every_n_epochs and epoch_done % o.sample_every_n_epochs == 0))

    @torch.no_grad()
    def sample(self) -> Path | None:
        """The model's greedy answer to each of output.sample_prompts as it is now (its LoRA active), as the rows
        were trained (a user turn in the chat template where they are conversations): into
        ``<run>/samples/<output_name>_step000100.txt``, the log and TensorBoard (``samples/prompt00``). Greedy
        decoding draws no random numbers, so a resumed run stays the same; a failure is a warning (training goes
        on)."""
        answers = []
        self.model.eval()
        try:
            for i, prompt in enumerate(self.prompts):
                try:
                    text = chat_prompt(self.tokenizer, prompt) if self.chat else prompt
                    with self.autocast():
                        answer = generate(self.model, self.tokenizer, text, templated=self.chat)[0]
                except Exception as e:  # a failed sample must not end the training
                    log.warning("sample %d at step %d failed: %s", i, self.step, e)
                    continue
                answers.append(f">>> {prompt}\n{answer}\n")
                log.info("step %d, sample %d: %s → %s", self.step, i, prompt[:80], answer.strip()[:200])
                if self.writer is not None:
                    self.writer.add_text(f"samples/prompt{i:02d}", f"{prompt}\n\n{answer}", self.step)
        finally:
            self.model.train()
        if not answers:
            return None
        path = self.run_dir / "samples" / f"{self.cfg.output.output_name}_step{self.step:06d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(answers), encoding="utf-8")
        self.samples.append(path)
        return path

    def save(self, reason: str) -> Path | None:
        t = self.cfg.training
        state = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(self.generator)}
        info = {"reason": reason, "task_type": "text-generation", "epoch": self.step // self.plan.steps_per_epoch,
                "total_steps": self.plan.total_steps, "loss": self.losses[-1] if self.losses else None,
                "first_loss": self.first_loss, "settings": self.settings}
        with ckpt.stops_on_full_disk(self.run_dir, f"the checkpoint of step {self.step}"):
            path = ckpt.save_checkpoint(self.run_dir, self.step, trainable_state(self.model), state, info,
                                        keep=t.checkpoints_total_limit)
        if path is not None:
            self.cbs.on_checkpoint(path)
        return path

    def save_if_due(self, epoch_done: int | None) -> None:
        t = self.cfg.training
        if (t.save_steps and self.step % t.save_steps == 0) or (
                t.save_every_n_epochs and epoch_done and epoch_done % t.save_every_n_epochs == 0):
            self.save("scheduled")

    def resume(self, restored: ckpt.Restored, path: Path) -> None:
        """The LoRA weights, optimizer, schedule, scaler and random state of a checkpoint: the run continues as if
        it had never stopped."""
        load_trainable_state(self.model, restored.weights)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        names, lrs = group_names(self.optimizer), list(self.lr_scheduler.base_lrs)
        self.optimizer.load_state_dict(restored.state["optimizer"])
        self.lr_scheduler.load_state_dict(restored.state["lr_scheduler"])
        changed = changed_since(self.optimizer, self.lr_scheduler, names, configured, lrs,
                                restored.info.get("settings", {}), self.cfg.training.optimizer_args)
        if changed:
            log.info("resuming with the settings changed since the checkpoint: %s", "; ".join(changed))
        self.scaler.load_state_dict(restored.state["scaler"])
        ckpt.set_rng_state(restored.state["rng"], self.generator)
        self.step = restored.step
        self.first_loss = restored.info.get("first_loss")
        log.info("resumed from %s at step %d of %d", path, self.step, self.plan.total_steps)
