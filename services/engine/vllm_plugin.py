"""A vLLM general plugin that stops NIXL's progress thread from spinning an idle core.

NIXL's UCX backend runs a progress thread that progresses its UCX workers, arms their
event fds and then ``poll()``s them with a timeout of the agent's ``pthrDelay``. The
Python agent (``nixl._api.nixl_agent``) hard-codes that delay to 0, so the thread calls
``poll(..., 0)`` in a loop: ~95 % of the core the engine is pinned to, with no request
in flight (found with ``top -H`` and gdb). On a CPU host every engine then computed at
about half speed and starved the light stages beside it.

The thread cannot simply be turned off: vLLM's NixlConnector relies on it to progress
the *prefill* side of a read while that engine's loop is idle (tried: decode reads hung).
A timeout of a millisecond keeps it responsive, since UCX wakes the poll through the
armed event fds as soon as there is work, while its idle cost drops to ~1 % of a core.

An engine stage exports ``STAGEMESH_NIXL_POLL_MS`` (``--nixl-poll-ms``); in any process
where that variable is set, this plugin makes every new NIXL agent use it as the
progress thread's delay. vLLM loads ``vllm.general_plugins`` entry points in each of its
processes (API, engine core, workers) before the KV connector creates its agent; the
plugin is registered in ``pyproject.toml`` and may run several times per process.
"""

from __future__ import annotations

import os

POLL_MS_ENV = "STAGEMESH_NIXL_POLL_MS"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    setting = os.environ.get(POLL_MS_ENV)
    if not setting or int(setting) <= 0:
        return  # not a stagemesh engine, or NIXL's own busy poll was asked for
    # vLLM sets this before its own first NIXL import, to avoid a UCX memory leak; the
    # import below would pre-empt it.
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
    import nixl._api as nixl_api

    base = nixl_api.nixlBind.nixlAgentConfig
    if getattr(base, "stagemesh_min_delay_us", None) is not None:
        return
    min_delay_us = int(setting) * 1000

    class AgentConfigWithPollDelay(base):  # type: ignore[misc, valid-type]
        """The bindings' agent config, whose progress-thread delay cannot go below the setting."""

        stagemesh_min_delay_us = min_delay_us

        @property
        def pthrDelay(self) -> int:  # the bindings' name
            return int(base.pthrDelay.__get__(self))

        @pthrDelay.setter
        def pthrDelay(self, delay_us: int) -> None:
            base.pthrDelay.__set__(self, max(int(delay_us), min_delay_us))

    nixl_api.nixlBind.nixlAgentConfig = AgentConfigWithPollDelay
