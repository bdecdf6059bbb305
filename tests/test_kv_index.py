"""The router's KV index (pure logic): chained hashes name equal prefixes equally,
events from each worker land in its own block set, matching finds the longest held
prefix per worker, and the memory cap evicts the least recently used blocks."""

from __future__ import annotations

import hashlib

from router_svc.kv_index import KvIndex
from services.kv.hashing import block_hash, chain_hashes, from_wire, to_wire
from services.pb import common_pb2

BLOCK = 4


def stored(
    ids: list[int], engine_hashes: list[bytes], parent: bytes = b""
) -> common_pb2.BlockStored:
    return common_pb2.BlockStored(
        block_hashes=engine_hashes, parent_block_hash=parent, token_ids=ids, block_size=BLOCK
    )


def test_chain_hashes_name_prefixes() -> None:
    a = chain_hashes(list(range(12)), BLOCK)
    b = chain_hashes(list(range(8)) + [99, 9, 10, 11], BLOCK)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert chain_hashes(list(range(7)), BLOCK) == a[:1]  # a partial block has no hash
    # The same block after a different prefix is a different block.
    assert chain_hashes(list(range(4, 8)), BLOCK)[0] != a[1]


def test_block_names_are_128_bits_as_specified() -> None:
    """The spec in bytes (services/kv/hashing.py), so any language computes the same
    names: the first 16 bytes of SHA-256 over the parent's 16 bytes and the ids as
    little-endian uint32, read little-endian. 128 bits: no 2**32 birthday collisions."""
    first, second = chain_hashes(list(range(8)), BLOCK)
    ids = b"".join(i.to_bytes(4, "little") for i in range(4, 8))
    digest = hashlib.sha256(first.to_bytes(16, "little") + ids).digest()
    assert second == int.from_bytes(digest[:16], "little") == block_hash(first, [4, 5, 6, 7])
    assert first.bit_length() > 64 or second.bit_length() > 64
    assert from_wire(to_wire(second)) == second and len(to_wire(second)) == 16


def test_match_finds_the_longest_held_prefix_per_worker() -> None:
    prompt = list(range(16))
    index = KvIndex()
    index.stored("a", stored(prompt[:8], [b"a1", b"a2"]))
    index.stored("a", stored(prompt[8:12], [b"a3"], parent=b"a2"))  # chained by engine hash
    index.stored("b", stored(prompt[:4], [b"b1"]))
    index.stored("b", stored([7, 7, 7, 7], [b"bx"], parent=b"b1"))  # diverges after block 1
    hashes = chain_hashes(prompt, BLOCK)
    assert index.match(hashes, ["a", "b", "c"]) == {"a": 3, "b": 1, "c": 0}
    assert index.blocks_of("a") == 3 and len(index) == 5

    index.removed("a", [b"a2"])  # a hole: the prefix past it no longer counts
    assert index.match(hashes, ["a", "b"]) == {"a": 1, "b": 1}
    index.cleared("b")
    assert index.match(hashes, ["a", "b"]) == {"a": 1, "b": 0}
    assert index.workers() == ["a"]


def test_router_hashes_from_the_publisher_are_trusted() -> None:
    index = KvIndex()
    index.stored(
        "kv",
        common_pb2.BlockStored(
            block_hashes=[b"k1"],
            token_ids=[1, 2, 3, 4],
            block_size=BLOCK,
            chain_names=[to_wire(42)],
        ),
    )
    assert index.match([42], ["kv"]) == {"kv": 1}
    index.stored(
        "kv", common_pb2.BlockStored(block_hashes=[b"k2"], chain_names=[(43).to_bytes(8, "little")])
    )
    assert index.match([43], ["kv"]) == {"kv": 0}  # a name of the wrong width is not indexed


def test_partial_or_malformed_records_are_not_indexed() -> None:
    index = KvIndex()
    index.stored("a", stored([1, 2, 3], [b"a1"]))
    index.stored("a", common_pb2.BlockStored(block_hashes=[b"a1"], token_ids=[1, 2, 3, 4]))
    assert len(index) == 0


def test_memory_cap_evicts_deepest_least_recently_used_blocks() -> None:
    index = KvIndex(max_blocks=4)
    first = list(range(8))
    index.stored("a", stored(first, [b"f1", b"f2"]))
    index.stored("b", stored(first, [b"g1", b"g2"]))
    assert len(index) == 4
    index.stored("a", stored(list(range(100, 104)), [b"n1"]))
    # The cold chain loses its deepest block (on both workers), not its root.
    assert len(index) == 3
    assert index.match(chain_hashes(first, BLOCK), ["a", "b"]) == {"a": 1, "b": 1}
    assert index.match(chain_hashes(list(range(100, 104)), BLOCK), ["a"]) == {"a": 1}
    assert index.blocks_of("a") == 2 and index.blocks_of("b") == 1


def test_salted_blocks_match_only_their_salt() -> None:
    """vLLM's first-block extra keys carry the cache_salt; the index names the chain with
    it, so only a prompt with the same salt matches."""
    from services.engine.vllm_events import apply_vllm_event
    from services.kv.events import KvEventLog
    from services.kv.hashing import chain_root

    log = KvEventLog(block_size=4)
    prompt = list(range(8))
    apply_vllm_event(
        log,
        {
            "type": "BlockStored",
            "block_hashes": [b"s1", b"s2"],
            "parent_block_hash": None,
            "token_ids": prompt,
            "block_size": 4,
            "lora_name": None,
            "extra_keys": [("tenant-a",), None],
        },
    )
    first, second = log.snapshot().blocks
    assert first.cache_salt == "tenant-a" and not first.parent_block_hash and not second.cache_salt
    index = KvIndex()
    index.stored("w", first)
    index.stored("w", second)
    assert index.match(chain_hashes(prompt, 4, chain_root("tenant-a")), ["w"]) == {"w": 2}
    assert index.match(chain_hashes(prompt, 4, chain_root("tenant-b")), ["w"]) == {"w": 0}
    assert index.match(chain_hashes(prompt, 4), ["w"]) == {"w": 0}
