"""The gauges inference gateways read, under the names their protocol gives.

The Kubernetes Gateway API Inference Extension's model-server protocol
(docs/proposals/003-model-server-protocol) asks a model server for: the requests
queued and running, the KV-cache utilisation, and for LoRA serving one
`lora_requests_info` gauge whose labels list the adapters of running and of waiting
requests and the slot limit, and whose value is the time of that report. Its endpoint
picker, AIBrix and KEDA recipes read them under vLLM's names, so loraplex serves those
names beside its own `loraplex_engine_*` series (same values, read at scrape time from
the engine loop's latest `EngineSnapshot`):

- `vllm:num_requests_waiting`, `vllm:num_requests_running` (gauges, `model_name`)
- `vllm:kv_cache_usage_perc` (gauge, 0..1 used share of the KV blocks, `model_name`),
  and `vllm:gpu_cache_usage_perc`, its name in older versions of the protocol
- `vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}`
  (gauge = unix time of the scrape). An adapter is listed under every name a request
  may use for it (its id `tenant/name@version` and its aliases, e.g. `tenant/name`),
  so a gateway matches whatever the client put in `model`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from engine.lora.registry import AdapterRegistry
    from engine.snapshot import EngineSnapshot


class GatewayCollector(Collector):
    """Reads the engine loop's latest snapshot and the registry at each scrape."""

    def __init__(
        self, snapshot: Callable[[], EngineSnapshot], adapters: AdapterRegistry, model_name: str
    ) -> None:
        self._snapshot = snapshot
        self._adapters = adapters
        self._model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._snapshot()
        labels = ["model_name"]
        for name, documentation, value in (
            ("vllm:num_requests_waiting", "Requests queued for admission", s.num_waiting),
            ("vllm:num_requests_running", "Requests admitted and holding KV blocks", s.num_running),
        ):
            family = GaugeMetricFamily(name, documentation, labels=labels)
            family.add_metric([self._model_name], value)
            yield family
        total = s.kv_blocks_total
        used = (total - s.kv_blocks_free) / total if total else 0.0
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            family = GaugeMetricFamily(
                name, "Share of the KV cache blocks in use (1 = full)", labels=labels
            )
            family.add_metric([self._model_name], used)
            yield family
        names = {r.adapter_id: (r.adapter_id, *r.aliases) for r in self._adapters.list()}
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters of running and of waiting requests, and the adapter slot limit; "
            "the value is the unix time of this report",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric(
            [
                _names(s.running_adapters, names),
                _names(s.waiting_adapters, names),
                str(s.max_loras),
            ],
            time.time(),
        )
        yield info


def _names(adapter_ids: frozenset[str], names: dict[str, tuple[str, ...]]) -> str:
    """Comma-separated names of `adapter_ids`, sorted so the label is stable."""
    return ",".join(sorted(n for a in adapter_ids for n in names.get(a, (a,))))
