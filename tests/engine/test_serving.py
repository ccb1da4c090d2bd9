"""Issue 2's promises through real gRPC on loopback: tokens equal transformers' greedy
tokens, concurrent streams equal solo runs, cancellation and preemption behave, and
every bad request gets INVALID_ARGUMENT with a sentence."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from engine.config import EngineConfig
from engine.tokenizer import Tokenizer
from loraplex.v1 import engine_admin_pb2, inference_pb2
from tests.engine_server import collect, running_engine
from tests.hf_reference import hf_greedy, hf_model

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]


def config_for(model_path, **overrides) -> EngineConfig:
    values = dict(
        model_path=model_path,
        device="cpu",
        dtype="float32",
        port=0,
        kv_cache_tokens=4096,
        max_loras=2,
        max_lora_rank=16,
    )
    values.update(overrides)
    return EngineConfig(**values)


def chat_request(content: str, max_new_tokens: int, **sampling) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, **sampling)
    )
    request.chat.messages.add(role="user", content=content)
    return request


def ids_request(ids: list[int], max_new_tokens: int, **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=ids),
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, **sampling),
    )


@pytest.fixture(scope="module")
def default_engine(default_model_path):
    with running_engine(config_for(default_model_path)) as running:
        yield running


def test_default_model_matches_transformers_on_chat_prompts(default_engine, default_model_path):
    tokenizer = Tokenizer(default_model_path)
    reference = hf_model(default_model_path)
    for content in CHATS:
        result = default_engine.generate(chat_request(content, 24))
        prompt = tokenizer.render_chat([("user", content)])
        expected = hf_greedy(reference, prompt, 24, tuple(tokenizer.eos_token_ids))
        assert result.token_ids == expected, content
        assert result.prompt_tokens == len(prompt)
        assert result.completion_tokens == len(expected)
        assert result.text == tokenizer.decode(expected)


@pytest.mark.parametrize("kind", ["tiny_llama31_path", "tiny_qwen2_path"])
def test_tiny_models_match_transformers(kind, request):
    path = request.getfixturevalue(kind)
    prompt = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 2, 77, 9]
    with running_engine(config_for(path)) as running:
        result = running.generate(ids_request(prompt, 16, ignore_eos=True))
    assert result.token_ids == hf_greedy(hf_model(path), prompt, 16)
    assert result.finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_eight_concurrent_streams_equal_solo_runs(default_engine):
    requests = [
        ids_request(list(range(100, 100 + 3 + 7 * i)), 4 + 3 * i, ignore_eos=True) for i in range(8)
    ]
    solo = [default_engine.generate(r) for r in requests]
    results: list = [None] * 8

    def run(i: int) -> None:
        results[i] = default_engine.generate(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert results[i].token_ids == solo[i].token_ids, f"stream {i}"
        assert results[i].completion_tokens == 4 + 3 * i


def test_seeded_sampling_is_reproducible_in_any_batch(default_engine):
    request = chat_request("Tell me a story.", 12, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    alone = default_engine.generate(request)
    noise = [ids_request(list(range(50, 80)), 12, temperature=1.0) for _ in range(3)]
    threads = [threading.Thread(target=default_engine.generate, args=(r,)) for r in noise]
    for t in threads:
        t.start()
    again = default_engine.generate(request)
    for t in threads:
        t.join()
    assert again.token_ids == alone.token_ids


def test_stop_string_ends_generation_and_is_not_streamed(default_engine, default_model_path):
    full = default_engine.generate(chat_request(CHATS[0], 24))
    stop = full.text[8:14]
    assert stop and stop in full.text
    result = default_engine.generate(chat_request(CHATS[0], 24, stop=[stop]))
    assert result.text == full.text[: full.text.index(stop)]
    assert result.finish_reason == inference_pb2.FINISH_REASON_STOP


def test_cancelled_stream_frees_its_blocks(default_engine):
    info = lambda: default_engine.admin.GetEngineInfo(engine_admin_pb2.GetEngineInfoRequest())  # noqa: E731
    free_before = info().kv_blocks_free
    stream = default_engine.inference.Generate(
        ids_request(list(range(200, 260)), 500, ignore_eos=True)
    )
    next(stream)
    next(stream)
    assert info().kv_blocks_free < free_before
    stream.cancel()
    deadline = time.monotonic() + 5
    while info().kv_blocks_free != free_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert info().kv_blocks_free == free_before
    assert info().running_requests == 0


def test_requests_that_do_not_fit_together_are_preempted_and_still_correct(tiny_llama31_path):
    # 8 blocks of 16 tokens: four requests growing to 60 tokens each cannot share them.
    prompts = [list(range(300 + 10 * i, 340 + 10 * i)) for i in range(4)]
    config = config_for(tiny_llama31_path, kv_cache_tokens=128, max_num_batched_tokens=128)
    with running_engine(config) as running:
        solo = [running.generate(ids_request(p, 20, ignore_eos=True)) for p in prompts]
        results: list = [None] * 4
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(
                    i, running.generate(ids_request(prompts[i], 20, ignore_eos=True))
                )
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert running.parts.engine.scheduler.blocks.num_free_blocks == 8
    assert [r.token_ids for r in results] == [s.token_ids for s in solo]
    assert all(r.completion_tokens == 20 for r in results)


BAD_REQUESTS = {
    "no prompt": (inference_pb2.GenerateRequest(), "no prompt"),
    "empty text": (inference_pb2.GenerateRequest(text=""), "empty"),
    "empty token ids": (ids_request([], 4), "empty"),
    "token outside vocabulary": (ids_request([1, 10**6], 4), "outside the vocabulary"),
    "prompt longer than the context": (ids_request([5] * 5000, 4), "context window"),
    "negative temperature": (chat_request("hi", 4, temperature=-1.0), "temperature"),
    "nan temperature": (chat_request("hi", 4, temperature=float("nan")), "temperature"),
    "top_p above one": (chat_request("hi", 4, top_p=1.5), "top_p"),
    "empty stop string": (chat_request("hi", 4, stop=[""]), "stop"),
    "max_new_tokens beyond context": (chat_request("hi", 10**6), "max_new_tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_refused_with_a_sentence(default_engine, case):
    request, phrase = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        default_engine.generate(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in caught.value.details()


def test_unknown_chat_role_is_refused(default_engine):
    request = inference_pb2.GenerateRequest()
    request.chat.messages.add(role="wizard", content="hi")
    with pytest.raises(grpc.RpcError) as caught:
        default_engine.generate(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "wizard" in caught.value.details()


def test_bad_request_does_not_disturb_streams_in_flight(default_engine):
    request = ids_request(list(range(400, 420)), 30, ignore_eos=True)
    solo = default_engine.generate(request)
    stream = default_engine.inference.Generate(request)
    first = next(stream)
    with pytest.raises(grpc.RpcError):
        default_engine.generate(ids_request([10**6], 4))
    rest = collect(stream)
    assert list(first.token_ids) + rest.token_ids == solo.token_ids


def test_the_default_budget_fits_a_small_context_window(tiny_llama31_path):
    config = config_for(tiny_llama31_path, max_model_len=64, default_max_new_tokens=256)
    with running_engine(config) as running:
        result = running.generate(ids_request(list(range(100, 150)), 0, ignore_eos=True))
    assert result.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert result.completion_tokens == 64 - 50
