"""Merging kohya-format LoRAs into a single-file checkpoint (export.merge, ``python -m lora_trainer merge``): every
adapted weight is W + weight · alpha/rank · up·down in the checkpoint's own layout, for LDM-named (ours, kohya's
SDXL) and diffusers-named (kohya's SD 1.x) UNet modules and the text encoder; the merged checkpoint's UNet gives the
base-plus-LoRA output; OpenCLIP's fused q/k/v slices; unknown modules refused; nothing overwritten."""

from __future__ import annotations

import json

import pytest
import torch
from ldm_checkpoint import write_ldm_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import TOL, peft_state, tiny_text_encoder, tiny_unet, unet_inputs, with_lora

from lora_trainer.cli import main
from lora_trainer.errors import LoraTrainerError
from lora_trainer.export.kohya import LdmUnetNames, peft_to_kohya, save_kohya_lora
from lora_trainer.export.merge import checkpoint_targets, merge_into_checkpoint
from lora_trainer.models.tiny import tiny_model_path

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # attention, a 1×1 and a 3×3 convolution


def tiny_checkpoint(path):
    """The tiny demo model as a single-file (LDM-named) checkpoint at ``path``."""
    from diffusers import AutoencoderKL

    parts = {"unet": tiny_unet(), "vae": AutoencoderKL.from_pretrained(tiny_model_path(), subfolder="vae"),
             "text_encoder": tiny_text_encoder()}
    write_ldm_checkpoint(parts, path)
    return path


@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "base.safetensors")


def lora_file(tmp_path, name, ldm_names: bool, alpha=2.0, seed=0):
    unet = with_lora(tiny_unet(), 4, alpha, TARGETS, seed=seed)
    te = with_lora(tiny_text_encoder(), 4, alpha, ["q_proj", "v_proj"], seed=seed + 1)
    rename = LdmUnetNames(unet.config) if ldm_names else None
    tensors = {**peft_to_kohya(peft_state(unet), "lora_unet_", alpha, rename=rename),
               **peft_to_kohya(peft_state(te), "lora_te_", alpha)}
    return unet, save_kohya_lora(tmp_path / f"{name}.safetensors", tensors, {"ss_network_dim": "4"})


def expected(base: dict, loras: list[tuple[dict, float]]) -> dict:
    """W + Σ weight · alpha/rank · up·down for every module, found through checkpoint_targets."""
    targets, out = checkpoint_targets(base), {k: v.clone().float() for k, v in base.items()}
    unet_names = LdmUnetNames(tiny_unet().config)
    for tensors, weight in loras:
        for key in tensors:
            if not key.endswith(".lora_down.weight"):
                continue
            name = key[: -len(".lora_down.weight")]
            target = targets.get(name)
            if target is None:  # a diffusers name: its LDM name, by the exporter's own table
                path = name[len("lora_unet_"):]
                for diffusers_path in [m for m, _ in tiny_unet().named_modules() if m.replace(".", "_") == path]:
                    target = targets["lora_unet_" + unet_names(diffusers_path).replace(".", "_")]
            down, up = tensors[key].float(), tensors[name + ".lora_up.weight"].float()
            delta = weight * float(tensors[name + ".alpha"]) / 4 * (up.flatten(1) @ down.flatten(1))
            out[target.key] += delta.reshape(out[target.key].shape)
    return out


@pytest.mark.parametrize("ldm_names", [True, False], ids=["ldm-names", "diffusers-names"])
def test_every_adapted_weight_is_w_plus_the_scaled_product(checkpoint, tmp_path, ldm_names):
    _, first = lora_file(tmp_path, "first", ldm_names)
    _, second = lora_file(tmp_path, "second", ldm_names, alpha=8.0, seed=5)
    out = merge_into_checkpoint(checkpoint, [(str(first), 0.7), (str(second), -0.3)], tmp_path / "merged.safetensors")
    base, merged = load_file(checkpoint), load_file(out)
    want = expected(base, [(load_file(first), 0.7), (load_file(second), -0.3)])
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    ups = load_file(first)
    modules = [k for k in ups if k.endswith(".lora_up.weight") and ups[k].any()]  # (not the TE's zero out_proj)
    assert len(changed) == len(modules) > 30  # one weight each: attention, proj_in, conv1 (3×3), the TE's q and v
    for key in base:
        torch.testing.assert_close(merged[key].float(), want[key], atol=1e-6, rtol=1e-5, msg=key)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["lora_trainer_merged"]) == [{"file": "first.safetensors", "weight": 0.7},
                                                                   {"file": "second.safetensors", "weight": -0.3}]


def test_the_merged_checkpoint_gives_the_base_plus_lora_unet(checkpoint, tmp_path):
    from lora_trainer.models.single_file import load_single_file_pipeline

    unet, lora = lora_file(tmp_path, "style", ldm_names=True)
    x, t, cond = unet_inputs()
    with torch.no_grad():
        want = unet(x, t, cond).sample
    merged = tmp_path / "m.safetensors"
    assert main(["merge", "--base", str(checkpoint), "--lora", f"{lora}:1", "--out", str(merged)]) == 0
    pipe = load_single_file_pipeline(merged, config_dir=tiny_model_path())
    with torch.no_grad():
        got = pipe.unet(x, t, cond).sample
        plain = load_single_file_pipeline(checkpoint, config_dir=tiny_model_path()).unet(x, t, cond).sample
    assert not torch.allclose(plain, want, atol=1e-3)
    torch.testing.assert_close(got, want, **TOL)


def test_open_clip_q_k_v_merge_into_their_slices(tmp_path):
    d = 8
    base = {"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * d, d),
            "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(2 * d, d),
            "model_ema.num_updates": torch.tensor(7), "model_ema.decay": torch.tensor(0.999),  # (0-dim, as LDM has)
            "alphas_cumprod": torch.rand(10, dtype=torch.float64), "mask": torch.tensor([True, False])}
    save_file(base, str(tmp_path / "xl.safetensors"))
    gen = torch.Generator().manual_seed(0)
    layer = "lora_te2_text_model_encoder_layers_0_"
    tensors = {}
    for module, out in ((layer + "self_attn_k_proj", d), (layer + "mlp_fc1", 2 * d)):
        tensors |= {module + ".lora_down.weight": torch.randn(2, d, generator=gen),
                    module + ".lora_up.weight": torch.randn(out, 2, generator=gen), module + ".alpha": torch.tensor(1.)}
    save_kohya_lora(tmp_path / "te2.safetensors", tensors, {})
    merged = load_file(merge_into_checkpoint(tmp_path / "xl.safetensors", [(tmp_path / "te2.safetensors", 1.0)],
                                             tmp_path / "out.safetensors"))
    fused = merged["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    k = tensors[layer + "self_attn_k_proj.lora_up.weight"] @ tensors[layer + "self_attn_k_proj.lora_down.weight"] / 2
    qkv = base["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    torch.testing.assert_close(fused[d:2 * d], qkv[d:2 * d] + k)
    assert torch.equal(fused[:d], qkv[:d]) and torch.equal(fused[2 * d:], qkv[2 * d:])  # q and v untouched
    for key in ("model_ema.num_updates", "model_ema.decay", "alphas_cumprod", "mask"):  # the rest: bit for bit
        assert merged[key].dtype == base[key].dtype and torch.equal(merged[key], base[key]), key
    half = merge_into_checkpoint(tmp_path / "xl.safetensors", [(tmp_path / "te2.safetensors", 1.0)],
                                 tmp_path / "half.safetensors", dtype="fp16")
    with safe_open(str(half), "pt") as f:  # fp16 weights; the schedule and counters as they were
        assert f.get_tensor("alphas_cumprod").dtype == torch.float64 and f.get_tensor("model_ema.decay").dtype == \
            torch.float32 and f.get_slice(next(iter(base))).get_dtype() == "F16"
    with open(half, "rb") as f:  # each tensor's data starts at a multiple of its element size
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    sizes = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BOOL": 1}
    assert all((8 + n + v["data_offsets"][0]) % sizes[v["dtype"]] == 0
               for k, v in header.items() if k != "__metadata__")


def test_unknown_modules_are_refused_and_nothing_is_overwritten(checkpoint, tmp_path):
    _, lora = lora_file(tmp_path, "style", ldm_names=True)
    tensors = load_file(lora)
    tensors["lora_unet_x.hada_w1_a"] = torch.zeros(2, 2)
    save_kohya_lora(tmp_path / "loha.safetensors", tensors, {})
    with pytest.raises(LoraTrainerError, match="^merge: .*lora_unet_x.hada_w1_a.*cannot be merged"):
        merge_into_checkpoint(checkpoint, [(tmp_path / "loha.safetensors", 1.0)], tmp_path / "x.safetensors")
    # the names of another family's LoRA can exist here with other widths (SD 2.x's 1024 against SD 1.x's 768)
    wide = {k: (torch.zeros(v.shape[0], 2 * v.shape[1]) if k.endswith("attn1_to_k.lora_down.weight") else v)
            for k, v in load_file(lora).items()}
    save_kohya_lora(tmp_path / "wide.safetensors", wide, {})
    with pytest.raises(LoraTrainerError, match="do not fit the shapes .*attn1_to_k"):
        merge_into_checkpoint(checkpoint, [(tmp_path / "wide.safetensors", 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(LoraTrainerError, match="must end in .safetensors"):
        merge_into_checkpoint(checkpoint, [(lora, 1.0)], tmp_path / "x.ckpt")
    foreign = {k.replace("lora_unet_input_blocks_1_1", "lora_unet_input_blocks_9_1"): v
               for k, v in load_file(lora).items()}
    save_kohya_lora(tmp_path / "foreign.safetensors", foreign, {})
    with pytest.raises(LoraTrainerError, match="have no weight in .*lora_unet_input_blocks_9_1"):
        merge_into_checkpoint(checkpoint, [(tmp_path / "foreign.safetensors", 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    written = merge_into_checkpoint(checkpoint, [(lora, 1.0)], taken)
    assert taken.read_bytes() == b"mine" and written.name == "taken_1.safetensors"


def test_non_finite_weights_and_non_safetensors_files_are_refused(checkpoint, tmp_path):
    _, lora = lora_file(tmp_path, "style", ldm_names=True)
    for weight in (float("nan"), float("-inf")):
        with pytest.raises(LoraTrainerError, match=rf"^merge: --lora .*style.safetensors:{weight} has the weight "):
            merge_into_checkpoint(checkpoint, [(str(lora), weight)], tmp_path / "x.safetensors")
    pickle = tmp_path / "pickle.safetensors"
    pickle.write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s." * 4)  # a pickled dict, renamed
    with pytest.raises(LoraTrainerError, match=r"^merge: --lora .*pickle.safetensors is not a safetensors file"):
        merge_into_checkpoint(checkpoint, [(str(pickle), 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(LoraTrainerError, match=r"^merge: --base .*pickle.safetensors is not a safetensors file"):
        merge_into_checkpoint(pickle, [(str(lora), 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_text_encoder_modules_merge_into_checkpoints_without_text_model(checkpoint, tmp_path):
    """Older SD 1.x checkpoints name their CLIP weights without its ``text_model.`` level
    (``cond_stage_model.transformer.encoder.layers.0…``; the WebUI's sd_models.checkpoint_dict_replacements_sd1 puts
    it back): a LoRA's lora_te_ modules merge into them as into the newer layout, key for key."""
    _, lora = lora_file(tmp_path, "style", ldm_names=True)
    new_layout = "cond_stage_model.transformer.text_model."
    base = load_file(checkpoint)
    old = {k.replace(new_layout, "cond_stage_model.transformer."): v for k, v in base.items()}
    assert old.keys() != base.keys()
    save_file(old, str(tmp_path / "old.safetensors"))
    want = load_file(merge_into_checkpoint(checkpoint, [(lora, 0.8)], tmp_path / "new_merged.safetensors"))
    got = load_file(merge_into_checkpoint(tmp_path / "old.safetensors", [(lora, 0.8)],
                                          tmp_path / "old_merged.safetensors"))
    te = [k for k in want if k.startswith(new_layout) and not torch.equal(want[k], base[k])]
    assert len(te) >= 2  # (the LoRA's q and v projections)
    for key, value in want.items():
        torch.testing.assert_close(got[key.replace(new_layout, "cond_stage_model.transformer.")], value, msg=key)


def test_sd2_turbo_open_clip_in_the_sgm_layout_takes_lora_te(tmp_path):
    """SD 2.1 Turbo's checkpoint keeps its OpenCLIP text encoder at ``conditioner.embedders.0.model.`` (the WebUI's
    sd_models.checkpoint_dict_replacements_sd2_turbo): an SD 2.x LoRA's lora_te_ modules merge into it."""
    d = 8
    key = "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"
    base = {key: torch.randn(3 * d, d)}
    save_file(base, str(tmp_path / "turbo.safetensors"))
    gen = torch.Generator().manual_seed(0)
    module = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
    tensors = {module + ".lora_down.weight": torch.randn(2, d, generator=gen),
               module + ".lora_up.weight": torch.randn(d, 2, generator=gen), module + ".alpha": torch.tensor(2.)}
    save_kohya_lora(tmp_path / "sd2.safetensors", tensors, {})
    merged = load_file(merge_into_checkpoint(tmp_path / "turbo.safetensors", [(tmp_path / "sd2.safetensors", 1.0)],
                                             tmp_path / "out.safetensors"))[key]
    v = tensors[module + ".lora_up.weight"] @ tensors[module + ".lora_down.weight"]
    torch.testing.assert_close(merged[2 * d:], base[key][2 * d:] + v)
    assert torch.equal(merged[:2 * d], base[key][:2 * d])
