"""Checks inside a real AUTOMATIC1111 process (its own hijacked CLIP, emphasis, prompt parser, model and queue):
run with the WebUI's python from its folder, the extension installed in ``extensions/``:

    cd $A1111/webui && ../venv/bin/python $PROJECT/tests/e2e/a1111_inprocess.py [--ckpt models/Stable-diffusion/X]

1. a literal caption (brackets, BREAK) encodes bitwise as the command line encodes it (HF tokenizer + text encoder);
2. weighted captions (data.weighted_captions) match the command line's own emphasis within float error;
3. a caption's conditioning does not depend on its batch-mates (emphasis "Original" rescales by a batch's mean);
4. a text encoder whose output has mean 0 for one caption stops training before step 1, naming the caption;
5. a short training through TrainingSession + WebUIHost (what the tab runs) finishes, writes models/Lora/<name>,
   and leaves the UNet's output bitwise as before;
6. the tab's Merge into checkpoint writes a checkpoint the WebUI lists and loads, which draws what the first one
   draws with <lora:name:0.7>; the first one loads back bitwise.
Prints PASS/FAIL lines and a JSON summary; exit 1 if a check failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

CAPTIONS = ["hatsune miku (vocaloid), [sketch], 1girl", "a (red:1.3) circle BREAK on white", "plain words only",
            r"a literal \(bracket\) and ((double))"]
results: list[dict] = []


def check(name: str, ok: bool, evidence: str) -> None:
    results.append({"check": name, "ok": bool(ok), "evidence": evidence})
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {evidence}", flush=True)


def start_webui(ckpt: str | None, extra: list[str] = ()):
    sys.argv = ["launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--no-half",
                "--use-cpu", "all", "--skip-version-check", "--no-download-sd-model",
                *(["--ckpt", ckpt] if ckpt else []), *extra]
    sys.path.insert(0, os.getcwd())
    import webui  # noqa: F401  (the WebUI's imports and version checks)
    from modules import initialize, shared

    initialize.initialize()
    from modules import script_callbacks

    script_callbacks.before_ui_callback()  # where the Lora extension registers <lora:...> (the UI is not built here)
    t0 = time.time()
    model = shared.sd_model  # loads the checkpoint
    print(f"model loaded in {time.time() - t0:.1f} s: {model.sd_checkpoint_info.name}", flush=True)
    return model


def conditioning_checks(sd_model) -> None:
    import torch
    from modules import shared

    from lora_trainer.models.prompts import encode_captions
    from lora_trainer.webui.host import WebUIHost

    cfg = _cfg(Path(tempfile.mkdtemp()), "c")
    backend = WebUIHost().make_backend(cfg)
    wrapped = sd_model.cond_stage_model.wrapped
    print(f"emphasis mode: {shared.opts.emphasis}", flush=True)
    with torch.no_grad():
        for weighted in (False, True):
            worst = 0.0
            for caption in CAPTIONS:
                webui = backend.encode_prompts([caption], weighted=weighted).context
                cli = encode_captions(wrapped.tokenizer, wrapped.transformer, [caption], backend.device, weighted)
                worst = max(worst, float((webui.float() - cli.float()).abs().max()))
                if not weighted and not torch.equal(webui, cli):
                    break
            ok = worst == 0.0 if not weighted else worst < 1e-4
            check(f"{'weighted' if weighted else 'literal'} captions: WebUI == command line", ok,
                  f"largest difference {worst:.3g} over {len(CAPTIONS)} captions")
        raw = sd_model.get_learned_conditioning([CAPTIONS[0]])
        literal = backend.encode_prompts([CAPTIONS[0]]).context
        check("the WebUI's parser would have weighed '(vocaloid)' and '[sketch]'", not torch.equal(raw, literal),
              f"difference without escaping {float((raw - literal).abs().max()):.3g}")
        batch = backend.encode_prompts(CAPTIONS, weighted=True).context
        alone = torch.cat([backend.encode_prompts([c], weighted=True).context for c in CAPTIONS])
        together = sd_model.get_learned_conditioning(CAPTIONS)[:, :77]
        check("a caption's conditioning does not depend on its batch-mates", torch.equal(batch, alone),
              "per caption: equal; the WebUI's own batched call differs by "
              f"{float((together - alone).abs().max()):.3g}")
    WebUIHost().release_backend(backend)


def _dataset(folder: Path, captions: list[str]) -> Path:
    from lora_trainer.data.demo_set import make_demo_dataset

    data = make_demo_dataset(folder, n=len(captions), resolution=64)
    with open(data / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("file_name", "text"), *((f"demo_{i:03d}.png", c) for i, c in enumerate(captions))])
    return data


def _cfg(tmp: Path, name: str, **extra):
    from lora_trainer.config import config_from_dict

    data = _dataset(tmp / "data", CAPTIONS)
    return config_from_dict({"train_data_dir": str(data), "resolution": 64, "max_train_steps": 2, "batch_size": 2,
                             "gradient_accumulation_steps": 1, "save_steps": 0, "output_name": name,
                             "output_dir": str(tmp / "run"), "log_with": "none", **extra})


def zero_mean_check(sd_model) -> None:
    from lora_trainer.ui.session import TrainingSession
    from lora_trainer.webui.host import WebUIHost

    tmp = Path(tempfile.mkdtemp())
    cfg = _cfg(tmp, "zero")
    transformer = sd_model.cond_stage_model.wrapped.transformer
    target = sd_model.cond_stage_model.wrapped.tokenizer("plain words only", add_special_tokens=False).input_ids
    real = transformer.forward

    def forward(input_ids=None, *args, **kwargs):  # a text encoder whose output is 0 for one caption
        out = real(input_ids, *args, **kwargs)
        for row, ids in enumerate(input_ids.tolist()):
            if ids[1: 1 + len(target)] == target:
                out.last_hidden_state[row] = 0.0
        return out

    transformer.forward = forward
    try:
        status = TrainingSession.start(WebUIHost(), cfg).wait(600)
    finally:
        del transformer.forward
    ok = (status.state == "error" and "'plain words only'" in status.message and "Emphasis mode" in status.message
          and status.step == 0)
    check("a zero-mean caption stops the run before step 1, named", ok, status.message[:300])


def estimate_check(sd_model, family: str, cfg) -> None:
    """The tab's Estimate memory on the real host: the loaded model's family and its bytes on the WebUI's device."""
    from modules import devices

    from lora_trainer.engine.preflight import module_bytes
    from lora_trainer.ui.estimate import estimate_message
    from lora_trainer.webui.host import WebUIHost

    host = WebUIHost()
    t0 = time.time()
    where = host.preflight_where(cfg)
    text, kind = estimate_message(host, cfg)
    ok = (where is not None and where.family == family and where.device == devices.device
          and where.resident == module_bytes([sd_model], on=devices.device) > 0 and text.startswith("Estimate: peak ~"))
    check(f"the memory estimate for the loaded {family} model", ok,
          f"{text[:240]} ({kind}; resident {where.resident if where else None} bytes; {time.time() - t0:.1f} s)")


def training_check(sd_model) -> None:
    import torch
    from modules import shared

    from lora_trainer.ui.session import TrainingSession
    from lora_trainer.webui.host import WebUIHost

    def unet_out():
        torch.manual_seed(0)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        with torch.no_grad():
            return sd_model.apply_model(x, t, sd_model.get_learned_conditioning(["a red circle"]))

    before = unet_out()
    name = f"e2e_inprocess_{int(time.time())}"
    tmp = Path(tempfile.mkdtemp())
    t0 = time.time()
    cfg = _cfg(tmp, name, train_text_encoder=True, gradient_checkpointing=True)
    status = TrainingSession.start(WebUIHost(), cfg).wait(1800)
    took = time.time() - t0
    lora = Path(shared.cmd_opts.lora_dir) / f"{name}.safetensors"
    check("training through the tab's session finishes", status.state == "done" and lora.is_file(),
          f"{status.state}: {status.message} ({status.step} steps, {took:.0f} s)")
    check("the UNet computes exactly what it did before", torch.equal(before, unet_out()), "bitwise")
    if lora.is_file():
        learned_check(lora, {"lora_unet_", "lora_te_"})
        merge_check(lora, before, unet_out)
    lora.unlink(missing_ok=True)


def learned_check(lora: Path, parts: set[str]) -> None:
    """Each trained part's LoRA moved from its zero start (up weights), with gradient checkpointing on: the text
    encoder's too (transformers' reentrant checkpoint once gave its layers no gradient). (Not every module: with
    clip skip 2, SDXL's, the last layer's output is not used.)"""
    from safetensors import safe_open

    moved = {}
    with safe_open(str(lora), "pt") as f:
        for key in f.keys():
            if key.endswith(".lora_up.weight"):
                part = key.split("text_model_")[0] if "_text_model_" in key else "lora_unet_"
                moved.setdefault(part, []).append(bool(f.get_tensor(key).abs().max() > 0))
    check("every trained part learned (gradient checkpointing on)",
          set(moved) == parts and all(map(any, moved.values())),
          "; ".join(f"{part}: {sum(v)} of {len(v)} modules moved from zero" for part, v in sorted(moved.items())))


def merge_check(lora: Path, before, unet_out) -> None:
    """The tab's Merge into checkpoint: a new file in models/Stable-diffusion, in the checkpoint list; loaded, it
    computes what the loaded checkpoint computes with <lora:name:0.7> (the WebUI's own Lora loader); the first
    checkpoint loads back bitwise. The 2-step LoRA is amplified (its up weights x30, published as <name>_x30) so its
    effect stands well above the fp16 checkpoint's rounding."""
    import numpy as np
    import torch
    from modules import sd_models, shared
    from safetensors.torch import load_file, save_file

    from lora_trainer.ui import tab
    from lora_trainer.webui.host import WebUIHost

    host, base_info = WebUIHost(), shared.sd_model.sd_checkpoint_info
    strong_tmp = Path(tempfile.mkdtemp()) / "strong.safetensors"
    tensors = {k: v * 30 if k.endswith("lora_up.weight") else v for k, v in load_file(str(lora)).items()}
    save_file(tensors, str(strong_tmp), metadata={"ss_network_module": "networks.lora"})
    strong = host.publish(strong_tmp, f"{lora.stem}_x30")
    t0 = time.time()
    message = tab.merge_checkpoint(host, str(strong), 0.7)
    took = time.time() - t0
    merged = Path(sd_models.model_path) / f"{Path(base_info.filename).stem}-{strong.stem}-0.7.safetensors"
    listed = sd_models.get_closet_checkpoint_match(merged.name)
    check("Merge into checkpoint writes a new checkpoint the WebUI lists", merged.is_file() and listed is not None,
          f"{merged.name} ({merged.stat().st_size / 2**30 if merged.is_file() else 0:.2f} GiB, {took:.0f} s); "
          f"listed: {getattr(listed, 'title', None)}; {message[:200]}")
    if not merged.is_file() or listed is None:
        strong.unlink(missing_ok=True)
        return

    def draw(prompt):  # a txt2img, then the UNet's output on a fixed input with the networks that prompt loaded
        image = np.asarray(host._txt2img(prompt, "", seed=5, steps=3, size=64), dtype=np.int16)
        return image, unet_out()

    plain = draw("a red circle")
    with_lora = draw(f"a red circle <lora:{strong.stem}:0.7>")
    draw("a red circle")  # (the Lora extension puts the weights back at the next generation without it)
    t0 = time.time()
    sd_models.reload_model_weights(info=listed)
    loaded = time.time() - t0
    from_merged = draw("a red circle")
    sd_models.reload_model_weights(info=base_info)
    effect, gap = float((with_lora[1] - plain[1]).norm()), float((from_merged[1] - with_lora[1]).norm())
    pixels, pixel_effect = int(np.abs(from_merged[0] - with_lora[0]).max()), int(np.abs(plain[0] - with_lora[0]).max())
    check("the merged checkpoint computes what the base computes with <lora:name:0.7>", gap < 0.05 * effect,
          f"UNet output: |merged - (base + LoRA)| = {gap:.3g}, {gap / max(effect, 1e-12):.2%} of the LoRA's own "
          f"effect {effect:.3g}; pixels: max difference {pixels}, the LoRA's {pixel_effect}; merged checkpoint "
          f"loaded in {loaded:.0f} s")
    check("the first checkpoint loads back bitwise", torch.equal(before, unet_out()), "UNet output compared")
    merged.unlink(missing_ok=True)
    strong.unlink(missing_ok=True)
    sd_models.list_models()


def buckets_check(sd_model) -> None:
    """Aspect-ratio buckets and shuffled captions on the WebUI's model: portraits, landscapes and squares train in
    their buckets (latents cached per bucket through the WebUI's VAE, captions encoded each step by its CLIP); the
    file says so; the UNet is restored."""
    import torch
    from modules import shared
    from PIL import Image

    from lora_trainer.ui.session import TrainingSession
    from lora_trainer.webui.host import WebUIHost

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "mixed"
    data.mkdir()
    rows = [("file_name", "text")]
    for k, size in enumerate([(192, 128), (128, 192), (128, 128), (256, 128)]):
        Image.effect_noise(size, 40 + 10 * k).convert("RGB").save(data / f"img_{k}.png")
        rows.append((f"img_{k}.png", f"**zxq style**, shape {k}, soft light, plain ground"))
    with open(data / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    before = sd_model.model.diffusion_model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    name = f"e2e_buckets_{int(time.time())}"
    cfg = _cfg(tmp, name, train_data_dir=str(data), resolution=128, min_bucket_reso=64, bucket_reso_steps=32,
               shuffle_caption=True, caption_tag_dropout_rate=0.3, batch_size=1, max_train_steps=4)
    t0 = time.time()
    status = TrainingSession.start(WebUIHost(), cfg).wait(1800)
    lora = Path(shared.cmd_opts.lora_dir) / f"{name}.safetensors"
    meta = {}
    if lora.is_file():
        from safetensors import safe_open

        with safe_open(str(lora), "pt") as f:
            meta = f.metadata()
    info = json.loads(meta.get("ss_bucket_info") or "null") or {}
    sizes = sorted(tuple(b["resolution"]) for b in info.get("buckets", {}).values())
    check("mixed aspect ratios train in their buckets with shuffled captions", status.state == "done"
          and len(sizes) >= 3 and meta.get("ss_shuffle_caption") == "True",
          f"{status.state}: {status.message[:160]} ({time.time() - t0:.0f} s); buckets {sizes}")
    after = sd_model.model.diffusion_model.state_dict()
    check("the UNet's weights are as before (buckets run)", all(torch.equal(before[k], after[k]) for k in before),
          f"{len(before)} tensors compared")
    lora.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--project", default=str(Path(__file__).resolve().parents[2]))
    args = parser.parse_args()
    sys.path.insert(0, args.project)
    sd_model = start_webui(args.ckpt)
    t0 = time.time()
    conditioning_checks(sd_model)
    zero_mean_check(sd_model)
    estimate_check(sd_model, "sd_v1", _cfg(Path(tempfile.mkdtemp()), "estimate"))
    training_check(sd_model)
    buckets_check(sd_model)
    return summarize(t0)


def summarize(t0: float) -> int:
    """Print the checks' JSON summary; the exit status (1 if one failed)."""
    summary = {"passed": sum(r["ok"] for r in results), "failed": sum(not r["ok"] for r in results),
               "seconds": round(time.time() - t0, 1), "results": results}
    print(json.dumps(summary, indent=1))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
