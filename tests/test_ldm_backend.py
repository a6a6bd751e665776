"""The LDM backend on a real (tiny) CompVis UNet: what the WebUI tab trains in place."""

from __future__ import annotations

import re

import pytest
import torch
from ldm_model import TinyLatentDiffusion

from lora_trainer.config import config_from_dict
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.lora import remove_lora
from lora_trainer.engine.trainer import train
from lora_trainer.export.kohya import read_kohya_lora
from lora_trainer.models.ldm import LdmBackend

TARGETS = {"to_q", "to_k", "to_v", "to_out.0"}


def webui_layer_names(sd_model) -> dict:
    """As A1111's Lora extension names layers (networks.assign_network_names_to_compvis_modules, SD 1.x)."""
    names = {}
    for n, m in sd_model.cond_stage_model.wrapped.named_modules():
        if n.startswith("transformer.") and not n.startswith("transformer.text_model"):
            n = "transformer.text_model." + n[len("transformer."):]  # A1111's transformers 4.30 has this level
        names[n.replace(".", "_")] = m
    names.update({n.replace(".", "_"): m for n, m in sd_model.model.named_modules()})
    return names


def webui_lookup(kohya_name: str) -> str:
    """As A1111's networks.load_network finds the layer of a key written with LDM / HF CLIP names."""
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", kohya_name)
    if m:
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return kohya_name.replace("lora_unet", "diffusion_model")


@pytest.fixture
def setup(tmp_path):
    sd_model = TinyLatentDiffusion()
    backend = LdmBackend(sd_model, "tiny-ldm", torch.device("cpu"), torch.float32)
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    return sd_model, backend, data


def make_cfg(data, out, **training):
    t = {"max_train_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
         "lora_rank": 4, "lora_alpha": 4, "lora_dropout": 0.0, "save_steps": 0}
    t.update(training)
    return config_from_dict({"train_data_dir": str(data), "resolution": 64, "output_dir": str(out),
                             "output_name": "ldm_lora", "save_precision": "fp32", "log_with": "none", **t})


def fixed_outputs(sd_model):
    torch.manual_seed(5)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([20, 600])
    with torch.no_grad():
        cond = sd_model.get_learned_conditioning(["a red circle", "demo style"])
        return cond, sd_model.apply_model(x, t, cond)


def test_train_in_place_touches_only_lora_and_removes_cleanly(setup, tmp_path):
    sd_model, backend, data = setup
    before_params = {k: v.clone() for k, v in sd_model.state_dict().items()}
    before_cond, before_out = fixed_outputs(sd_model)

    result = train(make_cfg(data, tmp_path / "out", train_text_encoder=True), backend=backend, progress=False)
    assert result.status == "finished" and result.steps == 3

    unet = sd_model.model.diffusion_model
    lora_layers = {n for n, m in unet.named_modules() if hasattr(m, "lora_A")}
    expected = {n for n, _ in unet.named_modules() if any(n.endswith("." + t) for t in TARGETS)}
    expected = {n for n in expected if not n.endswith((".base_layer",)) and ".lora_" not in n}
    assert lora_layers == expected and lora_layers, "LoRA went into other layers than the targets"
    # a training step changed LoRA weights only: every base weight is bitwise what it was
    after = sd_model.state_dict()
    base_keys = {k for k in after if "lora_" not in k}
    renamed = {k.replace(".base_layer", ""): k for k in base_keys}
    assert set(renamed) == set(before_params)
    assert all(torch.equal(after[renamed[k]], v) for k, v in before_params.items())
    assert any(after[k].abs().sum() > 0 for k in after if "lora_B" in k), "LoRA did not train"

    # taking the adapters out gives back the model's exact outputs
    assert remove_lora(unet) == len(lora_layers)
    assert remove_lora(backend.text_encoder) > 0
    ours = [m for m in unet.modules() if "_lora_trainer_attention" in m.__dict__]
    assert len(ours) == 14 and {m._lora_trainer_attention for m in ours} == {"sdpa"}  # training.attention: auto
    cond, out = fixed_outputs(sd_model)  # with the training's attention kernel still in: the same, to rounding
    assert torch.equal(cond, before_cond) and torch.allclose(out, before_out, atol=1e-5)
    backend.restore_attention()
    cond, out = fixed_outputs(sd_model)
    assert torch.equal(cond, before_cond) and torch.equal(out, before_out)
    assert set(sd_model.state_dict()) == set(before_params)


def test_kohya_keys_map_onto_the_webui_layers_and_reproduce_the_lora(setup, tmp_path):
    sd_model, backend, data = setup
    result = train(make_cfg(data, tmp_path / "out", train_text_encoder=True), backend=backend, progress=False)
    cond_lora, out_lora = fixed_outputs(sd_model)  # with the trained peft adapters in place

    tensors, meta = read_kohya_lora(result.lora_path)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_name"] == "tiny-ldm"
    names = {k.split(".")[0] for k in tensors}
    assert any(n.startswith("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q") for n in names)
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in names)

    remove_lora(sd_model.model.diffusion_model)
    remove_lora(backend.text_encoder)
    layers = webui_layer_names(sd_model)
    missing = [n for n in names if webui_lookup(n) not in layers]
    assert not missing, missing[:3]
    with torch.no_grad():  # apply the file as the WebUI does: W += up @ down * alpha / rank
        for n in names:
            down, up = tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"]
            layers[webui_lookup(n)].weight += up @ down * (tensors[f"{n}.alpha"].item() / down.shape[0])
    cond, out = fixed_outputs(sd_model)
    torch.testing.assert_close(cond, cond_lora, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, out_lora, atol=1e-5, rtol=1e-4)


def test_noise_schedule_and_prediction_type_come_from_the_model(setup):
    sd_model, backend, _ = setup
    assert torch.allclose(backend.noise_scheduler.betas, sd_model.betas.float())
    assert backend.prediction_type == "epsilon" and backend.family == "sd_v1"
    sd_model.parameterization = "v"
    assert LdmBackend(sd_model, "m", torch.device("cpu"), torch.float32).prediction_type == "v_prediction"


def test_latent_cache_on_disk_with_the_webui_model(setup, tmp_path, caplog):
    sd_model, backend, data = setup
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = backend.encode_image_dist(x)
    posterior = sd_model.encode_first_stage(x)
    assert torch.allclose(mean, posterior.mean) and torch.allclose(std, posterior.std) and (std > 0).all()
    assert backend.latent_scale == sd_model.scale_factor

    out = tmp_path / "out"
    train(make_cfg(data, out, cache_latents_to_disk=True), backend=backend, progress=False)
    remove_lora(sd_model.model.diffusion_model)
    assert len(list((out / "latent_cache").glob("*.safetensors"))) == 4
    with caplog.at_level("INFO", logger="lora_trainer"):
        again = train(make_cfg(data, out, cache_latents_to_disk=True), backend=backend, progress=False)
    assert again.status == "finished" and "4 loaded from" in caplog.text and "0 encoded" in caplog.text


def test_an_encoder_that_returns_the_latent_itself(setup, monkeypatch):
    sd_model, backend, _ = setup
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    expected = sd_model.encode_first_stage(x).mean
    monkeypatch.setattr(sd_model, "encode_first_stage", lambda pixels: sd_model.first_stage_model.encode(pixels)
                        .latent_dist.mean)
    mean, std = backend.encode_image_dist(x)
    assert torch.allclose(mean, expected) and torch.count_nonzero(std) == 0


def test_compile_unet_trains_through_the_compiled_forward_and_leaves_the_webui_calls_eager(setup, tmp_path,
                                                                                         monkeypatch):
    sd_model, backend, data = setup
    unet = sd_model.model.diffusion_model
    compiled_calls = []

    def fake_compile(fn, mode="default"):  # the real one: test_compiled_training_matches_eager_training
        def compiled(*args, **kwargs):
            compiled_calls.append(mode)
            return fn(*args, **kwargs)
        return compiled

    def other_extensions_forward(*args, **kwargs):  # as ControlNet sets one on the UNet instance
        return type(unet).forward(unet, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    unet.forward = other_extensions_forward
    result = train(make_cfg(data, tmp_path / "out", compile_unet=True), backend=backend, progress=False)
    assert result.steps == 3 and compiled_calls == ["default"] * 3  # one UNet call a step, each compiled
    assert vars(unet)["forward"] is other_extensions_forward  # back after every step
    fixed_outputs(sd_model)  # the WebUI's own calls (generation, samples) are not compiled
    assert len(compiled_calls) == 3


def test_compiled_training_matches_eager_training(tmp_path):
    from safetensors.torch import load_file

    from lora_trainer.errors import ConfigError
    from lora_trainer.models.compiling import check_compile

    try:
        check_compile("cpu")
    except ConfigError as err:
        pytest.skip(str(err))
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    weights, losses = {}, {}
    from torch._dynamo.utils import counters

    for compiled in (False, True):  # real torch.compile of the LDM UNet with our attention: ~1 min on 2 cores
        counters.clear()
        backend = LdmBackend(TinyLatentDiffusion(), "tiny-ldm", torch.device("cpu"), torch.float32)
        result = train(make_cfg(data, tmp_path / f"out-{compiled}", max_train_steps=2, compile_unet=compiled),
                       backend=backend, progress=False)
        assert result.steps == 2 and "forward" not in vars(backend.unet)
        assert bool(counters["stats"]["unique_graphs"]) == compiled  # dynamo built graphs only when asked
        weights[compiled] = load_file(result.lora_path)
        losses[compiled] = (result.first_loss, result.final_loss)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)  # measured: 1e-7
    assert weights[True].keys() == weights[False].keys()
    for key, eager in weights[False].items():
        assert (weights[True][key] - eager).norm() <= 1e-3 * eager.norm(), key


def test_compiled_runs_in_one_webui_session_each_compile_and_free_their_layers(setup, tmp_path, monkeypatch):
    import gc
    import weakref

    import torch._dynamo
    from torch._dynamo.utils import counters

    sd_model, _, data = setup
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode="default": real_compile(fn, backend="eager"))  # tracing only
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    old_layers = []
    with torch._dynamo.config.patch(**{limit: 2}):  # dynamo's limit of graphs per code object (8), made small
        for run, rank in enumerate((2, 3, 4)):  # three runs in one session (the WebUI's), each with new LoRA layers
            counters.clear()
            backend = LdmBackend(sd_model, "tiny-ldm", torch.device("cpu"), torch.float32)
            train(make_cfg(data, tmp_path / f"run{run}", max_train_steps=1, lora_rank=rank, compile_unet=True),
                  backend=backend, progress=False)
            assert counters["stats"]["unique_graphs"] == 1, f"run {run} trained uncompiled"
            old_layers += [weakref.ref(m) for m in backend.unet.modules() if hasattr(m, "lora_A")]
            remove_lora(backend.unet)
            backend.restore_attention()
            del backend
            gc.collect()
            assert not any(ref() for ref in old_layers), "compiled graphs hold the LoRA layers of a finished run"


def test_conv_rank_trains_the_webui_models_resblocks_and_the_file_reproduces_it(setup, tmp_path):
    """training.conv_rank (kohya's conv_dim) on the CompVis UNet: its ResBlocks' and samplers' 3x3 convolutions at
    their own rank and alpha (in_layers.2, out_layers.3, op, conv), emb_layers.1 and the 1x1 skips at lora_rank; the
    file applied the WebUI's way (W += up·down·alpha/rank, a 1x1 up after a 3x3 down) gives the trained model."""
    sd_model, backend, data = setup
    result = train(make_cfg(data, tmp_path / "out", conv_rank=2, conv_alpha=1.0), backend=backend, progress=False)
    cond_lora, out_lora = fixed_outputs(sd_model)
    tensors, meta = read_kohya_lora(result.lora_path)
    names = {k.split(".")[0] for k in tensors}
    conv = "lora_unet_input_blocks_1_0_in_layers_2"
    assert tensors[f"{conv}.lora_down.weight"].shape[0] == 2 and tensors[f"{conv}.lora_down.weight"].ndim == 4
    assert float(tensors[f"{conv}.alpha"]) == 1.0
    assert float(tensors["lora_unet_input_blocks_1_0_emb_layers_1.alpha"]) == 4.0  # (lora_alpha)
    assert any(n.endswith("_op") for n in names) and any(n.endswith("_skip_connection") for n in names)
    assert float(tensors[f"{conv}.lora_up.weight"].abs().sum()) > 0, "the convolutions' LoRA did not train"

    remove_lora(sd_model.model.diffusion_model)
    layers = webui_layer_names(sd_model)
    with torch.no_grad():
        for n in names:
            down, up = tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"]
            weight = layers[webui_lookup(n)].weight
            weight += (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (
                tensors[f"{n}.alpha"].item() / down.shape[0])
    _, out = fixed_outputs(sd_model)
    torch.testing.assert_close(out, out_lora, atol=1e-5, rtol=1e-4)
