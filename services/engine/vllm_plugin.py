"""A vLLM general plugin that keeps NIXL inside an engine's cores and off its idle CPU.

vLLM loads ``vllm.general_plugins`` entry points in each of its processes (API, engine
core, workers) before the KV connectors create their agents; the plugin is registered
in ``pyproject.toml`` and may run several times per process. It acts only where an
engine stage exported ``STAGEMESH_NIXL_POLL_MS`` (``--nixl-poll-ms``), so other vLLM
processes in the environment are untouched. It does two things:

- every new NIXL agent (NixlConnector's, the store connector's) sleeps up to that many
  milliseconds in its progress thread instead of busy-polling a core
  (:func:`services.kv.nixl.limit_progress_poll` says why);
- vLLM's NIXL worker on CPU does not re-pin the thread that creates it. It "reserves"
  the last core of each NUMA node for KV loads with ``sched_setaffinity``, whatever
  cores the engine was given, and on the uniprocess executor that thread is the engine
  core's main thread, OpenMP's thread 0: it moved an engine pinned to core 0 onto core
  1, beside the other engine's compute thread (found by the test that reads every
  engine thread's mask from /proc). An engine stage owns its cores
  (services/placement.py), so the reservation is turned off.
"""

from __future__ import annotations

import os

from services.kv.nixl import POLL_MS_ENV, limit_progress_poll, nixl_api


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    setting = os.environ.get(POLL_MS_ENV)
    if setting is None:
        return  # not a stagemesh engine
    keep_nixl_on_the_engine_cores()
    if int(setting) > 0:  # 0: NIXL's own busy poll was asked for
        limit_progress_poll(nixl_api(), int(setting))


def keep_nixl_on_the_engine_cores() -> None:
    """No NUMA "KV-transfer cores" for vLLM's NIXL worker: it then leaves affinity alone."""
    from vllm.platforms.cpu import CpuPlatform

    def no_reserved_cores(cls: type[CpuPlatform]) -> list[list[int]]:
        return []

    CpuPlatform.discover_numa_topology = classmethod(no_reserved_cores)
