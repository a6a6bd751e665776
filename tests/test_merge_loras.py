"""Several LoRAs merged into one (``merge --lora A:W --lora B:W2 --out AB.safetensors [--rank R]``): the merged file
changes every weight exactly as the files at their weights do (checked by merging both ways into a checkpoint); --rank
gives each module that rank, lossless at the sum of the ranks; other shapes are refused; the metadata keeps what the
files agree on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_merge import checkpoint, lora_file  # noqa: F401 (a fixture)

from lora_trainer.cli import main
from lora_trainer.errors import LoraTrainerError
from lora_trainer.export.kohya import save_kohya_lora
from lora_trainer.export.merge import merge_into_checkpoint
from lora_trainer.export.merge_loras import merge_loras


def deltas(path) -> dict:
    """module → alpha / rank · up · down."""
    t = load_file(path)
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = t[key].float(), t[name + ".lora_up.weight"].float()
            out[name] = float(t[name + ".alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
    return out


@pytest.fixture
def two(tmp_path):
    first = lora_file(tmp_path, "first", ldm_names=True)[1]
    second = lora_file(tmp_path, "second", ldm_names=True, alpha=8.0, seed=5)[1]
    return first, second


def test_the_merged_lora_changes_the_model_as_both_files_do(checkpoint, tmp_path, two):  # noqa: F811
    first, second = two
    out = tmp_path / "both.safetensors"
    assert main(["merge", "--lora", f"{first}:0.7", "--lora", f"{second}:-0.3", "--out", str(out)]) == 0
    a, b, ab = deltas(first), deltas(second), deltas(out)
    assert ab.keys() == a.keys()
    for name in ab:
        torch.testing.assert_close(ab[name], 0.7 * a[name] - 0.3 * b[name], atol=1e-6, rtol=1e-5, msg=name)
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("lora_down.weight"))).shape[0] == 8  # 4 + 4
        meta = f.metadata()
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "8"
    assert json.loads(meta["lora_trainer_merged"]) == [{"file": "first.safetensors", "weight": 0.7},
                                                       {"file": "second.safetensors", "weight": -0.3}]
    both_ways = [merge_into_checkpoint(checkpoint, loras, tmp_path / f"m{i}.safetensors")
                 for i, loras in enumerate([[(first, 0.7), (second, -0.3)], [(out, 1.0)]])]
    separate, merged = load_file(both_ways[0]), load_file(both_ways[1])
    for key in separate:
        torch.testing.assert_close(merged[key], separate[key], atol=1e-6, rtol=1e-5, msg=key)


def test_rank_cuts_each_module_and_the_sum_of_the_ranks_is_lossless(tmp_path, two):
    first, second = two
    exact = deltas(merge_loras([(first, 1.0), (second, 1.0)], tmp_path / "exact.safetensors"))
    full = deltas(merge_loras([(first, 1.0), (second, 1.0)], tmp_path / "full.safetensors", rank=8))
    cut_path = merge_loras([(first, 1.0), (second, 1.0)], tmp_path / "cut.safetensors", rank=2)
    cut = deltas(cut_path)
    for name in exact:
        torch.testing.assert_close(full[name], exact[name], atol=1e-5, rtol=1e-4, msg=name)
        # the best rank-2 approximation: closer than the first file's share alone (a rank-4 term of the sum)
        assert torch.linalg.matrix_rank(cut[name]) <= 2
        assert (cut[name] - exact[name]).norm() < exact[name].norm()
    with safe_open(str(cut_path), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "2" and "resized to rank 2" in f.metadata()["ss_training_comment"]


def test_metadata_keeps_what_the_files_agree_on_and_other_shapes_are_refused(tmp_path, two):
    first, second = two
    t1, t2 = load_file(first), load_file(second)
    a = save_kohya_lora(tmp_path / "a.safetensors", t1, {"ss_v_parameterization": "True", "ss_resolution": "(512, 512)",
                                                         "ss_tag_frequency": "{}", "ss_steps": "100"})
    b = save_kohya_lora(tmp_path / "b.safetensors", t2, {"ss_v_parameterization": "True",
                                                         "ss_resolution": "(768, 768)"})
    with safe_open(str(merge_loras([(a, 1.0), (b, 1.0)], tmp_path / "ab.safetensors")), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v_parameterization"] == "True" and "ss_resolution" not in meta
    assert "ss_tag_frequency" not in meta and "ss_steps" not in meta and meta["ss_output_name"] == "ab"
    wide = {k: (torch.zeros(v.shape[0], 2 * v.shape[1]) if k.endswith("attn1_to_k.lora_down.weight") else v)
            for k, v in t2.items()}
    save_kohya_lora(tmp_path / "wide.safetensors", wide, {})
    with pytest.raises(LoraTrainerError, match="attn1_to_k has other shapes in .*wide.safetensors"):
        merge_loras([(first, 1.0), (tmp_path / "wide.safetensors", 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(LoraTrainerError, match="two or more --lora"):
        merge_loras([(first, 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(LoraTrainerError, match="must end in .safetensors"):
        merge_loras([(first, 1.0), (second, 1.0)], tmp_path / "x.ckpt")
    assert not (tmp_path / "x.safetensors").exists()
