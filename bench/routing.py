"""The router's KV-index path alone: how many routing lookups per second at mesh scale.

    python -m bench.routing [--workers 64] [--blocks 1000000] [--json PATH]

Fills a :class:`KvIndex` with ``--blocks`` (block, worker) entries spread over
``--workers`` workers (shared system-prompt prefixes held by many workers, plus each
worker's own conversations), then times one decision as the router makes it: hash
the prompt's blocks, then find each worker's longest held prefix. Runs on one core.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

from bench.report import print_table, write_json
from router_svc.kv_index import KvIndex
from services.kv.hashing import chain_hashes
from services.pb import common_pb2

BLOCK_SIZE = 16


def fill(
    index: KvIndex, workers: int, blocks: int, prefixes: list[list[int]], rng: random.Random
) -> float:
    """Store shared prefixes on a quarter of the workers each, then unique chains; seconds taken."""
    started = time.perf_counter()
    engine_id = 0

    def store(worker: str, ids: list[int]) -> None:
        nonlocal engine_id
        count = len(ids) // BLOCK_SIZE
        hashes = [(engine_id + i).to_bytes(8, "little") for i in range(count)]
        engine_id += count
        index.stored(
            worker,
            common_pb2.BlockStored(block_hashes=hashes, token_ids=ids, block_size=BLOCK_SIZE),
        )

    names = [f"decode-{w}" for w in range(workers)]
    for prefix in prefixes:
        for worker in rng.sample(names, max(1, workers // 4)):
            store(worker, prefix)
    while len(index) < blocks:
        worker = rng.choice(names)
        store(worker, [rng.randrange(49152) for _ in range(BLOCK_SIZE * 32)])
    return time.perf_counter() - started


def rss_mib() -> float:
    """This process's resident memory, MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(
    workers: int, blocks: int, prompt_blocks: int = 64, decisions: int = 20_000
) -> dict[str, float]:
    """Fill an index with ``blocks`` entries over ``workers`` workers, then time
    ``decisions`` routing lookups (hash the prompt, match every worker)."""
    rng = random.Random(7)
    prefixes = [[rng.randrange(49152) for _ in range(BLOCK_SIZE * 48)] for _ in range(32)]
    before = rss_mib()
    index = KvIndex(max_blocks=blocks)
    fill_seconds = fill(index, workers, blocks, prefixes, rng)
    memory = rss_mib() - before
    names = index.workers()
    # Prompts: a shared system prompt then the user's own turn (prefix hits of 48 blocks).
    prompts = [
        rng.choice(prefixes)
        + [rng.randrange(49152) for _ in range(BLOCK_SIZE * (prompt_blocks - 48))]
        for _ in range(256)
    ]
    matched = 0
    started = time.perf_counter()
    for i in range(decisions):
        hashes = chain_hashes(prompts[i % len(prompts)], BLOCK_SIZE)
        matched += max(index.match(hashes, names).values())
    seconds = time.perf_counter() - started
    return {
        "workers": len(names),
        "entries": len(index),
        "fill_s": fill_seconds,
        "index_mib": memory,
        "decisions_per_s": decisions / seconds,
        "us_per_decision": seconds / decisions * 1e6,
        "mean_matched_blocks": matched / decisions,
    }


COLUMNS = [
    ("workers", "workers", "d"),
    ("entries", "index entries", ",d"),
    ("fill_s", "fill s", ".1f"),
    ("index_mib", "index MiB", ".0f"),
    ("decisions_per_s", "decisions/s", ",.0f"),
    ("us_per_decision", "us/decision", ".1f"),
    ("mean_matched_blocks", "matched blocks", ".1f"),
]


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--prompt-blocks", type=int, default=64, help="blocks per routed prompt")
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    row = measure(args.workers, args.blocks, args.prompt_blocks, args.decisions)
    print_table([row], COLUMNS)
    if args.json:
        write_json(
            args.json,
            {"benchmark": "routing", "block_size": BLOCK_SIZE, **vars(args), "json": None, **row},
        )


if __name__ == "__main__":
    main()
