"""Outputs carried from the engine loop's thread to a relay on the asyncio loop."""

from __future__ import annotations

import asyncio
import threading

from engine.metrics import EngineMetrics, RequestTimer
from engine.request import FinishReason, RequestOutput
from engine.server.generation import Generation
from engine.server.streams import OutputMailbox, OutputStream


def _generation() -> tuple[Generation, OutputStream]:
    stream = OutputStream()
    return Generation(stream, RequestTimer(EngineMetrics()), "r", None, 3), stream


def test_forward_relays_every_output_in_order_and_returns_after_the_last() -> None:
    async def run() -> list[RequestOutput]:
        generation, stream = _generation()
        send = OutputMailbox(asyncio.get_running_loop()).sender(stream)
        send(RequestOutput(text="a", token_ids=(1,)))  # delivered before the relay starts
        relayed: list[RequestOutput] = []

        def engine_loop() -> None:  # another thread, as the engine loop is
            for i in range(2, 50):
                send(RequestOutput(text=str(i), token_ids=(i,)))
            send(RequestOutput(text="z", token_ids=(50,), finish_reason=FinishReason.LENGTH))

        thread = threading.Thread(target=engine_loop)
        thread.start()
        await asyncio.wait_for(generation.forward(relayed.append), 10)
        thread.join()
        assert generation.finished
        return relayed

    relayed = asyncio.run(run())
    assert [out.token_ids[0] for out in relayed] == list(range(1, 51))
    assert relayed[-1].finish_reason is FinishReason.LENGTH
    assert all(out.finish_reason is None for out in relayed[:-1])


def test_a_cancelled_relay_passes_on_nothing_more() -> None:
    async def run() -> list[RequestOutput]:
        generation, stream = _generation()
        send = OutputMailbox(asyncio.get_running_loop()).sender(stream)
        relayed: list[RequestOutput] = []
        task = asyncio.create_task(generation.forward(relayed.append))
        send(RequestOutput(text="a", token_ids=(1,)))
        while not relayed:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        send(RequestOutput(text="b", token_ids=(2,), finish_reason=FinishReason.STOP))
        await asyncio.sleep(0.05)  # the delivery runs on this loop
        assert not generation.finished
        return relayed

    assert [out.text for out in asyncio.run(run())] == ["a"]
