"""Run an engine stage's process: one engine, or many simulated ones (``--sim-engines``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from services.engine.config import EngineConfig
from services.net import free_port
from services.server import Stage, run_stages


def replicas(config: EngineConfig) -> list[EngineConfig]:
    """The settings of each engine the process runs.

    A vLLM engine is one. Simulated engines are ``--sim-engines``: the first on
    ``--port``, the others on free ports (consecutive ones would run into the default
    port of the other engine role), with instance ids suffixed ``-N`` and only the first
    serving the process's metrics. A simulated engine needs its port
    before it starts: its KV side channel is its gRPC address, named in its handles.
    """
    if config.engine != "sim":
        return [config]
    if config.sim_engines == 1:
        return [dataclasses.replace(config, port=config.port or free_port())]
    return [
        dataclasses.replace(
            config,
            port=config.port if index == 0 and config.port else free_port(),
            instance_id=f"{config.instance_id}-{index}",
            metrics_port=config.metrics_port if index == 0 else -1,
            sim_engines=1,
        )
        for index in range(config.sim_engines)
    ]


def run_engines(config: EngineConfig, stage: Callable[[EngineConfig], Stage]) -> None:
    """Serve the engines ``config`` describes until SIGTERM/SIGINT."""
    run_stages([(replica, stage(replica)) for replica in replicas(config)])
