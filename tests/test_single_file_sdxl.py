"""Single-file SDXL checkpoints (the A1111 layout) load offline and train; every tensor of a checkpoint with SDXL's
real key names and shapes lands in the shipped configs' models (built on the meta device: nothing allocated); the
``v_pred``/``ztsnr`` marker keys decide v-prediction and zero terminal SNR; kinds we do not train are refused before
anything loads."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import socket

import pytest
import torch
from ldm_checkpoint import vae_to_ldm
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train import make_cfg

from lora_trainer.config import config_from_dict
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.trainer import train
from lora_trainer.errors import ModelLoadError
from lora_trainer.export.kohya import LdmUnetNames
from lora_trainer.models import single_file
from lora_trainer.models.factory import load_backend
from lora_trainer.models.sdxl_backend import SdxlBackend, is_sdxl_model
from lora_trainer.models.single_file import SDXL_CONFIG, inspect_checkpoint, load_single_file_pipeline
from lora_trainer.models.tiny_sdxl import build_tiny_sdxl_components, tiny_sdxl_model_path

TE1, TE2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
# open_clip's names for a Hugging Face CLIP layer's parts (q/k/v are one in_proj in open_clip)
OPEN_CLIP = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}
# keys of sd_xl_base_1.0.safetensors no text encoder uses: open_clip's contrastive temperature, a constant buffer
UNUSED = ("conditioner.embedders.1.model.logit_scale", "conditioner.embedders.0.transformer.text_model.embeddings."
          "position_ids")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- an SDXL model in the A1111 single-file layout -------------------------------------------------------

def open_clip_state(text_encoder, prefix: str) -> dict:
    """A CLIPTextModelWithProjection's weights named as open_clip (SDXL's second encoder in a checkpoint)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    sd.pop("embeddings.position_ids", None)
    projection = sd.pop("text_projection.weight")
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
           prefix + "text_projection": projection.T.contiguous(),  # open_clip multiplies x @ text_projection
           prefix + "logit_scale": torch.ones((), device=projection.device)}
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv"])
            out.update({f"{block}{ours}.{kind}": sd.pop(f"{layer}{hf}.{kind}") for hf, ours in OPEN_CLIP.items()})
    assert not sd, f"not written: {sorted(sd)[:5]}"
    return out


def a1111_sdxl_state(parts: dict) -> dict:
    """unet, vae, text_encoder, text_encoder_2 → one state dict with an A1111 / sgm SDXL checkpoint's key names."""
    names = LdmUnetNames(parts["unet"].config)
    out = {}
    for key, value in parts["unet"].state_dict().items():
        module, _, param = key.rpartition(".")
        out[f"model.diffusion_model.{names(module)}.{param}"] = value
    out.update(vae_to_ldm(parts["vae"]))
    for key, value in parts["text_encoder"].state_dict().items():
        out[TE1 + (key if key.startswith("text_model.") else "text_model." + key)] = value
    device = next(parts["text_encoder"].parameters()).device
    out[TE1 + "text_model.embeddings.position_ids"] = torch.arange(77, device=device)[None]  # saved by transformers 4
    out.update(open_clip_state(parts["text_encoder_2"], TE2))
    return out


def tiny_parts(seed: int = 0) -> dict:
    """The tiny SDXL model with a second text encoder wider than the first (48 against 32): diffusers tells the two
    encoders of a single file apart by their widths, as SDXL's 768 and 1280 are."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    parts = build_tiny_sdxl_components(seed)
    config = copy.deepcopy(parts["text_encoder_2"].config)
    config.hidden_size = config.projection_dim = 48
    torch.manual_seed(seed + 5)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    unet = dict(parts["unet"].config, cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=6 * 8 + 48)
    parts["unet"] = UNet2DConditionModel.from_config(unet)
    return parts


def tiny_single_file(folder, markers=(), seed: int = 0):
    """(checkpoint path, config folder without weights, the parts) of the tiny SDXL model as one file."""
    parts = tiny_parts(seed)
    state = {k: v.detach().contiguous() for k, v in a1111_sdxl_state(parts).items()}
    state.update({m: torch.zeros(0) for m in markers})  # empty marker tensors, as NoobAI-XL V-pred carries
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_sdxl.safetensors"
    save_file(state, str(path))
    config = folder / "config"
    shutil.copytree(tiny_sdxl_model_path(), config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    parts["unet"].save_config(config / "unet")
    parts["text_encoder_2"].config.save_pretrained(config / "text_encoder_2")
    return path, config, parts


def comparable(state: dict) -> dict:
    """Keys without transformers 5's dropped ``text_model.`` level and the position_ids buffer."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def test_a_tiny_single_file_sdxl_loads_offline_with_every_weight(tmp_path, no_network):
    path, config, parts = tiny_single_file(tmp_path)
    assert inspect_checkpoint(path) == single_file.CheckpointFacts("sdxl", frozenset(), 4)
    assert is_sdxl_model(str(path)) and not is_sdxl_model(str(config / "unet" / "config.json"))
    pipe = load_single_file_pipeline(path, config_dir=config)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = comparable(parts[name].state_dict()), comparable(getattr(pipe, name).state_dict())
        assert want.keys() == got.keys(), f"{name}: {sorted(want.keys() ^ got.keys())[:4]}"
        for key, value in want.items():
            assert torch.equal(got[key].to(value.dtype), value), f"{name}.{key} differs"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.scheduler.config.prediction_type == "epsilon"


def test_a_config_folder_without_vocabulary_files_gets_clips_from_sd15(tmp_path, no_network):
    """As the shipped SDXL folder: its tokenizer folders hold settings only; the vocabulary is configs/sd15's."""
    path, config, _ = tiny_single_file(tmp_path)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(config / name)
        shutil.copytree(SDXL_CONFIG / name, config / name)
    pipe = load_single_file_pipeline(path, config_dir=config)
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token, pipe.tokenizer_2.pad_token_id) == (
        "<|endoftext|>", "!", 0)


def test_a_single_file_sdxl_with_markers_trains_v_prediction_with_zero_terminal_snr(tmp_path, monkeypatch, caplog):
    """Through train() as the command line runs it: model.base_model is the file; the factory picks the SDXL
    backend; the marker keys make it v-prediction with zero terminal SNR; the kohya file is SDXL's."""
    path, config, _ = tiny_single_file(tmp_path / "model", markers=("v_pred", "ztsnr"))
    monkeypatch.setitem(single_file.CONFIGS, "sdxl", config)  # the tiny model's shapes, not SDXL's
    cfg = make_cfg(make_demo_dataset(tmp_path / "data", n=2, resolution=64, seed=0), tmp_path / "out",
                   max_train_steps=2, batch_size=2, mixed_precision="no")
    cfg.model.base_model = str(path)
    backend = load_backend(cfg)
    assert isinstance(backend, SdxlBackend) and backend.model_name == "tiny_sdxl"
    assert backend.prediction_type == "v_prediction" and float(backend.noise_scheduler.alphas_cumprod[-1]) == 0
    with caplog.at_level(logging.INFO):
        result = train(cfg, progress=False)
    assert "has the 'ztsnr' marker key" in caplog.text and "has the 'v_pred' marker key" in caplog.text
    assert result.status == "finished" and result.steps == 2
    with safe_open(str(result.lora_path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.prediction_type"] == "v"
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_sd_model_name"] == "tiny_sdxl"
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in keys)


# --- every tensor of a real-shape SDXL checkpoint lands ---------------------------------------------------------

# a few keys of sd_xl_base_1.0.safetensors with their shapes, and its parameter counts: the layout made here is SDXL's
REAL_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
             "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
             "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
             "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
             TE1 + "text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
             TE2 + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
             TE2 + "text_projection": (1280, 1280), TE2 + "positional_embedding": (77, 1280),
             "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
             "first_stage_model.quant_conv.weight": (8, 8, 1, 1)}
REAL_PARAMETERS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                   "vae": 83_653_863}
# sgm's configs/inference/sd_xl_base.yaml, the parts diffusers derives the UNet's and the VAE's configs from
SGM_SDXL_BASE = {"model": {"params": {
    "scale_factor": 0.13025,
    "network_config": {"params": {
        "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
        "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
        "context_dim": 2048}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}}}}


def listed(config: dict) -> dict:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}


class Reads(dict):
    """A checkpoint that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def real_shape_sdxl() -> dict:
    """SDXL's four models from the shipped configs, on the meta device (no memory for the weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIG / "unet")),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIG / "vae")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIG / "text_encoder")),
                "text_encoder_2": CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(SDXL_CONFIG / "text_encoder_2"))}


def test_every_tensor_of_a_real_sdxl_checkpoint_lands_in_the_shipped_configs_models():
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    parts = real_shape_sdxl()
    assert {n: sum(p.numel() for p in m.parameters()) for n, m in parts.items()} == REAL_PARAMETERS
    checkpoint = Reads({k: v.to(torch.float16) if v.is_floating_point() else v
                        for k, v in a1111_sdxl_state(parts).items()})
    assert all(v.is_meta for v in checkpoint.values())
    assert {k: tuple(checkpoint[k].shape) for k in REAL_KEYS} == REAL_KEYS and len(checkpoint) == 2515
    # the shipped configs are what diffusers derives from sgm's own SDXL config
    for name, derived in (("unet", create_unet_diffusers_config_from_ldm(SGM_SDXL_BASE, checkpoint)),
                          ("vae", create_vae_diffusers_config_from_ldm(SGM_SDXL_BASE, checkpoint))):
        derived.pop("sample_size")  # an image size diffusers guesses; no weight depends on it
        assert listed({k: parts[name].config[k] for k in derived}) == listed(derived), name
    checkpoint.read.clear()
    converted = {"unet": convert_ldm_unet_checkpoint(checkpoint, dict(parts["unet"].config)),
                 "vae": convert_ldm_vae_checkpoint(checkpoint, dict(parts["vae"].config)),
                 "text_encoder": convert_ldm_clip_checkpoint(checkpoint),
                 "text_encoder_2": convert_open_clip_checkpoint(parts["text_encoder_2"], checkpoint, prefix=TE2)}
    for name, state in converted.items():
        want = {k: tuple(v.shape) for k, v in comparable(parts[name].state_dict()).items()}
        got = {k: tuple(v.shape) for k, v in comparable(state).items()}
        assert got == want, f"{name}: {sorted(set(got.items()) ^ set(want.items()))[:4]}"
        assert all(v.dtype == torch.float16 for v in comparable(state).values())
    unread = set(checkpoint) - checkpoint.read - set(UNUSED)
    assert not unread, f"{len(unread)} checkpoint keys are used by no model: {sorted(unread)[:4]}"
    in_file = sum(v.numel() for k, v in checkpoint.items() if k not in UNUSED)
    assert in_file == sum(REAL_PARAMETERS.values())  # no tensor is used twice, or in part


# --- what the header tells, and what is refused before anything loads ------------------------------------------

def fake(tmp_path, keys, name="m.safetensors", first_conv=(320, 4, 3, 3)):
    """A file with these key names (tiny tensors); ``first_conv``: the UNet's first convolution's shape."""
    tensors = {k: torch.zeros(0) for k in keys}
    if any(k.startswith("model.diffusion_model.") for k in keys):
        tensors[single_file.FIRST_CONV] = torch.zeros(first_conv, dtype=torch.float16)
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


SDXL_KEYS = ["model.diffusion_model.a", "first_stage_model.b", TE1 + "text_model.x", TE2 + "ln_final.weight"]


@pytest.mark.parametrize("markers, prediction, zero_snr", [
    ((), "epsilon", False), (("v_pred",), "v_prediction", False), (("v_pred", "ztsnr"), "v_prediction", True)])
def test_marker_keys_say_v_prediction_and_zero_terminal_snr(tmp_path, markers, prediction, zero_snr):
    facts = inspect_checkpoint(fake(tmp_path, SDXL_KEYS + list(markers)))
    assert facts.family == "sdxl" and facts.markers == frozenset(markers)
    assert facts.prediction_type == prediction and facts.zero_terminal_snr == zero_snr


def test_the_markers_set_the_scheduler_the_run_reads(tmp_path):
    from lora_trainer.engine.loss import has_zero_terminal_snr

    path, config, _ = tiny_single_file(tmp_path, markers=("ztsnr",))
    pipe = load_single_file_pipeline(path, config_dir=config)
    assert has_zero_terminal_snr(pipe.scheduler) and pipe.scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("keys, first_conv, words", [
    (["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"], (1536, 16, 2, 2), "Stable Diffusion 3"),
    (["double_blocks.0.img_attn.norm.key_norm.scale"], None, "Flux"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], (3072, 64, 1, 1), "Flux"),
    (["model.diffusion_model.a", "conditioner.embedders.0.model.ln_final.weight"], (384, 4, 3, 3), "SDXL refiner"),
    (SDXL_KEYS, (320, 9, 3, 3), "inpainting .* 9 input channels"),
    (["model.diffusion_model.a", "cond_stage_model.transformer.text_model.x"], (320, 9, 3, 3), "9 input channels"),
    (["lora_unet_x.lora_down.weight"], None, "is a LoRA, not a base model"),
])
def test_kinds_we_do_not_train_are_refused_before_loading(tmp_path, monkeypatch, keys, first_conv, words):
    def no_loading(*args, **kwargs):
        pytest.fail("from_single_file was called")

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", no_loading)
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", no_loading)
    path = fake(tmp_path, keys, "other.safetensors", first_conv or (1,))
    with pytest.raises(ModelLoadError, match=words) as e:
        load_single_file_pipeline(path)
    assert "other.safetensors" in str(e.value) and "Stable Diffusion 1.x and SDXL" in str(e.value)
    cfg = config_from_dict({"data": {"train_data_dir": str(tmp_path)}, "model": {"base_model": str(path)}})
    with pytest.raises(ModelLoadError, match=words):  # whichever backend the factory picks for it
        load_backend(cfg)


def test_a_pickle_checkpoint_is_still_refused(tmp_path):
    ckpt = tmp_path / "sdxl_model.ckpt"
    ckpt.write_bytes(b"not loaded")
    assert not is_sdxl_model(str(ckpt))
    with pytest.raises(ModelLoadError, match="sdxl_model.ckpt is not a .safetensors file.*convert it"):
        load_single_file_pipeline(ckpt)


def test_shipped_sdxl_config_and_tokenizers(no_network):
    from transformers import CLIPTokenizer

    index = json.loads((SDXL_CONFIG / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and not list(SDXL_CONFIG.rglob("vocab.json"))
    assert not [p for p in SDXL_CONFIG.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt")]
    tokenizers = single_file._tokenizers(SDXL_CONFIG)
    one, two = tokenizers["tokenizer"], tokenizers["tokenizer_2"]
    reference = CLIPTokenizer.from_pretrained(single_file.SD15_CONFIG / "tokenizer")
    text = "a photo of a cat"
    assert one(text).input_ids == two(text).input_ids == reference(text).input_ids == [49406, 320, 1125, 539, 320,
                                                                                       2368, 49407]
    assert one.pad_token == "<|endoftext|>" and (two.pad_token, two.pad_token_id) == ("!", 0)  # open_clip pads with 0
    assert two(text, padding="max_length", max_length=77).input_ids[-1] == 0 and len(two) == 49408


def test_a_partial_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"unet_only.safetensors looks like SDXL but has no weights for its VAE "
                                             r"\(first_stage_model\.\*\), second text encoder"):
        load_single_file_pipeline(fake(tmp_path, SDXL_KEYS[:1] + SDXL_KEYS[2:3], "unet_only.safetensors"))
    path, config, _ = tiny_single_file(tmp_path)  # a tensor short: diffusers would leave it on the meta device
    state = load_file(str(path))
    del state[TE2 + "ln_final.weight"]
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match="tiny_sdxl.safetensors has no weights for text_encoder_2"):
        load_single_file_pipeline(path, config_dir=config)
