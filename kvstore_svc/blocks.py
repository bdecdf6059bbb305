"""The KV store's bookkeeping: which slot of the pool holds which block, and in what state.

Pure logic, no I/O (the servicer owns the memory and NIXL). The rules it enforces:

- a block is addressed by ``(layout, chain hash)``; the layout names the model and the
  shape of its KV, so blocks of different models or block sizes never mix;
- a slot is granted to one writer (``reserve``) and becomes readable only when that
  writer commits it, after the store has seen the write complete (``written``: the
  writer's NIXL notification). A commit without it is refused and frees the slots, so
  uninitialised or stale bytes are never served under a hash. A second writer of the same
  block is not granted it, so two engines writing the same blocks at once leave one
  intact copy;
- readers pin what ``lookup`` returns until they release it or the pin runs out, and a
  pinned block is never evicted or overwritten mid-read;
- when the pool is full, the least recently used committed, unpinned block makes room.
  A lookup hit or a commit makes a chain's blocks most recent, its first block last, so
  a cold chain loses its deepest blocks first and never its root under live children;
- reservations and pins have deadlines, so a writer or reader that dies cannot hold
  slots for ever.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence

Key = tuple[str, int]


class LayoutMismatch(ValueError):
    """A writer's block size differs from the one the pool was laid out with."""


@dataclasses.dataclass
class _Entry:
    slot: int
    committed: bool = False
    pins: int = 0


@dataclasses.dataclass
class _Pin:
    expires_at: float
    keys: list[Key]


@dataclasses.dataclass
class _Reservation:
    expires_at: float
    keys: dict[int, Key]
    written: bool = False


class NotWritten(RuntimeError):
    """A commit for a reservation whose write the store never saw complete."""


@dataclasses.dataclass
class TableStats:
    """The pool's figures, for the store's Stats."""

    capacity_blocks: int = 0
    used_blocks: int = 0
    pinned_blocks: int = 0
    lookups: int = 0
    hit_blocks: int = 0
    miss_blocks: int = 0
    evictions: int = 0


class BlockTable:
    """Slots of a pool of ``region_bytes``, cut into blocks of the first writer's size.

    ``on_stored(keys)`` and ``on_removed(keys)`` report blocks becoming readable and
    leaving (evicted, dropped), for the store's KV events and its disk tier.
    """

    def __init__(
        self,
        region_bytes: int,
        on_stored: Callable[[list[Key]], None] = lambda keys: None,
        on_removed: Callable[[list[Key]], None] = lambda keys: None,
    ) -> None:
        self.region_bytes = region_bytes
        self.slot_bytes = 0
        #: Called with blocks becoming readable and leaving the pool (set by the disk tier).
        self.on_stored = on_stored
        self.on_removed = on_removed
        #: Every block with a slot, least recently used first.
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._free: list[int] = []
        self._pins: dict[str, _Pin] = {}
        self._reservations: dict[str, _Reservation] = {}
        self.stats = TableStats()

    @property
    def capacity(self) -> int:
        return self.stats.capacity_blocks

    def lookup(
        self, layout: str, hashes: Sequence[int], pin_seconds: float, now: float
    ) -> tuple[list[tuple[int, int]], str]:
        """The longest committed prefix of ``hashes`` as ``(hash, slot)``, pinned.

        Returns the hits and the pin's id ("" when nothing was hit).
        """
        self.stats.lookups += 1
        hits: list[tuple[int, int]] = []
        keys: list[Key] = []
        for chain_hash in hashes:
            entry = self._entries.get((layout, chain_hash))
            if entry is None or not entry.committed:
                break
            hits.append((chain_hash, entry.slot))
            keys.append((layout, chain_hash))
        self.stats.hit_blocks += len(hits)
        self.stats.miss_blocks += len(hashes) - len(hits)
        if not hits:
            return [], ""
        return hits, self.pin(keys, pin_seconds, now)

    def pin(self, keys: Sequence[Key], seconds: float, now: float) -> str:
        """Pin committed blocks (the store's own reads and writes of its disk tier pin
        too) and make them most recent, the chain's first block last; the pin's id."""
        held = [key for key in keys if key in self._entries]
        for key in reversed(held):  # the chain's first block most recent, as in the router
            entry = self._entries[key]
            entry.pins += 1
            self._entries.move_to_end(key)
        pin_id = uuid.uuid4().hex
        self._pins[pin_id] = _Pin(now + seconds, held)
        return pin_id

    def holds(self, key: Key) -> bool:
        """Whether a block is readable from the pool (committed)."""
        entry = self._entries.get(key)
        return entry is not None and entry.committed

    def slot_of(self, key: Key) -> int:
        """The slot a block with a slot (committed or reserved) lives in."""
        return self._entries[key].slot

    def release(self, pin_id: str) -> bool:
        """Unpin what a lookup pinned; False when the pin is unknown (released or expired)."""
        pin = self._pins.pop(pin_id, None)
        if pin is None:
            return False
        for key in pin.keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins -= 1
        return True

    def reserve(
        self, layout: str, hashes: Sequence[int], block_bytes: int, ttl: float, now: float
    ) -> tuple[str, list[tuple[int, int]]]:
        """Grant slots for the blocks of ``hashes`` that nobody stores or is writing.

        Returns the reservation's id and the granted ``(hash, slot)`` pairs, in the
        order asked. Granting stops when no slot can be freed (everything pinned or
        being written); the writer then stores fewer blocks.
        """
        self.lay_out(block_bytes)
        granted: dict[int, Key] = {}
        pairs: list[tuple[int, int]] = []
        for chain_hash in hashes:
            key = (layout, chain_hash)
            if key in self._entries or chain_hash in granted:
                continue
            slot = self._take_slot()
            if slot is None:
                break
            self._entries[key] = _Entry(slot)
            granted[chain_hash] = key
            pairs.append((chain_hash, slot))
        if not pairs:
            return "", []
        reservation_id = uuid.uuid4().hex
        self._reservations[reservation_id] = _Reservation(now + ttl, granted)
        return reservation_id, pairs

    def written(self, reservation_id: str) -> None:
        """Record that the write into a reservation's slots completed (unknown ids: none)."""
        reservation = self._reservations.get(reservation_id)
        if reservation is not None:
            reservation.written = True

    def is_written(self, reservation_id: str) -> bool:
        """Whether the reservation's write completed; KeyError for an unknown reservation."""
        return self._reservations[reservation_id].written

    def commit(self, reservation_id: str, hashes: Sequence[int] = (), abort: bool = False) -> int:
        """Make written blocks readable (``hashes``, or all of the reservation), freeing
        the rest of it; with ``abort``, free all of it. Returns the blocks committed.

        Raises KeyError for an unknown reservation (expired, or committed already), and
        :class:`NotWritten` (after freeing the slots) when its write was never seen.
        """
        reservation = self._reservations.pop(reservation_id)
        if not abort and not reservation.written:
            self._reservations[reservation_id] = reservation
            self.commit(reservation_id, abort=True)
            raise NotWritten(reservation_id)
        chosen = set(reservation.keys) if not hashes else set(hashes) & set(reservation.keys)
        if abort:
            chosen = set()
        committed: list[int] = []
        for chain_hash, key in reservation.keys.items():
            if chain_hash in chosen:
                self._entries[key].committed = True
                committed.append(chain_hash)
            else:
                self._free_entry(key)
        for chain_hash in reversed(committed):  # the chain's first block most recent
            self._entries.move_to_end(reservation.keys[chain_hash])
        if committed:
            self.on_stored([reservation.keys[h] for h in committed])
        return len(committed)

    def evict(self, hashes: Sequence[int] = (), everything: bool = False) -> int:
        """Drop committed, unpinned blocks from the pool (``hashes`` of any layout, or all)."""
        wanted = set(hashes)
        doomed = [
            key
            for key, entry in self._entries.items()
            if entry.committed and entry.pins == 0 and (everything or key[1] in wanted)
        ]
        self._remove(doomed)
        return len(doomed)

    def expire(self, now: float) -> None:
        """Unpin expired pins and abandon expired reservations (their writers are gone)."""
        for pin_id in [p for p, pin in self._pins.items() if pin.expires_at <= now]:
            self.release(pin_id)
        for reservation_id in [r for r, res in self._reservations.items() if res.expires_at <= now]:
            self.commit(reservation_id, abort=True)

    def snapshot(self) -> TableStats:
        self.stats.pinned_blocks = sum(1 for e in self._entries.values() if e.pins)
        self.stats.used_blocks = sum(1 for e in self._entries.values() if e.committed)
        return dataclasses.replace(self.stats)

    def lay_out(self, block_bytes: int) -> None:
        """Cut the pool into slots of ``block_bytes`` (the first writer's, or the disk
        tier's at a restart); LayoutMismatch for a size other than the pool's."""
        if block_bytes <= 0:
            raise LayoutMismatch("block_bytes must be positive")
        if self.slot_bytes == 0:
            capacity = self.region_bytes // block_bytes
            if capacity == 0:
                raise LayoutMismatch(
                    f"a block of {block_bytes} bytes does not fit the store's "
                    f"{self.region_bytes}-byte pool"
                )
            self.slot_bytes = block_bytes
            self.stats.capacity_blocks = capacity
            self._free = list(range(capacity - 1, -1, -1))
        elif block_bytes != self.slot_bytes:
            raise LayoutMismatch(
                f"this store holds blocks of {self.slot_bytes} bytes, not {block_bytes}: "
                "use one store per KV layout"
            )

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, entry in self._entries.items():  # least recently used first
            if entry.committed and entry.pins == 0:
                self.stats.evictions += 1
                self._remove([key])
                return self._free.pop()
        return None

    def _remove(self, keys: list[Key]) -> None:
        for key in keys:
            self._free_entry(key)
        if keys:
            self.on_removed(keys)

    def _free_entry(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._free.append(entry.slot)
