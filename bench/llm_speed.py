"""Language-model LoRA training speed and memory (issue 20): ours (``lora_trainer.llm.trainer.train_llm``) against
the plain transformers + peft loop, on the same rows, the same base weights and the same LoRA settings.

    python bench/llm_speed.py [--model PATH] [--hidden 256] [--layers 4] [--rows 128] [--batch 8] [--max-len 256]
                              [--rank 16] [--block 8] [--rounds 4] [--out FILE.json]

Without ``--model`` a random LLaMA (``--hidden``, ``--layers``, a 2,000-word vocabulary) is built in a temp folder;
``--model`` takes a local causal-LM folder instead (e.g. a 0.5-1B model on a GPU). The rows are prompt/completion
pairs of 4-200 words (seeded), so their lengths vary as real instruction data does.

"reference" is the recipe of the transformers / peft tutorials: ``tokenizer(prompt + completion, truncation=True,
max_length=L, padding="max_length")``, a shuffled DataLoader, ``model(**batch, labels=labels).loss``, AdamW.
"ours" is ``train_llm`` with its defaults (rows of similar length batched together, padded to the longest in the
batch; prompt tokens masked; gradient_accumulation_steps 1 here, as in the reference).

- speed: both in one process, taking turns every ``--block`` steps, ``--rounds`` times (bench/turns.py). Both draw
  batches of ``--batch`` rows from the same rows, so tokens/s = rows/s × the mean real (unpadded) tokens per row.
- memory: each loop alone in a child process for ``2 × --block`` steps: peak RSS on the CPU (VmHWM), peak allocated
  memory on CUDA.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from turns import TakeTurns  # noqa: E402  (after the path is set)

VOCAB = [f"w{i}" for i in range(2000)]


def make_data(folder: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(rows):
        n = rng.randint(4, 200)
        words = [rng.choice(VOCAB) for _ in range(n)]
        cut = max(1, n // 3)
        lines.append(json.dumps({"prompt": " ".join(words[:cut]), "completion": " ".join(words[cut:])}))
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def config(args, model: str, data: Path, out: Path, steps: int):
    from lora_trainer.config import config_from_dict

    return config_from_dict({
        "model": {"task_type": "text-generation", "base_model": model},
        "data": {"train_data_dir": str(data), "max_seq_length": args.max_len, "validation_split": 0.0},
        "training": {"lora_rank": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": 0.05,
                     "batch_size": args.batch,
                     "gradient_accumulation_steps": 1, "max_train_steps": steps, "learning_rate": 2e-4,
                     "save_steps": 0, "max_grad_norm": 1.0},
        "output": {"output_dir": str(out), "output_name": "bench", "log_with": "none"}})


def reference_steps(args, model_dir: str, data: Path, device: str):
    """The plain loop, one step per ``next``; forever."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.pad_token = tok.pad_token or tok.eos_token
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                                 **{"dtype" if _new() else "torch_dtype": dtype}).to(device)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    rows = [json.loads(line) for line in (data / "rows.jsonl").read_text().splitlines()]
    enc = tok([r["prompt"] + " " + r["completion"] for r in rows], truncation=True, max_length=args.max_len,
              padding="max_length", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    dataset = torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    while True:
        for ids, mask, lab in loader:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=lab.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            yield


def peak_memory_mb(device: str) -> float:
    """CUDA: peak allocated; CPU: this process's own peak RSS (VmHWM; as bench/train_speed.py measures it)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _new() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def child(args) -> None:
    """One loop alone for 2 blocks of steps; prints its peak memory as JSON."""
    import torch

    data, model = Path(args.data), args.model
    if args.child == "reference":
        steps = reference_steps(args, model, data, args.device)
        for _ in range(2 * args.block):
            next(steps)
    else:
        from lora_trainer.llm.trainer import train_llm

        with tempfile.TemporaryDirectory() as tmp:
            train_llm(config(args, model, data, Path(tmp) / "run", 2 * args.block), progress=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"peak_mb": round(peak_memory_mb(args.device), 1)}))


def in_turns(args, model: str, data: Path, work: Path) -> dict:
    from lora_trainer.llm.trainer import train_llm

    warmup = 2
    turns = TakeTurns(reference_steps(args, model, data, args.device), warmup, args.block, args.rounds,
                      sync=_sync(args.device))
    steps = warmup + args.block * args.rounds
    train_llm(config(args, model, data, work / "run", steps), callbacks=turns, progress=False)
    return turns.times


def mean_tokens(model: str, data: Path, max_len: int) -> float:
    from lora_trainer.llm.data import encode_rows
    from lora_trainer.llm.model import load_tokenizer
    from lora_trainer.llm.rows import read_rows

    examples = encode_rows(load_tokenizer(model, False), read_rows(str(data)), max_len, False)
    return statistics.mean(len(e.input_ids) for e in examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model"), p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--hidden", type=int, default=256), p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=128), p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256), p.add_argument("--rank", type=int, default=16)
    p.add_argument("--block", type=int, default=8), p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out"), p.add_argument("--child", choices=["ours", "reference"]), p.add_argument("--data")
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model is None:
            from lora_trainer.llm.tiny import make_tiny_llama

            args.model = str(make_tiny_llama(work / "model", VOCAB, hidden=args.hidden, layers=args.layers,
                                             max_positions=args.max_len + 8, init_std=0.02))
        data = make_data(work / "data", args.rows)
        tokens = mean_tokens(args.model, data, args.max_len)
        times = in_turns(args, args.model, data, work)
        memory = {}
        for which in ("ours", "reference"):
            out = subprocess.run([sys.executable, __file__, "--child", which, "--data", str(data), *_passed(args)],
                                 capture_output=True, text=True, check=True).stdout
            memory[which] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    report(args, times, tokens, memory)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _passed(args) -> list[str]:
    keys = ("model", "device", "batch", "max_len", "rank", "block")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def report(args, times: dict, tokens: float, memory: dict) -> None:
    rate = {k: [args.block * args.batch * tokens / s for s in v] for k, v in times.items()}
    ratios = [o / r for o, r in zip(rate["ours"], rate["reference"])]
    result = {"device": args.device, "model": args.model if args.model and "tmp" not in args.model else
              f"random LLaMA hidden {args.hidden}, {args.layers} layers", "rows": args.rows, "batch": args.batch,
              "max_seq_length": args.max_len, "rank": args.rank, "mean_tokens_per_row": round(tokens, 1),
              "tokens_per_s": {k: round(statistics.median(v), 1) for k, v in rate.items()},
              "ratio_median": round(statistics.median(ratios), 3), "ratio_range": [round(min(ratios), 3),
                                                                                  round(max(ratios), 3)],
              "peak_memory_mb": memory, "when": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
