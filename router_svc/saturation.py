"""Is the router's relay saturated? Admission refuses new requests while it is.

A router process relays every token of every stream on one event loop (issue #28).
Past what one core can relay, each new stream slows all the others: at 1,024 streams
TTFT p50 was 2.7 s, and every admitted request paid for the ones after it. So the
router admits new requests only while the loop keeps up, and answers 429 beyond that
(vLLM and SGLang bound their own queues the same way; Envoy's overload manager sheds
on the same kind of signal).

Saturated means both, averaged over the last second or so (:data:`MEMORY`):

- the loop runs callbacks late (a timer due every 50 ms fires ``--max-loop-lag-ms``
  late or more), and
- the loop's thread is busy: it was running, or ready to run and waiting for a core,
  for at least :data:`BUSY_SHARE` of the time (Linux's ``schedstat``: time on a CPU
  plus time on the run queue).

The second half tells a relay with more work than it can do from a loop made late
otherwise (a blocking call, a stopped process). Run-queue time counts as busy, so a
router that shares its cores with engines is judged by the work it has, not by the
share of a core it happens to get.

Before it is saturated, a relay is *behind*: busy and late by :data:`BEHIND_LAG` or
more, or the process on a CPU :data:`BEHIND_CPU_SHARE` of the time or more (a few
streams at a fast pace keep a loop that busy without making it late). Its cost is per
engine message (a gRPC read, a detokenizer push, an SSE event, a socket write), not per
id, so while it is behind the streams it opens ask their engines for several ids per
message (``--behind-stream-interval``, vLLM's ``--stream-interval`` chosen per
request): the same tokens in fewer messages, and none held back while it keeps up.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from pathlib import Path

from prometheus_client import Gauge

#: How often the loop's lateness and the process's CPU are sampled (seconds).
INTERVAL = 0.05
#: Time constant of the moving averages (seconds): a sample's weight decays by e in it.
MEMORY = 0.5
#: The share of the time, running or runnable, above which the loop's thread is busy.
BUSY_SHARE = 0.9
#: Lateness (seconds) from which a busy relay is behind: well under any --max-loop-lag-ms
#: worth setting, and well over what a loop with time to spare shows (a few ms).
BEHIND_LAG = 0.02
#: The share of the time the process spends on a CPU (running, not waiting for a core)
#: from which its relay is behind however late the loop runs. It is the process's time,
#: not the loop thread's: gRPC's own threads read and parse the engines' messages, about
#: a fifth of the relay's work, and at 64 fast streams the loop's thread alone stayed
#: under 0.8 of a core while the process used all of one (12,900 tokens/s; behind from
#: the process's 0.6, 28,600). Time waiting for a core does not count: a router beside
#: busy engines is not behind.
BEHIND_CPU_SHARE = 0.6
#: The calling thread's scheduler statistics: ns on a CPU, ns waiting on a run queue.
_SCHEDSTAT = Path("/proc/thread-self/schedstat")

LOOP_LAG = Gauge(
    "stagemesh_router_loop_lag_seconds",
    "How late the router's event loop runs its timers, averaged over about a second "
    "(the relay's saturation; new requests get 429 past --max-loop-lag-ms while busy)",
    multiprocess_mode="livemax",
)
BUSY_SHARE_GAUGE = Gauge(
    "stagemesh_router_loop_busy_share",
    "The share of the time the router's event loop thread was running or waiting for a "
    "core, averaged over about a second",
    multiprocess_mode="livemax",
)

CPU_SHARE_GAUGE = Gauge(
    "stagemesh_router_cpu_share",
    "The share of the time the router process spent on a CPU, averaged over about a "
    "second (from 0.6, new streams ask their engines for several ids per message)",
    multiprocess_mode="livemax",
)


def busy_seconds() -> float:
    """Seconds the calling thread has been running or runnable (its CPU time where the
    kernel keeps no scheduler statistics)."""
    try:
        on_cpu, waiting, _ = _SCHEDSTAT.read_text().split()
    except (OSError, ValueError):
        return time.thread_time()
    return (int(on_cpu) + int(waiting)) / 1e9


class Saturation:
    """Samples the running loop's lateness, its thread's busy share and the process's
    on-CPU share (:meth:`run`)."""

    def __init__(self, max_lag: float, behind_interval: int = 1) -> None:
        #: Lateness (seconds) past which a busy router refuses new requests; 0: never.
        self.max_lag = max_lag
        #: Ids per engine message that new streams ask for while the relay is behind.
        self.behind_interval = behind_interval
        self.lag = 0.0
        self.busy_share = 0.0
        self.cpu_share = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def saturated(self) -> bool:
        """Whether new requests should be refused now."""
        return 0 < self.max_lag <= self.lag and self.busy_share >= BUSY_SHARE

    @property
    def behind(self) -> bool:
        """Whether the relay is past keeping up, short of saturated: busy and late, or
        the process on a CPU most of the time."""
        return (
            self.lag >= BEHIND_LAG and self.busy_share >= BUSY_SHARE
        ) or self.cpu_share >= BEHIND_CPU_SHARE

    def ids_per_message(self) -> int:
        """What a stream opened now asks its engine for (0: the engine's own setting)."""
        return self.behind_interval if self.behind else 0

    def sample(self, late: float, busy_share: float, cpu_share: float, elapsed: float) -> None:
        """Fold one sample, which covers ``elapsed`` seconds, into the averages."""
        weight = 1 - math.exp(-elapsed / MEMORY)
        self.lag += weight * (max(0.0, late) - self.lag)
        self.busy_share += weight * (busy_share - self.busy_share)
        self.cpu_share += weight * (cpu_share - self.cpu_share)
        LOOP_LAG.set(self.lag)
        BUSY_SHARE_GAUGE.set(self.busy_share)
        CPU_SHARE_GAUGE.set(self.cpu_share)

    async def run(self) -> None:
        """Sample until cancelled."""
        loop = asyncio.get_running_loop()
        wall, busy, cpu = loop.time(), busy_seconds(), time.process_time()
        while True:
            await asyncio.sleep(INTERVAL)
            now, used, ran = loop.time(), busy_seconds(), time.process_time()
            elapsed = now - wall
            if elapsed > 0:
                self.sample(
                    elapsed - INTERVAL, (used - busy) / elapsed, (ran - cpu) / elapsed, elapsed
                )
            wall, busy, cpu = now, used, ran

    def start(self) -> None:
        """Sample in the running loop until :meth:`close`."""
        self._task = asyncio.create_task(self.run(), name="relay-saturation")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
