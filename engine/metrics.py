"""Prometheus metrics of one engine: what a platform team scrapes to operate it.

Counters and histograms are fed by events: the engine loop reports requests starting
and finishing and each model step; the Inference servicer reports refusals and the
latencies its client sees. Gauges (queues, KV blocks, adapter slots, adapters) are read
at scrape time from the engine loop's published `EngineSnapshot` and the adapter
registry, so the engine loop pays nothing more for them.

Labels are bounded: `tenant` (the control plane bounds tenants; "" = no tenant),
`reason` (stop/length/cancelled/error), `code` (a gRPC status name), `kind`
(prefill/decode/mixed). Adapters are never a label: there may be thousands.

Each `EngineMetrics` owns its CollectorRegistry (not the process-global one), so
several engines in one process never clash; `loraplex.metrics_http` exposes it over HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.gateway_metrics import GatewayCollector

if TYPE_CHECKING:
    import grpc

    from engine.lora.registry import AdapterRegistry
    from engine.request import EngineRequest, FinishReason, RequestOutput
    from engine.scheduler import ScheduledBatch
    from engine.snapshot import EngineSnapshot

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
STEP_PHASES = ("schedule", "launch", "wait", "collect", "stream")
_SEQS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class EngineMetrics:
    """The engine's metrics and the hooks that feed them. Thread-safe: the engine loop,
    the servicer's event loop and the scrape thread may call in at the same time."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "loraplex_engine_"
        self.requests_started = Counter(
            p + "requests_started", "Requests accepted into the engine loop", ["tenant"], registry=r
        )
        self.requests_finished = Counter(
            p + "requests_finished",
            "Requests ended, by finish reason",
            ["tenant", "reason"],
            registry=r,
        )
        self.requests_refused = Counter(
            p + "requests_refused",
            "Generate calls refused before reaching the engine loop, by gRPC status code",
            ["code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens", "Prompt tokens of started requests", ["tenant"], registry=r
        )
        self.generation_tokens = Counter(
            p + "generation_tokens",
            "Tokens generated, counted when their request finishes",
            ["tenant"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds",
            "From the Generate call to its first token, as the servicer streams it",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            p + "inter_token_latency_seconds",
            "Between consecutive tokens of one request, as the servicer streams them",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            p + "request_duration_seconds",
            "From the Generate call to its last response (requests the engine finished)",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            p + "step_duration_seconds",
            "One model step (schedule excluded), by batch kind",
            ["kind"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.step_phase = Histogram(
            p + "step_phase_seconds",
            "Engine loop time per step by phase: schedule (pick the batch), launch (build "
            "inputs, queue the step), wait (for the tokens of the step collected: the one "
            "before with step overlap), collect (finish checks), stream (detokenize and "
            "send, while the device runs)",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.batch_seqs = Histogram(
            p + "batch_size_seqs", "Sequences in one model step", buckets=_SEQS_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            p + "batch_size_tokens",
            "Tokens fed to one model step",
            buckets=_TOKENS_BUCKETS,
            registry=r,
        )
        self.slot_loads = Counter(
            p + "adapter_slot_loads", "Adapters copied into a device slot", registry=r
        )
        self.preemptions = Counter(
            p + "preemptions",
            "Sequences preempted for lack of KV blocks (recomputed later)",
            registry=r,
        )
        # Children resolved once: the step hook runs every step.
        self._step_by_kind = {
            k: self.step_duration.labels(k) for k in ("prefill", "decode", "mixed")
        }
        self._phases = {k: self.step_phase.labels(k) for k in STEP_PHASES}
        self._watching = False

    def watch(
        self,
        snapshot: Callable[[], EngineSnapshot],
        adapters: AdapterRegistry,
        model_name: str = "",
    ) -> None:
        """Adds the gauges read at each scrape (once) from the engine loop's latest
        snapshot (`EngineLoop.snapshot`) and the registry: the `loraplex_engine_*` ones and
        the `vllm:*` ones inference gateways read (`engine.gateway_metrics`), labelled
        with `model_name`."""
        if not self._watching:
            self.registry.register(_LiveStateCollector(snapshot, adapters))
            self.registry.register(GatewayCollector(snapshot, adapters, model_name))
            self._watching = True

    # -- engine loop hooks ---------------------------------------------------------
    def request_started(self, request: EngineRequest) -> None:
        self.requests_started.labels(request.tenant).inc()
        self.prompt_tokens.labels(request.tenant).inc(len(request.prompt_token_ids))

    def request_finished(
        self, request: EngineRequest, reason: FinishReason, num_generated: int
    ) -> None:
        self.requests_finished.labels(request.tenant, reason.value).inc()
        if num_generated:
            self.generation_tokens.labels(request.tenant).inc(num_generated)

    def batch_scheduled(self, batch: ScheduledBatch) -> None:
        """Counts what scheduling did, even when the batch turns out empty."""
        if batch.preempted:
            self.preemptions.inc(len(batch.preempted))
        if batch.slot_loads:
            self.slot_loads.inc(len(batch.slot_loads))

    def step_done(self, batch: ScheduledBatch, seconds: float) -> None:
        num_tokens = 0
        num_decode = 0  # rows feeding one token: decode, cost-wise
        for item in batch.seqs:
            n = len(item.token_ids)
            num_tokens += n
            num_decode += n == 1
        num_seqs = len(batch.seqs)
        kind = "decode" if num_decode == num_seqs else "prefill" if num_decode == 0 else "mixed"
        self._step_by_kind[kind].observe(seconds)
        self.batch_seqs.observe(num_seqs)
        self.batch_tokens.observe(num_tokens)

    def step_phases(self, seconds: dict[str, float]) -> None:
        """`seconds`: how long each of STEP_PHASES took in one loop iteration."""
        for phase, duration in seconds.items():
            self._phases[phase].observe(duration)

    # -- servicer hooks ------------------------------------------------------------
    def request_refused(self, code: grpc.StatusCode) -> None:
        self.requests_refused.labels(code.name).inc()

    def request_timer(self) -> RequestTimer:
        """Starts timing one Generate call; feed it every output the call streams."""
        return RequestTimer(self)


class RequestTimer:
    """Latencies of one streamed request, measured where its client sees them."""

    __slots__ = ("_metrics", "_start", "_last")

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._last: float | None = None

    def on_output(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.token_ids:
            if self._last is None:
                self._metrics.time_to_first_token.observe(now - self._start)
            else:
                self._metrics.inter_token_latency.observe(now - self._last)
            self._last = now
        if out.finish_reason is not None:
            self._metrics.request_latency.observe(now - self._start)


class _LiveStateCollector(Collector):
    """Gauges read when scraped from the engine loop's latest snapshot (one consistent
    state, at most a step old) and the adapter registry (under its lock)."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], adapters: AdapterRegistry) -> None:
        self._snapshot = snapshot
        self._adapters = adapters

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._snapshot()
        records = self._adapters.list()
        values = (
            ("requests_running", "Requests admitted and holding KV blocks", s.num_running),
            ("requests_waiting", "Requests queued for admission", s.num_waiting),
            ("kv_blocks_total", "KV cache blocks the scheduler manages", s.kv_blocks_total),
            ("kv_blocks_free", "KV cache blocks free now", s.kv_blocks_free),
            ("adapter_slots_total", "Adapter slots on the device (max_loras)", s.max_loras),
            (
                "adapter_slots_in_use",
                "Adapter slots pinned by requests in flight",
                s.num_pinned_slots,
            ),
            ("adapter_slots_occupied", "Adapter slots holding an adapter", len(s.slot_of)),
            ("adapters_loaded", "Adapters loaded on this engine", len(records)),
            (
                "adapters_cpu_cached",
                "Loaded adapters whose weights sit in the host-memory cache",
                sum(1 for record in records if record.in_cpu_cache),
            ),
        )
        for name, documentation, value in values:
            yield GaugeMetricFamily("loraplex_engine_" + name, documentation, value=value)
