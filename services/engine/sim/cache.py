"""The simulated engine's paged KV cache: blocks, prefix caching and LRU eviction.

It follows vLLM v1's block pool (``vllm/v1/core/block_pool.py``): a fixed number of
blocks, each either in use (reference count above zero) or on one free queue, which is
also the eviction order. A full block is cached under its chain hash
(:mod:`services.kv.hashing`, salt and adapter included) and stays findable while it sits
free; allocating takes the free queue's head and evicts whatever that block cached. A
finished sequence frees its blocks tail first, so the end of a prompt is evicted before
its shared beginning. Every block cached or evicted is a real KV event, so the router's
index follows this cache exactly as it follows a vLLM engine's.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from services.kv.events import KvEventLog, chain_name


class BlockPool:
    """``num_blocks`` KV blocks of ``block_size`` tokens with a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, events: KvEventLog) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.events = events
        self._refs = [0] * num_blocks
        #: Chain hash each block is cached under (None: not a full, cached block).
        self._hash_of: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        #: Free blocks, head evicted first (vLLM's free_block_queue).
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(
            range(num_blocks)
        )
        self.queries = 0
        self.hits = 0

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by sequences (cached free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a chain are cached here."""
        count = 0
        for chain_hash in hashes:
            if chain_hash not in self._cached:
                break
            count += 1
        return count

    def can_take(self, hashes: Sequence[int], fresh: int) -> bool:
        """Whether referencing the cached blocks ``hashes`` and allocating ``fresh`` more
        fits: cached blocks that sit free leave the free queue when referenced."""
        evictable = sum(1 for h in hashes if self._refs[self._cached[h]] == 0)
        return len(self._free) - evictable >= fresh

    def record_query(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count a prompt's prefix-cache lookup for the hit rate (vLLM's prefix_cache_stats)."""
        self.queries += queried_tokens
        self.hits += hit_tokens

    def touch(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference on cached blocks (they leave the free queue while in use)."""
        blocks = []
        for chain_hash in hashes:
            block = self._cached[chain_hash]
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            blocks.append(block)
        return blocks

    def allocate(self, count: int) -> list[int] | None:
        """``count`` fresh blocks from the free queue's head, evicting what they cached;
        None (nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        blocks = []
        evicted: list[bytes] = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            old = self._hash_of[block]
            if old is not None:
                del self._cached[old]
                self._hash_of[block] = None
                evicted.append(chain_name(old))
            self._refs[block] = 1
            blocks.append(block)
        if evicted:
            self.events.removed(evicted)
        return blocks

    def cache(
        self,
        blocks: Sequence[int],
        hashes: Sequence[int],
        parent: int | None,
        token_ids: Sequence[int],
        salt: str = "",
        adapter: str = "",
    ) -> None:
        """Cache newly full blocks under their chain hashes and publish them (one
        BlockStored, chained to ``parent``, None for a chain's first block). A hash
        another block already caches (two sequences computed the same prefix at once)
        keeps the first one, as vLLM does; the duplicate stays uncached."""
        fresh: list[int] = []
        start = 0
        for index, (block, chain_hash) in enumerate(zip(blocks, hashes)):
            if chain_hash in self._cached:
                self._publish(
                    fresh,
                    parent,
                    token_ids[start * self.block_size : index * self.block_size],
                    salt,
                    adapter,
                )
                fresh, start, parent = [], index + 1, chain_hash
                continue
            self._cached[chain_hash] = block
            self._hash_of[block] = chain_hash
            fresh.append(chain_hash)
        self._publish(fresh, parent, token_ids[start * self.block_size :], salt, adapter)

    def _publish(
        self,
        hashes: list[int],
        parent: int | None,
        token_ids: Sequence[int],
        salt: str,
        adapter: str,
    ) -> None:
        if hashes:
            self.events.stored(
                [chain_name(h) for h in hashes],
                b"" if parent is None else chain_name(parent),
                list(token_ids[: len(hashes) * self.block_size]),
                salt,
                adapter,
            )

    def free(self, blocks: Sequence[int]) -> None:
        """Drop a sequence's references, its last block first: freed blocks join the
        free queue's tail, so a prompt's tail is evicted before its shared head."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
