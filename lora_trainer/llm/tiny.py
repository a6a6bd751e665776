"""A tiny random LLaMA with a word-level tokenizer, built in code and saved as a local model folder (no download):
for the tests and the benchmark."""

from __future__ import annotations

from pathlib import Path

SPECIAL = ["<unk>", "<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def make_tiny_llama(folder, words: list[str], hidden: int = 32, layers: int = 2, seed: int = 0,
                    chat_template: bool = True, max_positions: int = 256, init_std: float = 0.3,
                    add_bos: bool = False) -> Path:
    """Save a random LlamaForCausalLM (safetensors) and its tokenizer over ``words`` into ``folder``. ``init_std``:
    wider than the usual 0.02, so that a LoRA on a model this narrow can move its logits far enough to memorise.
    ``add_bos``: the tokenizer starts every text with <s>, as LLaMA's does."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIAL, *words, "user", "assistant", "system", ":"]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                         pad_token_id=vocab["<pad>"], tie_word_embeddings=False,
                         initializer_range=init_std)
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder
