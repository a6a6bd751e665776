"""modules/options.py (v1.10.1): OptionInfo(default, label, ..., section=...), Options.add_option."""


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.section, self.component = default, label, section, component


class Options:
    def __init__(self):
        self.data_labels = {}
        self.data = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        data = self.__dict__.get("data", {})
        if item in data:
            return data[item]
        raise AttributeError(item)
