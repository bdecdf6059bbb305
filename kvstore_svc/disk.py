"""The KV store's disk tier: blocks written behind the memory pool, read back on a miss.

The pool stays the only thing engines read and write over NIXL. The disk tier sits
behind it:

- a block committed to the pool is queued for disk and pinned until its file is
  written, so it cannot be evicted before it is safe (write-behind);
- a Lookup whose chain continues past the pool's blocks onto disk blocks reads those
  into free (or evicted) slots first, checks each checksum, and commits the good ones,
  so the reader sees one longer prefix in the pool (read on a miss);
- LRU rules both tiers: the pool evicts its least recently used blocks (those on disk
  only leave the pool), the disk its least recently used files, except that blocks of
  agent sessions seen within ``--session-retention`` go last (kvstore_svc/sessions.py);
- the store's KV events speak of the store as one: a block is stored when it first
  enters either tier and removed when it has left both;
- a disk that fills up stops the writes (logged, counted, reported in Stats) while
  reads go on; writes resume once room is found again.

All file I/O runs on one thread, so moves, deletions and scans never race.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from kvstore_svc.blocks import BlockTable, Key, LayoutMismatch
from kvstore_svc.disk_files import (
    HEADER_BYTES,
    MIN_FREE_BYTES,
    BlockDirectory,
    DiskSetupError,
    FileMover,
)
from kvstore_svc.sessions import SessionRetention
from services.kv.events import KvEventLog, chain_name
from services.pb import kvstore_pb2

log = logging.getLogger(__name__)

#: Seconds the store's own pins (a block waiting for disk, a chain being read back) last
#: at most; they are released as soon as the move is done.
OWN_PIN_SECONDS = 600.0
#: Seconds between checks for room on a disk that filled up.
FULL_RECHECK_SECONDS = 5.0
#: Blocks named in one re-published KV event at a restart.
EVENT_BATCH = 1024


class DiskTier:
    """The disk index (LRU), the write-behind queue, and read-back into the pool."""

    def __init__(
        self,
        directory: BlockDirectory,
        mover: FileMover,
        capacity_bytes: int,
        table: BlockTable,
        events: KvEventLog,
        sessions: SessionRetention,
    ) -> None:
        self.directory = directory
        self.sessions = sessions
        self.mover = mover
        self._capacity_bytes = capacity_bytes
        self._table = table
        self._events = events
        #: Blocks with a complete file, least recently used first.
        self._index: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._queue: asyncio.Queue[tuple[list[Key], str]] = asyncio.Queue()
        self._io = ThreadPoolExecutor(1, thread_name_prefix="kvstore-disk")
        self.writes_stopped = False
        self._full_since = 0.0
        self.hit_blocks = 0
        self.corrupt_blocks = 0

    @property
    def blocks(self) -> int:
        return len(self._index)

    @property
    def capacity_blocks(self) -> int:
        slot = self._table.slot_bytes
        return self._capacity_bytes // (HEADER_BYTES + slot) if slot else 0

    def restore(self) -> int:
        """Index the blocks a previous run left (before serving), lay the pool out for
        them, and re-publish them as KV events so routers learn them again."""
        found = self.directory.scan()
        own_bytes = sum(block.file_bytes for block in found)
        if self.directory.free_bytes() + own_bytes < MIN_FREE_BYTES:
            raise DiskSetupError(
                f"--disk-dir {self.directory.root} is on a full disk "
                f"({self.directory.free_bytes() >> 20} MiB free): free some space"
            )
        if not found:
            return 0
        sizes = collections.Counter(block.file_bytes for block in found)
        file_bytes = sizes.most_common(1)[0][0]
        try:
            self._table.lay_out(file_bytes - HEADER_BYTES)
        except LayoutMismatch as exc:
            raise DiskSetupError(f"--disk-dir {self.directory.root}: {exc}") from None
        for block in found:
            if block.file_bytes == file_bytes:
                self._index[block.key] = None
        if len(self._index) < len(found):
            log.warning(
                "disk tier: %d block files of another size are not served",
                len(found) - len(self._index),
            )
        self._make_room(0)
        keys = list(self._index)
        for start in range(0, len(keys), EVENT_BATCH):
            self._events.stored_chains([h for _, h in keys[start : start + EVENT_BATCH]])
        return len(keys)

    # -- the pool's callbacks --------------------------------------------------------

    def memory_stored(self, keys: list[Key]) -> None:
        """Blocks committed to the pool: new to the store, unless read back from disk."""
        new = [key for key in keys if key not in self._index]
        if not new:
            return
        self._events.stored_chains([h for _, h in new])
        if self.writes_stopped:
            return
        pin = self._table.pin(new, OWN_PIN_SECONDS, time.monotonic())
        self._queue.put_nowait((new, pin))

    def memory_removed(self, keys: list[Key]) -> None:
        """Blocks that left the pool: gone from the store unless they are on disk."""
        gone = [chain_name(h) for layout, h in keys if (layout, h) not in self._index]
        if gone:
            self._events.removed(gone)

    # -- write-behind ----------------------------------------------------------------

    async def run_writer(self) -> None:
        """Write queued blocks to disk, a commit's batch at a time, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            keys, pin = await self._queue.get()
            try:
                self._make_room(len(keys))
                items = [(key, self._table.slot_of(key)) for key in keys]
                written, full = await loop.run_in_executor(
                    self._io, self.mover.write, items, self._table.slot_bytes
                )
            except OSError as exc:
                log.error("disk tier: writing %d blocks failed: %s", len(keys), exc)
                written, full = [], False
            finally:
                self._table.release(pin)
            # Unwritten blocks stay in the pool, pinned no more: its eviction reports them.
            for key in reversed(written):  # the chain's first block most recent, as in the pool
                self._index[key] = None
            if full:
                self._stop_writes()

    def _stop_writes(self) -> None:
        if not self.writes_stopped:
            log.warning(
                "disk tier: %s is full; new blocks stay in memory only until room is found "
                "(reads from disk go on)",
                self.directory.root,
            )
        self.writes_stopped = True
        self._full_since = time.monotonic()
        while not self._queue.empty():
            _, pin = self._queue.get_nowait()
            self._table.release(pin)

    def tick(self, now: float) -> None:
        """Forget sessions past their retention; resume writes once the disk has room
        again (called every second)."""
        self.sessions.prune(now)
        if not self.writes_stopped or now - self._full_since < FULL_RECHECK_SECONDS:
            return
        self._full_since = now
        if self.directory.free_bytes() >= MIN_FREE_BYTES + 4 * self._table.slot_bytes:
            log.info("disk tier: %s has room again; writing behind resumes", self.directory.root)
            self.writes_stopped = False

    def _make_room(self, incoming: int) -> None:
        """Delete files until ``incoming`` more fit the capacity: least recently used
        first, blocks of sessions within their retention last."""
        excess = len(self._index) + incoming - self.capacity_blocks
        if excess > 0:
            self._drop(self.sessions.victims(self._index, excess, time.monotonic()), False)

    # -- reads -----------------------------------------------------------------------

    async def promote(self, layout: str, hashes: Sequence[int], now: float) -> None:
        """Read the disk blocks that continue ``hashes``' chain past the pool into the
        pool, checked; the caller's Lookup then finds them committed."""
        table = self._table
        run: list[int] = []
        for chain_hash in hashes:
            key = (layout, chain_hash)
            if table.holds(key):
                continue
            if key not in self._index:
                break
            run.append(chain_hash)
        if not run:
            return
        # The pool's part of the chain must survive the slots taken for the disk's part.
        guard = table.pin([(layout, h) for h in hashes], OWN_PIN_SECONDS, now)
        try:
            reservation, granted = table.reserve(
                layout, run, table.slot_bytes, OWN_PIN_SECONDS, now
            )
            if not granted:
                return
            items = [((layout, h), slot) for h, slot in granted]
            loop = asyncio.get_running_loop()
            good, bad, missing = await loop.run_in_executor(
                self._io, self.mover.read, items, table.slot_bytes
            )
            table.written(reservation)
            if good:
                table.commit(reservation, [h for _, h in good])
            else:
                table.commit(reservation, abort=True)
            self.hit_blocks += len(good)
            self._drop(bad, corrupt=True)
            self._drop(missing, corrupt=False)
        finally:
            table.release(guard)

    def stats(self) -> kvstore_pb2.Stats:
        """The disk tier's part of the store's Stats."""
        moved = self.mover.stats
        sessions, session_blocks = self.sessions.figures()
        return kvstore_pb2.Stats(
            disk_blocks=self.blocks,
            disk_capacity_blocks=self.capacity_blocks,
            disk_hit_blocks=self.hit_blocks,
            disk_corrupt_blocks=self.corrupt_blocks,
            disk_writes_stopped=self.writes_stopped,
            disk_read_bytes=moved.read_bytes,
            disk_read_seconds=moved.read_seconds,
            disk_write_bytes=moved.write_bytes,
            disk_write_seconds=moved.write_seconds,
            disk_sessions=sessions,
            disk_session_blocks=session_blocks,
        )

    def touch(self, keys: Sequence[Key]) -> None:
        """A lookup used these blocks: most recent on disk too, the chain's first last."""
        for key in reversed(keys):
            if key in self._index:
                self._index.move_to_end(key)

    def _drop(self, keys: list[Key], corrupt: bool) -> None:
        for key in keys:
            self._index.pop(key, None)
            self.sessions.forget(key)
            self._io.submit(self.directory.remove, key)
            if not self._table.holds(key):
                self._events.removed([chain_name(key[1])])
        if keys and corrupt:
            self.corrupt_blocks += len(keys)
            log.warning("disk tier: %d blocks failed their checksum and were dropped", len(keys))

    def evict(self, hashes: Sequence[int], everything: bool) -> int:
        """Delete files (``hashes`` of any layout, or all); call after the pool's evict."""
        wanted = set(hashes)
        doomed = [key for key in self._index if everything or key[1] in wanted]
        self._drop(doomed, corrupt=False)
        return len(doomed)

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self.mover.close()
        self.directory.close()


def open_disk_tier(
    directory: BlockDirectory,
    capacity_gib: float,
    mover: FileMover,
    table: BlockTable,
    events: KvEventLog,
    retention_seconds: float,
) -> DiskTier:
    """Index what ``directory`` holds and put the tier behind ``table``'s pool. Raises
    :class:`DiskSetupError` for a directory the store cannot use (the caller closes it)."""
    sessions = SessionRetention(retention_seconds)
    tier = DiskTier(directory, mover, int(capacity_gib * (1 << 30)), table, events, sessions)
    restored = tier.restore()
    table.on_stored = tier.memory_stored
    table.on_removed = tier.memory_removed
    free = directory.free_bytes()
    if free < capacity_gib * (1 << 30):
        log.warning(
            "disk tier: --disk-gib %g but only %.1f GiB free on %s: writes stop when it fills",
            capacity_gib,
            free / (1 << 30),
            directory.root,
        )
    log.info("disk tier: %s, %g GiB, %d blocks restored", directory.root, capacity_gib, restored)
    return tier
