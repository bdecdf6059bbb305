"""A vLLM general plugin that stops NIXL's progress thread from spinning an idle core.

See :func:`services.nixl.limit_progress_poll` for the why. An engine stage exports
``STAGEMESH_NIXL_POLL_MS`` (``--nixl-poll-ms``); in any process where that variable is
set, this plugin makes every new NIXL agent (NixlConnector's, the store connector's)
use it as the progress thread's delay. vLLM loads ``vllm.general_plugins`` entry points
in each of its processes (API, engine core, workers) before the KV connectors create
their agents; the plugin is registered in ``pyproject.toml`` and may run several times
per process. Other vLLM processes in the environment are untouched.
"""

from __future__ import annotations

import os

from services.nixl import POLL_MS_ENV, limit_progress_poll, nixl_api


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    setting = os.environ.get(POLL_MS_ENV)
    if not setting or int(setting) <= 0:
        return  # not a stagemesh engine, or NIXL's own busy poll was asked for
    limit_progress_poll(nixl_api(), int(setting))
