"""Shared test set-up: a private cache for the tiny model, and no network."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _tiny_model_cache(tmp_path_factory):
    """Build the tiny model once per test session, in a temp folder unless LORA_TRAINER_CACHE is set."""
    if "LORA_TRAINER_CACHE" not in os.environ:
        os.environ["LORA_TRAINER_CACHE"] = str(tmp_path_factory.mktemp("lora_trainer_cache"))
    yield
