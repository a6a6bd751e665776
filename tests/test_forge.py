"""The Forge host (lora_trainer/webui/forge_host.py) and backend (models/forge.py) against a stand-in of Forge's
model and modules (tests/forge_model.py, tests/forge_stub, tests/webui_stub): inference-mode weights, Forge's own
Linear class, its LoRA patcher and memory manager."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel",
                    reason="the LDM code: pip install --no-deps stable-diffusion-sdkit==2.1.5")
from forge_model import STUB, Prompts, TinyForgeSD2, TinyForgeSD15, TinyForgeSDXL  # noqa: E402
from lora_file import learned_prefixes  # noqa: E402
from webui_session import webui_with  # noqa: E402

from lora_trainer.errors import LoraTrainerError  # noqa: E402
from lora_trainer.ui.session import TrainingSession  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def forge_modules():
    """Forge's packages importable for this module's tests only: the A1111 tests after them see no Forge."""
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in ("backend", "modules_forge")]:
        del sys.modules[name]
    while str(STUB) in sys.path:
        sys.path.remove(str(STUB))


@pytest.fixture(params=["sd15"])
def forge(request, tmp_path):
    from backend import memory_management
    from modules import sd_models

    model = {"sd15": TinyForgeSD15, "sd2": TinyForgeSD2, "sdxl": TinyForgeSDXL}[request.param]()
    sd_models.model_data.sd_model = model
    memory_management.calls.clear()
    try:
        yield from webui_with(model, tmp_path)
    finally:
        sd_models.model_data.sd_model = None


def make_cfg(tmp_path, **extra):
    from test_webui import make_cfg as webui_cfg

    return webui_cfg(tmp_path, output_name="forge_lora", **extra)


def snapshot(model):
    return {n: (p.detach().clone(), p.is_inference(), p.requires_grad) for n, p in model.parameters()}


def user_lora(model):
    """A LoRA the user generated with, as Forge's Lora extension applies it: a patched clone of the UNet patcher,
    merged into the weights by its LoraLoader when the memory manager loads it."""
    patched = model.forge_objects_original.unet.clone()
    key = next(n for n, _ in model.parameters() if n.endswith("attn1.to_q.weight"))[len("unet."):]
    weight = model.forge_objects.unet.model.get_parameter(key)
    patched.add_patches(filename="user_lora.safetensors", patches={key: torch.full_like(weight, 0.5)})
    model.forge_objects.unet = patched
    model.current_lora_hash = "[['user_lora.safetensors', 1.0, 1.0, False]]"


def test_the_stand_in_is_forge_like(forge):
    """Training Forge's model as A1111's fails on what the issue names: Forge's Linear is no nn.Linear for peft, and
    its weights are inference tensors autograd cannot save (the stand-in must not be kinder than Forge)."""
    from backend.operations import ForgeOperations

    unet = forge.forge_objects.unet.model.diffusion_model
    layer = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    assert isinstance(layer, ForgeOperations.Linear) and not isinstance(layer, nn.Linear)
    assert all(p.is_inference() for _, p in forge.parameters())
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        unet(x, torch.tensor([10.0]), context=torch.randn(1, 77, 32)).sum().backward()
    from lora_trainer.models.forge import copy_norm_inputs, inference_tensors, ordinary_tensors, restore_norm_inputs

    replaced = ordinary_tensors([unet])  # and then its in-place adds (``x += n`` after a layer norm saved x)
    try:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            unet(x, torch.tensor([10.0]), context=torch.randn(1, 77, 32)).sum().backward()
        blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
        assert copy_norm_inputs(unet) == 3 * blocks  # norm1..3 of each transformer block
        unet(x, torch.tensor([10.0]), context=torch.randn(1, 77, 32)).sum().backward()
        assert x.grad is not None
    finally:
        restore_norm_inputs(unet)
        inference_tensors(replaced)
    assert not any("forward" in vars(m) for m in unet.modules())


@pytest.mark.parametrize(("forge", "checkpointing"), [("sd15", True), ("sd15", False), ("sd2", True), ("sdxl", True)],
                         indirect=["forge"])
def test_training_in_forge_leaves_the_model_exactly_as_before(forge, tmp_path, monkeypatch, checkpointing):
    from backend import memory_management
    from modules import processing, shared

    from lora_trainer.webui.forge_host import ForgeHost

    pristine = forge.generate("demo style")
    before = snapshot(forge)
    user_lora(forge)
    with_user_lora = forge.generate("demo style")
    assert not torch.equal(with_user_lora[1], pristine[1])  # merged into the weights
    generated = []

    def forge_generation(p):  # Forge's txt2img: the model's UNet under inference mode, with the LoRA being trained
        generated.append(forge.generate(p.prompt))
        return processing.Processed([None])

    monkeypatch.setattr(processing, "process_images", forge_generation)
    cfg = make_cfg(tmp_path, train_text_encoder=True, train_text_encoder_2=forge.is_sdxl,
                   gradient_checkpointing=checkpointing)  # (SDXL: both text encoders)
    status = TrainingSession.start(ForgeHost(), cfg, sample_prompt="demo style", sample_every=2).wait(180)
    assert status.state == "done", status.message
    lora = Path(shared.cmd_opts.lora_dir) / "forge_lora.safetensors"
    assert status.published == lora and lora.is_file()
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    te = "lora_te1_" if forge.is_sdxl else "lora_te_"  # (SD 2.x: its clip_h, which Forge's loader reads as lora_te_)
    assert (meta["ss_v2"], meta["ss_v_parameterization"]) == ((str(forge.is_sd2),) * 2)
    assert any(k.startswith("lora_unet_input_blocks_") and "_attn1_to_q.lora_down" in k for k in keys)
    assert any(k.startswith(f"{te}text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert learned_prefixes(lora) == {"lora_unet_", te} | ({"lora_te2_"} if forge.is_sdxl else set())
    # the samples ran through Forge's generation mid-training, and the trained LoRA changed what it computes
    assert len(generated) == 2 and not torch.equal(generated[-1][1], pristine[1])
    assert memory_management.calls and memory_management.calls[0] is forge.forge_objects_original.unet

    # Forge's state: no prompt LoRA merged (the next prompt naming one applies it again), its patchers the originals
    assert forge.current_lora_hash == "[]" and forge.forge_objects.unet is forge.forge_objects_original.unet
    # every weight bitwise as before the user's LoRA, an inference tensor again, requires_grad as it was
    after = snapshot(forge)
    assert after.keys() == before.keys()
    for name, (value, inference, grad) in before.items():
        assert torch.equal(after[name][0], value) and after[name][1:] == (inference, grad), name
    assert not any(hasattr(m, "lora_A") for m in forge.forge_objects.unet.model.modules())
    assert not any("forward" in vars(m) for m in forge.forge_objects.unet.model.modules())
    again = forge.generate("demo style")
    assert torch.equal(again[0], pristine[0]) and torch.equal(again[1], pristine[1])


def test_forge_linear_takes_a_peft_lora_that_trains_and_comes_out_again():
    from backend.operations import ForgeOperations

    from lora_trainer.engine.lora import add_lora, lora_state_dict, remove_lora
    from lora_trainer.models.forge import forge_lora_layers

    model = nn.Sequential()
    model.to_q = ForgeOperations.Linear(8, 8)
    model.to_q.weight, model.to_q.bias = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    model.requires_grad_(False)
    x = torch.randn(2, 8)
    base = model.to_q(x)
    with _no_warning():
        params = add_lora(model, rank=2, alpha=2, dropout=0.0, target_modules=["to_q"],
                          custom_modules=forge_lora_layers(ForgeOperations.Linear))
    assert len(params) == 2 and torch.equal(model.to_q(x), base)  # LoRA B starts at zero
    with torch.no_grad():
        model.to_q.lora_B["default"].weight.fill_(0.1)
    out = model.to_q(x)
    assert not torch.equal(out, base)
    out.sum().backward()
    assert all(p.grad is not None for p in params)
    assert set(lora_state_dict(model)) == {"to_q.lora_A.weight", "to_q.lora_B.weight"}
    assert remove_lora(model) == 1 and isinstance(model.to_q, ForgeOperations.Linear)
    assert torch.equal(model.to_q(x), base)


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings(record=True)
        self.caught = self._w.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
        assert not [w for w in self.caught if "Unsupported layer type" in str(w.message)]


def test_inference_tensors_are_made_ordinary_and_back_bitwise():
    from lora_trainer.models.forge import inference_tensors, ordinary_tensors

    with torch.inference_mode():
        layer = nn.Linear(4, 4)
        layer.register_buffer("scale", torch.ones(4))
        layer.weight = nn.Parameter(layer.weight * 1, requires_grad=False)
    values = {n: t.clone() for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
    replaced = ordinary_tensors([layer])
    assert len(replaced) == 3 and not any(t.is_inference() for t in [*layer.parameters(), *layer.buffers()])
    layer(torch.randn(2, 4, requires_grad=True)).sum().backward()  # autograd can save them now
    assert ordinary_tensors([layer]) == []  # nothing left to do
    inference_tensors(replaced)
    assert all(t.is_inference() for t in [*layer.parameters(), *layer.buffers()])
    assert all(torch.equal(t, values[n]) for n, t in [*layer.named_parameters(), *layer.named_buffers()])
    assert layer.weight.requires_grad is False and layer.bias.requires_grad is True


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: setattr(m.forge_objects.unet.model, "storage_dtype", "nf4"), "not supported for training"),
    (lambda m: setattr(m, "is_sd1", False), "not Stable Diffusion 1.x, 2.x or SDXL"),
    (lambda m: setattr(m, "is_inpaint", True), "inpainting"),
])
def test_forge_models_that_cannot_train_are_refused_before_anything_changes(forge, tmp_path, change, message):
    from lora_trainer.webui.forge_host import ForgeHost

    change(forge)
    before = snapshot(forge)
    with pytest.raises(LoraTrainerError, match=message):
        ForgeHost().make_backend(make_cfg(tmp_path))
    after = snapshot(forge)
    assert all(torch.equal(after[n][0], v[0]) and after[n][1] == v[1] for n, v in before.items())


def test_no_model_loaded_is_a_clear_error(tmp_path):
    from modules import sd_models

    from lora_trainer.webui.forge_host import ForgeHost

    sd_models.model_data.sd_model = None
    with pytest.raises(LoraTrainerError, match="no model is loaded"):
        ForgeHost().make_backend(make_cfg(tmp_path))


def test_the_tab_picks_the_host_by_what_the_webui_is(monkeypatch):
    from lora_trainer.webui import forge_host, tab
    from lora_trainer.webui.forge_host import ForgeHost
    from lora_trainer.webui.host import WebUIHost

    assert forge_host.is_forge()  # the stand-in's backend and modules_forge are importable here
    assert type(tab.make_host()) is ForgeHost
    monkeypatch.setattr(forge_host, "is_forge", lambda: False)
    assert type(tab.make_host()) is WebUIHost


def test_forge_family_and_schedule(forge):
    from lora_trainer.models.forge import forge_betas, forge_family
    from lora_trainer.webui.forge_host import ForgeHost

    assert forge_family(forge) == "sd_v1" and ForgeHost().model_family() == "sd_v1"
    cumprod = torch.cumprod(1 - forge_betas(forge).double(), 0)
    assert torch.allclose(cumprod.float(), forge.forge_objects.unet.model.predictor.alphas_cumprod, rtol=1e-5)


def test_install_py_keeps_forges_own_pins(monkeypatch, tmp_path):
    """In Forge (its requirements_versions.txt pins peft 0.13.2 and diffusers 0.31.0) the host's pins are kept: a
    missing one is installed at the host's version, a present one never replaced, even where A1111's rules would."""
    import importlib.metadata
    import runpy

    import launch

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "requirements_versions.txt").write_text("gradio==4.40.0\ntransformers==4.46.1\n"
                                                        "diffusers==0.31.0\npeft==0.13.2\n")
    monkeypatch.chdir(tmp_path)  # Forge runs an extension's installer in the WebUI folder
    versions = {"peft": "0.13.2", "diffusers": "0.31.0"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])

    def install(installed, broken=()):
        launch.installed, launch.broken = set(installed), set(broken)
        launch.pip_calls.clear()
        runpy.run_path(str(root / "install.py"))
        return launch.pip_calls

    host = {"torch", "transformers", "gradio", "huggingface_hub"}
    try:
        assert install(host | {"peft", "diffusers"}) == []  # Forge as it comes: nothing installed
        assert install(host | {"peft"}) == ["install --no-deps diffusers==0.31.0"]  # Forge's pin, not A1111's 0.30.3
        assert install(host | {"peft", "diffusers"}, broken={"diffusers"}) == []  # reported, not replaced
        versions["peft"] = "0.12.0"  # older than we test with, but the host's: Forge's launcher restores its pins
        assert install(host | {"peft", "diffusers"}) == []
    finally:
        launch.broken = set()


@pytest.mark.parametrize("forge", ["sdxl"], indirect=True)
def test_forge_sdxl_conditioning_is_forges_own_for_each_images_size(forge):
    """The vector a training image gets (the caption's pooled embedding, then its own size/crop through Forge's
    embedder) is what Forge's get_learned_conditioning makes for a generation of that size; crossattn the same."""
    from lora_trainer.models.forge import ForgeBackend

    backend = ForgeBackend(forge, "tiny", torch.device("cpu"))
    cond = backend.encode_prompts(["a red cat"])
    ids = torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]])
    vector = torch.cat([cond.pooled, backend.size_vector(ids, cond.pooled.dtype)], dim=1)
    forges = forge.get_learned_conditioning(Prompts(["a red cat"], width=48, height=64))
    assert torch.equal(vector, forges["vector"]) and torch.equal(cond.context, forges["crossattn"])
    assert backend.kohya_prefixes["text_encoder"] == "lora_te1_" and backend.uses_time_ids


def test_a_unet_moved_off_the_device_by_forge_is_a_clear_error(forge):
    """Forge's memory manager may unload the UNet to the CPU to make room (a GPU short of memory): the next step says
    so instead of failing inside a layer."""
    from lora_trainer.models.conditioning import Conditioning
    from lora_trainer.models.forge import ForgeBackend

    backend = ForgeBackend(forge, "tiny", torch.device("cuda", 0))  # where the UNet was loaded, say
    with pytest.raises(LoraTrainerError, match="moved the UNet to cpu during training"):
        backend.predict(torch.randn(1, 4, 8, 8), torch.tensor([10]), Conditioning(torch.randn(1, 77, 32)))
    backend.release()
