"""Session-wide real models: the bundled default and tiny random Llama-family folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_factory import default_model_dir, make_tiny_model


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_llama31_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama31", tmp_path_factory.mktemp("tiny-llama31"))


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_mistral_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("mistral", tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def tiny_llama_tied_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama_tied", tmp_path_factory.mktemp("tiny-llama-tied"))
