"""An agent-trace benchmark: many sessions of many turns against plain vLLM and the mesh.

    python -m bench.agents [--sessions 6] [--turns 4-8] [--servers vllm,vllm-all-ram,mesh-disk]
                           [--deadline 420] [--json F] [--png F]

Agents re-send a context that grows every turn and come back after think times nobody
can predict. The trace (seeded, the same for every server) has ``--sessions`` sessions
of ``--turns`` turns each. A session opens with a system prompt and tool list shared by
all sessions plus a task of its own; each later turn appends a tool-call-shaped step
(the assistant's call, which is the previous reply's ids as generated, then a tool
result of heavy-tailed size) and waits a think time drawn from a Pareto distribution
(``--think-min`` seconds up, capped at ``--think-max``). With the defaults the live
contexts add up to several times one engine's KV cache (``--engine-blocks`` blocks of
128 tokens, set the same on every server), so an engine alone must recompute what it
evicted.

Servers (each started in turn, same model in float32, same engine KV):

- ``vllm``: vLLM's OpenAI server with as many KV blocks as the mesh's two engines
  together (``--engine-blocks`` x 2), so the same RAM for engine KV;
- ``vllm-all-ram``: the same server given the mesh's whole KV RAM as engine KV (the two
  engines' blocks and the store's ``--store-mib``);
- ``mesh-memory``: ``stagemesh up --layout aggregated`` (one engine on every core with
  both engines' blocks, loading from and writing to the store) with the KV store's memory
  tier only (``--store-mib``); ``--mesh-layout pd`` runs a prefill and a decode engine
  of ``--engine-blocks`` each on a core each instead, both using the store (the decode
  engine with ``--kvstore-decode``);
- ``mesh-disk``: the same with the store's disk tier (``--disk-gib`` in a temporary
  folder, or ``--disk-dir``).

Reports TTFT p50/p90/p99 per turn depth and overall, output tokens/s, prompt tokens
served from the engine's prefix cache, the store's memory and its disk (the store's
Stats), and the disk's read/write GB/s beside a raw file copy in the same folder.
Requests are sent session by session with ``X-Session-Id``, so the store keeps a
returning session's blocks. A 2-core host takes about 8 minutes per server with the
defaults (a server stops starting turns at ``--deadline`` seconds); scale with the flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.kvstore import measure_disk
from bench.report import add_output_arguments, print_table, write_json, write_png
from bench.vs_vllm import MODEL_NAME, Mesh, PlainVllm, Server
from services import credentials
from services.clients import KvStoreClient
from services.config import DEFAULT_HOME
from services.credentials import MESH_KEY_ENV, MeshCredentials
from services.model import prepare_bundled_model

BLOCK_TOKENS = 128  # the CPU engines' block size, vLLM's and the mesh's alike
SERVERS = ("vllm", "vllm-all-ram", "mesh-memory", "mesh-disk")
COLUMNS = [
    ("server", "server", ""),
    ("turns", "turns", "d"),
    ("output_tps", "out tok/s", ".2f"),
    ("ttft_p50_s", "TTFT p50 s", ".2f"),
    ("ttft_p90_s", "TTFT p90 s", ".2f"),
    ("ttft_p99_s", "TTFT p99 s", ".2f"),
    ("prompt_tokens", "prompt tok", "d"),
    ("engine_cached_tokens", "engine cache", "d"),
    ("store_memory_tokens", "store mem", "d"),
    ("store_disk_tokens", "store disk", "d"),
]


@dataclass
class Turn:
    """One request of a session: tokens it appends, tokens to generate, think time before."""

    new_tokens: list[int]
    output_tokens: int
    think_s: float


@dataclass
class Result:
    """What one turn measured."""

    session: int
    depth: int
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_s: float
    e2e_s: float


@dataclass
class Trace:
    """The sessions' turns, drawn once from the seed (every server gets the same)."""

    sessions: list[list[Turn]] = field(default_factory=list)


def ids(rng: random.Random, count: int) -> list[int]:
    """Token ids of text-like variety, away from the special tokens."""
    return [rng.randrange(100, 40000) for _ in range(count)]


def make_trace(args: argparse.Namespace) -> Trace:
    """Sessions of tool-call-shaped turns with heavy-tailed tool results and think times."""
    rng = random.Random(args.seed)
    shared = ids(rng, args.system_tokens)  # the system prompt and tools every agent has
    low, high = (int(x) for x in args.turns.split("-"))
    trace = Trace()
    for _ in range(args.sessions):
        turns = [Turn(shared + ids(rng, args.task_tokens), args.output_tokens, 0.0)]
        for _ in range(rng.randint(low, high) - 1):
            result = min(int(rng.lognormvariate(5.0, 0.6)), args.max_tool_tokens)
            think = min(args.think_min * rng.paretovariate(1.2), args.think_max)
            turns.append(Turn(ids(rng, max(result, 16)), args.output_tokens, think))
        trace.sessions.append(turns)
    return trace


async def run_turn(
    http: httpx.AsyncClient, session: int, prompt: list[int], turn: Turn
) -> tuple[Result, list[int]]:
    """One streamed completion; TTFT is the first chunk that carries a token."""
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": turn.output_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    start = time.perf_counter()
    first = 0.0
    generated: list[int] = []
    usage: dict[str, Any] = {}
    headers = {"X-Session-Id": f"agent-{session}"}
    async with http.stream("POST", "/v1/completions", json=body, headers=headers) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice.get("token_ids") and not first:
                    first = time.perf_counter() - start
                generated += choice.get("token_ids") or []
            usage = chunk.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    result = Result(
        session,
        0,
        len(prompt),
        int(details.get("cached_tokens") or 0),
        len(generated),
        first,
        time.perf_counter() - start,
    )
    return result, generated


async def run_session(
    http: httpx.AsyncClient, index: int, turns: list[Turn], deadline: float
) -> list[Result]:
    """A session's turns in order, each after its think time, until the deadline."""
    context: list[int] = []
    results = []
    for depth, turn in enumerate(turns):
        await asyncio.sleep(turn.think_s)
        if time.monotonic() > deadline:
            break
        context += turn.new_tokens
        result, generated = await run_turn(http, index, context, turn)
        result.depth = depth
        results.append(result)
        context += generated  # the assistant's tool call, as it was generated
    return results


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summarize(name: str, results: list[Result], wall_s: float) -> dict[str, Any]:
    """The table's row, and TTFT percentiles per turn depth."""
    ttfts = [r.ttft_s for r in results]
    by_depth: dict[int, list[float]] = {}
    for r in results:
        by_depth.setdefault(r.depth, []).append(r.ttft_s)
    return {
        "server": name,
        "turns": len(results),
        "output_tps": sum(r.output_tokens for r in results) / wall_s,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "cached_tokens": sum(r.cached_tokens for r in results),
        "mean_context_tokens": statistics.mean(r.prompt_tokens for r in results),
        "wall_s": wall_s,
        "ttft_by_depth": {
            depth: {q: percentile(v, q) for q in (50, 90, 99)} | {"turns": len(v)}
            for depth, v in sorted(by_depth.items())
        },
    }


async def store_stats(server: Server) -> Any:
    """The mesh's KV store figures (None for plain vLLM)."""
    if not isinstance(server, Mesh):
        return None
    async with KvStoreClient(server.kvstore_address) as store:
        return await store.stats()


def tier_tokens(row: dict[str, Any], before: Any, after: Any) -> None:
    """Split the cached prompt tokens by where they came from: store disk, store memory
    (the blocks engines loaded, less the disk's read-backs), the engine's own cache.

    Loads, not Lookup hits: an engine may look a prefix up more than once before it
    schedules the request (and the router looks up too), so hits overcount."""
    if before is None:
        row.update(engine_cached_tokens=row["cached_tokens"], store_memory_tokens=None)
        return
    disk = (after.disk_hit_blocks - before.disk_hit_blocks) * BLOCK_TOKENS
    hits = (after.loaded_blocks - before.loaded_blocks) * BLOCK_TOKENS
    row.update(
        store_disk_tokens=disk,
        store_memory_tokens=max(hits - disk, 0),
        engine_cached_tokens=max(row["cached_tokens"] - hits, 0),
        store_disk_write_gb=(after.disk_write_bytes - before.disk_write_bytes) / 1e9,
    )


async def measure(server: Server, trace: Trace, args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole trace against a started server, every session at once."""
    before = await store_stats(server)
    start = time.monotonic()
    deadline = start + args.deadline
    async with httpx.AsyncClient(base_url=server.url, timeout=args.deadline + 600) as http:
        per_session = await asyncio.gather(
            *(run_session(http, i, turns, deadline) for i, turns in enumerate(trace.sessions))
        )
    row = summarize(server.name, [r for rs in per_session for r in rs], time.monotonic() - start)
    after = await store_stats(server)
    tier_tokens(row, before, after)
    if after is not None and after.disk_write_bytes:
        row["disk"] = measure_disk(after, args.disk_dir or str(Path(tempfile.gettempdir())))
    return row


def build(
    name: str, args: argparse.Namespace, home: Path, model_dir: Path, log_dir: Path
) -> Server:
    """A server of the comparison, with the same engine KV blocks as the others."""
    if name.startswith("vllm"):
        blocks = 2 * args.engine_blocks  # the mesh's two engines' KV, in one engine
        if name == "vllm-all-ram":  # and the store's memory too, as engine KV
            blocks += (args.store_mib << 20) // kv_block_bytes(model_dir)
        extra = ("--num-gpu-blocks-override", str(blocks), "--enable-prompt-tokens-details")
        return PlainVllm(name, model_dir, log_dir, 1, args.max_model_len, False, extra)
    os.environ["STAGEMESH_MAX_MODEL_LEN"] = str(args.max_model_len)
    # The decode engine uses the store too: a turn it computes aggregated is written
    # there, and one it runs aggregated loads its prefix from there.
    os.environ["STAGEMESH_KVSTORE_DECODE"] = "true"
    # pd: two engines of --engine-blocks each; aggregated: one engine on every core
    # with both engines' blocks. Either way the same engine KV as ``vllm``.
    engines = 2 if args.mesh_layout == "pd" else 1
    os.environ["STAGEMESH_KV_CACHE_BLOCKS"] = str(2 * args.engine_blocks // engines)
    flags = ["--layout", args.mesh_layout, "--kvstore-mib", str(args.store_mib)]
    if name == "mesh-disk":
        flags += ["--kvstore-disk-dir", args.disk_dir, "--kvstore-disk-gib", str(args.disk_gib)]
    return Mesh(name, home, log_dir, flags)


def kv_block_bytes(model_dir: Path) -> int:
    """Bytes of one 128-token KV block of the bundled model in float32 (K and V, every layer)."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    return int(per_token * BLOCK_TOKENS)


async def run(args: argparse.Namespace) -> None:
    """Start each server in turn and play the trace against it."""
    home = Path(args.home)
    model_dir = prepare_bundled_model(home)
    log_dir = Path(tempfile.mkdtemp(prefix="stagemesh-agents-"))
    args.disk_dir = args.disk_dir or str(Path(tempfile.mkdtemp(prefix="kvstore-disk-")))
    # The mesh's key is ours, so that this process may read the store's Stats.
    os.environ[MESH_KEY_ENV] = os.environ.get(MESH_KEY_ENV) or secrets.token_hex(32)
    credentials.install(MeshCredentials.load(mesh_key=os.environ[MESH_KEY_ENV]))
    trace = make_trace(args)
    contexts = [sum(len(t.new_tokens) + t.output_tokens for t in s) for s in trace.sessions]
    print(
        f"trace: {len(contexts)} sessions, {sum(len(s) for s in trace.sessions)} turns, final "
        f"contexts {min(contexts)}-{max(contexts)} tokens ({sum(contexts)} in all) against "
        f"{2 * args.engine_blocks * BLOCK_TOKENS} tokens of engine KV per server; logs in "
        f"{log_dir}",
        flush=True,
    )
    rows = []
    for name in args.servers:
        server = build(name, args, home, model_dir, log_dir)
        print(f"\n== {name}: starting", flush=True)
        try:  # a start that fails or is interrupted still stops what it started
            await server.start()
            rows.append(await measure(server, trace, args))
        finally:
            server.stop()
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ttft_by_depth"}), flush=True)
    report(rows, args)


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The table, TTFT per depth, and the JSON and PNG where asked."""
    print_table(rows, COLUMNS)
    for row in rows:
        depths = ", ".join(
            f"{d}: {v[50]:.2f}/{v[90]:.2f}/{v[99]:.2f}" for d, v in row["ttft_by_depth"].items()
        )
        print(f"{row['server']} TTFT p50/p90/p99 s by turn depth: {depths}")
        if "disk" in row:
            print(f"{row['server']} disk GB/s: {row['disk']}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "png", "home")}
        write_json(
            Path(args.json),
            {"settings": settings, "loadavg": os.getloadavg(), "results": rows},
        )
    if args.png:
        series = {
            row["server"]: (
                [float(d + 1) for d in row["ttft_by_depth"]],
                [v[90] for v in row["ttft_by_depth"].values()],
            )
            for row in rows
        }
        write_png(Path(args.png), "agent trace: TTFT p90", "turn depth", series, "seconds")


def main() -> None:
    """Parse the flags and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--turns", default="4-8", help="turns per session, LOW-HIGH")
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--task-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--max-tool-tokens", type=int, default=1024)
    parser.add_argument("--think-min", type=float, default=2.0)
    parser.add_argument("--think-max", type=float, default=90.0)
    parser.add_argument("--engine-blocks", type=int, default=24)
    parser.add_argument("--store-mib", type=int, default=256)
    parser.add_argument(
        "--mesh-layout",
        choices=("pd", "aggregated"),
        default="aggregated",
        help="the mesh servers' engines: one engine on every core with both engines' KV "
        "blocks (what `stagemesh up` runs on a host of under 16 cores), or a prefill and a "
        "decode engine on a core each; either way every engine uses the store",
    )
    parser.add_argument("--disk-dir", default="")
    parser.add_argument("--disk-gib", type=float, default=4.0)
    parser.add_argument("--deadline", type=float, default=420.0)
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=0,
        help="at most (engine blocks - 1) x 128: vLLM keeps one block back (default that)",
    )
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--servers", default=",".join(SERVERS))
    add_output_arguments(parser, DEFAULT_HOME)
    args = parser.parse_args()
    args.servers = args.servers.split(",")
    args.max_model_len = args.max_model_len or (args.engine_blocks - 1) * BLOCK_TOKENS
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
