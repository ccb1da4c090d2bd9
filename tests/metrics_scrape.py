"""Reading Prometheus text in tests: scrape over HTTP or render a registry, then look up
one sample by name and labels."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> Samples:
    """GET http://127.0.0.1:port/metrics, parsed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return parse(reply.read().decode())


def render(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, default: float | None = None, **labels: str) -> float:
    """The sample's value. A missing series is an error (a renamed or dropped metric
    must fail the test) unless `default` is given, for a labelled counter that was
    legitimately never incremented."""
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        if default is None:
            raise KeyError(f"no sample {name}{labels} in the scrape")
        return default
    return samples[key]
