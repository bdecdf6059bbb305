"""What a process's ``/metrics`` serves: its own metrics, or those of every process of a
router started with ``--workers N``.

Several router processes behind one port (SO_REUSEPORT) are scraped through that port,
so any of them must answer for all. prometheus_client's multiprocess mode does that, as
vLLM's ``--api-server-count`` uses it: with ``PROMETHEUS_MULTIPROC_DIR`` set (by the
parent process, before any metric exists) counters, histograms and gauges keep their
values in files there, and a scrape sums them. Metrics read from a callback at scrape
time (:class:`Sampled`, ``Info``) describe the one process that answers; they are
registered here with :func:`process_local` so that registry still serves them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: prometheus_client's own switch for multiprocess mode (read by the library at import).
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

_local: list[Collector] = []
C = TypeVar("C", bound=Collector)


def process_local(collector: C) -> C:
    """Serve ``collector`` from this process's memory in either mode (it is registered
    in the default registry too, which serves when the process is alone)."""
    _local.append(collector)
    return collector


def registry() -> CollectorRegistry:
    """The registry a scrape of this process reads: the default one for a lone process;
    for one of several router workers, the shared files plus this process's callbacks."""
    if not os.environ.get(MULTIPROC_DIR):
        return REGISTRY
    shared = CollectorRegistry()
    multiprocess.MultiProcessCollector(shared)
    for collector in _local:
        shared.register(collector)
    return shared


class Sampled(Collector):
    """A gauge read from ``source`` at scrape time (label values -> value), so a value
    that changes on every event (index entries, stored bytes) costs nothing until read.
    It describes the answering process (see the module's note on workers)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self._name, self._documentation, self._labels = name, documentation, list(labels)
        self.source: Callable[[], Mapping[tuple[str, ...], float]] | None = None
        REGISTRY.register(self)
        process_local(self)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=self._labels)
        for values, value in sorted((self.source() if self.source else {}).items()):
            family.add_metric(list(values), value)
        yield family
