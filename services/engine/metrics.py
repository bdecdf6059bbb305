"""Engine load as Prometheus series, read from each engine at scrape time.

One collector per process serves every engine stage in it (one, or many simulated
ones), each series labelled with the engine's instance id: the figures the router
routes by, for dashboards.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.engine.backend import EngineBackend


class EngineLoads(Collector):
    """The load figures of the engines this process runs."""

    def __init__(self) -> None:
        self._engines: dict[str, EngineBackend] = {}
        self._registered = False

    def add(self, instance_id: str, engine: EngineBackend) -> None:
        if not self._registered:
            REGISTRY.register(self)
            self._registered = True
        self._engines[instance_id] = engine

    def remove(self, instance_id: str) -> None:
        self._engines.pop(instance_id, None)

    def collect(self) -> Iterator[Metric]:
        requests = GaugeMetricFamily(
            "stagemesh_engine_requests",
            "Requests in the engine's scheduler, by state",
            labels=["engine", "state"],
        )
        usage = GaugeMetricFamily(
            "stagemesh_engine_kv_cache_usage",
            "Fraction of the engine's KV cache blocks in use",
            labels=["engine"],
        )
        hit_rate = GaugeMetricFamily(
            "stagemesh_engine_prefix_cache_hit_rate",
            "Share of queried prompt tokens found in the engine's prefix cache",
            labels=["engine"],
        )
        prefill_cost = GaugeMetricFamily(
            "stagemesh_engine_prefill_seconds_per_token",
            "Prefill seconds per computed prompt token, a moving mean (0: not measured yet)",
            labels=["engine"],
        )
        external = CounterMetricFamily(
            "stagemesh_engine_external_prefix_tokens",
            "Prompt tokens looked up in the KV store, by outcome",
            labels=["engine", "outcome"],
        )
        for instance_id, engine in list(self._engines.items()):
            if engine.events is None:
                continue  # still starting
            load = engine.load(0)
            requests.add_metric([instance_id, "running"], load.running_requests)
            requests.add_metric([instance_id, "waiting"], load.waiting_requests)
            usage.add_metric([instance_id], load.kv_cache_usage)
            hit_rate.add_metric([instance_id], load.prefix_cache_hit_rate)
            prefill_cost.add_metric([instance_id], load.prefill_seconds_per_token)
            external.add_metric([instance_id, "queried"], load.external_prefix_queried_tokens)
            external.add_metric([instance_id, "hit"], load.external_prefix_hit_tokens)
        yield from (requests, usage, hit_rate, prefill_cost, external)


#: The process's one collector.
ENGINE_LOADS = EngineLoads()
