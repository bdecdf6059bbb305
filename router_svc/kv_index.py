"""The router's index of which worker holds which KV blocks.

Blocks are named by the mesh's chained hash (:mod:`services.kv.hashing`), so equal hashes
mean equal prefixes on every worker and in the KV store. Engines report blocks with their own
hashes and the blocks' token ids; the index maps each worker's engine hashes to chain
hashes so that removals (which carry engine hashes only) find their blocks.

Pure data structure, no I/O: whatever follows the engines' KV-event streams feeds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from services.kv.hashing import ROOT, block_hash, chain_root, from_wire
from services.pb import common_pb2


class KvIndex:
    """Per-worker block sets, a global holder map, and a memory cap with LRU eviction.

    ``max_blocks`` bounds the number of (block, worker) entries. Past it the least
    recently stored or matched blocks are forgotten (for every worker): the index is a
    routing hint, so forgetting a block costs at worst a less informed choice.
    """

    def __init__(self, max_blocks: int = 1_000_000) -> None:
        self.max_blocks = max_blocks
        #: chain hash -> workers holding it, in least-recently-used order.
        self._holders: OrderedDict[int, set[str]] = OrderedDict()
        #: worker -> its engine hash -> chain hash, and the reverse.
        self._engine_hashes: dict[str, dict[bytes, int]] = {}
        self._chains: dict[str, dict[int, bytes]] = {}
        self._entries = 0

    def __len__(self) -> int:
        """(block, worker) entries held."""
        return self._entries

    def workers(self) -> list[str]:
        return list(self._engine_hashes)

    def blocks_of(self, worker: str) -> int:
        return len(self._engine_hashes.get(worker, {}))

    def stored(self, worker: str, event: common_pb2.BlockStored) -> None:
        """Record full blocks stored by ``worker``, chained to their parent."""
        known = self._engine_hashes.setdefault(worker, {})
        chains = self._chains.setdefault(worker, {})
        if event.parent_block_hash:
            parent = known.get(bytes(event.parent_block_hash), ROOT)
        else:
            parent = chain_root(event.cache_salt, event.adapter)
        size = event.block_size
        added: list[int] = []
        for i, engine_hash in enumerate(event.block_hashes):
            if i < len(event.chain_names):
                try:
                    parent = from_wire(
                        event.chain_names[i]
                    )  # the KV store names blocks by chain hash
                except ValueError:
                    break  # a malformed record: never index a block under a wrong name
            else:
                block = event.token_ids[i * size : (i + 1) * size]
                if size == 0 or len(block) < size:
                    break  # a malformed record: never index a partial block
                parent = block_hash(parent, block)
            holders = self._holders.setdefault(parent, set())
            if worker not in holders:
                holders.add(worker)
                self._entries += 1
            known[bytes(engine_hash)] = parent
            chains[parent] = bytes(engine_hash)
            added.append(parent)
        self._touch(added)
        self._evict()

    def removed(self, worker: str, engine_hashes: Iterable[bytes]) -> None:
        known = self._engine_hashes.get(worker)
        if not known:
            return
        for engine_hash in engine_hashes:
            chain = known.pop(bytes(engine_hash), None)
            if chain is not None:
                self._chains[worker].pop(chain, None)
                self._drop(chain, worker)

    def cleared(self, worker: str) -> None:
        """Forget every block of ``worker`` (cache reset, resync, or the worker left)."""
        self._engine_hashes.pop(worker, None)
        for chain in self._chains.pop(worker, {}):
            self._drop(chain, worker)

    def match(self, hashes: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        """For each candidate, how many leading blocks of ``hashes`` it holds.

        Walks the prompt's blocks once, narrowing the set of workers still matching,
        one set intersection per matched block; each worker's depth is written once, when it
        leaves the walk.
        """
        matched = dict.fromkeys(candidates, 0)
        active = set(matched)
        depth = 0
        for chain in hashes:
            holders = self._holders.get(chain)
            if not holders:
                break
            still = active & holders
            if len(still) < len(active):  # workers leave the walk: their depth is final
                for worker in active - still:
                    matched[worker] = depth
                active = still
                if not active:
                    break
            depth += 1
        for worker in active:
            matched[worker] = depth
        self._touch(hashes[:depth])
        return matched

    def match_any(self, hashes: Sequence[int], workers: Iterable[str]) -> int:
        """How many leading blocks of ``hashes`` are each held by at least one of
        ``workers``: the KV stores, which split a chain's blocks among them by hash."""
        pool = set(workers)
        depth = 0
        for chain in hashes:
            holders = self._holders.get(chain)
            if not holders or pool.isdisjoint(holders):
                break
            depth += 1
        self._touch(hashes[:depth])
        return depth

    def _touch(self, chain: Sequence[int]) -> None:
        """Mark a chain of blocks used, its first block most recent: eviction then
        takes the deepest blocks of cold chains first, never a root under live children."""
        for block in reversed(chain):
            self._holders.move_to_end(block)

    def _drop(self, chain: int, worker: str) -> None:
        holders = self._holders.get(chain)
        if holders is None or worker not in holders:
            return
        holders.discard(worker)
        self._entries -= 1
        if not holders:
            del self._holders[chain]

    def _evict(self) -> None:
        while self._entries > self.max_blocks and self._holders:
            chain, holders = self._holders.popitem(last=False)
            self._entries -= len(holders)
            for worker in holders:
                engine_hash = self._chains[worker].pop(chain, None)
                if engine_hash is not None:
                    self._engine_hashes[worker].pop(engine_hash, None)
