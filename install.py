"""Run by the WebUI when it starts: install only what lora-trainer needs and the WebUI lacks or cannot use.

For each package: missing, or older than the minimum this extension is tested with → the pinned release is
installed; present but it does not import together with the host's own libraries (too new for the WebUI's
transformers: peft >= 0.14 and diffusers >= 0.31 with AUTOMATIC1111 v1.10's transformers 4.30.2) → the pinned
release replaces it. The pins are the last releases that import with A1111 v1.10. Everything is installed
with --no-deps, so pip never upgrades the host's torch, transformers, huggingface_hub or gradio. Nothing is
installed when everything is already fine.
"""

import importlib.metadata
import re

import launch

# package → (minimum version, the release to install, the import that must work in the host)
NEEDED = {
    "peft": ("0.13.2", "peft==0.13.2", "import peft; from peft import LoraConfig, inject_adapter_in_model"),
    "diffusers": ("0.30.3", "diffusers==0.30.3",
                  "import diffusers; from diffusers import DDPMScheduler; import diffusers.training_utils"),
}
# what the host provides and we must never touch
HOST_OWNED = ("torch", "transformers", "huggingface_hub", "gradio")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def to_install(needed=NEEDED) -> list[tuple[str, str]]:
    """(requirement, why) for each package that has to be (re)installed."""
    out = []
    for name, (minimum, pin, probe) in needed.items():
        have = installed_version(name) if launch.is_installed(name) else None
        if have is None:
            out.append((pin, "missing"))
        elif _version(have) < _version(minimum):
            out.append((pin, f"{name} {have} is older than {minimum}"))
        elif not launch.check_run_python(probe):
            out.append((pin, f"{name} {have} does not import with this WebUI's libraries (too new for its "
                             f"transformers?)"))
    return out


def main():
    for req, why in to_install():
        assert not req.startswith(HOST_OWNED), req
        print(f"lora-trainer: installing {req} ({why})")
        launch.run_pip(f"install --no-deps {req}", f"{req} for lora-trainer")


main()
