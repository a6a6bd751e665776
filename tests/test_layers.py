"""The shape of the code, checked: imports point one way (webui → ui → engine/data/export/models → config), and no
function in the package is longer than a screen. Static (ast): nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_trainer"
MAX_FUNCTION_LINES = 80
# package part → module prefixes it must never import (the WebUI's own modules are `modules.*`, Forge's also
# `backend.*` and `modules_forge.*`)
FORBIDDEN = {
    "config.py": ("gradio", "modules", "lora_trainer.ui", "lora_trainer.webui", "lora_trainer.engine",
                  "lora_trainer.models", "lora_trainer.data", "lora_trainer.export"),
    "engine": ("gradio", "modules", "lora_trainer.ui", "lora_trainer.webui"),
    "data": ("gradio", "modules", "lora_trainer.ui", "lora_trainer.webui", "lora_trainer.engine"),
    "models": ("gradio", "modules", "lora_trainer.ui", "lora_trainer.webui", "lora_trainer.engine"),
    "export": ("gradio", "modules", "lora_trainer.ui", "lora_trainer.webui", "lora_trainer.engine"),
    "utils": ("gradio", "modules", "lora_trainer.ui", "lora_trainer.webui", "lora_trainer.engine"),
    "ui": ("modules", "lora_trainer.webui"),
    "llm": ("gradio", "modules", "lora_trainer.ui", "lora_trainer.webui", "lora_trainer.models", "lora_trainer.data",
            "lora_trainer.export", "diffusers"),  # (a language model's LoRA needs none of the image side)
    # the parts of the UI that anything may use without gradio (a test, an HTTP API)
    **{f"ui/{name}.py": ("gradio", "modules", "lora_trainer.webui")
       for name in ("host", "run_config", "session", "views")},
}
# Forge's own packages (its model code and its additions to `modules`): only lora_trainer/webui/ may import them too
FORBIDDEN = {part: (*bad, "backend", "modules_forge") for part, bad in FORBIDDEN.items()}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def files_of(part: str) -> list[Path]:
    target = PACKAGE / part
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_point_one_way(part):
    wrong = [f"{path.relative_to(PACKAGE.parent)} imports {name}"
             for path in files_of(part) for name in sorted(imports(path))
             if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[part])]
    assert wrong == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import os\n\ndef f():\n    from modules import shared\n    import gradio as gr\n")
    assert imports(sample) == {"os", "modules", "gradio"}


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_the_tabs_fields_are_the_configs_own():
    """Every advanced field of the tab is a config key, its default the config's, its choices the config's."""
    from lora_trainer.config import CHOICES, FIELD_SECTION, Config
    from lora_trainer.ui.run_config import ADVANCED, PRESETS, ZERO_IS_NONE, field_default

    defaults = Config()
    for key, _label, kind, extra in ADVANCED:
        assert key in FIELD_SECTION, key
        section = getattr(defaults, FIELD_SECTION[key])
        expected = getattr(section, key)
        if expected is None and key in ZERO_IS_NONE:  # (off: 0 in a number field, empty in a text one)
            expected = "" if kind == "text" else 0
        elif isinstance(expected, dict):  # (optimizer arguments: name=value text, none by default)
            expected = " ".join(f"{k}={v!r}" for k, v in expected.items())
        elif key == "resume_from_checkpoint":  # (a checkbox: "latest" or none)
            expected = expected is not None
        assert field_default(key, defaults) == expected, key
        if kind == "choice":
            assert extra == list(CHOICES[key]), key
    assert all(k in FIELD_SECTION for preset in PRESETS.values() for k in preset)
