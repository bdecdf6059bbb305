"""What loading a block from the KV store costs, measured on the loads themselves.

A load has two halves in two processes: the store's ``Lookup`` (a table walk, and disk
reads when the chain continues on disk) and the reader's NIXL read of the pinned slots.
The store times its Lookup and keeps the time by pin id; the reader reports its read's
seconds and blocks with ``Release``. The store adds both to two counters, seconds and
blocks loaded, which ``Stats`` and Prometheus expose. The router polls them and weighs a
prefix held in the store by their ratio: measured on this host's memory, disks and
network, never a configured constant.

Bounded: a lookup's time is forgotten when its pin is released or runs out, and past
:data:`MAX_OPEN` open lookups the oldest go first.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

from kvstore_svc.metrics import LOAD_SECONDS, LOADED_BLOCKS

#: Open lookups remembered at most (a reader that never releases leaves one until its pin
#: runs out); far more than the pins any mesh holds at once.
MAX_OPEN = 65_536


@dataclasses.dataclass
class _Lookup:
    seconds: float
    blocks: int
    expires_at: float


class LoadMeter:
    """Lookup times by pin id until their Release, and the cumulative load figures."""

    def __init__(self, capacity: int = MAX_OPEN) -> None:
        self.capacity = capacity
        #: Seconds of loads reported, and the blocks they loaded, since the store started.
        self.load_seconds = 0.0
        self.loaded_blocks = 0
        self._open: OrderedDict[str, _Lookup] = OrderedDict()

    def __len__(self) -> int:
        """Lookups whose Release has not come yet."""
        return len(self._open)

    def looked_up(self, pin_id: str, seconds: float, blocks: int, expires_at: float) -> None:
        """A Lookup that took ``seconds`` pinned ``blocks`` until ``expires_at`` (none
        pinned, no pin id: nothing will be read, nothing to remember)."""
        if not pin_id:
            return
        self._open[pin_id] = _Lookup(seconds, blocks, expires_at)
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)

    def released(self, pin_id: str, read_seconds: float, read_blocks: int) -> None:
        """A Release reporting the reader's read: its blocks count as loaded, with the
        lookup's time (when still known) and the read's. ValueError for figures no read
        gives (checked before anything is counted or forgotten)."""
        if not math.isfinite(read_seconds) or read_seconds < 0:
            raise ValueError(f"read_seconds must be a finite number >= 0, not {read_seconds}")
        lookup = self._open.get(pin_id)
        if lookup is not None and read_blocks > lookup.blocks:
            raise ValueError(
                f"read_blocks {read_blocks} is more than the {lookup.blocks} blocks the pin holds"
            )
        self._open.pop(pin_id, None)
        if read_blocks <= 0:
            return  # released unread (the engine had them, or its read failed)
        seconds = read_seconds + (lookup.seconds if lookup is not None else 0.0)
        self.load_seconds += seconds
        self.loaded_blocks += read_blocks
        LOAD_SECONDS.inc(seconds)
        LOADED_BLOCKS.inc(read_blocks)

    def expire(self, now: float) -> None:
        """Forget the lookups whose pins ran out (their readers are gone)."""
        for pin_id in [p for p, lookup in self._open.items() if lookup.expires_at <= now]:
            del self._open[pin_id]
