"""Resizing a LoRA's rank (export.resize, ``python -m lora_trainer resize``): lossless at the full rank, the best
approximation of a lower rank with the share of the norm it keeps, the scale kept, LoCon convolutions too, other
module types refused, nothing overwritten; the resized file loads in diffusers and gives the UNet it describes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import (  # noqa: F401 (diffusers_loader: a fixture)
    CONV_TARGETS,
    TOL,
    UNET_TARGETS,
    diffusers_loader,
    kohya_tensors,
    metadata,
    outputs_before_and_after,
    tiny_unet,
    unet_inputs,
    with_lora,
)

from lora_trainer.cli import main
from lora_trainer.errors import LoraTrainerError
from lora_trainer.export.kohya import save_kohya_lora
from lora_trainer.export.resize import resize_lora


def deltas(tensors: dict) -> dict[str, torch.Tensor]:
    """Each module's weight change, scale included: alpha / rank · up · down (as a matrix)."""
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = tensors[key].float(), tensors[name + ".lora_up.weight"].float()
            scale = float(tensors[name + ".alpha"]) / down.shape[0]
            out[name] = scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return out


@pytest.fixture
def lora(tmp_path):
    unet = with_lora(tiny_unet(), 8, 4.0, UNET_TARGETS + CONV_TARGETS)
    path = save_kohya_lora(tmp_path / "full.safetensors", kohya_tensors(4.0, unet=unet), metadata(rank=8, alpha=4.0))
    return unet, path


def test_the_full_rank_is_lossless_and_loads_in_diffusers(lora, tmp_path, diffusers_loader):  # noqa: F811
    unet, path = lora
    report = resize_lora(path, tmp_path / "same.safetensors", rank=8)
    assert report.kept == pytest.approx(1.0, abs=1e-6) and all(m.new_rank == 8 for m in report.modules)
    before, after = deltas(load_file(path)), deltas(load_file(report.path))
    assert any(d.dim() and d.shape[1] > 100 for d in before.values())  # a 3×3 convolution is among them
    for name, d in before.items():
        torch.testing.assert_close(after[name], d, atol=1e-6, rtol=1e-4)
    x, t, cond = unet_inputs()
    with torch.no_grad():
        want = unet(x, t, cond).sample
    base, got = outputs_before_and_after(report.path, lambda pipe: pipe.unet(x, t, cond).sample)
    assert not torch.allclose(base, want, atol=1e-3)
    torch.testing.assert_close(got, want, **TOL)


def test_a_lower_rank_is_the_best_approximation_with_the_scale_kept(lora, tmp_path,
                                                                   diffusers_loader):  # noqa: F811
    _, path = lora
    report = resize_lora(path, tmp_path / "r2.safetensors", rank=2)
    before, tensors = deltas(load_file(path)), load_file(report.path)
    after = deltas(tensors)
    total = kept = 0.0
    for name, d in before.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # (Eckart-Young: the closest rank-2 matrix)
        torch.testing.assert_close(after[name], best, atol=1e-6, rtol=1e-4)
        assert tensors[name + ".lora_down.weight"].shape[0] == 2
        assert float(tensors[name + ".alpha"]) == pytest.approx(4.0 * 2 / 8)  # alpha / rank unchanged: 0.5
        module = next(m for m in report.modules if m.name == name)
        assert module.kept == pytest.approx(float(s[:2].norm() / s.norm()), rel=1e-5)
        total, kept = total + float(s.norm()) ** 2, kept + float(s[:2].norm()) ** 2
    assert report.kept == pytest.approx((kept / total) ** 0.5, rel=1e-5) and report.kept < 0.99
    with safe_open(str(report.path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "1.0")
    assert meta["ss_training_comment"].startswith("dimension is resized from 8 to 2")
    assert json.loads(meta["lora_trainer_resize"])["from_rank"] == [8] and meta["sshs_model_hash"]
    base, got = outputs_before_and_after(report.path, lambda pipe: pipe.unet(*unet_inputs()).sample)
    assert not torch.allclose(base, got, atol=1e-4)  # (it loads, and changes the UNet)


def test_energy_chooses_each_modules_rank(lora, tmp_path):
    _, path = lora
    report = resize_lora(path, tmp_path / "e.safetensors", energy=0.9)
    before = deltas(load_file(path))
    for m in report.modules:
        s2 = torch.linalg.svdvals(before[m.name]) ** 2
        need = int((torch.cumsum(s2, 0) / s2.sum() < 0.81).sum()) + 1  # the fewest that keep 90% of the norm
        assert m.new_rank == min(need, 8) and m.kept >= 0.9 - 1e-6
    with safe_open(str(report.path), "pt") as f:
        dims = {m.new_rank for m in report.modules}
        assert f.metadata()["ss_network_dim"] == (str(dims.pop()) if len(dims) == 1 else "Dynamic")


def test_bad_input_is_named_and_nothing_is_overwritten(lora, tmp_path, capsys):
    _, path = lora
    tensors = load_file(path)
    tensors["lora_unet_x.hada_w1_a"] = torch.zeros(2, 2)
    loha = save_kohya_lora(tmp_path / "loha.safetensors", tensors, metadata())
    with pytest.raises(LoraTrainerError, match="lora_unet_x.hada_w1_a.*LoHa"):
        resize_lora(loha, tmp_path / "x.safetensors", rank=2)
    with pytest.raises(LoraTrainerError, match="either --rank"):
        resize_lora(path, tmp_path / "x.safetensors")
    with pytest.raises(LoraTrainerError, match="--energy 1.5"):
        resize_lora(path, tmp_path / "x.safetensors", energy=1.5)
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"the user's file")
    assert main(["resize", "--lora", str(path), "--rank", "4", "--out", str(taken)]) == 0
    assert taken.read_bytes() == b"the user's file" and (tmp_path / "taken_1.safetensors").is_file()
    assert "resized" in capsys.readouterr().out


def test_a_rank_above_a_modules_width_keeps_it_whole(tmp_path):
    """A module narrower than its rank (4 outputs at rank 8) has only 4 singular values: asked for 8, it keeps 4,
    losslessly (not a reshape error), in resize and merge --rank alike."""
    from lora_trainer.export.merge_loras import merge_loras

    gen = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(8, 16, generator=gen),
               "lora_unet_x.lora_up.weight": torch.randn(4, 8, generator=gen), "lora_unet_x.alpha": torch.tensor(8.0)}
    wide = save_kohya_lora(tmp_path / "wide.safetensors", tensors, {})
    want = deltas(tensors)["lora_unet_x"]
    report = resize_lora(wide, tmp_path / "r.safetensors", rank=8)
    assert [m.new_rank for m in report.modules] == [4] and report.kept == pytest.approx(1.0, abs=1e-6)
    for path in (report.path, merge_loras([(wide, 1.0)], tmp_path / "m.safetensors", rank=8)):
        got = load_file(path)
        assert got["lora_unet_x.lora_down.weight"].shape == (4, 16)
        torch.testing.assert_close(deltas(got)["lora_unet_x"], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("missing", [".lora_down.weight", ".lora_up.weight"])
def test_an_incomplete_module_is_refused_by_name(tmp_path, missing):
    from lora_trainer.export.merge_loras import merge_loras

    tensors = {f"lora_unet_{n}{part}": torch.ones(2, 2) for n in ("x", "y")
               for part in (".lora_down.weight", ".lora_up.weight")}
    tensors |= {"lora_unet_x.alpha": torch.tensor(2.0), "lora_unet_y.alpha": torch.tensor(2.0)}
    del tensors["lora_unet_y" + missing]
    path = save_kohya_lora(tmp_path / "part.safetensors", tensors, {})
    want = rf"1 modules in .*part.safetensors are incomplete \(lora_unet_y has no \{missing}\)"
    with pytest.raises(LoraTrainerError, match="^resize: " + want):
        resize_lora(path, tmp_path / "x.safetensors", rank=1)
    with pytest.raises(LoraTrainerError, match="^merge: " + want):
        merge_loras([(path, 1.0), (path, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_out_and_lora_are_checked_as_merge_checks_them(lora, tmp_path):
    _, path = lora
    with pytest.raises(LoraTrainerError, match=r"^resize: --out .*r2 must end in \.safetensors"):
        resize_lora(path, tmp_path / "r2", rank=2)
    (tmp_path / "taken.safetensors").mkdir()
    with pytest.raises(LoraTrainerError, match=r"^resize: --out .*taken.safetensors is a folder"):
        resize_lora(path, tmp_path / "taken.safetensors", rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.safetensors", "taken.safetensors"]
    pickle = tmp_path / "pickle.safetensors"
    pickle.write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s." * 4)  # a pickled dict, renamed
    with pytest.raises(LoraTrainerError, match=r"^resize: --lora .*pickle.safetensors is not a safetensors file, "
                                               "or damaged"):
        resize_lora(pickle, tmp_path / "x.safetensors", rank=2)


def test_a_file_without_its_family_is_resized_into_one_that_names_it(tmp_path):
    """A LoRA without metadata (the WebUI shows it for every model) gets ss_network_dim and the rest when resized:
    with no ss_base_model_version among them AUTOMATIC1111 takes it for SD 1.x and hides it under SDXL, so the
    family its lora_te1_/lora_te2_ keys tell is written too."""
    from test_merge_loras import small_lora, webui_version

    modules = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (8, 2048)}
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(small_lora(tmp_path, "tensors", modules, rank=4)), str(bare))  # (no metadata at all)
    assert webui_version(bare) == "Unknown"
    report = resize_lora(bare, tmp_path / "r.safetensors", rank=2)
    assert webui_version(report.path) == "SDXL"
    with safe_open(str(report.path), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def test_a_module_whose_up_does_not_take_its_downs_rank_is_refused_by_name(tmp_path):
    """A damaged file (lora_up of rank 3 after a lora_down of rank 2): resize and both merges name the module and
    write nothing, rather than a reshape error from deep in the SVD, or (merged into one LoRA) a file the WebUI
    cannot multiply out."""
    from lora_trainer.export.merge import merge_into_checkpoint
    from lora_trainer.export.merge_loras import merge_loras

    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
               "lora_unet_y.lora_down.weight": torch.ones(2, 4), "lora_unet_y.lora_up.weight": torch.ones(4, 3)}
    path = save_kohya_lora(tmp_path / "bad.safetensors", tensors, {})
    save_file({"model.diffusion_model.x.weight": torch.zeros(4, 4)}, str(tmp_path / "base.safetensors"))
    want = r"1 modules in .*bad.safetensors have a lora_up that does not take the rank of their lora_down " \
           r"\(lora_unet_y: lora_up \[4, 3\], lora_down \[2, 4\]\)"
    with pytest.raises(LoraTrainerError, match="^resize: " + want):
        resize_lora(path, tmp_path / "x.safetensors", rank=1)
    with pytest.raises(LoraTrainerError, match="^merge: " + want):
        merge_loras([(path, 1.0), (path, 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(LoraTrainerError, match="^merge: " + want):
        merge_into_checkpoint(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


KNOWN_S = [4.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]  # s²'s running share: .707 .884 .928 .972 .983 .994 .997 1


def module_of(singular_values, rows=16, cols=16, seed=0) -> dict:
    """A rank-len(singular_values) module (alpha = rank) whose up · down has exactly these singular values."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rows, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(cols, cols, generator=gen))[0]
    r, s = len(singular_values), torch.tensor(singular_values)
    return {".lora_up.weight": (u[:, :r] * s).contiguous(), ".lora_down.weight": v[:, :r].T.contiguous(),
            ".alpha": torch.tensor(float(r))}


def kohya_sv_fro_rank(s: list[float], width: int, target: float, new_rank: int) -> int:
    """The rank kohya's sd-scripts networks/resize_lora.py gives a module (``--dynamic_method sv_fro --dynamic_param
    target --new_rank new_rank``), written out from its ``index_sv_fro`` (as fixed by sd-scripts PR #2194) and
    ``rank_resize``, in float64 numpy: S is every singular value of the module's width × width product (those past
    its rank zero), not only the rank's."""
    import numpy as np

    S = np.array(s + [0.0] * (width - len(s)))
    with np.errstate(invalid="ignore"):  # (a zero module's shares are NaN, in kohya's too: MIN_SV decides below)
        sum_S_squared = np.cumsum(S**2) / np.sum(S**2)
    index = int(np.searchsorted(sum_S_squared, target**2))  # (side "left", as torch.searchsorted)
    index = max(0, min(index, len(S) - 1))
    new = index + 1  # rank_resize
    if S[0] <= 1e-6:  # MIN_SV: a zero matrix gets rank 1
        new = 1
    elif new > new_rank:
        new = new_rank
    return new


@pytest.mark.parametrize(("energy", "rank"), [(0.3, 1), (0.85, 2), (0.95, 3), (0.98, 4), (0.99, 5), (0.997, 6),
                                              (0.9985, 7), (1.0, 8)])
def test_energy_keeps_kohyas_sv_fro_rank(tmp_path, energy, rank):
    """--energy E keeps, of each module, the fewest singular values whose squares reach E² of the squared Frobenius
    norm: kohya's resize_lora.py sv_fro at --new_rank 8 (the file's rank), computed here from its formula; a zero
    module (or one whose largest singular value is at most 1e-6) keeps 1, as kohya's. (sd-scripts before its PR #2194
    kept one more: 2, 3, ..., 8, 8.)"""
    modules = {"lora_unet_known": module_of(KNOWN_S), "lora_unet_zero": module_of([0.0] * 8),
               "lora_unet_tiny": module_of([5e-7] + [1e-7] * 7), "lora_unet_conv": module_of(KNOWN_S, 16, 16 * 9, 1)}
    modules["lora_unet_conv"][".lora_down.weight"] = modules["lora_unet_conv"][".lora_down.weight"].reshape(8, 16, 3, 3)
    modules["lora_unet_conv"][".lora_up.weight"] = modules["lora_unet_conv"][".lora_up.weight"].reshape(16, 8, 1, 1)
    tensors = {name + part: t for name, parts in modules.items() for part, t in parts.items()}
    path = save_kohya_lora(tmp_path / "known.safetensors", tensors, {})
    report = resize_lora(path, tmp_path / "e.safetensors", energy=energy)
    got = {m.name: m.new_rank for m in report.modules}
    assert got["lora_unet_known"] == got["lora_unet_conv"] == rank == kohya_sv_fro_rank(KNOWN_S, 16, energy, 8)
    assert got["lora_unet_zero"] == got["lora_unet_tiny"] == 1 == kohya_sv_fro_rank([0.0] * 8, 16, energy, 8)
    known = next(m for m in report.modules if m.name == "lora_unet_known")
    s2 = torch.tensor(KNOWN_S) ** 2
    assert known.kept == pytest.approx(float(s2[:rank].sum() / s2.sum()) ** 0.5, rel=1e-5) and known.kept >= energy
    before, after = deltas(tensors)["lora_unet_known"], deltas(load_file(report.path))["lora_unet_known"]
    u, s, vh = torch.linalg.svd(before)
    torch.testing.assert_close(after, u[:, :rank] * s[:rank] @ vh[:rank], atol=1e-5, rtol=1e-4)  # the scale kept


def test_the_scale_is_kept_where_the_alpha_dtype_cannot_hold_the_new_alpha(tmp_path):
    """The new alpha (alpha · new rank / rank) in the file's alpha dtype: bf16 alpha 8 at rank 24 resized to 7 is
    2.333, 2.328 in bf16 (-0.22% on every weight of the module); kohya's svd_merge_lora.py writes alpha as an int64
    rank, where alpha 6 at rank 8 resized to 7, 5.25, became 5 (-4.8%). The new up takes the rounding (bf16) or the
    alpha is written in float32 (an integer dtype), so the scale is what it was."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_bf16.lora_down.weight": torch.randn(24, 256, generator=gen).to(torch.bfloat16),
               "lora_unet_bf16.lora_up.weight": torch.randn(256, 24, generator=gen).to(torch.bfloat16),
               "lora_unet_bf16.alpha": torch.tensor(8.0, dtype=torch.bfloat16),
               "lora_unet_int.lora_down.weight": torch.randn(8, 64, generator=gen),
               "lora_unet_int.lora_up.weight": torch.randn(64, 8, generator=gen),
               "lora_unet_int.alpha": torch.tensor(6)}
    path = save_kohya_lora(tmp_path / "mixed.safetensors", tensors, {})
    before = deltas(tensors)
    report = resize_lora(path, tmp_path / "r.safetensors", rank=7)
    out = load_file(report.path)
    assert out["lora_unet_bf16.alpha"].dtype == torch.bfloat16 and float(out["lora_unet_bf16.alpha"]) == 2.328125
    assert out["lora_unet_int.alpha"].dtype == torch.float32 and float(out["lora_unet_int.alpha"]) == 6 * 7 / 8
    after = deltas(out)
    for name in before:
        u, s, vh = torch.linalg.svd(before[name].double())
        want = u[:, :7] * s[:7] @ vh[:7]  # the best rank-7 approximation, at the module's scale
        bias = float((after[name].double() * want).sum() / (want * want).sum()) - 1
        assert abs(bias) < 2e-4, (name, bias)  # (bf16's rounding of 2.333 alone: -2.2e-3)


def test_lycoris_cp_decomposed_locon_is_refused_by_name(tmp_path):
    """A LyCORIS LoCon trained with CP decomposition (use_cp / use_tucker) has a lora_mid between lora_down and
    lora_up in its convolutions: resize and both merges name the key and what it is, and write nothing."""
    from lora_trainer.export.merge import merge_into_checkpoint
    from lora_trainer.export.merge_loras import merge_loras

    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {f"{conv}.lora_down.weight": torch.ones(4, 8, 1, 1), f"{conv}.lora_mid.weight": torch.ones(4, 4, 3, 3),
               f"{conv}.lora_up.weight": torch.ones(8, 4, 1, 1), f"{conv}.alpha": torch.tensor(4.0),
               "lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)}
    path = save_kohya_lora(tmp_path / "cp.safetensors", tensors, {"ss_network_module": "lycoris.kohya"})
    save_file({"model.diffusion_model.x.weight": torch.zeros(4, 4)}, str(tmp_path / "base.safetensors"))
    want = (rf"1 modules in .*cp.safetensors have a lora_mid weight \(e.g. {conv}.lora_mid.weight\): that is "
            r"LyCORIS's CP-decomposed LoCon .*which {} cannot take: it takes plain LoRA/LoCon modules only")
    with pytest.raises(LoraTrainerError, match="^resize: " + want.format("resize")):
        resize_lora(path, tmp_path / "x.safetensors", rank=2)
    with pytest.raises(LoraTrainerError, match="^merge: " + want.format("merge")):
        merge_loras([(path, 1.0), (path, 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(LoraTrainerError, match="^merge: " + want.format("merge")):
        merge_into_checkpoint(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
