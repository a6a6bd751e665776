"""The Train LoRA tab's path on SDXL inside a real AUTOMATIC1111 v1.10.1 (sgm model, its hijacked CLIP-L and
open_clip bigG, its prompt parser and Lora extension); run with the WebUI's python from its folder:

    cd $A1111/webui && ../venv/bin/python $PROJECT/tests/e2e/a1111_sdxl.py \
        --ckpt models/Stable-diffusion/random_sdxl.safetensors --ui-settings-file config_sdxl.json

1. the loaded model is SDXL and the host makes an SgmBackend over it;
2. per image, our prediction (caption conditioning + the image's size/crop ids through the conditioner's size
   embedders) equals the WebUI's apply_model on the conditioning its txt2img makes at that size;
3. a short training through TrainingSession + WebUIHost (what the tab runs; first text encoder and gradient
   checkpointing on) finishes and writes models/Lora/<name> with kohya SDXL keys and metadata;
4. the WebUI's own Lora loader matches every module of the file (none dropped), and the strength sweep through
   ``<lora:name:S>`` changes the image at 1 and gives the plain image at 0;
5. the UNet's output is bitwise as before; no flag or forward of ours is left on the model;
6. the tab's memory estimate for the loaded SDXL model (its family's shapes, its bytes on the device).
Prints PASS/FAIL lines and a JSON summary; exit 1 if a check failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from a1111_inprocess import _dataset, check, estimate_check, learned_check, start_webui, summarize  # noqa: E402

CAPTIONS = ["a (red:1.3) cube on a table", "two cats, [sketch]"]


def _cfg(tmp: Path, name: str, steps: int, **extra):
    from lora_trainer.config import config_from_dict

    data = _dataset(tmp / "data", CAPTIONS)
    return config_from_dict({"train_data_dir": str(data), "resolution": 64, "max_train_steps": steps,
                             "batch_size": 1, "lora_rank": 4, "lora_alpha": 4, "save_steps": 0, "seed": 1,
                             "output_name": name, "output_dir": str(tmp / "run"), "log_with": "none", **extra})


def _state(sd_model):
    return ({n: p.requires_grad for n, p in sd_model.named_parameters()},
            [getattr(e, "is_trainable", None) for e in sd_model.conditioner.embedders],
            sum(1 for m in sd_model.modules() if vars(m).keys() & {"forward", "_lora_trainer_checkpoint"}))


def conditioning_check(sd_model) -> None:
    import torch
    from modules.prompt_parser import SdConditioning

    from lora_trainer.models.sgm import SgmBackend
    from lora_trainer.webui.host import WebUIHost

    host = WebUIHost()
    backend = host.make_backend(_cfg(Path(tempfile.mkdtemp()), "c", 1))
    check("the loaded model is SDXL, trained through SgmBackend", host.model_family() == "sdxl"
          and isinstance(backend, SgmBackend), f"family {host.model_family()}, backend {type(backend).__name__}")
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    worst = 0.0
    with torch.no_grad():
        for caption, (h, w) in zip(CAPTIONS, [(64, 64), (96, 128)]):
            ours = backend.predict(x, t, backend.encode_prompts([caption], weighted=True).with_time_ids(
                torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)))
            theirs = sd_model.apply_model(x, t, sd_model.get_learned_conditioning(SdConditioning([caption], width=w,
                                                                                                   height=h)))
            worst = max(worst, float((ours - theirs).abs().max()))
    check("per image: our prediction == the WebUI's at the image's size", worst < 1e-4,
          f"largest difference {worst:.3g} over {len(CAPTIONS)} captions and sizes")
    host.release_backend(backend)


def training_check(sd_model, steps: int) -> None:
    import torch
    from modules import shared
    from safetensors import safe_open

    from lora_trainer.ui.session import TrainingSession
    from lora_trainer.webui.host import WebUIHost

    def unet_out():
        torch.manual_seed(0)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        with torch.no_grad():
            return sd_model.apply_model(x, t, sd_model.get_learned_conditioning(["a red circle"]))

    before, flags = unet_out(), _state(sd_model)
    name = f"e2e_sdxl_{int(time.time())}"
    cfg = _cfg(Path(tempfile.mkdtemp()), name, steps, train_text_encoder=True, gradient_checkpointing=True,
               learning_rate=1e-2)
    t0 = time.time()
    host = WebUIHost()
    status = TrainingSession.start(host, cfg, sample_prompt="a red cube", sample_every=steps).wait(3600)
    took = time.time() - t0
    lora = Path(shared.cmd_opts.lora_dir) / f"{name}.safetensors"
    per_step = 1 / status.steps_per_s if status.steps_per_s else 0.0
    check("training SDXL through the tab's session finishes", status.state == "done" and lora.is_file(),
          f"{status.state}: {status.message} ({status.step} steps, {took:.0f} s in all, {per_step:.1f} s/step)")
    check("a sample through the WebUI's txt2img during training", len(status.samples) == 1,
          f"{len(status.samples)} sample(s), size {status.samples[0][1].size if status.samples else None}")
    check("the UNet computes exactly what it did before", torch.equal(before, unet_out()), "bitwise")
    check("no flag or forward of ours is left", _state(sd_model) == flags, "requires_grad, is_trainable, forwards")
    if not lora.is_file():
        return
    with safe_open(str(lora), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    modules = {k.removesuffix(".alpha") for k in keys if k.endswith(".alpha")}
    prefixes = sorted({m.split("_")[1] for m in modules})
    check("kohya SDXL keys and metadata", meta.get("ss_base_model_version") == "sdxl_base_v1-0"
          and any(m.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for m in modules)
          and any(m.startswith("lora_te1_text_model_encoder_layers_0_self_attn") for m in modules),
          f"{len(modules)} modules ({prefixes}); ss_base_model_version {meta.get('ss_base_model_version')}, "
          f"modelspec.architecture {meta.get('modelspec.architecture')}")
    learned_check(lora, {"lora_unet_", "lora_te1_"})
    loader_check(name, modules)
    sweep_check(host, lora)
    lora.unlink(missing_ok=True)


def sweep_check(host, lora: Path) -> None:
    import numpy as np

    t0 = time.time()
    images = host.sweep(lora, "a red cube", "", [0, 1.0, 0], seed=3, steps=3, size=64)
    a, b, c = (np.asarray(img, dtype=np.int16) for _, img in images)
    check("the sweep through <lora:name:S>: strength 1 changes the image, 0 is the plain image again",
          bool(np.abs(a - b).max() > 0) and np.array_equal(a, c),
          f"max pixel difference {int(np.abs(a - b).max())} at strength 1, {int(np.abs(a - c).max())} between the "
          f"two strength-0 images; {time.time() - t0:.0f} s for 3 images at 64², 3 steps")


def loader_check(name: str, modules: set[str]) -> None:
    import networks  # the built-in Lora extension

    networks.list_available_networks()
    net = networks.load_network(name, networks.available_networks[name])
    matched = {m.network_key.split(".")[0] for m in net.modules.values()}
    check("the WebUI's Lora loader matches every module of the file", matched == modules,
          f"{len(matched)} of {len(modules)} modules matched; not matched: {sorted(modules - matched)[:5]}")

def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default="models/Stable-diffusion/random_sdxl.safetensors")
    parser.add_argument("--ui-settings-file", default="config_sdxl.json")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--project", default=str(Path(__file__).resolve().parents[2]))
    args = parser.parse_args()
    sys.path.insert(0, args.project)
    sd_model = start_webui(args.ckpt, ["--ui-settings-file", args.ui_settings_file])
    t0 = time.time()
    conditioning_check(sd_model)
    estimate_check(sd_model, "sdxl", _cfg(Path(tempfile.mkdtemp()), "estimate", 2))
    training_check(sd_model, args.steps)
    return summarize(t0)


if __name__ == "__main__":
    sys.exit(main())
