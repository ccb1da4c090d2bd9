"""The tiny base model the adapter-format tests build adapters against."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.model.config import ModelConfig, load_model_config
from tests.adapter_factory import make_tiny_llama


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (tests.adapter_factory.make_tiny_llama); tests only read it."""
    return make_tiny_llama(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def model_config(base_dir: Path) -> ModelConfig:
    return load_model_config(base_dir)
