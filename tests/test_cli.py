"""The `loraplex` command as a user runs it: a subprocess against real servers."""

from __future__ import annotations

import os
import subprocess
import sys

from engine.config import EngineConfig
from tests.engine_server import running_engine

LORAPLEX = [sys.executable, "-m", "loraplex.cli"]


def test_generate_streams_to_the_terminal(tiny_llama31_path):
    config = EngineConfig(model_path=tiny_llama31_path, port=0, kv_cache_tokens=1024)
    with running_engine(config) as running:
        done = subprocess.run(
            [
                *LORAPLEX,
                "generate",
                "--target",
                f"127.0.0.1:{running.port}",
                "--max-new-tokens",
                "5",
                "--chat",
                "Hello there",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        unknown = subprocess.run(
            [
                *LORAPLEX,
                "generate",
                "--target",
                f"127.0.0.1:{running.port}",
                "--adapter",
                "nobody/nothing",
                "Hello",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "prompt +" in done.stderr and "5 completion tokens" in done.stderr
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_up_is_imported_without_the_cli():
    """`loraplex.cli` imports `loraplex.up` to add its command, never the other way round."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys, loraplex.up; print('loraplex.cli' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_engine_refuses_a_malformed_model_folder_with_a_sentence(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    done = subprocess.run(
        [*LORAPLEX, "engine", "serve", "--model", str(tmp_path), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "GPT2LMHeadModel" in done.stderr and "not supported" in done.stderr


def test_engine_on_a_taken_port_says_so(tiny_llama31_path):
    config = EngineConfig(model_path=tiny_llama31_path, port=0, kv_cache_tokens=1024)
    with running_engine(config) as running:
        done = subprocess.run(
            [
                *LORAPLEX,
                "engine",
                "serve",
                "--model",
                str(tiny_llama31_path),
                "--device",
                "cpu",
                "--kv-cache-tokens",
                "1024",
                "--port",
                str(running.port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert "error: Failed to bind" in done.stderr and "Traceback" not in done.stderr


def test_engine_kernels_are_cached_beside_the_models(tmp_path, monkeypatch):
    """A restarted engine whose models cache survives (a volume) finds its Triton
    kernels compiled there; an explicit TRITON_CACHE_DIR wins; a models cache that
    cannot be written leaves Triton's default alone."""
    from loraplex.cli import use_kernel_cache

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    use_kernel_cache(tmp_path / "models")
    cache = tmp_path / "models" / ".triton-cache"
    assert os.environ["TRITON_CACHE_DIR"] == str(cache) and cache.is_dir()

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    use_kernel_cache(tmp_path / "models")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    use_kernel_cache(blocked)
    assert "TRITON_CACHE_DIR" not in os.environ
