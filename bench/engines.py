"""Prefill/decode handoff benchmark: what disaggregation costs and what NIXL achieves.

Starts etcd, one prefill and one decode stage (each pinned to its own core) and, for
prompt lengths from 64 tokens to the model's limit, measures:

- prefill time (the Prefill RPC: prompt computed, KV kept for transfer);
- handoff: decode's time to first token with the handle, less one decode step — the
  NIXL pull of the prompt's KV plus scheduling;
- KV bytes moved and the GB/s that makes, next to a raw NIXL host-to-host copy of the
  same size measured in the same run (after the engines stop, so they do not compete);
- end to end for OUTPUT tokens: prefill + decode on two engines vs one engine alone.

    python -m bench.engines [--lengths 64,256,1024,4096,8000] [--json F] [--png F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.nixl_copy import raw_copy_gbps
from bench.report import add_output_arguments, print_table, write_json, write_png
from services.clients import EngineClient
from services.config import DEFAULT_HOME
from services.etcd_server import EmbeddedEtcd
from services.launcher import ProcessGroup, StageProcess
from services.model import prepare_bundled_model
from services.net import free_port
from services.pb import common_pb2


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int = 4) -> int:
    """K and V of every layer for one token (float32 on CPU)."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return int(config["num_hidden_layers"] * 2 * kv_heads * head_dim * dtype_bytes)


def fresh_prompt(length: int, rng: random.Random) -> list[int]:
    """Random ids, so no prefix cache anywhere helps."""
    return [rng.randrange(100, 40000) for _ in range(length)]


async def timed_generate(
    engine: EngineClient,
    prompt: list[int],
    params: common_pb2.SamplingParams,
    handle: common_pb2.KvTransferHandle | None = None,
) -> tuple[float, float, int]:
    """(time to first token, mean inter-token latency, tokens) of one Generate."""
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async for reply in engine.generate(prompt, params, kv_handle=handle):
        now = time.perf_counter()
        if reply.token_ids and not tokens:
            first = now - start
        tokens += len(reply.token_ids)
        last = now - start
    return first, (last - first) / max(tokens - 1, 1), tokens


async def measure(
    args: argparse.Namespace,
    prefill: EngineClient,
    decode: EngineClient,
    per_token: int,
    block_size: int,
) -> list[dict[str, Any]]:
    """One prompt length: prefill on one engine, KV pulled by the other, decode timed."""
    rng = random.Random(0)
    params = common_pb2.SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
    warm = fresh_prompt(32, rng)  # first calls pay one-off costs (NIXL handshake)
    await timed_generate(decode, warm, params, (await prefill.prefill(warm, params)).handle)
    rows = []
    for length in args.lengths:
        prompt = fresh_prompt(length, rng)
        start = time.perf_counter()
        prefilled = await prefill.prefill(prompt, params, timeout=None)
        prefill_s = time.perf_counter() - start
        ttft, itl, _ = await timed_generate(decode, prompt, params, prefilled.handle)
        split_e2e = time.perf_counter() - start
        blocks = len(prefilled.handle.remote_block_ids)
        kv_bytes = blocks * block_size * per_token
        handoff = max(ttft - itl, 1e-6)

        alone_prompt = fresh_prompt(length, rng)
        start = time.perf_counter()
        await timed_generate(decode, alone_prompt, params)
        alone_e2e = time.perf_counter() - start

        rows.append(
            {
                "prompt_tokens": length,
                "prefill_s": prefill_s,
                "handoff_s": handoff,
                "decode_ttft_s": ttft,
                "itl_ms": itl * 1000,
                "kv_blocks": blocks,
                "kv_mb": kv_bytes / 1e6,
                "kv_bytes": kv_bytes,
                "handoff_gbps": kv_bytes / handoff / 1e9,
                "split_e2e_s": split_e2e,
                "alone_e2e_s": alone_e2e,
            }
        )
        print(
            f"  {length:>5} tokens: prefill {prefill_s:.2f}s, handoff {handoff * 1000:.1f} ms, "
            f"{kv_bytes / 1e6:.1f} MB at {kv_bytes / handoff / 1e9:.2f} GB/s",
            flush=True,
        )
    return rows


async def run(args: argparse.Namespace) -> None:
    """Start a prefill and a decode engine and measure every requested length."""
    home = Path(args.home)
    model_dir = prepare_bundled_model(home)
    per_token = kv_bytes_per_token(model_dir)
    log_dir = Path(tempfile.mkdtemp(prefix="stagemesh-bench-"))
    etcd = EmbeddedEtcd(client_port=0)
    etcd.start()
    group = ProcessGroup()
    try:
        stages = []
        for role, core in (("prefill", "0"), ("decode", "1")):
            port = free_port()
            stages.append(
                group.add(
                    StageProcess(
                        role,
                        f"{role}_svc",
                        [
                            "--port",
                            str(port),
                            "--etcd",
                            etcd.endpoint,
                            "--home",
                            str(home),
                            "--cpu-cores",
                            core,
                            "--kv-cache-gib",
                            "2",
                            "--max-model-len",
                            str(args.max_model_len),
                        ],
                        f"127.0.0.1:{port}",
                        log_dir,
                    )
                )
            )
        print(f"starting engines (logs in {log_dir})...", flush=True)
        await asyncio.gather(*(stage.wait_healthy(600) for stage in stages))
        async with (
            EngineClient(stages[0].grpc_address) as prefill,
            EngineClient(stages[1].grpc_address) as decode,
        ):
            block_size = (await decode.load()).kv_block_size
            rows = await measure(args, prefill, decode, per_token, block_size)
    finally:
        group.stop_all()
        etcd.stop()
    # The raw NIXL baseline runs once the engines are gone, so neither disturbs the other.
    for row in rows:
        row["raw_nixl_gbps"] = raw_copy_gbps(row["kv_bytes"])

    print(
        f"\nKV handoff prefill -> decode over NIXL ({per_token} KV bytes/token, block "
        f"{block_size}, "
        f"{args.output} output tokens)"
    )
    print_table(
        rows,
        [
            ("prompt_tokens", "prompt", "d"),
            ("prefill_s", "prefill s", ".3f"),
            ("handoff_s", "handoff s", ".4f"),
            ("kv_mb", "KV MB", ".1f"),
            ("handoff_gbps", "handoff GB/s", ".2f"),
            ("raw_nixl_gbps", "raw NIXL GB/s", ".2f"),
            ("itl_ms", "ITL ms", ".1f"),
            ("split_e2e_s", "split e2e s", ".2f"),
            ("alone_e2e_s", "one engine e2e s", ".2f"),
        ],
    )
    if args.json:
        write_json(
            Path(args.json),
            {
                "benchmark": "engines",
                "output_tokens": args.output,
                "kv_bytes_per_token": per_token,
                "rows": rows,
            },
        )
    if args.png:
        xs = [float(r["prompt_tokens"]) for r in rows]
        write_png(
            Path(args.png),
            "P/D handoff: achieved vs raw NIXL",
            "prompt tokens",
            {
                "handoff GB/s": (xs, [r["handoff_gbps"] for r in rows]),
                "raw NIXL GB/s": (xs, [r["raw_nixl_gbps"] for r in rows]),
            },
            "GB/s",
        )


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[64, 256, 1024, 4096, 8000],
    )
    parser.add_argument("--output", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--max-model-len", type=int, default=8192, help="engine context length")
    add_output_arguments(parser, DEFAULT_HOME)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
