"""`Client` against a real engine: streamed deltas, whole completions, chat, typed
errors, cancellation by closing the iterator, deadlines."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from loraplex.client import (
    ChatMessage,
    Client,
    DeadlineExceededError,
    Delta,
    FinishReason,
    InvalidArgumentError,
    LoraplexError,
    NotFoundError,
    UnauthenticatedError,
)
from loraplex.v1 import inference_pb2
from tests.client.conftest import ADAPTER, ServedEngine, wait_for


@pytest.fixture
def acme(served: ServedEngine) -> Iterator[Client]:
    with Client(served.target, api_key=served.keys["acme"]) as client:
        yield client


def test_deltas_join_into_what_generate_text_returns_and_the_raw_stub_streams(
    served: ServedEngine, acme: Client
) -> None:
    deltas = list(acme.generate("The sky is", adapter=ADAPTER, max_new_tokens=12, ignore_eos=True))
    assert all(isinstance(d, Delta) for d in deltas) and len(deltas) > 1
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == FinishReason.LENGTH and last.usage is not None
    assert last.usage.completion_tokens == 12 and last.adapter_id == f"{ADAPTER}@1"
    whole = acme.generate_text("The sky is", adapter=ADAPTER, max_new_tokens=12, ignore_eos=True)
    assert whole.text == "".join(d.text for d in deltas)
    assert whole.token_ids == tuple(i for d in deltas for i in d.token_ids)
    assert len(whole.token_ids) == 12 and whole.usage == last.usage
    assert whole.finish_reason == FinishReason.LENGTH and whole.error == ""
    # The same request through the bare gRPC stub: the SDK adds and loses nothing.
    raw = served.running.generate(
        inference_pb2.GenerateRequest(
            adapter=ADAPTER,
            text="The sky is",
            sampling=inference_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True),
        ),
        metadata=[("authorization", f"Bearer {served.keys['acme']}")],
    )
    assert (raw.text, tuple(raw.token_ids)) == (whole.text, whole.token_ids)


def test_chat_takes_dicts_or_chat_messages_and_renders_the_template(acme: Client) -> None:
    as_dicts = acme.chat([{"role": "user", "content": "Hi there"}], max_new_tokens=6)
    as_messages = acme.chat([ChatMessage("user", "Hi there")], max_new_tokens=6)
    plain = acme.generate_text("Hi there", max_new_tokens=6)
    assert (as_dicts.text, as_dicts.token_ids) == (as_messages.text, as_messages.token_ids)
    assert as_dicts.request_id and as_dicts.request_id != as_messages.request_id
    assert as_dicts.usage.prompt_tokens > plain.usage.prompt_tokens  # the template's tokens
    streamed = list(acme.generate(messages=[ChatMessage("user", "Hi there")], max_new_tokens=6))
    assert "".join(d.text for d in streamed) == as_dicts.text


def test_adapter_token_ids_stop_strings_and_seeds_reach_the_engine(acme: Client) -> None:
    base = acme.generate_text(token_ids=[5, 6, 7], max_new_tokens=16, ignore_eos=True)
    tuned = acme.generate_text(token_ids=[5, 6, 7], adapter=ADAPTER, max_new_tokens=16,
                               ignore_eos=True)  # fmt: skip
    assert base.usage.prompt_tokens == 3 and base.adapter_id == ""
    assert tuned.token_ids != base.token_ids  # the adapter changes the answer
    stop = tuned.text[len(tuned.text) // 2 :][:3]
    cut = acme.generate_text(token_ids=[5, 6, 7], adapter=ADAPTER, max_new_tokens=16,
                             ignore_eos=True, stop=[stop])  # fmt: skip
    assert cut.finish_reason == FinishReason.STOP and stop not in cut.text
    assert tuned.text.startswith(cut.text)
    sampled = [
        acme.generate_text("Once", max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
        for _ in range(2)
    ]
    assert sampled[0].token_ids == sampled[1].token_ids


def test_refusals_raise_one_error_class_per_status_with_the_servers_sentence(
    served: ServedEngine, acme: Client
) -> None:
    with pytest.raises(NotFoundError) as missing:
        acme.generate_text("Hi", adapter="acme/nothing")
    assert "acme/nothing" in missing.value.message and str(missing.value).startswith("NOT_FOUND:")
    with Client(served.target, api_key=served.keys["globex"]) as globex:
        with pytest.raises(NotFoundError):  # another tenant's adapter looks missing
            globex.generate_text("Hi", adapter=ADAPTER)
        assert globex.generate_text("Hi", max_new_tokens=2).usage.completion_tokens <= 2
    with pytest.raises(InvalidArgumentError) as bad:
        acme.generate_text("Hi", temperature=-1.0)
    assert "temperature" in bad.value.message
    for key in ("", "lpx_nope_nope"):
        with Client(served.target, api_key=key) as stranger:
            with pytest.raises(UnauthenticatedError) as refused:
                stranger.generate_text("Hi")
        assert isinstance(refused.value, LoraplexError) and refused.value.message
    # Mistakes the SDK can see itself never reach the engine.
    with pytest.raises(ValueError, match="exactly one of prompt, messages or token_ids"):
        acme.generate("Hi", token_ids=[1])
    with pytest.raises(ValueError, match="exactly one"):
        acme.generate()
    with pytest.raises(TypeError, match="unknown sampling option.*max_tokens"):
        acme.generate("Hi", max_tokens=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="role and content"):
        acme.chat([{"text": "Hi"}])


def test_closing_the_iterator_cancels_the_generation_on_the_engine(
    served: ServedEngine, acme: Client
) -> None:
    cancelled = served.num_cancelled()
    stream = acme.generate("Tell me", max_new_tokens=900, ignore_eos=True)
    assert next(stream).token_ids
    assert served.num_requests() == 1
    stream.close()
    wait_for(lambda: served.num_requests() == 0, 2, "the engine to drop the closed stream")
    assert served.num_cancelled() == cancelled + 1
    for _ in acme.generate("Tell me", max_new_tokens=900, ignore_eos=True):
        break  # leaving the loop early closes the stream too
    wait_for(lambda: served.num_requests() == 0, 2, "the engine to drop the abandoned stream")
    assert served.num_cancelled() == cancelled + 2


def test_a_timeout_bounds_the_whole_call(served: ServedEngine, acme: Client) -> None:
    cancelled = served.num_cancelled()
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        acme.generate_text("Tell me", max_new_tokens=900, ignore_eos=True, timeout=0.3)
    assert time.monotonic() - start < 2
    wait_for(lambda: served.num_requests() == 0, 2, "the engine to drop the expired call")
    assert served.num_cancelled() == cancelled + 1
    assert acme.generate_text("Hi", max_new_tokens=3, timeout=30).usage.completion_tokens <= 3
    with pytest.raises(ValueError, match="timeout must be positive"):
        next(acme.generate("Hi", timeout=0))
