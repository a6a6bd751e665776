"""Run by the WebUI when it starts: install only what lora-trainer needs and the WebUI lacks.

Pinned to the last releases that import with AUTOMATIC1111 v1.10's transformers 4.30.2 (newer peft and
diffusers do not), and installed with --no-deps so that pip never upgrades the host's torch,
transformers, huggingface_hub or gradio. Nothing is installed when everything is already there.
"""

import launch

# package → requirement (import name = package name for these)
NEEDED = {
    "peft": "peft==0.13.2",
    "diffusers": "diffusers==0.30.3",
}
# what the host provides and we must never touch
HOST_OWNED = ("torch", "transformers", "huggingface_hub", "gradio")


def missing(needed=NEEDED):
    return [req for name, req in needed.items() if not launch.is_installed(name)]


def main():
    for req in missing():
        assert not req.startswith(HOST_OWNED), req
        launch.run_pip(f"install --no-deps {req}", f"{req} for lora-trainer")


main()
