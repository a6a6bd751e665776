"""modules/infotext_utils.py (v1.10.1): ParamBinding, register_paste_params_button."""
registered_param_bindings = []


class ParamBinding:
    def __init__(self, paste_button, tabname, source_text_component=None, source_image_component=None,
                 source_tabname=None, override_settings_component=None, paste_field_names=None):
        self.paste_button, self.tabname, self.source_text_component = paste_button, tabname, source_text_component


def register_paste_params_button(binding):
    registered_param_bindings.append(binding)
