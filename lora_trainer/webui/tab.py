"""The WebUI's tab and settings: what ``scripts/lora_trainer_tab.py`` registers."""

from __future__ import annotations

from lora_trainer.config import default_value
from lora_trainer.webui.host import OPTIONS, SECTION, WebUIHost


def make_host() -> WebUIHost:
    """The host for the WebUI this runs in: Forge's (its own model backend) or AUTOMATIC1111's."""
    from lora_trainer.webui.forge_host import ForgeHost, is_forge

    return ForgeHost() if is_forge() else WebUIHost()


def on_ui_tabs():
    from lora_trainer.ui.tab import create_tab

    blocks = create_tab(make_host())
    _bind_send_to_txt2img(*blocks.lora_trainer_send)
    return [(blocks, "Train LoRA", "lora_trainer")]


def _bind_send_to_txt2img(button, prompt_box) -> None:
    """The WebUI's own "send to txt2img" mechanism (as its PNG Info tab uses)."""
    try:
        from modules import infotext_utils as paste
    except ImportError:  # before v1.8 the module had another name
        from modules import generation_parameters_copypaste as paste
    paste.register_paste_params_button(paste.ParamBinding(paste_button=button, tabname="txt2img",
                                                          source_text_component=prompt_box))


def on_ui_settings():
    import gradio as gr
    from modules import shared

    for opt, (key, label) in OPTIONS.items():
        default = default_value(key)
        # the Settings page makes widgets for str, int and bool by itself; a float needs its component named
        component = gr.Number if isinstance(default, float) else None
        shared.opts.add_option(opt, shared.OptionInfo(default, label, component=component, section=SECTION))
