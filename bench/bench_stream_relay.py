"""Host cost of relaying one decode step's outputs to the front-end process, on the
engine process's asyncio loop (which shares the GIL with the engine loop). CPU only.

    python bench/bench_stream_relay.py [--streams 242] [--steps 128] [--out FILE]

A thread stands in for the engine loop: each step it posts one output per stream
through `OutputMailbox` (as `RequestStream` does), then sleeps as a GPU step would.
The asyncio loop relays them to an `Outbox` over a discarding writer, either with one
task per stream iterating its `Generation` (how every call was relayed before) or with
`Generation.forward` (a consumer per stream, no task woken per output). Reported: CPU
time of the asyncio thread per step, median of `--repeats` runs of each, interleaved.
An explanation of a share of the engine's step time, not a serving figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_report import result_header  # noqa: E402
from engine.metrics import EngineMetrics, RequestTimer  # noqa: E402
from engine.request import FinishReason, RequestOutput  # noqa: E402
from engine.server.frontend_link import Outbox  # noqa: E402
from engine.server.frontend_process import _out_event  # noqa: E402
from engine.server.generation import Generation  # noqa: E402
from engine.server.streams import OutputMailbox, OutputStream  # noqa: E402


class _DiscardingWriter:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def _relay_ms_per_step(mode: str, streams: int, steps: int, step_s: float) -> float:
    loop = asyncio.get_running_loop()
    mailbox, metrics = OutputMailbox(loop), EngineMetrics()
    outbox = Outbox(_DiscardingWriter())  # type: ignore[arg-type]
    generations, senders = [], []
    for i in range(streams):
        stream = OutputStream()
        generations.append(Generation(stream, RequestTimer(metrics), f"r{i}", None, 128))
        senders.append(mailbox.sender(stream))

    async def per_task(sid: int, generation: Generation) -> None:
        async for out in generation:
            outbox.post(_out_event(sid, out))

    async def forward(sid: int, generation: Generation) -> None:
        await generation.forward(lambda out: outbox.post(_out_event(sid, out)))

    relay = per_task if mode == "tasks" else forward
    tasks = [asyncio.create_task(relay(i, g)) for i, g in enumerate(generations)]
    await asyncio.sleep(0)

    def engine_loop() -> None:
        for step in range(steps):
            finish = FinishReason.LENGTH if step == steps - 1 else None
            for send in senders:
                send(RequestOutput(text=" word", token_ids=(1234,), finish_reason=finish))
            time.sleep(step_s)

    thread = threading.Thread(target=engine_loop)
    start = time.thread_time()
    thread.start()
    await asyncio.gather(*tasks)
    cpu = time.thread_time() - start
    thread.join()
    return cpu / steps * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=242, help="W2's mean decode batch")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"tasks": [], "forward": []}
    for _ in range(args.repeats):
        for mode, values in runs.items():
            ms = asyncio.run(_relay_ms_per_step(mode, args.streams, args.steps, args.step_ms / 1e3))
            values.append(ms)
    result = {
        **result_header("stream_relay", "cpu", "", ROOT),  # command, commit, machine
        "streams": args.streams,
        "steps": args.steps,
        "asyncio_cpu_ms_per_step": {mode: statistics.median(v) for mode, v in runs.items()},
        "runs": runs,
    }
    for mode, ms in result["asyncio_cpu_ms_per_step"].items():
        print(f"{mode:>8}: {ms:.2f} ms of asyncio-thread CPU per step of {args.streams} outputs")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
