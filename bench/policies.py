"""Routing policies on a shared-prefix workload, through the HTTP bridge, and what the
router itself costs.

    python -m bench.policies [--rate 0.25] [--users 27] [--turns 2] [--json F] [--png F]
    python -m bench.policies --policies ''     # only the router's cost, in minutes

Starts etcd, the tokenizer and two decode engines (one per core, aggregated: every
prompt is computed where it is routed), then for each policy in turn a router, and
drives the same workload through its OpenAI-compatible HTTP bridge: several long
system prompts, each shared by several users, each user holding a multi-turn
conversation, requests started at a fixed rate. Every policy gets system prompts of
its own, so caches warmed by an earlier policy do not help a later one. Reports TTFT
p50/p90/p99, ITL p50, output throughput and the prefix-cache hit rate the engines
themselves report (cached over prompt tokens, from each response's usage).

Then, at concurrency 1, the router's own cost: TTFT and ITL of the same prompts
through the router's gRPC API and straight to the decode engine, and TTFT and time per
token through the router's HTTP bridge next to a plain vLLM OpenAI server
(``vllm.entrypoints.openai.api_server``) with the same model and engine settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from bench.report import add_output_arguments, print_table, write_json
from router_svc.policy import POLICIES
from services.clients import EngineClient, RouterClient, TokenizerClient
from services.config import DEFAULT_HOME
from services.model import prepare_bundled_model
from services.net import free_port
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import ProcessGroup, StageProcess, cpu_seconds
from services.pb import common_pb2, router_pb2

#: How long the cost run watches the router and tokenizer idle, for their idle CPU.
_IDLE_WINDOW_S = 10.0
TOPICS = ("astronomy", "cooking", "law", "chemistry", "music", "geography", "poetry", "finance")


def system_prompt(seed: int, rules: int) -> str:
    """A long, seeded system prompt: users of one system share its prefix blocks."""
    rng = random.Random(seed)
    topic = rng.choice(TOPICS)
    return f"You are assistant #{seed}, an expert in {topic}. " + " ".join(
        f"Rule {i}: when asked about item {rng.randrange(10_000)}, "
        f"answer with code {rng.randrange(10_000)}."
        for i in range(rules)
    )


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile by rank (NaN for no values): enough for a benchmark's table."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sse_events(
    http: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of one streamed OpenAI response (server-sent events up to [DONE])."""
    async with http.stream("POST", path, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def chat(
    http: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    """One streamed chat completion: TTFT, inter-token gaps, text and usage."""
    body = {
        "model": "",
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    last = start
    gaps: list[float] = []
    text, usage = "", {}
    async for event in sse_events(http, "/v1/chat/completions", body):
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            if choice["delta"].get("content"):
                now = time.perf_counter()
                if first is None:
                    first = now - start
                else:
                    gaps.append(now - last)
                last = now
                text += choice["delta"]["content"]
    return {
        "ttft": first if first is not None else last - start,
        "gaps": gaps,
        "text": text,
        "usage": usage,
    }


async def workload(http_url: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The shared-prefix multi-turn load against one router: hit rate, TTFT, ITL, tok/s."""
    systems = [system_prompt(seed * 100 + s, args.rules) for s in range(args.systems)]
    results: list[dict[str, Any]] = []
    started = time.perf_counter()

    async def user(u: int) -> None:
        messages = [{"role": "system", "content": systems[u % len(systems)]}]
        async with httpx.AsyncClient(base_url=http_url, timeout=600) as http:
            for turn in range(args.turns):
                slot = started + (turn * args.users + u) / args.rate
                await asyncio.sleep(max(0.0, slot - time.perf_counter()))
                messages.append(
                    {
                        "role": "user",
                        "content": f"User {u}, turn {turn}: what is item {u * 10 + turn}?",
                    }
                )
                result = await chat(http, messages, args.output)
                messages.append({"role": "assistant", "content": result["text"]})
                results.append(result)

    await asyncio.gather(*(user(u) for u in range(args.users)))
    wall = time.perf_counter() - started
    ttfts = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    prompt = sum(r["usage"].get("prompt_tokens", 0) for r in results)
    cached = sum(
        r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in results
    )
    output = sum(r["usage"].get("completion_tokens", 0) for r in results)
    return {
        "requests": len(results),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p90_s": percentile(ttfts, 0.9),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "itl_p50_ms": percentile(gaps, 0.5) * 1000,
        "output_tok_s": output / wall,
        "hit_rate": cached / prompt if prompt else 0.0,
    }


async def overhead(
    router: RouterClient,
    decode: EngineClient,
    tokenizer: TokenizerClient,
    samples: int,
    output: int,
    mesh_pids: dict[str, int],
) -> dict[str, Any]:
    """TTFT and time per output token at concurrency 1: through the router's gRPC API vs
    the decode engine directly (the only engine left running), on the same warm prompts.

    Also the CPU time each of ``mesh_pids`` (router, tokenizer) spends on the routed
    runs per generated token, less what it burns idle over the same time (load polls,
    keep-alives). On a two-core host the engine keeps both cores busy while it
    generates, so the latency difference is the sum of small numbers with noise of the
    same size; the CPU the mesh's own stages burn per token is what steals from the
    engine (and what a host with spare cores would still pay serially).
    """

    async def timed(stream: Any) -> tuple[float, float]:
        start = time.perf_counter()
        first = last = 0.0
        tokens = 0
        async for reply in stream:
            if reply.token_ids:
                tokens += len(reply.token_ids)
                last = time.perf_counter() - start
                first = first or last
        return first, (last - first) / max(1, tokens - 1)

    params = common_pb2.SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
    direct: list[tuple[float, float]] = []
    routed: list[tuple[float, float]] = []
    cpu = dict.fromkeys(mesh_pids, 0.0)

    def cpu_now() -> dict[str, float]:
        return {name: cpu_seconds([pid]) for name, pid in mesh_pids.items()}

    warm = story_prompts(1)[0] + " (warm-up)"
    ids = list((await tokenizer.tokenize(warm)).token_ids)
    # The router's first request for a model fetches the model's decoder: not per token.
    await timed(
        router.generate(
            router_pb2.RouterGenerateRequest(
                token_ids=router_pb2.TokenIds(ids=ids), sampling=params
            )
        )
    )
    await asyncio.sleep(2)  # the engine's queues spin for a second after each message
    idle_since, idle_cpu = time.perf_counter(), cpu_now()
    await asyncio.sleep(_IDLE_WINDOW_S)
    idle_for, idle_after = time.perf_counter() - idle_since, cpu_now()
    idle_rate = {name: (idle_after[name] - idle_cpu[name]) / idle_for for name in mesh_pids}
    for text in story_prompts(samples):
        ids = list((await tokenizer.tokenize(text)).token_ids)
        await timed(decode.generate(ids, params))  # warm: both timed runs then hit the prefix cache
        direct.append(await timed(decode.generate(ids, params)))
        request = router_pb2.RouterGenerateRequest(
            token_ids=router_pb2.TokenIds(ids=ids), sampling=params, return_token_ids=True
        )
        before, started = cpu_now(), time.perf_counter()
        routed.append(await timed(router.generate(request)))
        elapsed, after = time.perf_counter() - started, cpu_now()
        for name in mesh_pids:
            cpu[name] += after[name] - before[name] - idle_rate[name] * elapsed
    # Paired: each routed run against the direct run just before it, on the same prompt,
    # so drift in the engine's speed over the run cancels out.
    return {
        "ttft_added_ms": statistics.median(r[0] - d[0] for d, r in zip(direct, routed, strict=True))
        * 1000,
        "itl_added_ms": statistics.median(r[1] - d[1] for d, r in zip(direct, routed, strict=True))
        * 1000,
        **{f"{name}_idle_cpu_pct": rate * 100 for name, rate in idle_rate.items()},
        **{
            f"{name}_cpu_ms_per_token": used * 1000 / (samples * output)
            for name, used in cpu.items()
        },
        "direct_ttft_ms": statistics.median(t for t, _ in direct) * 1000,
        "router_ttft_ms": statistics.median(t for t, _ in routed) * 1000,
        "direct_itl_ms": statistics.median(p for _, p in direct) * 1000,
        "router_itl_ms": statistics.median(p for _, p in routed) * 1000,
    }


def story_prompts(samples: int) -> list[str]:
    """Distinct prompts with long answers, for the concurrency-1 cost runs."""
    return [
        f"Sample {i}: tell me a long story about a lighthouse keeper named {name}."
        for i, name in zip(range(samples), itertools.cycle(("Ada", "Bo", "Cy", "Di", "Ed")))
    ]


async def http_timing(
    base_url: str, model: str, prompts: list[str], output: int
) -> dict[str, float]:
    """Median TTFT and time per output token of streamed /v1/completions at concurrency 1.

    Each prompt runs twice and the second run is timed, so both servers answer from
    their prefix cache. Time per token is (last event - first event) / (tokens - 1), which
    does not depend on how a server groups tokens into events.
    """
    ttfts, per_token = [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        for prompt in prompts:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": output,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for _ in range(2):  # the second run is timed
                start = time.perf_counter()
                first = last = 0.0
                tokens = 0
                async for event in sse_events(http, "/v1/completions", body):
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    if any(choice.get("text") for choice in event.get("choices", [])):
                        last = time.perf_counter() - start
                        first = first or last
            ttfts.append(first)
            per_token.append((last - first) / max(1, tokens - 1))
    return {
        "ttft_ms": statistics.median(ttfts) * 1000,
        "tpot_ms": statistics.median(per_token) * 1000,
    }


async def vllm_server_timing(
    args: argparse.Namespace, model_dir: Path, log_dir: Path
) -> dict[str, float]:
    """The same HTTP timing against a plain vLLM OpenAI server with the engines' settings."""
    port = free_port()
    server = StageProcess(
        "vllm-serve",
        "vllm.entrypoints.openai.api_server",
        [
            "--model",
            str(model_dir),
            "--served-model-name",
            "plain",
            "--dtype",
            "float32",
            "--port",
            str(port),
            "--max-model-len",
            str(args.max_model_len),
            "--block-size",
            str(args.block_size),
            "--num-gpu-blocks-override",
            str(args.kv_cache_blocks),
            "--enable-prefix-caching",
        ],
        "",
        log_dir,
        env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            deadline = time.monotonic() + 900
            while True:
                if not server.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not start:\n{server.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(1)
        return await http_timing(
            f"http://127.0.0.1:{port}",
            "plain",
            story_prompts(args.overhead_samples),
            args.overhead_output,
        )
    finally:
        server.stop(60)  # SIGTERM, then its whole process group


async def run(args: argparse.Namespace) -> None:
    """Start the mesh, run each policy's workload and the cost runs, print and save them."""
    home = Path(args.home)
    model_dir = prepare_bundled_model(home)
    log_dir = Path(tempfile.mkdtemp(prefix="stagemesh-bench-"))
    etcd = EmbeddedEtcd(client_port=0)
    etcd.start()
    group = ProcessGroup()

    def stage(name: str, module: str, *extra: str) -> StageProcess:
        port = free_port()
        return group.add(
            StageProcess(
                name,
                module,
                ["--port", str(port), "--etcd", etcd.endpoint, "--home", str(home), *extra],
                f"127.0.0.1:{port}",
                log_dir,
            )
        )

    rows = []
    try:
        # Two engines for the policies, one per core; the cost alone needs one.
        cores = (0, 1) if args.policies else (0,)
        print(
            f"starting tokenizer and {len(cores)} decode engine(s) (logs in {log_dir})...",
            flush=True,
        )
        tokenizer = stage("tokenizer", "tokenizer_svc")  # the group starts what it adds
        decodes = [
            stage(
                f"decode-{core}",
                "decode_svc",
                "--cpu-cores",
                str(core),
                "--kv-cache-blocks",
                str(args.kv_cache_blocks),
                "--block-size",
                str(args.block_size),
                "--max-model-len",
                str(args.max_model_len),
            )
            for core in cores
        ]
        await asyncio.gather(*(p.wait_healthy(900) for p in (tokenizer, *decodes)))

        async def start_router(policy: str) -> tuple[StageProcess, str]:
            http_port = free_port()
            router = stage(
                f"router-{policy}",
                "router_svc",
                "--http-port",
                str(http_port),
                "--router-policy",
                policy,
                "--host",
                "127.0.0.1",
            )
            await router.wait_healthy(120)
            await asyncio.sleep(2)  # the router's first load polls and KV snapshots
            return router, f"http://127.0.0.1:{http_port}"

        for number, policy in enumerate(args.policies):
            router, http_url = await start_router(policy)
            print(
                f"{policy}: {args.users} users x {args.turns} turns at {args.rate} req/s...",
                flush=True,
            )
            rows.append({"policy": policy, **await workload(http_url, args, seed=number + 1)})
            router.stop()
        # The cost figures at concurrency 1 come from one engine alone: a second engine
        # competes for the host's memory bandwidth and, on two cores, for the CPU.
        for extra in decodes[1:]:
            extra.stop()
        print("router cost at concurrency 1...", flush=True)
        router, http_url = await start_router("kv_aware")
        async with (
            RouterClient(router.grpc_address) as client,
            EngineClient(decodes[0].grpc_address) as decode,
            TokenizerClient(tokenizer.grpc_address) as tok,
        ):
            cost = await overhead(
                client,
                decode,
                tok,
                args.overhead_samples,
                args.overhead_output,
                {"router": router.pid, "tokenizer": tokenizer.pid},
            )
        routed_http = await http_timing(
            http_url, "", story_prompts(args.overhead_samples), args.overhead_output
        )
    finally:
        group.stop_all()
        etcd.stop()
    plain_http: dict[str, float] = {}
    if args.vllm_serve:
        print("plain vLLM OpenAI server, same model and settings, concurrency 1...", flush=True)
        plain_http = await vllm_server_timing(args, model_dir, log_dir)

    if rows:
        print(
            f"\nShared-prefix workload: {args.systems} system prompts, {args.users} users, "
            f"{args.turns} turns, {args.rate} req/s, {args.output} output tokens, "
            "two decode workers"
        )
        print_table(
            rows,
            [
                ("policy", "policy", "s"),
                ("requests", "requests", "d"),
                ("hit_rate", "hit rate", ".1%"),
                ("ttft_p50_s", "TTFT p50 s", ".3f"),
                ("ttft_p90_s", "TTFT p90 s", ".3f"),
                ("ttft_p99_s", "TTFT p99 s", ".3f"),
                ("itl_p50_ms", "ITL p50 ms", ".1f"),
                ("output_tok_s", "output tok/s", ".1f"),
            ],
        )
    print(
        "\nRouter cost at concurrency 1 (medians; added: median of paired differences on the "
        "same warm prompt; one engine; gRPC API vs the engine directly)"
    )
    print_table(
        [cost],
        [
            ("direct_ttft_ms", "direct TTFT ms", ".1f"),
            ("router_ttft_ms", "router TTFT ms", ".1f"),
            ("ttft_added_ms", "added ms/request", ".2f"),
            ("direct_itl_ms", "direct ITL ms", ".2f"),
            ("router_itl_ms", "router ITL ms", ".2f"),
            ("itl_added_ms", "added ms/token", ".2f"),
            ("router_cpu_ms_per_token", "router CPU ms/token", ".3f"),
            ("tokenizer_cpu_ms_per_token", "tokenizer CPU ms/token", ".3f"),
        ],
    )
    http_rows = [{"server": "stagemesh router (HTTP bridge)", **routed_http}]
    if plain_http:
        http_rows.append({"server": "plain vLLM OpenAI server", **plain_http})
    print("\nOpenAI HTTP at concurrency 1 (median TTFT, time per output token)")
    print_table(
        http_rows,
        [("server", "server", "s"), ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "ms/token", ".2f")],
    )
    if args.json:
        write_json(
            Path(args.json),
            {
                "benchmark": "policies",
                "settings": {k: v for k, v in vars(args).items() if k not in ("json", "png")},
                "policies": rows,
                "router_cost": cost,
                "http": http_rows,
            },
        )
    if args.png and rows:
        plot(Path(args.png), rows)


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """TTFT percentiles and throughput per policy, side by side (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; skipping {path} (pip install -e '.[bench]')")
        return
    names = [r["policy"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.25
    for offset, key in enumerate(("ttft_p50_s", "ttft_p90_s", "ttft_p99_s")):
        left.bar(
            [i + (offset - 1) * width for i in range(len(rows))],
            [r[key] for r in rows],
            width,
            label=key[5:8],
        )
    left.set_xticks(range(len(rows)), names)
    left.set_ylabel("TTFT (s)")
    left.legend()
    right.bar(names, [r["output_tok_s"] for r in rows])
    right.set_ylabel("output tokens/s")
    figure.suptitle("Routing policies on a shared-prefix workload")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def main() -> None:
    """``python -m bench.policies``: parse the flags and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--policies",
        type=lambda s: [p for p in s.split(",") if p],
        default=list(POLICIES),
        help="comma-separated; '' measures only the router's cost (one engine, minutes)",
    )
    # Sized for single-core CPU engines, which prefill ~130 tokens/s (a cold 600-token
    # prompt: 4.5 s to the first token). The 9 system prompts (~250 tokens, 7 blocks of
    # 32 each) overflow one engine's KV cache (48 blocks) but fit in two: a policy that
    # spreads every prompt over both workers thrashes, one that partitions them does not.
    # Odd counts (9 systems, 27 users) keep round_robin's alternation from lining up with
    # the users of one system, or with a user's turns, by accident.
    parser.add_argument("--systems", type=int, default=9, help="distinct system prompts")
    parser.add_argument(
        "--rules", type=int, default=10, help="length of each system prompt (rules)"
    )
    parser.add_argument("--users", type=int, default=27)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument(
        "--block-size", type=int, default=32, help="KV block size (tokens; CPU: a multiple of 32)"
    )
    parser.add_argument(
        "--kv-cache-blocks", type=int, default=48, help="KV cache per engine, in blocks"
    )
    parser.add_argument(
        "--max-model-len", type=int, default=1024, help="engine context (at most the cache)"
    )
    parser.add_argument("--rate", type=float, default=0.25, help="requests started per second")
    parser.add_argument("--output", type=int, default=8, help="tokens generated per request")
    parser.add_argument("--overhead-samples", type=int, default=20)
    parser.add_argument(
        "--overhead-output",
        type=int,
        default=64,
        help="tokens generated per request in the concurrency-1 cost runs",
    )
    parser.add_argument(
        "--vllm-serve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a plain vLLM OpenAI server (one more engine start)",
    )
    add_output_arguments(parser, DEFAULT_HOME)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
