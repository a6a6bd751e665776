"""modules/script_callbacks.py (v1.10.1): on_ui_tabs(callback, *, name=None), on_ui_settings(...)."""
ui_tabs, ui_settings = [], []


def on_ui_tabs(callback, *, name=None):
    ui_tabs.append(callback)


def on_ui_settings(callback, *, name=None):
    ui_settings.append(callback)
