"""An adapter load runs its torch CPU ops on its own thread, and no other thread's
intra-op thread count changes because of it (a CPU model keeps all its threads)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from engine.cpu_threads import this_thread_only
from engine.lora import peft_format
from engine.model.config import ModelConfig
from tests.adapter_factory import write_random_adapter

pytestmark = pytest.mark.skipif(
    torch.get_num_threads() < 2, reason="needs torch to run CPU ops on 2 or more threads"
)


def on_new_thread(fn):
    """fn()'s result, run on a thread started for it."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def test_inside_the_block_ops_run_on_this_thread_and_after_it_on_all_again() -> None:
    default = torch.get_num_threads()

    def worker() -> tuple[int, int, int]:
        with this_thread_only():
            inside = torch.get_num_threads()
            started_meanwhile = on_new_thread(torch.get_num_threads)
        return inside, started_meanwhile, torch.get_num_threads()

    inside, started_meanwhile, after = on_new_thread(worker)
    assert inside == 1
    # torch.set_num_threads(1) would have handed 1 to the thread started meanwhile.
    assert started_meanwhile == default
    assert after == default
    assert torch.get_num_threads() == default


def test_a_load_packs_and_checks_its_weights_on_one_thread(
    tmp_path: Path, model_config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    all_finite = peft_format._all_finite

    def spying_all_finite(tensor: torch.Tensor) -> bool:
        seen.append(torch.get_num_threads())
        return all_finite(tensor)

    monkeypatch.setattr(peft_format, "_all_finite", spying_all_finite)
    folder = write_random_adapter(tmp_path / "a", model_config, rank=4)
    peft_format.load_adapter(folder, model_config, 8)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() > 1
