"""The engine loop: one thread that schedules, runs and streams, step after step.

gRPC handlers talk to it only through `submit`, `abort` and `forget_adapter`, which
post to an inbox read between steps; so a cancel takes effect within one step and
the loop's state (the scheduler, its KV blocks and adapter slots) is read and changed
by the loop thread only. Other threads (GetEngineInfo, ListAdapters, metrics, the
servicer's queue cap) read `snapshot()`: the `EngineSnapshot` the loop publishes after
each step and after applying inbox messages, at most a step stale.

Steps overlap on CUDA (`overlap`): step N+1 is scheduled and launched while the
device still computes step N, its decode tokens read from N's sampled tokens on the
device (`Scheduler.on_step_launched`), so the host's scheduling, input building and
launches hide behind the device instead of leaving it idle between steps. Then N's
tokens are collected, checked against EOS and token limits, and turned into streamed
text while N+1 runs. A request that finishes at step N has computed one token more in
N+1 (never streamed; a stop string, found with the text, may cost one more). Without
overlap (the CPU, where a launch runs the step to the end, or --no-step-overlap) each
step is collected before the next one is scheduled; the text of the step before is
streamed while it runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.lora.peft_format import LoraWeights
from engine.metrics import EngineMetrics
from engine.output_processor import RequestStream
from engine.request import EngineRequest, FinishReason, RequestOutput
from engine.runner import ModelRunner, PendingStep
from engine.sampling import make_generator
from engine.scheduler import ScheduledBatch, Scheduler, Sequence
from engine.snapshot import EngineSnapshot
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

AdapterWeightsSource = Callable[[str], LoraWeights]  # adapter_id -> its packed host image
ReleaseAdapter = Callable[[str], None]  # called once per finished request with an adapter


@dataclass
class _Live:
    stream: RequestStream
    generator: torch.Generator


class _Phases:
    """How long each phase of one loop iteration took (metrics.STEP_PHASES)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def end(self, phase: str) -> None:
        """The phase that began at the last `end` (or at creation) ends now."""
        now = time.perf_counter()
        self.seconds[phase] = now - self.last
        self.last = now


@dataclass
class _Launched:
    """A step queued on the device whose tokens have not been collected yet."""

    batch: ScheduledBatch
    pending: PendingStep
    launched_at: float  # perf_counter when its launch began


class EngineLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        adapter_weights: AdapterWeightsSource | None = None,
        release_adapter: ReleaseAdapter | None = None,
        metrics: EngineMetrics | None = None,
        overlap: bool | None = None,
    ) -> None:
        """`overlap` None: overlap steps where the runner's device computes
        asynchronously (CUDA)."""
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self._adapter_weights = adapter_weights
        self._release_adapter = release_adapter
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._unstreamed: list[str] = []  # requests with accepted tokens not yet streamed
        self.overlap = runner.device.type == "cuda" if overlap is None else overlap
        self._in_flight: _Launched | None = None
        self._last_collected = 0.0  # perf_counter when the last step's tokens arrived
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        # Set (under the lock) once the loop has ended: later submissions fail at once
        # instead of waiting in an inbox nobody reads.
        self._closed = False
        self._closing = threading.Lock()
        self._steps = 0  # steps collected
        self._snapshot = EngineSnapshot.of(scheduler, 0)  # the loop's thread not started yet

    # -- called from other threads -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)

    def submit(self, request: EngineRequest, emit: Callable[[RequestOutput], None]) -> None:
        with self._closing:
            if not self._closed:
                self._inbox.put(("add", request, emit))
                return
        self._refuse(request, emit)

    def snapshot(self) -> EngineSnapshot:
        """The loop's state as it last published it (see the module docstring)."""
        return self._snapshot

    @property
    def num_queued(self) -> int:
        """Requests waiting to run: in the scheduler's queue or not yet read from the inbox
        (the inbox also holds aborts, so this may overcount slightly)."""
        return self._snapshot.num_waiting + self._inbox.qsize()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def forget_adapter(self, adapter_id: str) -> None:
        """The adapter left the engine: free its slot once its requests are done. The
        registry calls it (its `on_drop`) on whichever thread dropped the adapter; the
        loop applies it between steps."""
        self._inbox.put(("forget", adapter_id))

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------
    def _run(self) -> None:
        # Triton launches on the thread's current device, and a new thread's is cuda:0.
        if self.runner.device.type == "cuda":
            torch.cuda.set_device(self.runner.device)
        try:
            while True:
                try:
                    if not self._step():
                        return
                except Exception:  # a bug: fail what is in flight, keep the loop serving
                    log.exception("the engine loop hit an unexpected error")
                    self._fail_all("the engine hit an internal error")
                self._publish()
        finally:  # whatever ends the loop, no request may be left without a final message
            with self._closing:
                self._closed = True
            self._fail_all("the engine loop has stopped")
            while not self._inbox.empty():
                message = self._inbox.get()
                if message[0] == "add":
                    self._refuse(message[1], message[2])
            self._publish()

    def _publish(self) -> None:
        """Publishes the loop's state for other threads (one atomic assignment)."""
        self._snapshot = EngineSnapshot.of(self.scheduler, self._steps)

    def _fail_all(self, error: str) -> None:
        for request_id in list(self._live):
            try:
                self._end(request_id, FinishReason.ERROR, error)
            except Exception:
                log.exception("could not end request %s cleanly", request_id)
                self._live.pop(request_id, None)

    def _refuse(self, request: EngineRequest, emit: Callable[[RequestOutput], None]) -> None:
        """Ends a request the loop will never run (it has stopped)."""
        emit(
            RequestOutput(
                text="",
                token_ids=(),
                finish_reason=FinishReason.ERROR,
                prompt_tokens=len(request.prompt_token_ids),
                error="the engine loop has stopped; retry on another engine",
            )
        )
        if request.adapter_id is not None and self._release_adapter is not None:
            self._release_adapter(request.adapter_id)

    def _step(self) -> bool:
        """One iteration: inbox, schedule, copy adapters, launch the step; stream text
        and collect tokens while it runs. False = stop."""
        idle = not self.scheduler.has_work() and not self._unstreamed and self._in_flight is None
        if not self._drain(block=idle):
            return False
        phases = _Phases()  # for metrics.step_phases
        batch = self.scheduler.schedule()
        self.metrics.batch_scheduled(batch)
        # Copies are issued before the forward; no sequence of this batch reads the
        # slots they fill, so on CUDA they run beside it.
        failed_loads = self._load_slots(batch.slot_loads)
        phases.end("schedule")
        launched = None
        if batch.seqs and not failed_loads:  # failed loads ended requests: reschedule
            launched = self._launch(batch, phases.last)
        phases.end("launch")
        if self.overlap:  # collect the step before, then stream its text beside this one
            collected, self._in_flight = self._in_flight, launched
            if collected is not None:
                self._collect(collected, phases)
            self._stream_text()
            phases.end("stream")
        else:  # stream the step before's text beside this one, then collect it
            collected = launched
            self._stream_text()
            phases.end("stream")
            if collected is not None:
                self._collect(collected, phases)
            if not self.scheduler.has_work():
                self._stream_text()
        if collected is not None:
            self.metrics.step_phases(phases.seconds)
        return True

    def _launch(self, batch: ScheduledBatch, now: float) -> _Launched | None:
        """Queues `batch` on the device, its unresolved tokens fed from the step in
        flight. None when the launch failed (its requests are failed)."""
        live = [self._live[s.request_id] for s in batch.seqs]
        previous = self._in_flight.pending if self._in_flight is not None else None
        try:
            pending = self.runner.launch(
                batch,
                [entry.stream.request.params for entry in live],
                [entry.generator for entry in live],
                previous=previous,
            )
        except Exception:  # a bug: fail this batch, keep serving
            self._fail_step(batch)
            return None
        self.scheduler.on_step_launched(batch)
        return _Launched(batch, pending, now)

    def _collect(self, step: _Launched, phases: _Phases) -> None:
        """Waits for a step's tokens and accepts them (the wait and collect phases)."""
        try:
            sampled = step.pending.result()
        except Exception:  # a device fault surfaces here: fail what is in flight
            self._fail_step(step.batch)
            if self._in_flight is not None:
                self._fail_step(self._in_flight.batch)
                self._in_flight = None
            phases.end("wait")
            return
        phases.end("wait")
        now = phases.last
        self._steps += 1
        # The device time of this step, had it queued behind the one before.
        self.metrics.step_done(step.batch, now - max(step.launched_at, self._last_collected))
        self._last_collected = now
        self.scheduler.on_tokens(sampled)
        for request_id, token in sampled.items():
            entry = self._live.get(request_id)
            if entry is None or self.scheduler.get(request_id) is None:
                continue  # ended while the step ran (finished, stop string, cancel)
            self._unstreamed.append(request_id)
            if entry.stream.accept(token) is not None:
                # Done: its blocks and slot go back before the next schedule; its final
                # text goes out with the next `_stream_text`.
                self.scheduler.finish(request_id)
        phases.end("collect")

    def _fail_step(self, batch: ScheduledBatch) -> None:
        log.exception("model step failed; failing the %d requests in it", len(batch.seqs))
        for item in batch.seqs:
            if item.request_id in self._live:
                self._end(item.request_id, FinishReason.ERROR, "the model step failed")

    def _stream_text(self) -> None:
        """Turns the tokens accepted so far into streamed text; ends finished requests."""
        request_ids, self._unstreamed = self._unstreamed, []
        for request_id in request_ids:
            entry = self._live.get(request_id)
            if entry is None:
                continue
            reason = entry.stream.stream_text()
            if reason is not None:
                self._end(request_id, reason)

    def _drain(self, block: bool) -> bool:
        """Applies inbox messages, then publishes the state they changed; returns False
        when asked to stop."""
        applied = False
        while True:
            try:
                message = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if block:
                    continue
                if applied:  # requests moved from the inbox to the scheduler's queue
                    self._publish()
                return True
            block = False
            applied = True
            kind = message[0]
            if kind == "stop":
                for request_id in list(self._live):
                    self._end(request_id, FinishReason.CANCELLED, "the engine is shutting down")
                return False
            if kind == "add":
                self._add(message[1], message[2])
            elif kind == "abort" and message[1] in self._live:
                self._end(message[1], FinishReason.CANCELLED)
            elif kind == "forget":
                self.scheduler.slots.forget(message[1])

    def _add(self, request: EngineRequest, emit: Callable[[RequestOutput], None]) -> None:
        stream = RequestStream(request, self.tokenizer, emit)
        # A CPU generator per request: its draws cost no device launches.
        generator = make_generator(request.params.seed, "cpu")
        self._live[request.request_id] = _Live(stream, generator)
        self.metrics.request_started(request)
        self.scheduler.add(
            Sequence(
                request.request_id,
                list(request.prompt_token_ids),
                adapter_id=request.adapter_id,
                tenant=request.tenant,
                max_tokens=len(request.prompt_token_ids) + request.params.max_new_tokens,
            )
        )

    def _load_slots(self, slot_loads: tuple[tuple[int, str], ...]) -> bool:
        """Copies newly assigned adapters into their slots; fails the requests of any
        adapter that cannot be read. Returns True if something failed."""
        failed = False
        for slot, adapter_id in slot_loads:
            try:
                self.runner.load_adapter(slot, self._adapter_weights(adapter_id))
            except Exception as exc:
                log.exception("adapter %s could not be loaded into slot %d", adapter_id, slot)
                failed = True
                for request_id, entry in list(self._live.items()):
                    if entry.stream.request.adapter_id == adapter_id:
                        self._end(request_id, FinishReason.ERROR, f"adapter {adapter_id}: {exc}")
                self.scheduler.slots.forget(adapter_id)
        return failed

    def _end(self, request_id: str, reason: FinishReason, error: str = "") -> None:
        entry = self._live.pop(request_id)
        entry.stream.abort(reason, error)  # no-op when the stream already finished
        self.metrics.request_finished(entry.stream.request, reason, entry.stream.num_generated)
        self.scheduler.finish(request_id)
        adapter_id = entry.stream.request.adapter_id
        if adapter_id is not None and self._release_adapter is not None:
            self._release_adapter(adapter_id)
