"""Merging kohya-format LoRAs into a diffusers folder (``merge --base FOLDER --lora F[:W] --out NEW``): the new folder
loads with from_pretrained and its UNet gives the base-plus-LoRA output, for LDM- and diffusers-named LoRAs, across a
sharded UNet; the text encoder's weights are W + the scaled product; the rest is copied bit for bit; nothing is
overwritten; pickled weights are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_export import TOL, tiny_text_encoder, tiny_unet, unet_inputs
from test_merge import lora_file

from lora_trainer.cli import main
from lora_trainer.errors import LoraTrainerError
from lora_trainer.export.merge import merge_into_checkpoint
from lora_trainer.models.tiny import tiny_model_path


@pytest.fixture
def folder(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_path(), base)
    shutil.rmtree(base / "unet")
    tiny_unet().save_pretrained(base / "unet", max_shard_size="300KB")  # (sharded: every shard is merged)
    assert len(list((base / "unet").glob("*.safetensors"))) > 1
    return base


@pytest.mark.parametrize("ldm_names", [True, False], ids=["ldm-names", "diffusers-names"])
def test_the_merged_folder_gives_the_base_plus_lora_model(folder, tmp_path, ldm_names):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet, lora = lora_file(tmp_path, "style", ldm_names=ldm_names)
    x, t, cond = unet_inputs()
    with torch.no_grad():
        want = unet(x, t, cond).sample
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(folder), "--lora", f"{lora}:0.5", "--out", str(out)]) == 0
    merged = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    with torch.no_grad():
        plain = tiny_unet()(x, t, cond).sample
        half = plain + 0.5 * (want - plain)  # (the LoRA's delta is linear in its weight only to first order)
        got = merged(x, t, cond).sample
    assert not torch.allclose(plain, got, atol=1e-3)
    full = tmp_path / "full"
    merge_into_checkpoint(folder, [(str(lora), 1.0)], full)
    with torch.no_grad():
        torch.testing.assert_close(UNet2DConditionModel.from_pretrained(full / "unet").eval()(x, t, cond).sample,
                                   want, **TOL)
    assert (got - half).abs().max() < (got - plain).abs().max()
    # the text encoder: W + 0.5 · alpha/rank · up·down for q and v; everything else as it was
    te, base_te = CLIPTextModel.from_pretrained(out / "text_encoder"), tiny_text_encoder()
    tensors = load_file(lora)
    for name, p in te.named_parameters():
        before = dict(base_te.named_parameters())[name]
        path = name if name.startswith("text_model.") else "text_model." + name  # (transformers 5 drops it)
        module = "lora_te_" + path[: -len(".weight")].replace(".", "_")
        if module + ".lora_down.weight" in tensors:
            up, down = tensors[module + ".lora_up.weight"], tensors[module + ".lora_down.weight"]
            torch.testing.assert_close(p, before + 0.5 * float(tensors[module + ".alpha"]) / 4 * up @ down)
        else:
            assert torch.equal(p, before), name
    for rel in ("vae/diffusion_pytorch_model.safetensors", "model_index.json", "tokenizer/vocab.json"):
        assert (out / rel).read_bytes() == (folder / rel).read_bytes(), rel
    index = json.loads((out / "unet/diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = out / "unet" / next(iter(index["weight_map"].values()))
    with safe_open(str(shard), "pt") as f:
        assert json.loads(f.metadata()["lora_trainer_merged"]) == [{"file": "style.safetensors", "weight": 0.5}]


def test_folder_merge_refuses_an_existing_out_pickles_and_a_file_out(folder, tmp_path):
    _, lora = lora_file(tmp_path, "style", ldm_names=True)
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(LoraTrainerError, match="already exists"):
        merge_into_checkpoint(folder, [(str(lora), 1.0)], taken)
    assert not any(taken.iterdir())
    with pytest.raises(LoraTrainerError, match="new folder, not a .safetensors file"):
        merge_into_checkpoint(folder, [(str(lora), 1.0)], tmp_path / "x.safetensors")
    for f in (folder / "text_encoder").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(LoraTrainerError, match=r"text_encoder holds its weights as \.bin"):
        merge_into_checkpoint(folder, [(str(lora), 1.0)], tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))


def test_fp16_casts_the_whole_folder(folder, tmp_path):
    _, lora = lora_file(tmp_path, "style", ldm_names=True)
    out = merge_into_checkpoint(folder, [(str(lora), 1.0)], tmp_path / "half", dtype="fp16")
    for f in out.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            kinds = {h.get_slice(k).get_dtype() for k in h.keys()}
        assert "F32" not in kinds and "F16" in kinds, f


def test_folder_merge_refuses_an_out_inside_the_base_and_non_finite_weights(folder, tmp_path):
    """An --out inside --base would copy its own temp folder into itself (a stray .merged.*.tmp/ in the result)."""
    _, lora = lora_file(tmp_path, "style", ldm_names=True)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(LoraTrainerError, match=r"--out .*merged is inside --base .*base: choose a folder outside"):
        merge_into_checkpoint(folder, [(str(lora), 1.0)], folder / "merged")
    with pytest.raises(LoraTrainerError, match="has the weight nan"):
        merge_into_checkpoint(folder, [(str(lora), float("nan"))], tmp_path / "y")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before and not (tmp_path / "y").exists()
