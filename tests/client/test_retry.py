"""Retries: UNAVAILABLE before the first token is retried with backoff (an engine that
comes up late still answers), never after it (a cut stream raises), never for other
statuses; the policy's attempts and the call's deadline bound it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from engine.server.app import build_engine
from loraplex.client import (
    NO_RETRY,
    AsyncClient,
    Client,
    Completion,
    NotFoundError,
    RetryPolicy,
    UnavailableError,
)
from tests.client.conftest import ServedEngine, engine_config, wait_for
from tests.client.relay import Relay
from tests.engine_server import running_engine
from tests.ports import free_port


def _generate_text(flavour: str, target: str, policy: RetryPolicy, **kw: object) -> Completion:
    if flavour == "sync":
        with Client(target, retry=policy) as client:
            return client.generate_text(**kw)  # type: ignore[arg-type]

    async def main() -> Completion:
        async with AsyncClient(target, retry=policy) as client:
            return await client.generate_text(**kw)  # type: ignore[arg-type]

    return asyncio.run(main())


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_call_made_before_the_engine_is_up_is_answered_once_it_is(
    tiny_llama31_path: Path, support_adapter: Path, flavour: str
) -> None:
    port = free_port()
    config = engine_config(tiny_llama31_path, support_adapter.parent, port=port)
    parts = build_engine(config)
    policy = RetryPolicy(max_attempts=50, initial_backoff_s=0.1, max_backoff_s=0.3)
    answers: list[Completion] = []

    def call() -> None:
        target = f"127.0.0.1:{port}"
        answers.append(_generate_text(flavour, target, policy, prompt="Hi", max_new_tokens=4,
                                      ignore_eos=True))  # fmt: skip

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.0)
    assert caller.is_alive() and not answers  # nothing listens yet: it keeps retrying
    with running_engine(config, parts):
        caller.join(30)
    assert answers and answers[0].usage.completion_tokens == 4


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_nothing_listening_gives_up_after_the_policys_attempts(flavour: str) -> None:
    target = f"127.0.0.1:{free_port()}"
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.2, multiplier=2.0, jitter=0.0)
    start = time.monotonic()
    with pytest.raises(UnavailableError) as refused:
        _generate_text(flavour, target, policy, prompt="Hi")
    assert 0.6 <= time.monotonic() - start < 3  # waited 0.2 s, then 0.4 s, then gave up
    assert refused.value.message  # gRPC's sentence about the connection
    start = time.monotonic()
    with pytest.raises(UnavailableError):
        _generate_text(flavour, target, NO_RETRY, prompt="Hi")
    assert time.monotonic() - start < 0.5


def test_the_deadline_cuts_the_retries_short() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=1.0)
    start = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", retry=policy) as client:
        with pytest.raises(UnavailableError):  # the next wait would outlast the deadline
            client.generate_text("Hi", timeout=0.5)
    assert time.monotonic() - start < 0.9


def test_a_refusal_is_answered_at_once_not_retried(served: ServedEngine) -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=3.0, max_backoff_s=3.0)
    start = time.monotonic()
    with Client(served.target, api_key=served.keys["acme"], retry=policy) as client:
        with pytest.raises(NotFoundError):
            client.generate_text("Hi", adapter="acme/nothing")
    assert time.monotonic() - start < 1.5


def test_a_stream_cut_after_its_first_token_raises_and_is_not_retried(
    served: ServedEngine,
) -> None:
    relay = Relay(("127.0.0.1", served.running.port))
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.1)
    try:
        with Client(relay.target, api_key=served.keys["acme"], retry=policy) as client:
            stream = client.generate("Tell me", max_new_tokens=900, ignore_eos=True)
            received = list(next(stream).token_ids)
            relay.sever()  # the connection drops mid-stream
            with pytest.raises(UnavailableError):
                for delta in stream:
                    received.extend(delta.token_ids)
            assert 0 < len(received) < 900
            # The relay still accepts: a retry would have dialled again and streamed the
            # text from the start a second time.
            assert relay.num_connections == 1
            wait_for(lambda: served.num_requests() == 0, 5, "the engine to drop the cut call")
            # The same client works again once the network does.
            assert client.generate_text("Hi", max_new_tokens=2).usage.completion_tokens <= 2
            assert relay.num_connections == 2
    finally:
        relay.close()


def test_backoff_grows_by_the_multiplier_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.25, max_backoff_s=1.0, multiplier=2.0, jitter=0.0)
    assert [policy.backoff_s(n) for n in range(1, 6)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    jittery = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=1.0, jitter=0.2)
    assert all(0.8 <= jittery.backoff_s(1) <= 1.2 for _ in range(100))
    for bad in ({"max_attempts": 0}, {"initial_backoff_s": 0}, {"jitter": 1.0},
                {"initial_backoff_s": 2.0, "max_backoff_s": 1.0}):  # fmt: skip
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]
