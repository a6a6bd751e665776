"""A language model's LoRA (model.task_type: text-generation) on a tiny random LLaMA built in code (no download):
config, data rows and masks, training that memorises, generation, the adapter through peft, bit-exact resume, merge,
and the command line."""

from __future__ import annotations

import importlib.util
import json
import logging
import math

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from lora_trainer.cli import main
from lora_trainer.config import config_from_dict
from lora_trainer.engine.events import Callbacks
from lora_trainer.errors import ConfigError, DatasetError, ModelLoadError
from lora_trainer.llm.data import IGNORE, chunk, collate, encode, encode_rows, pack
from lora_trainer.llm.generate import find_adapter, generate, load_with_adapter
from lora_trainer.llm.model import default_targets, load_tokenizer
from lora_trainer.llm.rows import Row, read_rows
from lora_trainer.llm.tiny import make_tiny_llama
from lora_trainer.llm.trainer import train_llm

OLD_TRANSFORMERS = int(transformers.__version__.split(".")[0]) < 5 and tuple(
    int(x) for x in transformers.__version__.split(".")[:2]) < (4, 34)
COLORS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("night", "black")]
WORDS = "what is the color of sky grass blue green red snow white night black one two three four".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama", WORDS)


@pytest.fixture(scope="module")
def tok(base):
    return load_tokenizer(str(base), False)


def write_rows(folder, rows, name="rows.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return folder


def color_rows():
    return [{"prompt": f"what is the color of {thing}", "completion": color} for thing, color in COLORS]


def llm_config(base, data, out, **training):
    settings = {"lora_rank": 8, "lora_alpha": 16, "learning_rate": 1e-2, "batch_size": 4, "epochs": 30,
                "gradient_accumulation_steps": 1, "lora_dropout": 0.0, "save_steps": 0, **training}
    return {"model": {"task_type": "text-generation", "base_model": str(base)}, "data": {"train_data_dir": str(data)},
            "training": settings, "output": {"output_dir": str(out), "output_name": "colors"}}


# --- config ---------------------------------------------------------------------------------------------------

def test_config_accepts_the_language_model_task_with_its_keys(base):
    cfg = config_from_dict({"task_type": "llm", "base_model": str(base), "train_data_dir": "d",
                            "target_modules": ["q_proj", "v_proj"]})
    assert cfg.model.task_type == "text-generation"
    assert (cfg.data.max_seq_length, cfg.data.train_on_prompt, cfg.data.packing, cfg.model.trust_remote_code) == (
        512, False, False, False)
    assert cfg.training.target_modules == ["q_proj", "v_proj"]  # a language model's own names, not the UNet's


@pytest.mark.parametrize("settings, words", [
    ({"data": {"max_seq_length": 4}}, ["data.max_seq_length", ">= 8"]),
    ({"data": {"packing": "maybe"}}, ["data.packing", "true or false"]),
    ({"model": {"trust_remote_code": "yes please"}}, ["model.trust_remote_code", "true or false"]),
    ({"model": {"task_type": "chat"}}, ["model.task_type", "text-to-image", "text-generation"]),
    ({"model": {"base_model": None}}, ["model.base_model", "causal-LM folder"]),
    ({"data": {"train_data_dir": ""}}, ["data.train_data_dir", "data.metadata_path", ".jsonl"]),
])
def test_config_names_the_bad_key_and_what_is_allowed(settings, words):
    raw = {"model": {"task_type": "text-generation", "base_model": "m"}, "data": {"train_data_dir": "d"}}
    for section, values in settings.items():
        raw[section].update(values)
    raw["model"] = {k: v for k, v in raw["model"].items() if v is not None}
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_targets_follow_the_architecture():
    assert default_targets("llama") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert default_targets("falcon") == default_targets("gpt_neox") == ["query_key_value"]
    assert default_targets("gpt2") == ["c_attn"]


# --- data ------------------------------------------------------------------------------------------------------

def test_prompt_tokens_and_padding_are_masked(tok):
    row = Row("x:1", prompt="what is the color of sky", completion="blue")
    ex = encode(tok, row, train_on_prompt=False)
    n_prompt = len(tok("what is the color of sky")["input_ids"])
    assert ex.labels[:n_prompt] == (IGNORE,) * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] == (tok.convert_tokens_to_ids("blue"), tok.eos_token_id)
    assert encode(tok, row, train_on_prompt=True).labels == ex.input_ids
    short = encode(tok, Row("x:2", prompt="sky", completion="blue"), False)
    batch = collate([ex, short], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ex.input_ids))  # padded to the longest row, not max_seq_length
    assert (batch["labels"][1, len(short.input_ids):] == IGNORE).all()
    assert batch["attention_mask"][1].tolist() == [1] * len(short.input_ids) + [0] * (len(ex.input_ids) - 3)


def test_rows_that_hold_their_bos_and_eos_get_neither_twice(tmp_path):
    """A row written for another trainer holds BOS and EOS already ("<s>[INST] ... </s>": a chat template rendered
    beforehand): the tokenizer's own BOS and the appended EOS are not added a second time (trl's add_eos appends EOS
    only where the text does not end with it), in training and in generate alike."""
    from types import SimpleNamespace

    tok = load_tokenizer(str(make_tiny_llama(tmp_path / "bos", WORDS, add_bos=True)), False)
    bos, eos, sky, blue = tok.bos_token_id, tok.eos_token_id, *tok.convert_tokens_to_ids(["sky", "blue"])
    for text in ("<s> sky blue </s>", "<s>sky blue</s>", "sky blue"):
        assert encode(tok, Row("x:1", text=text), False).input_ids == (bos, sky, blue, eos), text
    for prompt, completion in (("<s> sky", "blue </s>"), ("sky", "blue")):
        ex = encode(tok, Row("x:1", prompt=prompt, completion=completion), False)
        assert (ex.input_ids, ex.labels) == ((bos, sky, blue, eos), (IGNORE, IGNORE, blue, eos)), (prompt, completion)
    seen = {}

    def fake_generate(input_ids, **kwargs):
        seen["ids"] = input_ids[0].tolist()
        return input_ids

    generate(SimpleNamespace(device=torch.device("cpu"), generate=fake_generate), tok, "<s> sky", max_new_tokens=1)
    assert seen["ids"] == [bos, sky]


@pytest.mark.skipif(OLD_TRANSFORMERS, reason="chat templates need transformers >= 4.34 (this venv pins 4.30)")
def test_only_the_assistant_turns_are_trained(tok):
    row = Row("x:1", messages=(("user", "what is the color of sky"), ("assistant", "blue"),
                               ("user", "what is the color of snow"), ("assistant", "white")))
    ex = encode(tok, row, train_on_prompt=False)
    trained = [tok.convert_ids_to_tokens(i) for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert trained == ["blue", "</s>", "white", "</s>"]


@pytest.mark.skipif(OLD_TRANSFORMERS, reason="chat templates need transformers >= 4.34 (this venv pins 4.30)")
def test_a_conversation_is_tokenized_whole_as_at_inference():
    """A SentencePiece-like tokenizer (LLaMA 2, Mistral) starts every text it tokenizes with "▁": turns tokenized
    apart get a "▁" the model never sees at inference. The ids are the whole conversation's; the labels still
    train the assistant turns only."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("▁user:sky\nassistant:blue\n"))
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(["<unk>", "</s>", *chars])}, [], unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    row = Row("x:1", messages=(("user", "sky"), ("assistant", "blue")))
    whole = tok.apply_chat_template([{"role": "user", "content": "sky"}, {"role": "assistant", "content": "blue"}],
                                    tokenize=False)
    ex = encode(tok, row, train_on_prompt=False)
    assert list(ex.input_ids) == tok(whole, add_special_tokens=False)["input_ids"]
    trained = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert "".join(tok.convert_ids_to_tokens(trained)) == "blue\n"
    assert encode(tok, row, train_on_prompt=True).labels == ex.input_ids


def test_messages_without_a_chat_template_name_the_file(tmp_path):
    model = make_tiny_llama(tmp_path / "plain", WORDS, chat_template=False)
    data = write_rows(tmp_path / "d", [{"messages": [{"role": "user", "content": "sky"},
                                                     {"role": "assistant", "content": "blue"}]}])
    with pytest.raises(DatasetError) as e:
        encode_rows(load_tokenizer(str(model), False), read_rows(str(data)), 64, False)
    assert f"{data / 'rows.jsonl'}:1" in str(e.value) and "chat template" in str(e.value)


@pytest.mark.parametrize("name, text, line", [
    ("a.jsonl", '{"prompt": "sky", "completion": "blue"}\n\n{"prompt": "snow", "completion": 3}\n', 3),
    ("b.jsonl", '{"prompt": "sky", "completion": "blue"}\n{"prompt": "snow", \n', 2),
    ("c.json", '[\n  {"text": "sky blue"},\n  {"question": "snow"}\n]\n', 3),
    ("d.csv", "prompt,completion\nsky,blue\nsnow,white,extra\n", 3),
    ("e.json", '[\n  {"text": "sky blue"},\n  {"text": "snow white"}\n', 4),  # (cut off: no closing ']')
    ("f.json", '[\n  {"text": "sky blue"}\n]\ngarbage\n', 4),
])
def test_a_bad_row_gets_one_line_naming_file_and_line(tmp_path, name, text, line):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_rows(str(tmp_path))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / name}:{line}: ") and "\n" not in message


def test_a_json_file_of_one_object_laid_out_over_lines_is_one_row(tmp_path):
    (tmp_path / "one.json").write_text('{\n  "prompt": "sky",\n  "completion": "blue"\n}\n', encoding="utf-8")
    rows = read_rows(str(tmp_path))
    assert [(r.prompt, r.completion) for r in rows] == [("sky", "blue")]


def test_held_out_rows_with_nothing_to_learn_are_named_as_held_out(tok):
    """Every held-out row's prompt fills max_seq_length: the message says they are the held-out ones and that
    validation_split: 0 is a way out (it read as if the whole data set had nothing to learn)."""
    rows = [Row(f"r.jsonl:{i}", prompt="what is the color of sky", completion="blue") for i in (1, 2)]
    with pytest.raises(DatasetError, match=r"^none of the 2 held-out rows \(data.validation_split\) has a token to "
                                           r"learn within data.max_seq_length 4 \(the prompt fills it\), e.g. "
                                           r"r.jsonl:1; raise it, or set data.validation_split: 0$"):
        encode_rows(tok, rows, 4, False, held_out=True)
    with pytest.raises(DatasetError, match=r"^none of the 2 rows has a token to learn .*; raise it$"):
        encode_rows(tok, rows, 4, False)


def test_rows_from_each_file_kind(tmp_path, tok):
    write_rows(tmp_path, color_rows()[:1])
    (tmp_path / "b.csv").write_text("prompt,completion\nwhat is the color of snow,white\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("one two three four", encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "the sky"}]), encoding="utf-8")
    rows = read_rows(str(tmp_path))
    assert [(r.completion or r.text) for r in rows] == ["white", "one two three four", "the sky", "blue"]
    examples = encode_rows(tok, rows, max_len=4, train_on_prompt=False)  # (the prompts fill 4 tokens: left out)
    assert [len(e.input_ids) for e in examples] == [4, 2, 3]  # (the .txt document's 5 tokens: two chunks)
    alone = encode_rows(tok, rows, 64, False)
    packed = pack(alone, 64, 0)
    assert len(packed) == 1
    # the targets are each row's own, as alone: its first token is none (the model sees labels shifted by one)
    targets = sum(1 for e in alone for label in e.labels[1:] if label != IGNORE)
    assert sum(1 for label in packed[0].labels if label != IGNORE) == targets


@pytest.mark.skipif(importlib.util.find_spec("transformers.masking_utils") is None,
                    reason="transformers builds no per-row mask from positions before masking_utils")
def test_packed_rows_attend_within_themselves_as_alone(base, tok, monkeypatch):
    """Packing as trl's: the joined rows keep their own positions and the model (this transformers' LLaMA takes them
    as the rows' bounds) attends within each row: a padded batch of packed sequences has the loss of its rows alone."""
    import contextlib
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from lora_trainer.llm.model import keeps_packed_rows_apart
    from lora_trainer.llm.run import LlmRun

    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    model.config.use_cache = False
    model.train()
    assert keeps_packed_rows_apart(model) and model.training  # (tried in eval, left as it was)
    model.eval()
    rows = [encode(tok, Row(f"x:{i}", prompt=p["prompt"], completion=p["completion"]), True)
            for i, p in enumerate(color_rows())] + [encode(tok, Row("x:9", text="one two three"), False)]
    packed = pack(rows, 20, 0)
    assert len(packed) == 2 and len(packed[0].input_ids) != len(packed[1].input_ids)  # (one is padded)
    assert all(p.positions.count(0) >= 2 for p in packed)
    batch = collate(packed, tok.pad_token_id)
    assert batch["position_ids"][0, :8].tolist() == list(packed[0].positions[:8])
    run = SimpleNamespace(device=torch.device("cpu"), model=model, autocast=contextlib.nullcontext, rows_apart=True)
    with torch.no_grad():
        together = LlmRun.loss_sum(run, batch)
        alone = sum(LlmRun.loss_sum(run, collate([r], tok.pad_token_id)) for r in rows)
    assert torch.allclose(together, alone, rtol=1e-4), (together, alone)
    masking = importlib.import_module("transformers.masking_utils")  # (a release that builds no per-row mask: told)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda positions: None)
    assert not keeps_packed_rows_apart(model)


def test_line_breaks_in_csv_fields_and_unicode_separators_in_json_are_kept(tmp_path, tok):
    (tmp_path / "a.csv").write_text('prompt,completion\nwrite code,"def f():\n    return 1"\n', encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one\u2028two\x85three"}, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    rows = read_rows(str(tmp_path))
    assert [r.completion or r.text for r in rows] == ["def f():\n    return 1", "one\u2028two\x85three"]
    # an empty prompt: the completion starts as a prompt would have (the tokenizer's special tokens)
    ex = encode(tok, Row("x:1", prompt="", completion="blue"), train_on_prompt=False)
    assert list(ex.input_ids) == list(tok("blue")["input_ids"]) + [tok.eos_token_id]


def test_long_text_documents_are_split_into_chunks_and_prompt_rows_cut(tmp_path, tok, caplog):
    """A .txt document and a {"text"} row longer than max_seq_length become consecutive chunks that together hold
    every token, each token after the first a target exactly once; a prompt/completion row is cut (and counted)."""
    caplog.set_level("INFO", logger="lora_trainer")
    words = [w for _, c in COLORS for w in ("the", "color", "of", c)] * 3  # 48 words
    (tmp_path / "a.txt").write_text(" ".join(words), encoding="utf-8")
    write_rows(tmp_path, [{"text": " ".join(words[:20])}, {"prompt": "what is the color of sky",
                                                           "completion": " ".join(words[:20])}], name="b.jsonl")
    rows = read_rows(str(tmp_path))
    examples = encode_rows(tok, rows, max_len=8, train_on_prompt=False)
    doc = encode(tok, rows[0], False)
    assert len(doc.input_ids) == 49  # (the words and EOS)
    chunks = chunk(doc, 8)
    assert [len(c.input_ids) for c in chunks] == [8] * 6 + [7]  # starts 0, 7, 14, ..., 42: one token of overlap
    assert examples[:7] == chunks
    assert [i for c in chunks for i in c.input_ids[1:]] == list(doc.input_ids[1:])  # every target once, in order
    assert all(a.input_ids[-1] == b.input_ids[0] for a, b in zip(chunks, chunks[1:]))
    assert [len(e.input_ids) for e in examples[7:]] == [8, 8, 7, 8]  # the 21-token text row: 3 chunks; the prompt row
    assert examples[-1].input_ids == encode(tok, rows[2], False).input_ids[:8]  # ...cut to 8
    assert "2 of 3 text rows/documents are longer than data.max_seq_length 8 tokens and were split into 10 " in (
        caplog.text)
    assert "1 of 3 rows are longer than data.max_seq_length 8 tokens and were cut to it" in caplog.text
    assert chunk(doc, 64) == [doc]


# --- training --------------------------------------------------------------------------------------------------

def test_train_memorises_then_generates_and_the_adapter_reloads(base, tmp_path, capsys):
    """Through the command line: train dispatches on task_type; the loss falls; greedy decoding gives the memorised
    completion; the adapter folder is peft's, in safetensors; it changes the base model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_rows(tmp_path / "data", color_rows())
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(llm_config(base, data, tmp_path / "out")))
    assert main(["train", "-c", str(tmp_path / "cfg.yaml")]) == 0
    assert "PEFT adapter:" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["task_type"] == "text-generation" and summary["steps"] == 30
    assert summary["final_loss"] < 0.2 * summary["first_loss"]
    adapter = tmp_path / "out" / "colors"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert not list(adapter.glob("*.bin")) and json.loads((adapter / "adapter_config.json").read_text()).get(
        "modules_to_save") is None
    assert any(k.endswith("q_proj.lora_A.weight") for k in load_file(adapter / "adapter_model.safetensors"))
    assert (tmp_path / "out" / "config.yaml").is_file() and (tmp_path / "out" / "logs" / "train.log").is_file()

    model, tok = load_with_adapter(find_adapter(str(tmp_path / "out")))
    for thing, color in COLORS:
        assert generate(model, tok, f"what is the color of {thing}", max_new_tokens=2)[1] == [
            tok.convert_tokens_to_ids(color), tok.eos_token_id]
    ids = tok("what is the color of sky", return_tensors="pt")["input_ids"]
    plain = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    with torch.no_grad():
        before = plain(ids).logits
        after = PeftModel.from_pretrained(plain, str(adapter)).eval()(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)
    assert main(["generate", "--adapter", str(tmp_path / "out"), "--prompt", "what is the color of snow",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.split() == ["white"]


class StopAt(Callbacks):
    def __init__(self, step):
        self.step, self.now = step, 0

    def on_step(self, info):
        self.now = info.step

    def should_stop(self):
        return self.now >= self.step


def test_resume_is_bit_exact(base, tmp_path):
    """Stopped at step 3 (within an epoch, with dropout and accumulation), resumed from 'latest': the same adapter
    tensors as the run that never stopped."""
    rows = color_rows() + [{"text": "one two three four"}, {"prompt": "what is", "completion": "red"}]
    data = write_rows(tmp_path / "data", rows)
    settings = {"batch_size": 2, "gradient_accumulation_steps": 2, "epochs": 3, "lora_dropout": 0.2,
                "lr_scheduler": "cosine"}
    whole = train_llm(config_from_dict(llm_config(base, data, tmp_path / "whole", **settings)), progress=False)
    cut = llm_config(base, data, tmp_path / "cut", **settings)
    stopped = train_llm(config_from_dict(cut), callbacks=StopAt(3), progress=False)
    assert (stopped.status, stopped.steps, whole.steps) == ("stopped", 3, 6)
    cut["training"]["resume_from_checkpoint"] = "latest"
    resumed = train_llm(config_from_dict(cut), progress=False)
    assert resumed.status == "finished" and resumed.run_dir == stopped.run_dir
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    early = load_file(next(stopped.run_dir.glob("colors-step3")) / "adapter_model.safetensors")
    assert not all(torch.equal(a[k], early[k]) for k in a)  # (the stop's export, kept aside, is another state)


def test_a_resume_refuses_another_optimizer_and_applies_a_changed_learning_rate(base, tmp_path, caplog):
    """...to each parameter group: with LoRA+ (loraplus_lr_ratio), the B matrices' group at the ratio too."""
    data = write_rows(tmp_path / "data", color_rows())
    cut = llm_config(base, data, tmp_path / "cut", batch_size=2, epochs=2, loraplus_lr_ratio=4)
    train_llm(config_from_dict(cut), callbacks=StopAt(2), progress=False)
    cut["training"].update(resume_from_checkpoint="latest", optimizer="adafactor")
    with pytest.raises(ConfigError, match="was trained with 'adamw' and this run has 'adafactor'"):
        train_llm(config_from_dict(cut), progress=False)
    cut["training"].update(optimizer="adamw", learning_rate=cut["training"]["learning_rate"] / 2)
    caplog.set_level(logging.INFO, logger="lora_trainer")
    assert train_llm(config_from_dict(cut), progress=False).status == "finished"
    changed = [r.message for r in caplog.records if "resuming with the settings changed" in r.message]
    assert len(changed) == 1 and "LoRA learning rate 0.01 → 0.005" in changed[0], changed
    assert "LoRA B (LoRA+) learning rate 0.04 → 0.02" in changed[0], changed


def test_sample_prompts_are_answered_while_training_without_changing_it(base, tmp_path):
    """output.sample_prompts (accepted for a language model, as for images): the model's greedy answers before step
    1, every sample_every_n_steps and at the last step, in <run>/samples/ and summary.json; the trained adapter is
    the very one a run without samples trains (greedy decoding draws no random numbers)."""
    data = write_rows(tmp_path / "data", color_rows())
    plain = train_llm(config_from_dict(llm_config(base, data, tmp_path / "plain", lora_dropout=0.1)), progress=False)
    raw = llm_config(base, data, tmp_path / "out", lora_dropout=0.1)
    raw["output"].update(sample_prompts=["what is the color of sky", "what is the color of snow"],
                         sample_every_n_steps=20, sample_at_first=True)
    result = train_llm(config_from_dict(raw), progress=False)
    files = sorted((result.run_dir / "samples").iterdir())
    assert [f.name for f in files] == ["colors_step000000.txt", "colors_step000020.txt", "colors_step000030.txt"]
    assert files[-1].read_text(encoding="utf-8").split("\n")[:4] == [
        ">>> what is the color of sky", "blue", "", ">>> what is the color of snow"]
    assert json.loads((result.run_dir / "summary.json").read_text())["samples"] == [
        f"samples/{f.name}" for f in files]
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (plain, result))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(OLD_TRANSFORMERS, reason="chat templates need transformers >= 4.34 (this venv pins 4.30)")
def test_a_sample_prompt_is_a_user_turn_where_the_rows_are_conversations(base, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"what is the color of {t}"},
                          {"role": "assistant", "content": c}]} for t, c in COLORS]
    raw = llm_config(base, write_rows(tmp_path / "data", rows), tmp_path / "out")
    raw["output"].update(sample_prompts=["what is the color of grass"])
    result = train_llm(config_from_dict(raw), progress=False)
    assert (result.run_dir / "samples" / "colors_step000030.txt").read_text(encoding="utf-8").split("\n")[:2] == [
        ">>> what is the color of grass", "green"]


def test_held_out_rows_give_eval_loss_and_perplexity_per_epoch(base, tmp_path):
    rows = [{"prompt": f"what is the color of {t}", "completion": c} for _ in range(10) for t, c in COLORS]
    data = write_rows(tmp_path / "data", rows)  # 40 rows: 5% (2) held out by default
    result = train_llm(config_from_dict(llm_config(base, data, tmp_path / "out", epochs=2, batch_size=8)),
                       progress=False)
    assert (result.rows_trained, result.rows_held_out) == (38, 2)
    assert [e["epoch"] for e in result.evaluations] == [1, 2]
    assert all(math.isclose(e["perplexity"], math.exp(e["eval_loss"])) for e in result.evaluations)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["eval_loss"] == result.evaluations[-1]["eval_loss"]


def test_merge_writes_shards_that_load_as_a_plain_model(base, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_rows(tmp_path / "data", color_rows())
    result = train_llm(config_from_dict(llm_config(base, data, tmp_path / "out", epochs=3)), progress=False)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(result.adapter_dir), "--output", str(out), "--max-shard-size", "40KB"]) == 0
    assert len(list(out.glob("*.safetensors"))) >= 2 and not list(out.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    peft_model, tok = load_with_adapter(result.adapter_dir)
    ids = tok("what is the color of grass", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-4)
    assert main(["merge", "--adapter", str(result.adapter_dir), "--output", str(out)]) == 2  # never overwrites


# --- refusals before the model loads ---------------------------------------------------------------------------

def test_pickled_weights_and_remote_code_are_refused(base, tmp_path):
    import shutil

    data = write_rows(tmp_path / "data", color_rows())
    pickled = tmp_path / "pickled"
    shutil.copytree(base, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickled weights"):
        train_llm(config_from_dict(llm_config(pickled, data, tmp_path / "out")))
    remote = tmp_path / "remote"
    shutil.copytree(base, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    with pytest.raises(ConfigError, match="model.trust_remote_code: true"):
        train_llm(config_from_dict(llm_config(remote, data, tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_bad_row_stops_the_cli_with_one_line(base, tmp_path, capsys):
    data = tmp_path / "data"
    write_rows(data, color_rows())
    with open(data / "rows.jsonl", "a", encoding="utf-8") as f:
        f.write('{"prompt": "what is"}\n')
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(llm_config(base, data, tmp_path / "out")))
    assert main(["train", "-c", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data / 'rows.jsonl'}:5: ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_target_modules_list_the_models_layers(base, tmp_path):
    data = write_rows(tmp_path / "data", color_rows())
    with pytest.raises(ConfigError, match="training.target_modules.*gate_proj"):
        train_llm(config_from_dict(llm_config(base, data, tmp_path / "out", target_modules=["c_attn"])),
                  progress=False)


def test_packing_checkpointing_and_accumulation_train(base, tmp_path, caplog):
    caplog.set_level("INFO", logger="lora_trainer")
    rows = color_rows() + [{"text": "one two three four " * 6}]
    data = write_rows(tmp_path / "data", rows)
    raw = llm_config(base, data, tmp_path / "out", epochs=2, batch_size=1, gradient_accumulation_steps=2,
                     gradient_checkpointing=True, save_steps=1)
    raw["data"].update(packing=True, max_seq_length=16)
    result = train_llm(config_from_dict(raw), progress=False)
    assert "1 of 5 text rows/documents are longer than data.max_seq_length 16 tokens and were split into 2 chunks" in (
        caplog.text) and "packing: 6 rows" in caplog.text
    assert result.status == "finished" and result.steps == 2 * math.ceil(result.rows_trained / 2)
    assert result.rows_trained < len(rows) + 1  # (the 6 rows, the long one split in two, joined)
    assert len(list((result.run_dir / "checkpoints").iterdir())) == 3  # (checkpoints_total_limit)
    first, last = result.first_loss, result.final_loss
    assert math.isfinite(first) and math.isfinite(last)


# --- a quantized base (training.quantize_base: QLoRA); no CUDA here: the refusals and the set-up, not a CUDA run ----

def test_quantize_base_is_a_language_model_choice():
    raw = {"model": {"task_type": "text-generation", "base_model": "m"}, "data": {"train_data_dir": "d"}}
    assert config_from_dict({**raw, "training": {"quantize_base": "4bit"}}).training.quantize_base == "4bit"
    assert config_from_dict(raw).training.quantize_base == "no"
    assert config_from_dict({**raw, "training": {"quantize_base": False}}).training.quantize_base == "no"  # (YAML no)
    with pytest.raises(ConfigError, match=r"training.quantize_base: '3bit' is not one of no, 4bit, 8bit"):
        config_from_dict({**raw, "training": {"quantize_base": "3bit"}})
    with pytest.raises(ConfigError, match=r"training.quantize_base: '8bit' is for model.task_type: text-generation"):
        config_from_dict({"train_data_dir": "d", "quantize_base": "8bit"})
    with pytest.raises(ConfigError, match=r"training.fp8_base: true is for image LoRAs.*quantize_base"):
        config_from_dict({**raw, "training": {"fp8_base": True}})
    with pytest.raises(ConfigError, match=r"unknown key 'load_in_4bit' in training: write training.quantize_base: 4b"):
        config_from_dict({**raw, "training": {"load_in_4bit": True}})


@pytest.mark.parametrize("cuda, installed, words", [
    (False, True, ["training.quantize_base: '4bit' needs a CUDA GPU", "quantize_base: no"]),
    (True, False, ["training.quantize_base: '4bit' needs the bitsandbytes package", "pip install bitsandbytes"]),
])
def test_quantize_base_without_cuda_or_bitsandbytes_stops_before_the_data_is_read(base, tmp_path, monkeypatch, cuda,
                                                                                    installed, words):
    from lora_trainer.llm import quantize

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(quantize, "bitsandbytes_installed", lambda: installed)
    data = write_rows(tmp_path / "data", [{"prompt": "what is"}])  # (a bad row: not reached)
    with pytest.raises(ConfigError) as e:
        train_llm(config_from_dict(llm_config(base, data, tmp_path / "out", quantize_base="4bit")), progress=False)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "out").exists()


def test_quantize_base_builds_the_qlora_bitsandbytes_config(monkeypatch):
    """4bit: NF4, double quantization, computing in the run's mixed precision; 8bit: LLM.int8. (transformers 4.30
    reads bitsandbytes' version as it builds the config: a version stands in for the package not installed here.)"""
    import importlib.metadata

    from lora_trainer.llm.quantize import quantization_config

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.45.0" if n == "bitsandbytes" else real(n))
    q = quantization_config("4bit", "bf16")
    assert (q.load_in_4bit, q.load_in_8bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant,
            q.bnb_4bit_compute_dtype) == (True, False, "nf4", True, torch.bfloat16)
    assert quantization_config("4bit", "fp16").bnb_4bit_compute_dtype == torch.float16
    assert quantization_config("4bit", "no").bnb_4bit_compute_dtype == torch.float32
    q8 = quantization_config("8bit", "bf16")
    assert (q8.load_in_8bit, q8.load_in_4bit) == (True, False)
    assert quantization_config("no", "bf16") is None


def test_a_quantized_base_loads_through_transformers_onto_the_gpu_unmoved(base, monkeypatch):
    """The loading call a quantized run makes (the model is placed by transformers as it loads, never moved after);
    recorded with transformers' loader replaced, as there is no CUDA here."""
    from transformers import AutoModelForCausalLM

    from lora_trainer.llm.model import load_model

    seen = {}

    class Loaded:
        def to(self, device):
            raise AssertionError("a quantized model is not moved")

    def fake(folder, **kwargs):
        seen.update(kwargs, folder=folder)
        return Loaded()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    marker = object()
    assert isinstance(load_model(str(base), torch.bfloat16, torch.device("cuda"), False, quantization=marker), Loaded)
    assert seen["quantization_config"] is marker and seen["device_map"] == {"": 0}
    assert seen["use_safetensors"] is True and seen["local_files_only"] is True


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="QLoRA needs a CUDA GPU and bitsandbytes (neither is assumed in CI)")
@pytest.mark.parametrize("mode, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_a_quantized_base_trains_on_cuda_and_its_adapter_loads_on_the_full_base(base, tmp_path, monkeypatch, mode,
                                                                                  layer):
    """Where a GPU and bitsandbytes are (not on the machines this was written on: never run there): the base's
    projections are bitsandbytes layers, the loss falls, and the adapter is an ordinary one that loads on the
    full-precision base and changes its logits."""
    from lora_trainer.llm import trainer as llm_trainer

    data = write_rows(tmp_path / "data", color_rows())
    seen, real = {}, llm_trainer.add_lora

    def spy(model, t, targets):
        seen["layers"] = {type(m).__name__ for m in model.modules()}
        return real(model, t, targets)

    monkeypatch.setattr(llm_trainer, "add_lora", spy)
    result = train_llm(config_from_dict(llm_config(base, data, tmp_path / "out", quantize_base=mode,
                                                   mixed_precision="bf16")), progress=False)
    assert layer in seen["layers"], seen
    assert result.final_loss < 0.5 * result.first_loss
    model, tok = load_with_adapter(result.adapter_dir)
    ids = tok("what is the color of sky", return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        after = model(ids).logits
        with model.disable_adapter():
            before = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)


# --- the model's own facts: its end-of-turn tokens, its context, its folder, its chat template's refusals
def test_generation_stops_at_the_models_own_end_of_turn_as_well():
    from types import SimpleNamespace

    from lora_trainer.llm.generate import stop_ids

    tok = SimpleNamespace(eos_token_id=2)
    assert stop_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 107])), tok) == [2, 107]
    assert stop_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=107)), tok) == [107, 2]
    assert stop_ids(SimpleNamespace(), tok) == [2]


def test_the_adapter_names_its_base_by_an_absolute_path_and_the_context_bounds_max_seq_length(base, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.chdir(base.parent)
    data = write_rows(tmp_path / "data", color_rows())
    cfg = llm_config(base.name, data, tmp_path / "out", epochs=1)
    cfg["data"]["max_seq_length"] = 300  # (the tiny model takes 256 positions)
    with pytest.raises(ConfigError, match=r"data.max_seq_length: 300 tokens is more than the model takes \(256 "
                                          r"positions, .*config.json\); set it to 256 or less"):
        train_llm(config_from_dict(cfg), progress=False)
    del cfg["data"]["max_seq_length"]  # (the default, 512: the model's 256)
    result = train_llm(config_from_dict(cfg), progress=False)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base.resolve())
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["data"]["max_seq_length"] == 256


@pytest.mark.skipif(OLD_TRANSFORMERS, reason="chat templates need transformers >= 4.34 (this venv pins 4.30)")
def test_a_conversation_the_template_refuses_or_that_starts_with_the_answer_is_named(base, tmp_path):
    from lora_trainer.llm.data import chat_pieces

    tok = load_tokenizer(str(base), False)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    system = Row(messages=[("system", "be brief"), ("user", "sky"), ("assistant", "blue")], source="r.jsonl:3")
    with pytest.raises(DatasetError, match=r"r.jsonl:3: the tokenizer's chat template refuses this conversation "
                                           r"\(System role not supported; its turns: system"):
        chat_pieces(tok, system)
    answer_first = Row(messages=[("assistant", "hi"), ("user", "sky"), ("assistant", "blue")], source="r.jsonl:4")
    with pytest.raises(DatasetError, match="r.jsonl:4: the conversation starts with an assistant turn"):
        chat_pieces(tok, answer_first)


def test_a_model_folder_without_its_tokenizer_is_named(base, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    with pytest.raises(ModelLoadError, match=r"the tokenizer in .*bare could not be loaded"):
        load_tokenizer(str(bare), False)
