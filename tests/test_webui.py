"""The WebUI glue (scripts/, lora_trainer/webui/, install.py) against a stand-in of A1111 v1.10's modules."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STUB = Path(__file__).resolve().parent / "webui_stub"
sys.path.insert(0, str(STUB))

import launch  # noqa: E402  (the stand-in)
import networks  # noqa: E402
from ldm_model import TinyLatentDiffusion  # noqa: E402
from lora_file import learned_prefixes  # noqa: E402
from modules import devices, processing, script_callbacks, shared  # noqa: E402
from webui_session import webui_with  # noqa: E402

from lora_trainer.config import config_from_dict  # noqa: E402
from lora_trainer.data.demo_set import make_demo_dataset  # noqa: E402
from lora_trainer.models.conditioning import Conditioning  # noqa: E402
from lora_trainer.ui.session import TrainingSession  # noqa: E402
from lora_trainer.webui.host import WebUIHost  # noqa: E402


@pytest.fixture
def webui(tmp_path):
    yield from webui_with(TinyLatentDiffusion(), tmp_path)


def outputs(sd_model):
    torch.manual_seed(3)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([100])
    with torch.no_grad():
        cond = sd_model.get_learned_conditioning(["demo style"])
        return cond, sd_model.apply_model(x, t, cond)


def make_cfg(tmp_path, **extra):
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    settings = {"train_data_dir": str(data), "resolution": 64, "max_train_steps": 4, "batch_size": 2,
                "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "save_steps": 0, "lora_dropout": 0.0,
                "output_dir": str(tmp_path / "run"), "output_name": "webui_lora", "log_with": "none", **extra}
    return config_from_dict(settings)


def test_training_in_the_webui_leaves_the_model_exactly_as_before(webui, tmp_path):
    pristine = outputs(webui)
    grads_before = {n: p.requires_grad for n, p in webui.named_parameters()}
    # a Lora the user generated with is merged into one layer, as the built-in extension does it
    layer = webui.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    layer.network_weights_backup = layer.weight.detach().clone()
    layer.network_current_names = (("user_lora", 1.0, 1.0, None),)
    with torch.no_grad():
        layer.weight += 0.5
    networks.loaded_networks.append(object())
    assert not torch.equal(outputs(webui)[1], pristine[1])
    shared.loaded_hypernetworks.append(types.SimpleNamespace(name="my_hypernet"))

    host = WebUIHost()
    session = TrainingSession.start(host, make_cfg(tmp_path, train_text_encoder=True, gradient_checkpointing=True),
                                    sample_prompt="demo style", sample_every=2)
    try:
        status = session.wait(120)
    finally:
        shared.loaded_hypernetworks.clear()
    assert status.state == "done", status.message
    lora = Path(shared.cmd_opts.lora_dir) / "webui_lora.safetensors"
    assert status.published == lora and lora.is_file()
    assert learned_prefixes(lora) == {"lora_unet_", "lora_te_"}  # (checkpointed, the text encoder's layers too)
    assert networks.refreshes >= 1 and networks.loaded_networks == []
    assert ("begin", "Train LoRA") in shared.state.calls and shared.state.calls[-1] == ("end",)
    assert [p.prompt for p in processing.calls] == ["demo style", "demo style"]  # samples at steps 2 and 4
    assert all(p.closed for p in processing.calls)
    (run_log,) = (tmp_path / "run").rglob("train.log")  # what the WebUI's console said is in the run's log too
    assert "hypernetworks my_hypernet are not applied while training" in run_log.read_text()

    # the same seed and input give the same output as before the user's Lora and the training
    after = outputs(webui)
    assert torch.equal(after[0], pristine[0]) and torch.equal(after[1], pristine[1])
    assert {n: p.requires_grad for n, p in webui.named_parameters()} == grads_before
    assert not webui.training and not any(m.training for m in webui.modules())
    assert not any(hasattr(m, "lora_A") for m in webui.modules())
    assert devices.gc_calls >= 1


def test_the_webui_upcast_setting_reaches_the_kernel_and_what_gives_way_is_logged(webui, tmp_path, caplog):
    from modules import sd_hijack  # noqa: F401  (loaded, as in the WebUI: the host names its optimization)

    caplog.set_level("INFO", logger="lora_trainer")
    shared.opts.data["upcast_attn"] = True
    shared.loaded_hypernetworks.append(types.SimpleNamespace(name="my_hypernet"))
    host = WebUIHost()
    try:
        backend = host.make_backend(make_cfg(tmp_path))
        backend.use_attention("auto")
        ours = [m for m in webui.model.diffusion_model.modules() if "_lora_trainer_attention" in m.__dict__]
        assert len(ours) == 14 and all(m._lora_trainer_upcast for m in ours)
        assert "my_hypernet" in caplog.text and "not applied while training" in caplog.text
        assert "cross attention optimization (Doggettx) gives way while training" in caplog.text
        host.release_backend(backend)
        assert not any("forward" in m.__dict__ for m in webui.modules())
    finally:
        shared.opts.data.pop("upcast_attn")
        shared.loaded_hypernetworks.clear()


def test_gradient_checkpointing_the_webui_way_gives_the_same_gradients_for_less_memory(webui, tmp_path):
    from modules import sd_hijack_checkpoint

    from lora_trainer.engine.lora import add_lora

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from ldm_attention import SavedForBackward
    finally:
        sys.path.pop(0)
    host = WebUIHost()
    backend = host.make_backend(make_cfg(tmp_path))
    unet = backend.unet
    try:
        torch.manual_seed(0)
        add_lora(unet, rank=4, alpha=4, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                 key="training.target_modules")
        with torch.no_grad():  # LoRA B starts at zero: give it weights, so gradients reach every LoRA matrix
            for n, p in unet.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        backend.use_attention("auto")

        def grads():
            torch.manual_seed(1)
            x, t, cond = torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), Conditioning(torch.randn(2, 77, 32))
            unet.zero_grad(set_to_none=True)
            with SavedForBackward() as saved:
                out = backend.predict(x, t, cond)
            out.pow(2).mean().backward()
            return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}, saved.bytes

        plain, plain_bytes = grads()
        backend.enable_gradient_checkpointing(text_encoder=False)
        assert sd_hijack_checkpoint.stored  # the WebUI's hook is on: blocks run under reentrant checkpoint
        checkpointed, checkpointed_bytes = grads()
    finally:
        host.release_backend(backend)
    assert not sd_hijack_checkpoint.stored
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for n, g in plain.items():
        assert checkpointed[n] is not None and torch.allclose(checkpointed[n], g, rtol=1e-4, atol=1e-7), n
    assert checkpointed_bytes < plain_bytes / 2, (checkpointed_bytes, plain_bytes)


def test_a_bad_dataset_is_reported_before_the_webui_model_is_touched(webui, tmp_path):
    layer = webui.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    layer.network_weights_backup = layer.weight.detach().clone()  # a Lora the user generated with, merged
    layer.network_current_names = (("user_lora", 1.0, 1.0, None),)
    with torch.no_grad():
        layer.weight += 0.5
    merged = layer.weight.detach().clone()
    cfg = make_cfg(tmp_path)
    (tmp_path / "empty").mkdir()
    cfg.data.train_data_dir = str(tmp_path / "empty")
    status = TrainingSession.start(WebUIHost(), cfg).wait(60)
    assert status.state == "error" and "no usable images" in status.message
    assert torch.equal(layer.weight, merged)  # the user's Lora is still merged: make_backend never ran


@pytest.mark.parametrize("change, words", [
    ("none", "no model is loaded"),
    ("sd3", "SD3"),
    ("medvram", "--medvram/--lowvram"),
])
def test_clear_refusals_leave_the_webui_working(webui, tmp_path, change, words):
    if change == "none":
        shared.sd_model = None
    elif change == "sd3":
        webui.is_sd3 = True
    else:
        shared.cmd_opts.medvram = True
    status = TrainingSession.start(WebUIHost(), make_cfg(tmp_path)).wait(60)
    assert status.state == "error" and words in status.message
    assert shared.state.calls[-1] == ("end",)


def test_strength_sweep_uses_the_webui_generation(webui, tmp_path):
    images = WebUIHost().sweep(tmp_path / "my_style.safetensors", "a cat", "blurry", [0, 0.5, 1.0], seed=7)
    assert [s for s, _ in images] == [0, 0.5, 1.0]
    assert [p.prompt for p in processing.calls] == ["a cat", "a cat <lora:my_style:0.5>", "a cat <lora:my_style:1>"]
    assert {p.seed for p in processing.calls} == {7} and {p.negative_prompt for p in processing.calls} == {"blurry"}


def test_the_sweep_takes_size_and_steps_and_defaults_to_the_models_size_then_the_trainings(webui, tmp_path):
    from lora_trainer.ui.views import SWEEP_STEPS

    host = WebUIHost()
    host.sweep(tmp_path / "my_style.safetensors", "a cat", "", [0, 1.0], seed=7)
    assert {(p.width, p.height, p.steps) for p in processing.calls} == {(512, 512, SWEEP_STEPS)}  # SD 1.x, few steps
    processing.calls.clear()
    host.sweep(tmp_path / "my_style.safetensors", "a cat", "", [1.0], seed=7, steps=5, size=320)
    assert [(p.width, p.height, p.steps) for p in processing.calls] == [(320, 320, 5)]
    webui.is_sdxl = True
    try:
        assert host.native_image_size() == 1024
    finally:
        webui.is_sdxl = False
    shared.sd_model = None  # the UI is built before the WebUI has loaded a model
    assert host.native_image_size() == 512
    shared.sd_model = webui
    status = TrainingSession.start(host, make_cfg(tmp_path, max_train_steps=1)).wait(120)
    assert status.state == "done", status.message
    processing.calls.clear()
    host.sweep(status.published, "a cat", "", [1.0], seed=7)
    assert processing.calls[0].width == 64  # after a training: its resolution


def test_send_to_txt2img_is_off_until_a_lora_exists(webui, tmp_path):
    pytest.importorskip("gradio")
    from lora_trainer.ui import tab

    blocks = tab.create_tab(WebUIHost())
    send, prompt_box = blocks.lora_trainer_send
    assert send.interactive is False and send.visible is not False and prompt_box.value in ("", None)
    text, button, _ = tab.send_update("", "a cat")
    assert text == "" and button["interactive"] is False  # never the placeholder <lora:my_lora:0.7>


def test_script_registers_the_tab_and_settings(webui):
    pytest.importorskip("gradio")
    from modules import infotext_utils

    script_callbacks.ui_tabs.clear()
    script_callbacks.ui_settings.clear()
    runpy.run_path(str(ROOT / "scripts" / "lora_trainer_tab.py"))
    [tabs_cb], [settings_cb] = script_callbacks.ui_tabs, script_callbacks.ui_settings
    [(blocks, title, elem_id)] = tabs_cb()
    assert title == "Train LoRA" and elem_id == "lora_trainer"
    binding = infotext_utils.registered_param_bindings[-1]
    assert binding.tabname == "txt2img" and binding.source_text_component is not None
    settings_cb()
    opts = shared.opts.data_labels
    assert opts["lora_trainer_lora_rank"].section == ("lora_trainer", "LoRA Trainer")
    # the WebUI's Settings page (ui_settings.create_setting_component) builds str/int/bool by itself only
    assert all(info.component is not None or type(info.default) in (str, int, bool) for info in opts.values())
    assert WebUIHost().defaults()["lora_rank"] == 8


def test_install_py_installs_only_what_is_missing_too_old_or_unusable(monkeypatch):
    import importlib.metadata

    versions = {"peft": "0.13.2", "diffusers": "0.30.3"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])

    def install(installed, broken=()):
        launch.installed, launch.broken = set(installed), set(broken)
        launch.pip_calls.clear()
        runpy.run_path(str(ROOT / "install.py"))
        return launch.pip_calls

    host = {"torch", "transformers", "gradio", "huggingface_hub"}
    assert install(host | {"peft"}) == ["install --no-deps diffusers==0.30.3"]  # missing
    assert install(host | {"peft", "diffusers"}) == []  # all there, and they import: nothing touched
    versions["peft"] = "0.12.0"  # older than we are tested with
    assert install(host | {"peft", "diffusers"}) == ["install --no-deps peft==0.13.2"]
    versions["peft"] = "0.17.1"  # newer, and it imports with the host's transformers (Forge, say): kept
    assert install(host | {"peft", "diffusers"}) == []
    # newer, and it does not import with the host's transformers (A1111 v1.10's 4.30.2): the pin replaces it
    assert install(host | {"peft", "diffusers"}, broken={"peft"}) == ["install --no-deps peft==0.13.2"]
    assert any("inject_adapter_in_model" in p for p in launch.probes)
    launch.broken = set()


def test_webui_interrogators_caption_under_the_queue_lock(webui):
    from modules import call_queue, deepbooru
    from PIL import Image

    from lora_trainer.errors import LoraTrainerError
    from lora_trainer.webui.captioners import WebUIInterrogator

    images = [Image.new("RGBA", (40, 30)), Image.new("L", (20, 20))]
    shared.interrogator.calls.clear()
    assert WebUIInterrogator("webui-blip").caption(images) == [
        "a red circle on a white background, RGB", "a red circle on a white background, RGB"]
    assert shared.interrogator.calls == [("RGB", (40, 30)), ("RGB", (20, 20))]  # the WebUI gets RGB, as its button
    deepbooru.model.calls.clear()
    # the WebUI escapes (vocaloid) for its prompts; a caption holds the text as written
    assert WebUIInterrogator("webui-deepbooru").caption(images) == [
        "1girl, hatsune miku (vocaloid), 40px", "1girl, hatsune miku (vocaloid), 20px"]
    assert deepbooru.model.calls[0] == "start" and deepbooru.model.calls[-1] == "stop"
    assert all(c[2] is True for c in deepbooru.model.calls[1:-1])  # no (tag:0.9) ranks inside captions
    shared.opts.data["deepbooru_escape"] = False
    try:  # with the WebUI's escaping off, nothing to undo
        assert WebUIInterrogator("webui-deepbooru").caption(images[:1]) == ["1girl, hatsune miku (vocaloid), 40px"]
    finally:
        shared.opts.data["deepbooru_escape"] = True

    call_queue.queue_lock.acquire()  # generation in progress: the interrogator waits for the WebUI's queue
    try:
        import threading

        done = []
        worker = threading.Thread(target=lambda: done.append(WebUIInterrogator("webui-blip").caption(images[:1])))
        worker.start()
        worker.join(0.3)
        assert not done
    finally:
        call_queue.queue_lock.release()
    worker.join(5)
    assert done

    shared.interrogator.fail = True
    try:
        with pytest.raises(LoraTrainerError, match="BLIP interrogator failed"):
            WebUIInterrogator("webui-blip").caption(images[:1])
    finally:
        shared.interrogator.fail = False
    with pytest.raises(LoraTrainerError, match="webui-blip"):
        WebUIInterrogator("blip")


def test_the_tab_offers_the_webui_interrogators_first(webui):
    from lora_trainer.webui.captioners import QueueLocked, WebUIInterrogator

    host = WebUIHost()
    assert list(host.captioners())[:2] == ["webui-blip", "webui-deepbooru"]
    assert {"blip", "clip-tags"} <= set(host.captioners())
    assert isinstance(host.make_captioner("webui-deepbooru", None, False), WebUIInterrogator)

    class Inner:
        name = "inner"

        def caption(self, images):
            from modules import call_queue

            assert call_queue.queue_lock.locked()  # ours run under the WebUI's queue too
            return ["x"] * len(images)

    assert QueueLocked(Inner()).caption([1, 2]) == ["x", "x"]


def test_the_memory_estimate_takes_the_loaded_models_family_and_counts_its_weights_as_free(webui, tmp_path):
    """Before Train: the loaded model's family (its diffusers shapes stand in for A1111's modules), on the WebUI's
    device, with the model's own bytes there counted as free (training uses them in place)."""
    from lora_trainer.engine.preflight import module_bytes
    from lora_trainer.ui.estimate import estimate_message

    host = WebUIHost()
    where = host.preflight_where(make_cfg(tmp_path))
    assert where.family == "sd_v1" and where.base_model is None and where.device == torch.device("cpu")
    assert where.resident == module_bytes([webui]) > 0
    text, kind = estimate_message(host, make_cfg(tmp_path, resolution=64, batch_size=1))
    assert text.startswith("Estimate: peak ~") and kind in ("ok", "error")
    assert "unet 1.6 GB" in text or "unet 3.2 GB" in text  # SD 1.5's UNet (fp16 or fp32), not the stand-in's


def test_merge_into_checkpoint_writes_a_new_checkpoint_of_the_loaded_file_and_refreshes_the_list(webui, tmp_path):
    from modules import sd_models
    from safetensors.torch import load_file
    from test_merge import lora_file, tiny_checkpoint

    from lora_trainer.export.merge import merge_into_checkpoint
    from lora_trainer.ui import tab

    _, lora = lora_file(tmp_path, "style", ldm_names=True)
    host, before = WebUIHost(), sd_models.refreshes
    message = tab.merge_checkpoint(host, str(lora), 0.7)
    assert "no checkpoint file is loaded" in message and "lora_trainer_error" in message
    models = Path(sd_models.model_path)
    models.mkdir(parents=True)
    pickle = models / "old.ckpt"
    pickle.write_bytes(b"not read")
    webui.sd_checkpoint_info = types.SimpleNamespace(filename=str(pickle))
    assert "is a .ckpt file" in tab.merge_checkpoint(host, str(lora), 0.7)
    base = tiny_checkpoint(models / "base.safetensors")
    webui.sd_checkpoint_info = types.SimpleNamespace(filename=str(base))
    assert "'Merge weight': 0 must be" in tab.merge_checkpoint(host, str(lora), 0)
    assert "Train a LoRA first" in tab.merge_checkpoint(host, "", 1)
    assert sd_models.refreshes == before
    message = tab.merge_checkpoint(host, str(lora), 0.7)
    written = models / "base-style-0.7.safetensors"
    assert str(written) in message and "lora_trainer_error" not in message and sd_models.refreshes == before + 1
    want = load_file(merge_into_checkpoint(base, [(str(lora), 0.7)], tmp_path / "want.safetensors"))
    got = load_file(written)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tab.merge_checkpoint(host, str(lora), 0.7)  # again: a new name, the first file kept
    assert (models / "base-style-0.7_1.safetensors").is_file() and load_file(written).keys() == want.keys()
