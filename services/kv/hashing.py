"""The mesh's name for a KV block: a chained hash over token ids.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean
equal prefixes on every worker, whatever hash seed each engine uses internally. The
router indexes blocks by it, the KV store addresses blocks by it, and the engines'
store connector computes it, so all three agree on what "the same prefix" is. No torch
or vLLM here: every stage uses it.
"""

from __future__ import annotations

import array
import hashlib
import sys
from collections.abc import Sequence

#: The chain hash of "no parent" (the first block of a sequence).
ROOT = 0
#: Bytes in a chain hash: 128 bits, so that planting a block under another prompt's name
#: costs about 2**64 hashes, not the 2**32 of a birthday search on 64 bits.
HASH_BYTES = 16


def _le_uint32(token_ids: Sequence[int]) -> bytes:
    ids = array.array("I", token_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The chained hash of one block.

    The first 16 bytes (little-endian) of SHA-256 over the parent's hash (16 bytes,
    little-endian) followed by the block's ids (uint32, little-endian): specified in
    bytes, so a KV store or client in any language computes the same names.
    """
    data = parent.to_bytes(HASH_BYTES, "little") + _le_uint32(token_ids)
    return int.from_bytes(hashlib.sha256(data).digest()[:HASH_BYTES], "little")


def chain_root(salt: str = "", adapter: str = "") -> int:
    """The chain's starting value for a cache_salt and a LoRA adapter (ROOT with
    neither): blocks of the same tokens under different salts or adapters get
    different chain hashes from the first block on. Without an adapter it is the
    SHA-256 of ``cache_salt:<salt>``; with one, of ``adapter:<byte length>:<name>``
    followed by that (first 16 bytes, little-endian, like the block hashes)."""
    if not salt and not adapter:
        return ROOT
    data = b"cache_salt:" + salt.encode()
    if adapter:
        name = adapter.encode()
        data = b"adapter:%d:" % len(name) + name + data
    return int.from_bytes(hashlib.sha256(data).digest()[:HASH_BYTES], "little")


def chain_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT) -> list[int]:
    """Chained hashes of every full block of ``token_ids`` (a partial last block has none)."""
    raw = _le_uint32(token_ids[: len(token_ids) - len(token_ids) % block_size])
    step = block_size * 4
    previous = parent.to_bytes(HASH_BYTES, "little")
    hashes = []
    for start in range(0, len(raw), step):
        previous = hashlib.sha256(previous + raw[start : start + step]).digest()[:HASH_BYTES]
        hashes.append(int.from_bytes(previous, "little"))
    return hashes


def to_wire(chain_hash: int) -> bytes:
    """A chain hash as protobuf messages carry it (``chain_names``): its 16 bytes,
    little-endian (too wide for a uint64 field)."""
    return chain_hash.to_bytes(HASH_BYTES, "little")


def from_wire(name: bytes) -> int:
    """The chain hash a message's ``chain_names`` entry holds; ValueError unless 16 bytes."""
    if len(name) != HASH_BYTES:
        raise ValueError(f"a chain name is {HASH_BYTES} bytes, not {len(name)}")
    return int.from_bytes(name, "little")
