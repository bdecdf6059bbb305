"""NIXL, as every stage that moves KV uses it: loading the bindings, taming the UCX
progress thread, and running one transfer to completion with a deadline.

No torch import here. ``import nixl`` picks a CUDA build of the bindings by asking torch
which CUDA it was built with, and on a CPU-only torch that means importing all of torch
(a second and a half, and the KV store must stay torch-free). Where torch is not loaded
yet we import the first installed build directly, in the order ``nixl`` itself tries
them; where it is (engine processes), we go through ``nixl`` so that vLLM and we share
one build of the bindings (two builds in one process collide).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: The environment variable the engines' vLLM plugin reads (``--nixl-poll-ms``).
POLL_MS_ENV = "STAGEMESH_NIXL_POLL_MS"

_BUILDS = ("nixl_cu13", "nixl_cu12", "nixl_rocm")


class TransferError(RuntimeError):
    """A NIXL transfer failed or did not finish in time.

    ``settled`` is False when NIXL could not cancel a transfer that ran out of time: it
    may still move bytes, so the memory it names on either side must not be handed to
    anyone else until a deadline the caller already holds runs out (the store's
    reservation for a write, its pin for a read). Give up those claims early only on a
    settled error.
    """

    def __init__(self, message: str, settled: bool = True) -> None:
        super().__init__(message)
        self.settled = settled


def nixl_api() -> ModuleType:
    """The NIXL Python API module (``nixl_agent``, ``nixl_agent_config``, bindings)."""
    # vLLM sets this before its own first NIXL import, to avoid a UCX memory leak.
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
    if "torch" in sys.modules or "nixl._api" in sys.modules:
        return importlib.import_module("nixl._api")
    for build in _BUILDS:
        try:
            return importlib.import_module(f"{build}._api")
        except ModuleNotFoundError as exc:
            if exc.name != build:
                raise
    raise ImportError(f"no NIXL bindings installed (tried {', '.join(_BUILDS)})")


def limit_progress_poll(api: ModuleType, poll_ms: int) -> None:
    """Make every NIXL agent created from now on sleep up to ``poll_ms`` in its progress thread.

    NIXL's UCX backend runs a progress thread that ``poll()``s its workers' event fds
    with a timeout of the agent's ``pthrDelay``, and ``nixl_agent`` hard-codes that to
    0: ``poll(..., 0)`` in a loop, ~95 % of a core per agent with nothing to do (found
    with ``top -H`` and gdb). UCX wakes the poll through the armed fds when work
    arrives, so a millisecond costs no latency and ~1 % of a core when idle. The thread
    cannot simply be turned off: a passive side (a prefill engine between steps, the
    KV store always) relies on it to progress peers' reads and writes.

    The bindings' config class is replaced by a subclass whose ``pthrDelay`` cannot go
    below the setting; calling this again is harmless. ``poll_ms <= 0`` leaves NIXL's
    own behaviour.
    """
    if poll_ms <= 0:
        return
    base = api.nixlBind.nixlAgentConfig
    if getattr(base, "stagemesh_min_delay_us", None) is not None:
        return
    min_delay_us = poll_ms * 1000

    class AgentConfigWithPollDelay(base):  # type: ignore[misc, valid-type]
        """The bindings' agent config, whose progress-thread delay cannot go below the setting."""

        stagemesh_min_delay_us = min_delay_us

        @property
        def pthrDelay(self) -> int:  # the bindings' name
            return int(base.pthrDelay.__get__(self))

        @pthrDelay.setter
        def pthrDelay(self, delay_us: int) -> None:
            base.pthrDelay.__set__(self, max(int(delay_us), min_delay_us))

    api.nixlBind.nixlAgentConfig = AgentConfigWithPollDelay


def new_agent(name: str, poll_ms: int = 1) -> Any:
    """A NIXL agent with the UCX backend and a progress thread that does not spin.

    Its calls are serialized inside NIXL (strict thread sync): a store client reads on
    one thread and writes on another with the same agent.
    """
    api = nixl_api()
    limit_progress_poll(api, poll_ms)
    return api.nixl_agent(
        name,
        api.nixl_agent_config(
            backends=["UCX"], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
        ),
    )


def transfer(
    agent: Any,
    op: str,
    local: list[tuple[int, int, int]],
    remote: list[tuple[int, int, int]],
    peer: str,
    timeout: float,
    notify: bytes = b"",
    remote_kind: str = "DRAM",
) -> int:
    """Run one READ or WRITE between host-memory descriptor lists and wait for it.

    ``local`` and ``remote`` are ``(address, bytes, device id)`` triples in matching
    order; with ``remote_kind="FILE"`` the remote triples are ``(offset, bytes, fd)`` of
    files registered with the agent's POSIX backend (``peer`` is then the agent itself).
    ``notify``, when given, reaches the peer's agent as a NIXL notification once
    the transfer's data has landed (how a KV store learns a write is complete). Returns
    the bytes moved; raises :class:`TransferError` when NIXL reports an error or the
    transfer is not done within ``timeout`` seconds (a peer that died mid-transfer may
    never answer).
    """
    handle = agent.initialize_xfer(
        op,
        agent.get_xfer_descs(local, "DRAM"),
        agent.get_xfer_descs(remote, remote_kind),
        peer,
        notify,
    )
    error: TransferError | None = None
    try:
        state = agent.transfer(handle)
        deadline = time.monotonic() + timeout
        pause = 0.0
        while state not in ("DONE", "ERR"):
            if time.monotonic() > deadline:
                error = TransferError(f"NIXL {op} with {peer} not done after {timeout:.1f}s")
                break
            time.sleep(pause)
            pause = min(pause + 0.0002, 0.002)
            state = agent.check_xfer_state(handle)
        if state == "ERR":
            error = TransferError(f"NIXL {op} with {peer} failed")
    finally:
        # Releasing a transfer still in flight asks NIXL to cancel it.
        try:
            agent.release_xfer_handle(handle)
        except Exception as exc:  # noqa: BLE001  NIXL's bindings raise their own error types
            log.warning(
                "NIXL %s with %s could not be cancelled (%s): its memory stays claimed",
                op,
                peer,
                exc,
            )
            if error is not None:
                error.settled = False
    if error is not None:
        raise error
    return sum(length for _, length, _ in local)
