"""`AsyncClient` against a real engine: the same answers as `Client`, cancellation by
cancelling the task, deadlines and typed errors."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from loraplex.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    NotFoundError,
    UnauthenticatedError,
)
from tests.client.conftest import ADAPTER, ServedEngine


async def _until(check, timeout: float, what: str) -> None:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def test_async_answers_equal_the_blocking_clients(served: ServedEngine) -> None:
    key = served.keys["acme"]
    with Client(served.target, api_key=key) as client:
        expected = client.generate_text("The sky is", adapter=ADAPTER, max_new_tokens=10)
        expected_chat = client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=6)

    async def main() -> None:
        async with AsyncClient(served.target, api_key=key) as client:
            deltas = [d async for d in client.generate("The sky is", adapter=ADAPTER,
                                                        max_new_tokens=10)]  # fmt: skip
            whole = await client.generate_text("The sky is", adapter=ADAPTER, max_new_tokens=10)
            chat = await client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=6)
            both = await asyncio.gather(
                *(client.generate_text(token_ids=[5, 6], max_new_tokens=4) for _ in range(3))
            )
        assert "".join(d.text for d in deltas) == whole.text == expected.text
        assert whole.token_ids == expected.token_ids and whole.usage == expected.usage
        assert deltas[-1].finish_reason == whole.finish_reason
        assert (chat.text, chat.token_ids) == (expected_chat.text, expected_chat.token_ids)
        assert len({c.token_ids for c in both}) == 1  # concurrent calls, one answer

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_call_on_the_engine(served: ServedEngine) -> None:
    cancelled = served.num_cancelled()

    async def main() -> None:
        async with AsyncClient(served.target, api_key=served.keys["acme"]) as client:
            task = asyncio.create_task(
                client.generate_text("Tell me", max_new_tokens=900, ignore_eos=True)
            )
            await _until(lambda: served.num_requests() == 1, 10, "the request to start")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _until(lambda: served.num_requests() == 0, 2, "the engine to drop it")
            assert served.num_cancelled() == cancelled + 1

            async def read_a_little() -> None:
                stream = client.generate("Tell me", max_new_tokens=900, ignore_eos=True)
                async with contextlib.aclosing(stream):
                    async for _ in stream:
                        await asyncio.sleep(3600)  # a slow consumer, cancelled below

            reader = asyncio.create_task(read_a_little())
            await _until(lambda: served.num_requests() == 1, 10, "the stream to start")
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await _until(lambda: served.num_requests() == 0, 2, "the engine to drop the stream")
            assert served.num_cancelled() == cancelled + 2

    asyncio.run(main())


def test_async_timeouts_and_refusals_raise_typed_errors(served: ServedEngine) -> None:
    async def main() -> None:
        async with AsyncClient(served.target, api_key=served.keys["acme"]) as client:
            with pytest.raises(DeadlineExceededError):
                await client.generate_text("Tell", max_new_tokens=900, ignore_eos=True,
                                           timeout=0.3)  # fmt: skip
            with pytest.raises(NotFoundError) as missing:
                await client.generate_text("Hi", adapter="acme/nothing")
            assert "acme/nothing" in missing.value.message
        async with AsyncClient(served.target, api_key="lpx_bad_bad") as stranger:
            with pytest.raises(UnauthenticatedError):
                async for _ in stranger.generate("Hi"):
                    pass
        await _until(lambda: served.num_requests() == 0, 2, "the expired call to go")

    asyncio.run(main())
