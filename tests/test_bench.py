"""The speed benchmark: its turn-taking, and one short run end to end (numbers not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.latest_only  # the developers' benchmarks: the latest suite's releases (.ci/run)


def test_loops_take_turns_in_blocks():
    sys.path.insert(0, str(BENCH))
    try:
        from turns import TakeTurns
    finally:
        sys.path.remove(str(BENCH))
    log = []

    def reference():
        while True:
            log.append("r")
            yield

    turns = TakeTurns(reference(), warmup=2, block=3, rounds=2)
    for _ in range(2 + 2 * 3):  # what train() does with max_train_steps = warmup + rounds * block
        log.append("o")
        turns.on_step(None)
    # our warm-up, the reference's warm-up and first block, then blocks in turn; ours ends the run
    assert "".join(log) == "oo" + "rr" + "rrr" + "ooo" + "rrr" + "ooo"
    assert len(turns.times["ours"]) == len(turns.times["reference"]) == 2
    assert all(t > 0 for ts in turns.times.values() for t in ts)


def test_benchmark_runs_end_to_end(tmp_path):
    pytest.importorskip("diffusers.utils").USE_PEFT_BACKEND or pytest.skip(
        "the reference loop uses diffusers' PEFT backend (transformers >= 4.34)")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH / "train_speed.py"), "--steps", "2", "--rounds", "2",
                           "--warmup", "1", "--images", "4", "--batch", "2", "--work", str(tmp_path / "work"),
                           "--variant", "cl:channels_last=true", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"reference", "ours", "cl"} and rows["cl"]["overrides"] == {"channels_last": True}
    for r in rows.values():
        assert len(r["turn_s"]) == 2 and len(r["ratios"]) == 2 and r["peak_memory_mb"] > 0 and r["first_step_s"] > 0
    assert "ours/reference:" in proc.stdout


@pytest.mark.slow
def test_the_mixed_aspect_benchmark_compares_buckets_with_square_crops(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH / "train_speed.py"), "--mixed-aspect", "--resolution", "128",
                           "--no-reference", "--steps", "2", "--rounds", "1", "--warmup", "1", "--images", "4",
                           "--batch", "1", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["square"]["overrides"] == {"enable_bucket": False} and rows["ours"]["overrides"]["enable_bucket"]
    cmp = result["buckets_vs_square"]
    # 4:3, 3:4, 1:1 and 2:1 in buckets of at most 128² pixels (160×96: 15360), against four 128² squares
    assert cmp["square"]["pixels_per_image"] == 128 * 128 and cmp["ours"]["pixels_per_image"] < 128 * 128
    assert cmp["steps_ratio"] > 0 and "buckets vs square:" in proc.stdout


def test_peak_memory_of_a_child_is_its_own_not_its_parents():
    # Linux carries a parent's ru_maxrss over fork + exec; the benchmark's children must not report it
    hog = bytearray(300 * 2**20)
    hog[:: 4096] = b"\1" * len(hog[:: 4096])  # touch every page: 300 MB resident in this process
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from train_speed import peak_memory_mb; "
            "print(peak_memory_mb('cpu'))")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, check=True)
    del hog
    assert 0 < float(out.stdout.split()[-1]) < 250


def test_step_overhead_runs_end_to_end():
    proc = subprocess.run([sys.executable, str(BENCH / "step_overhead.py"), "--block", "1", "--rounds", "2",
                           "--warmup", "1"], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bare/ours:" in proc.stdout and "ms/step" in proc.stdout


def test_ldm_attention_benchmark_runs_its_loops(tmp_path):
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel", reason="the LDM code (stable-diffusion-sdkit)")
    out = tmp_path / "ldm.json"
    proc = subprocess.run([sys.executable, str(BENCH / "ldm_attention.py"), "--resolution", "128", "--batch", "1",
                           "--steps", "1", "--loops", "webui,own,sdpa,diffusers", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["loop"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"webui", "own", "sdpa", "diffusers"}
    assert all(r["step_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows.values())
    saved = {name: r["saved_for_backward_mb"] for name, r in rows.items()}
    # 16x16 latents: the WebUI's way and the stock forward keep each 2 x 256 x 256 softmax (fp32 on the CPU:
    # the same bytes), SDPA none of them
    assert saved["sdpa"] < saved["webui"] and abs(saved["webui"] - saved["own"]) < 0.05 * saved["own"]
    # the diffusers UNet of the same widths, also with SDPA, keeps about what the LDM one does with ours
    assert abs(saved["diffusers"] - saved["sdpa"]) < 0.25 * saved["sdpa"]


def test_the_webui_default_attention_written_again_computes_the_stock_forward(monkeypatch):
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel", reason="the LDM code (stable-diffusion-sdkit)")
    import torch
    from ldm.modules.attention import CrossAttention

    sys.path.insert(0, str(BENCH))
    try:
        import ldm_attention
    finally:
        sys.path.remove(str(BENCH))
    torch.manual_seed(0)
    x, context = torch.randn(2, 300, 32), torch.randn(2, 77, 24)
    cases = [(CrossAttention(query_dim=32, heads=4, dim_head=8), None),  # self-attention
             (CrossAttention(query_dim=32, context_dim=24, heads=4, dim_head=8), context)]
    with torch.no_grad():
        for slice_bytes in (ldm_attention.SLICE_BYTES, 100_000):  # whole, and 10-query slices (30 of them)
            monkeypatch.setattr(ldm_attention, "SLICE_BYTES", slice_bytes)
            for attn, ctx in cases:
                assert torch.allclose(ldm_attention.webui_default_forward(attn, x, ctx), attn(x, ctx), atol=1e-5)


def test_the_sdxl_reference_loop_conditions_as_our_sdxl_backend_and_trains(tmp_path):
    """The diffusers SDXL LoRA recipe (bench/reference_loop.py) on the tiny SDXL model: both encoders' penultimate
    states side by side and the second's pooled embedding, the same conditioning our SdxlBackend computes; two
    steps of it run with gradient checkpointing."""
    import torch

    pytest.importorskip("diffusers.utils").USE_PEFT_BACKEND or pytest.skip(
        "the reference loop uses diffusers' PEFT backend (transformers >= 4.34)")
    from types import SimpleNamespace

    from lora_trainer.data.demo_set import make_demo_dataset
    from lora_trainer.models.sdxl_backend import load_sdxl_backend

    sys.path.insert(0, str(BENCH))
    try:
        from reference_loop import Recipe, reference_steps
    finally:
        sys.path.remove(str(BENCH))
    captions = ["a red circle", "a blue square on grey"]
    recipe = Recipe("tiny-sdxl", torch.device("cpu"), torch.float32)
    context, added = recipe.condition(recipe.token_ids(captions), torch.zeros(2, 6))
    ours = load_sdxl_backend("tiny-sdxl", torch.device("cpu"), torch.float32).encode_prompts(captions)
    torch.testing.assert_close(context, ours.context)
    torch.testing.assert_close(added["text_embeds"], ours.pooled)
    assert added["time_ids"].shape == (2, 6)
    data = make_demo_dataset(tmp_path / "data", n=2, resolution=64)
    args = SimpleNamespace(device="cpu", resolution=64, batch=2, gradient_checkpointing=True, rank=4)
    steps = reference_steps(args, data, "tiny-sdxl")
    next(steps)
    next(steps)


def test_the_step_profile_sorts_kernels_into_kinds(tmp_path):
    sys.path.insert(0, str(BENCH))
    from profile_step import kind_of

    names = ("aten::mm", "ampere_bf16_s16816gemm_relu", "flash_fwd_kernel", "aten::native_group_norm", "Memcpy DtoD",
             "multi_tensor_apply_kernel", "vectorized_elementwise_kernel<silu>", "cudaLaunchKernel",
             # kernel names of the H200 run (2026-12-04): cuBLAS's nvjet, cuDNN's SDPA and layout change, an add
             "nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT", "cudnn_generated_fort_native_sdpa_sm90_flash_bprop",
             "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>",
             "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
             "CUDAFunctor_add<c10::BFloat16>>")
    assert [kind_of(n) for n in names] == [
        "matmul/conv", "matmul/conv", "attention", "norm", "copy/cast", "optimizer", "elementwise", "other",
        "matmul/conv", "attention", "copy/cast", "elementwise"]
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, str(BENCH / "profile_step.py"), "--steps", "1", "--warmup", "1", "--batch", "1",
                    "--work", str(tmp_path), "--out", str(out)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["ms_per_step"] > 0 and result["top"] and abs(sum(result["kinds"].values()) - 1) < 0.01
    assert result["wall_ms_per_step"] > 0 and 0 < result["busy_share"]
    assert result["kinds"]["matmul/conv"] > 0.2  # a UNet step is mostly matrix multiplies and convolutions


def test_the_sdpa_backend_benchmark_times_each_backend_or_says_why_not(tmp_path):
    out = tmp_path / "sdpa.json"
    subprocess.run([sys.executable, str(BENCH / "sdpa_backends.py"), "--batch", "1", "--scale", "64", "--repeats", "1",
                    "--dtype", "fp32", "--sdxl", "--out", str(out)], check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 * 4  # four SD 1.5 shapes and three SDXL ones, each with every backend
    assert all(("ms" in r and r["ms"] > 0 and r["tflops"] > 0) or r["refused"] for r in rows)
    assert all("ms" in r for r in rows if r["backend"] == "MATH")  # the math backend takes every shape


def test_the_lora_casts_benchmark_counts_fewer_casts_without_peft_s(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "lora_casts.py"), "--latent", "8", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600, check=True)
    counts = [int(line.split(":")[1].split()[0]) for line in done.stdout.splitlines() if "aten::_to_copy" in line]
    assert len(counts) == 2 and counts[1] < counts[0], done.stdout  # (SD 1.5: 1,328 and 950 with peft 0.21.2)
