# The WebUI's entry point: the "Train LoRA" tab and its settings. Everything else is in lora_trainer/.
from modules import script_callbacks

from lora_trainer.webui.tab import on_ui_settings, on_ui_tabs

script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
