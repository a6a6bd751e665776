"""The project's error types: each message names the file, key or value and what is allowed."""


class LoraTrainerError(Exception):
    """Base class: an error the user can fix; the CLI prints its message without a traceback."""


class ConfigError(LoraTrainerError, ValueError):
    """A bad config file, key or value."""


class DatasetError(LoraTrainerError):
    """A dataset that cannot be trained on (for example: no usable images)."""


class ModelLoadError(LoraTrainerError):
    """A base model that cannot be found or loaded."""
