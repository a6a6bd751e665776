"""The base language model: a local Hugging Face causal-LM folder, checked before it loads (safetensors weights only,
its own Python code refused unless ``model.trust_remote_code``), then loaded with its tokenizer, and LoRA layers
put on the projections its architecture names (or ``training.target_modules``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lora_trainer.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)
# model_type (config.json) → the attention projections LoRA adapts by default; any other: LLaMA-style names
TARGETS_BY_TYPE = {
    **{t: ["query_key_value"] for t in ("chatglm", "falcon", "gpt_neox", "bloom", "RefinedWeb", "RefinedWebModel")},
    "gpt2": ["c_attn"],
    "phi3": ["qkv_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    **{t: ["q_proj", "k_proj", "v_proj", "out_proj"] for t in ("gptj", "opt", "codegen")},
}
LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj"]
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def read_model_config(folder: str, trust_remote_code: bool) -> dict:
    """config.json of a causal-LM folder, after the checks that need no model: a folder, safetensors weights (never
    a pickle), and no code of its own unless trusted. Raises ModelLoadError / ConfigError naming what to do."""
    path = Path(folder).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"model.base_model: {path.resolve()} is not a Hugging Face model folder (a folder with "
                             "config.json, the tokenizer and *.safetensors weights); nothing is downloaded")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
        if pickled:
            shown = ", ".join(pickled[:3])
            raise ModelLoadError(f"model.base_model: {path.resolve()} holds only pickled weights ({shown}), "
                                 "which are never loaded (a pickle can run code); convert them to safetensors, e.g. "
                                 "load once where you trust the file and save_pretrained(..., safe_serialization=True)")
        raise ModelLoadError(f"model.base_model: {path.resolve()} holds no *.safetensors weights")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelLoadError(f"model.base_model: {path / 'config.json'} is not valid JSON ({e})") from None
    if config.get("auto_map") and not trust_remote_code:
        raise ConfigError(f"model.base_model: {path.resolve()} ships its own Python code (config.json auto_map: "
                          f"{sorted(config['auto_map'])}); it is not run unless you set model.trust_remote_code: "
                          "true, which lets the code in that folder run with your user's rights: read it first")
    return config


def context_length(config: dict) -> int | None:
    """The most positions the model takes (config.json: max_position_embeddings, GPT-2's n_positions), if it says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def default_targets(model_type: str | None) -> list[str]:
    return list(TARGETS_BY_TYPE.get(model_type, LLAMA_STYLE))


def load_tokenizer(folder: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(f"model.base_model: the tokenizer in {Path(folder).resolve()} ships its own Python code "
                              "(tokenizer_config.json auto_map); it is not run unless you set "
                              "model.trust_remote_code: true, which lets that code run with your user's rights: read "
                              "it first") from None
        raise ModelLoadError(f"model.base_model: the tokenizer in {Path(folder).resolve()} could not be loaded "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}); a "
                             "model folder needs its tokenizer files (tokenizer.json, or tokenizer_config.json with "
                             "the vocabulary)") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(folder: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool, quantization=None):
    """The causal LM from its folder's safetensors (``use_safetensors=True``: a pickle is never read). ``quantization``:
    a BitsAndBytesConfig (llm.quantize); the model is then quantized as it loads, onto ``device`` (CUDA)."""
    import transformers
    from transformers import AutoModelForCausalLM

    new = int(transformers.__version__.split(".")[0]) >= 5  # (``dtype``; 4.x: ``torch_dtype``)
    kwargs = {"dtype" if new else "torch_dtype": dtype}
    if quantization is not None:  # (a quantized model is placed as it loads and cannot be moved afterwards)
        kwargs.update(quantization_config=quantization, device_map={"": device.index or 0})
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"model.base_model: {folder} could not be loaded as a causal language model: "
                             f"{str(e).splitlines()[0][:300]}") from e
    return model if quantization is not None else model.to(device)


@torch.no_grad()
def keeps_packed_rows_apart(model) -> bool:
    """Whether ``model`` attends within each row of a packed sequence when given each row's positions (restarting
    at 0) and no attention mask, as trl's packing feeds it: transformers' masking_utils builds the block-diagonal
    mask from such positions (flash attention its per-row call); older releases and some models' own code do not.
    Tried on two short rows: the second's logits packed, against alone."""
    first, second = [1, 2, 3, 4], [4, 3, 2]
    device = next(model.parameters()).device
    packed_ids = torch.tensor([first + second], device=device)
    positions = torch.tensor([[*range(len(first)), *range(len(second))]], device=device)
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits.float()
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits[:, len(first):].float()
    except Exception as e:  # (a model that takes no position_ids: packed rows attend to each other, as before)
        log.debug("packed rows: the model refused position ids (%s)", e)
        return False
    finally:
        model.train(was_training)
    scale = alone.abs().max().item()
    return torch.allclose(packed, alone, rtol=0.02, atol=0.02 * scale)


def add_lora(model, t, targets: list[str]):
    """The model with peft LoRA layers (task CAUSAL_LM) on ``targets``; only they train (fp32)."""
    from peft import LoraConfig, get_peft_model

    spec = "all-linear" if targets == ["all-linear"] else targets
    config = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=spec,
                        bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"training.target_modules: {targets} do not name this model's layers ({e}); its linear "
                          f"layers are: {', '.join(linear)}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, weights: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        raise ConfigError("training.resume_from_checkpoint: the checkpoint's LoRA tensors do not match this model's "
                          f"({len(weights)} saved, {len(params)} now); resume with the same model and LoRA settings")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
