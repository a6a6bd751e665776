"""Run by the WebUI when it starts: install only what lora-trainer needs and the WebUI lacks or cannot use.

For each package: missing, or older than the minimum this extension is tested with → the pinned release is
installed; present but it does not import together with the host's own libraries (too new for the WebUI's
transformers: peft >= 0.14 and diffusers >= 0.31 with AUTOMATIC1111 v1.10's transformers 4.30.2) → the pinned
release replaces it. The pins are the last releases that import with A1111 v1.10. Everything is installed
with --no-deps, so pip never upgrades the host's torch, transformers, huggingface_hub or gradio. Nothing is
installed when everything is already fine.

A package the WebUI pins itself (its ``requirements_versions.txt``, read from the WebUI folder the installer runs
in: Forge pins peft 0.13.2 and diffusers 0.31.0, A1111 v1.10 neither) is the host's: missing, the host's pin is
installed; present, it is never replaced (the WebUI's launcher keeps its own pins), only reported if unusable.
"""

import importlib.metadata
import re
from pathlib import Path

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


def host_pins(path: str = "requirements_versions.txt") -> dict[str, str]:
    """The WebUI's own ``name==version`` pins (lower-case names); none where the file is not there."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    pins = {}
    for line in lines:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def to_install(needed=NEEDED, pins=None) -> list[tuple[str, str]]:
    """(requirement, why) for each package that has to be (re)installed."""
    pins = host_pins() if pins is None else pins
    out = []
    for name, (minimum, pin, probe) in needed.items():
        have = installed_version(name) if launch.is_installed(name) else None
        if name in pins:  # the WebUI's own pin: installed if missing, never replaced
            if have is None:
                out.append((f"{name}=={pins[name]}", "missing (the WebUI's own pin)"))
            elif not launch.check_run_python(probe):
                print(f"lora-trainer: {name} {have} (the WebUI pins {pins[name]}) does not import with this WebUI's "
                      f"libraries; training will fail until the WebUI's own requirements are installed again")
            continue
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
