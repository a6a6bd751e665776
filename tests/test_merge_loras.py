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
        if exact[name].any():  # (not the text encoder's zero out_proj)
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


def small_lora(tmp_path, name: str, modules: dict[str, tuple[int, int]], meta: dict | None = None, rank=2, seed=0,
               alpha=1.0, scale=1.0, dtype=torch.float32):
    """A LoRA file of random modules (name → (out, in) widths) at ``rank``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (rows, cols) in modules.items():
        tensors |= {f"{module}.lora_down.weight": (torch.randn(rank, cols, generator=gen) * 0.05).to(dtype),
                    f"{module}.lora_up.weight": (torch.randn(rows, rank, generator=gen) * scale).to(dtype),
                    f"{module}.alpha": torch.tensor(alpha, dtype=dtype)}
    return save_kohya_lora(tmp_path / f"{name}.safetensors", tensors, meta or {})


def test_loras_of_different_families_are_refused(tmp_path):
    """By their metadata where they have it, else their keys (SDXL's lora_te1_/te2_) and widths."""
    sd1 = small_lora(tmp_path, "sd1", {"lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8)},
                     {"ss_base_model_version": "sd_v1"})
    xl = small_lora(tmp_path, "xl", {"lora_unet_input_blocks_4_1_proj_in": (8, 8)},
                    {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(LoraTrainerError, match=r"sd1.safetensors is a LoRA for SD 1.x \(ss_base_model_version "
                                               r"sd_v1\) and .*xl.safetensors one for SDXL .*different model families"):
        merge_loras([(sd1, 0.8), (xl, 0.6)], tmp_path / "x.safetensors")
    te = small_lora(tmp_path, "te", {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (8, 8)})
    te12 = small_lora(tmp_path, "te12", {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),
                                         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (8, 8)})
    v2 = small_lora(tmp_path, "v2", {"lora_unet_x": (8, 8)}, {"ss_v2": "True"})
    cross = small_lora(tmp_path, "cross", {"lora_unet_a_attn2_to_k": (8, 768)})
    for a, b, why in [(te, te12, "SD 1.x or SD 2.x .*lora_te_ .* SDXL .*lora_te1_/lora_te2_"),
                      (v2, cross, r"SD 2.x \(ss_v2 True\) .* SD 1.x \(its cross-attention width 768\)"),
                      (sd1, te12, "SD 1.x .* SDXL")]:
        with pytest.raises(LoraTrainerError, match=why):
            merge_loras([(a, 1.0), (b, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    merge_loras([(te, 1.0), (v2, 1.0), (small_lora(tmp_path, "plain", {"lora_unet_x": (8, 8)}), 1.0)],
                tmp_path / "ok.safetensors")  # (SD 1.x or 2.x, SD 2.x, and one that does not say: one family)


def test_ldm_and_diffusers_names_of_one_module_are_merged_as_one(tmp_path):
    """kohya's SD 1.x files name the UNet the diffusers way, ours and SDXL's the LDM way: the same module (SD 1.x's
    down_blocks.1.attentions.0 is input_blocks.4.1) is merged once, under its LDM name, and --rank cuts the sum."""
    sd1 = {"ss_base_model_version": "sd_v1"}
    diffusers_names = {"lora_unet_down_blocks_1_attentions_0_proj_in": (8, 8),
                       "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_q": (8, 8),
                       "lora_unet_down_blocks_0_resnets_1_conv1": (8, 8)}
    ldm_names = {"lora_unet_input_blocks_4_1_proj_in": (8, 8),
                 "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q": (8, 8),
                 "lora_unet_middle_block_1_proj_out": (8, 8)}
    a = small_lora(tmp_path, "a", diffusers_names, sd1)
    b = small_lora(tmp_path, "b", ldm_names, sd1, seed=3)
    da, db = deltas(a), deltas(b)
    for rank, rtol in ((None, 1e-5), (4, 1e-4)):  # (4: the sum of the ranks, lossless)
        got = deltas(merge_loras([(a, 0.5), (b, 2.0)], tmp_path / f"ab{rank}.safetensors", rank=rank))
        assert sorted(got) == sorted([*ldm_names, "lora_unet_input_blocks_2_0_in_layers_2"])
        for ldm, diffusers in (("input_blocks_4_1_proj_in", "down_blocks_1_attentions_0_proj_in"),
                               ("output_blocks_5_1_transformer_blocks_0_attn1_to_q",
                                "up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_q")):
            torch.testing.assert_close(got["lora_unet_" + ldm], 0.5 * da["lora_unet_" + diffusers]
                                       + 2.0 * db["lora_unet_" + ldm], atol=1e-6, rtol=rtol)
        torch.testing.assert_close(got["lora_unet_input_blocks_2_0_in_layers_2"],
                                   0.5 * da["lora_unet_down_blocks_0_resnets_1_conv1"])
    unknown = [small_lora(tmp_path, n, names) for n, names in (("c", diffusers_names), ("d", ldm_names))]
    with pytest.raises(LoraTrainerError, match="c.safetensors names its UNet modules the diffusers way .*d.safetensors "
                                               "the LDM way .*--base"):
        merge_loras([(p, 1.0) for p in unknown], tmp_path / "x.safetensors")


def test_non_finite_weights_and_non_safetensors_files_are_refused(tmp_path, two):
    first, second = two
    for weight in (float("nan"), float("inf")):
        with pytest.raises(LoraTrainerError, match=rf"--lora .*second.safetensors:{weight} has the weight {weight}"):
            merge_loras([(first, 1.0), (second, weight)], tmp_path / "x.safetensors")
    pickle = tmp_path / "pickle.safetensors"
    pickle.write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s." * 4)
    with pytest.raises(LoraTrainerError, match=r"^merge: --lora .*pickle.safetensors is not a safetensors file"):
        merge_loras([(first, 1.0), (pickle, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_fp16_loras_merge_without_losing_precision_and_dtype_is_written(tmp_path):
    """alpha 1 at rank 128 and weight 0.3: the scale (0.0023) folded into up alone made it subnormal in fp16 (0.7%
    error); split between the factors, the merged product is as exact as fp16 storage allows."""
    modules = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{p}": (320, 320) for p in "qkv"}
    a = small_lora(tmp_path, "a", modules, rank=128, scale=1e-3, dtype=torch.float16)
    b = small_lora(tmp_path, "b", modules, rank=128, scale=1e-3, seed=1, dtype=torch.float16)
    merged = merge_loras([(a, 0.3), (b, 0.3)], tmp_path / "ab.safetensors")
    da, db, got = deltas(a), deltas(b), deltas(merged)
    for name in modules:
        want = 0.3 * (da[name].double() + db[name].double())
        assert float((got[name].double() - want).norm() / want.norm()) < 1.5e-3, name
    with safe_open(str(merged), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    first = small_lora(tmp_path, "f32", modules)
    for dtype, kind in (("auto", "F32"), ("fp16", "F16"), ("bf16", "BF16")):
        with safe_open(str(merge_loras([(first, 1.0), (first, 0.5)], tmp_path / f"{dtype}.safetensors",
                                       dtype=dtype)), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {kind}, dtype


def webui_version(path) -> str:
    """The family AUTOMATIC1111 files a LoRA under (v1.10.1 extensions-builtin/Lora/network.py detect_version): it
    hides a LoRA of another family than the loaded model's."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if meta.get("ss_v2") == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def test_the_merged_lora_names_the_family_the_files_are_for(tmp_path):
    """An SDXL file that names its family merged with one that does not (its lora_te1_/lora_te2_ keys tell): the
    merged file says SDXL, as does a merge of SD 2.x files told by their cross-attention width alone; the WebUI
    would take either for SD 1.x (it has metadata without the family) and hide it under its own model."""
    xl_modules = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),
                  "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (8, 8)}
    xl = small_lora(tmp_path, "xl", xl_modules, {"ss_base_model_version": "sdxl_base_v1-0"})
    bare = small_lora(tmp_path, "bare", xl_modules, seed=1)
    merged = merge_loras([(xl, 1.0), (bare, 0.5)], tmp_path / "xl_bare.safetensors")
    assert webui_version(merged) == "SDXL"
    sd2 = [small_lora(tmp_path, f"sd2_{i}", {"lora_unet_a_attn2_to_k": (8, 1024)}, seed=i) for i in range(2)]
    merged = merge_loras([(p, 1.0) for p in sd2], tmp_path / "sd2.safetensors")
    assert webui_version(merged) == "SD2"
    with safe_open(str(merged), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v2"


def test_a_merged_rank_bf16_cannot_hold_keeps_the_scale(tmp_path):
    """Ranks 128 and 129 merged in bf16: the module's alpha (= its rank, 257) is 256 in bf16, which alone put every
    weight of the module off by -0.39%; up takes the rounding, so the merged file changes the weights as the two
    files do, up to the weights' own (unbiased) bf16 rounding."""
    modules = {"lora_unet_a_proj_in": (96, 96)}
    a = small_lora(tmp_path, "a", modules, rank=128, dtype=torch.bfloat16)
    b = small_lora(tmp_path, "b", modules, rank=129, seed=1, alpha=4.0, dtype=torch.bfloat16)
    merged = merge_loras([(a, 0.7), (b, 0.5)], tmp_path / "ab.safetensors")
    tensors = load_file(merged)
    alpha = tensors["lora_unet_a_proj_in.alpha"]
    assert tensors["lora_unet_a_proj_in.lora_down.weight"].shape[0] == 257
    assert alpha.dtype == torch.bfloat16 and float(alpha) == 256.0
    want = 0.7 * deltas(a)["lora_unet_a_proj_in"].double() + 0.5 * deltas(b)["lora_unet_a_proj_in"].double()
    got = deltas(merged)["lora_unet_a_proj_in"].double()
    bias = float((got * want).sum() / (want * want).sum()) - 1  # (the scale error: the weights' rounding averages out)
    assert abs(bias) < 5e-4, bias
