"""The router's relay-saturation signal (router_svc/saturation.py), on a real event loop:
CPU work that holds the loop makes it saturated (and behind: new streams ask engines for
several ids per message); lateness from a starved process (it waits, using no CPU) does
not; a loop that keeps up recovers."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from router_svc.saturation import Saturation

pytestmark = pytest.mark.unit


def spin(seconds: float) -> None:
    """Hold the loop doing CPU work."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def watch(saturation: Saturation, hold: object, seconds: float) -> bool:
    """Whether ``saturation`` said saturated while ``hold`` blocked the loop in 100 ms
    slices for ``seconds``."""
    seen = False
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        hold(0.1)  # type: ignore[operator]
        await asyncio.sleep(0.001)
        seen = seen or saturation.saturated
    return seen


async def test_busy_and_late_is_saturated_starved_is_not_and_it_recovers() -> None:
    saturation = Saturation(max_lag=0.02, behind_interval=4)
    saturation.start()
    try:
        assert saturation.ids_per_message() == 0  # keeping up: the engine's own setting
        assert await watch(saturation, spin, 2.0), (saturation.lag, saturation.busy_share)
        assert saturation.behind and saturation.ids_per_message() == 4
        await asyncio.sleep(2.0)
        assert not saturation.saturated, saturation.lag
        assert saturation.ids_per_message() == 0
        assert not await watch(saturation, time.sleep, 2.0), saturation.busy_share
        assert saturation.lag > 0.02  # late, but not from its own work
        assert not saturation.behind, saturation.cpu_share
    finally:
        await saturation.close()


def hash_for(seconds: float) -> None:
    """CPU work outside the GIL, as gRPC's threads do when they read the engines'
    messages: the loop keeps up, the process is on a CPU."""
    data = bytes(1 << 20)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        hashlib.sha256(data).digest()


async def test_the_process_on_a_cpu_off_the_loop_thread_is_behind() -> None:
    saturation = Saturation(max_lag=0.02, behind_interval=4)
    saturation.start()
    try:
        await asyncio.sleep(0.5)
        assert not saturation.behind, saturation.cpu_share
        hashing = asyncio.create_task(asyncio.to_thread(hash_for, 2.0))
        await asyncio.sleep(1.5)
        assert not saturation.saturated, saturation.lag  # the loop itself keeps up
        assert saturation.behind and saturation.ids_per_message() == 4, saturation.cpu_share
        await hashing
    finally:
        await saturation.close()


async def test_zero_never_refuses() -> None:
    saturation = Saturation(max_lag=0)
    saturation.start()
    try:
        assert not await watch(saturation, spin, 1.0)
    finally:
        await saturation.close()
