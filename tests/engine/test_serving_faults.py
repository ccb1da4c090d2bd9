"""What a client sees when things go wrong around it: overload, reused request ids,
engine faults, adapters vanishing from disk. Other requests must keep streaming."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest

from engine.config import EngineConfig
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import inference_pb2
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import collect, running_engine


def ids_request(ids, max_new_tokens, adapter="", request_id=""):
    return inference_pb2.GenerateRequest(
        request_id=request_id,
        adapter=adapter,
        token_ids=inference_pb2.TokenIds(ids=ids),
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


def config_for(model_path, **overrides) -> EngineConfig:
    values = dict(model_path=model_path, port=0, kv_cache_tokens=2048, max_lora_rank=8)
    values.update(overrides)
    return EngineConfig(**values)


def wait_until(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_answers_resource_exhausted(tiny_llama31_path):
    config = config_for(
        tiny_llama31_path, max_num_seqs=1, max_num_batched_tokens=64, max_num_waiting=1
    )
    with running_engine(config) as running:
        first = running.inference.Generate(ids_request([5, 6, 7], 400))
        next(first)
        second = running.inference.Generate(ids_request([5, 6, 8], 4))
        wait_until(lambda: running.parts.engine.snapshot().num_waiting == 1)
        with pytest.raises(grpc.RpcError) as caught:
            running.generate(ids_request([5, 6, 9], 4))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry later" in caught.value.details()
        first.cancel()
        assert collect(second).completion_tokens == 4


def test_clients_reusing_a_request_id_do_not_disturb_each_other(tiny_llama31_path):
    prompts = [[10, 11, 12], [20, 21, 22, 23]]
    with running_engine(config_for(tiny_llama31_path)) as running:
        solo = [running.generate(ids_request(p, 12)).token_ids for p in prompts]
        results: list = [None, None]

        def run(i: int) -> None:
            responses = list(
                running.inference.Generate(ids_request(prompts[i], 12, request_id="same"))
            )
            results[i] = (
                [t for r in responses for t in r.token_ids],
                {r.request_id for r in responses},
            )

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [r[0] for r in results] == solo
        assert all(r[1] == {"same"} for r in results)  # echoed, not used as a key
        assert running.parts.engine.is_alive()


def test_a_failed_step_ends_its_requests_with_a_sentence_and_serving_goes_on(
    tiny_llama31_path, monkeypatch
):
    with running_engine(config_for(tiny_llama31_path)) as running:
        runner = running.parts.engine.runner
        real_launch = runner.launch
        calls = {"n": 0}

        def fails_once(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("device fault")
            return real_launch(*args, **kwargs)

        monkeypatch.setattr(runner, "launch", fails_once)
        responses = list(running.inference.Generate(ids_request([5, 6, 7], 10)))
        assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_ERROR
        assert responses[-1].error == "the model step failed"
        assert running.generate(ids_request([5, 6, 7], 10)).completion_tokens == 10
        free = running.admin.GetEngineInfo(admin_pb.GetEngineInfoRequest()).kv_blocks_free
        assert free == running.parts.engine.scheduler.blocks.num_blocks


def test_an_unexpected_error_in_the_loop_fails_requests_in_flight_and_the_loop_survives(
    tiny_llama31_path, monkeypatch
):
    with running_engine(config_for(tiny_llama31_path)) as running:
        scheduler = running.parts.engine.scheduler
        real_schedule = scheduler.schedule
        calls = {"n": 0}

        def breaks_once():
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyError("bug")
            return real_schedule()

        monkeypatch.setattr(scheduler, "schedule", breaks_once)
        last = list(running.inference.Generate(ids_request([5, 6, 7], 10)))[-1]
        assert last.finish_reason == inference_pb2.FINISH_REASON_ERROR
        assert "internal error" in last.error
        assert running.parts.engine.is_alive()
        assert running.generate(ids_request([5, 6, 7], 5)).completion_tokens == 5
        assert scheduler.num_running == scheduler.num_waiting == 0


def test_an_adapter_gone_from_disk_is_refused_clearly(tiny_llama31_path, tmp_path):
    root = tmp_path / "adapters"
    for seed, name in enumerate(("gone", "other")):
        make_peft_adapter(
            tiny_llama31_path, root / name, r=4, alpha=8, target_modules=["q_proj"], seed=seed
        )
    # One slot and one host-cached adapter: using "other" pushes "gone" out of both.
    config = config_for(tiny_llama31_path, max_loras=1, max_cpu_loras=1, adapter_dir=root)
    with running_engine(config) as running:
        assert running.generate(ids_request([5, 6], 3, adapter="gone")).completion_tokens == 3
        assert running.generate(ids_request([5, 6], 3, adapter="other")).completion_tokens == 3
        shutil.rmtree(root / "gone")
        with pytest.raises(grpc.RpcError) as caught:
            running.generate(ids_request([5, 6], 3, adapter="gone"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot be read" in caught.value.details()
        listing = running.admin.ListAdapters(admin_pb.ListAdaptersRequest()).adapters
        assert all(a.requests_in_flight == 0 for a in listing)
        assert running.generate(ids_request([5, 6], 3, adapter="other")).completion_tokens == 3


def test_an_engine_under_a_control_plane_needs_the_admin_token(tiny_llama31_path):
    with pytest.raises(ValueError, match="--admin-token"):
        EngineConfig(model_path=tiny_llama31_path, control_plane="127.0.0.1:50050")
    with pytest.raises(ValueError, match="--lora-backend"):
        EngineConfig(model_path=tiny_llama31_path, lora_backend="cuda")


def test_a_bad_folder_in_the_adapter_dir_is_skipped_and_the_rest_served(
    tiny_llama31_path, tmp_path
):
    root = tmp_path / "adapters"
    make_peft_adapter(
        tiny_llama31_path, root / "good", r=4, alpha=8, target_modules=["q_proj"], seed=1
    )
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    with running_engine(config_for(tiny_llama31_path, adapter_dir=root)) as running:
        assert running.parts.preloader.wait(30)  # the preload runs in the background
        listing = running.admin.ListAdapters(admin_pb.ListAdaptersRequest()).adapters
        assert [a.adapter_id for a in listing] == ["good"]
        assert running.generate(ids_request([5, 6], 3, adapter="good")).completion_tokens == 3


def test_a_burst_cannot_slip_past_the_queue_cap(tiny_llama31_path):
    config = config_for(
        tiny_llama31_path, max_num_seqs=1, max_num_batched_tokens=64, max_num_waiting=2
    )
    codes: list = []
    with running_engine(config) as running:

        def run(i: int) -> None:
            try:
                running.generate(ids_request([5, 6, i + 7], 20))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())

        threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) <= 4  # one running + two waiting, give or take


class LoopKiller(BaseException):
    """Escapes the loop's catch-all, as nothing ordinary should."""


def test_if_the_loop_dies_every_request_still_gets_a_final_message(tiny_llama31_path, monkeypatch):
    with running_engine(config_for(tiny_llama31_path)) as running:
        engine = running.parts.engine
        stream = running.inference.Generate(ids_request([5, 6, 7], 500))
        next(stream)

        def dies():
            raise LoopKiller()

        monkeypatch.setattr(engine.scheduler, "schedule", dies)
        last = list(stream)[-1]
        assert last.finish_reason == inference_pb2.FINISH_REASON_ERROR
        assert "stopped" in last.error
        wait_until(lambda: not engine.is_alive())
        with pytest.raises(grpc.RpcError) as caught:
            running.generate(ids_request([5, 6], 3))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


def test_a_hostile_pattern_in_load_adapter_is_refused_and_streams_go_on(
    tiny_llama31_path, tmp_path
):
    """LoadAdapter with a backtracking `target_modules` answers INVALID_ARGUMENT with a
    sentence while another tenant's stream keeps going (it used to hold the interpreter
    for seconds, or hours, and answer UNKNOWN for an invalid pattern)."""
    import json

    hostile = make_peft_adapter(
        tiny_llama31_path, tmp_path / "hostile", r=4, alpha=8, target_modules=["q_proj"], seed=2
    )
    config_path = hostile / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    raw["target_modules"] = "(" + "a*" * 40 + r")+\1"
    config_path.write_text(json.dumps(raw))
    with running_engine(config_for(tiny_llama31_path, adapter_roots=(tmp_path,))) as running:
        stream = running.inference.Generate(ids_request([5, 6, 7], 30))
        first = next(stream)
        with pytest.raises(grpc.RpcError) as caught:
            request = admin_pb.LoadAdapterRequest(adapter_id="h", path=str(hostile))
            running.admin.LoadAdapter(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "list the module names instead" in caught.value.details()
        rest = list(stream)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 30
        assert rest[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_paths_that_cannot_hold_an_adapter_are_refused_cleanly(tiny_llama31_path, tmp_path):
    """A NUL byte, a system folder, a FIFO in place of a file: INVALID_ARGUMENT with a
    sentence, at once (a FIFO used to block the load forever; NUL answered UNKNOWN)."""
    import os

    fifo_adapter = make_peft_adapter(
        tiny_llama31_path, tmp_path / "fifo", r=4, alpha=8, target_modules=["q_proj"], seed=3
    )
    (fifo_adapter / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo_adapter / "adapter_model.safetensors")
    cases = [("\x00", "NUL byte"), ("/proc/self", "system folder"),
             (str(fifo_adapter), "not a regular file")]  # fmt: skip
    with running_engine(config_for(tiny_llama31_path, adapter_roots=(tmp_path,))) as running:
        for path, words in cases:
            with pytest.raises(grpc.RpcError) as caught:
                running.admin.LoadAdapter(
                    admin_pb.LoadAdapterRequest(adapter_id="x", path=path), timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            assert words in caught.value.details(), caught.value.details()
        assert running.generate(ids_request([5, 6], 3)).completion_tokens == 3
