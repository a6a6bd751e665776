"""A random-weight SD 2.x 768-v checkpoint with the real LDM key names (A1111's pinned Stability-AI code and its
configs/stable-diffusion/v2-inference-v.yaml; OpenCLIP ViT-H built without weights, nothing downloaded), fp16.
As make_random_sd15.py: LDM's zero-initialised output layers re-randomised, the text encoder's LayerNorms
randomised; output_blocks.11.1.transformer_blocks.0.norm1.bias given std 0.2 so that model detectors (ComfyUI's,
Forge's huggingface_guess: std > 0.09) take it for v-prediction, as a real SD 2.1 768-v.
Run with the A1111 venv: python make_random_sd2.py A1111_WEBUI_DIR OUT.safetensors [seed]"""
import os
import sys

import torch


def main(webui, out, seed=1234):
    sys.path.insert(0, os.path.join(webui, "repositories", "stable-diffusion-stability-ai"))
    import ldm.modules.encoders.modules as enc
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    real = enc.open_clip.create_model_and_transforms
    enc.open_clip.create_model_and_transforms = lambda arch, device=None, pretrained=None: real(arch, device=device)
    torch.manual_seed(seed)
    cfg = OmegaConf.load(os.path.join(webui, "repositories", "stable-diffusion-stability-ai", "configs",
                                      "stable-diffusion", "v2-inference-v.yaml"))
    cfg.model.params.unet_config.params.use_checkpoint = False
    model = instantiate_from_config(cfg.model)
    for name, mod in model.model.diffusion_model.named_modules():
        if name == "out.2" or name.endswith("out_layers.3") or name.endswith("proj_out"):
            mod.reset_parameters()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.cond_stage_model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
        bias = model.model.diffusion_model.output_blocks[11][1].transformer_blocks[0].norm1.bias
        bias.copy_(0.2 * torch.randn(bias.shape, generator=gen))
    sd = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, out, metadata={"harness_generator": "make_random_sd2 v1"})
    print(f"{out}: {len(sd)} keys")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1234)
