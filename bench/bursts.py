"""Bursts of concurrent prompts, the first one beside busy processes: how an engine's
first token holds up when something else wants its cores.

    python -m bench.bursts [--servers mesh,vllm] [--bursts 4] [--hog 1] [--json F]

Each server starts in turn (as ``bench.vs_vllm`` starts it). Then come ``--bursts``
bursts of ``--streams`` concurrent chat requests, each with a fresh 600-token prompt
(no prefix is shared, so nothing is cached) and 32 output tokens, sent with the scale
lab's prompts and client. During the first burst, ``--hog`` busy-loop processes run
beside the server, standing in for a client or any other program on the same host.
Reports each burst's first tokens, sorted (JSON), and the slowest per burst (PNG).

It separates the engine from the client: ``bench.vs_vllm``'s tail was all in its first
burst, while guidellm was starting up on the same cores (docs/design.md, "OpenMP threads
wait passively").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from bench.report import add_output_arguments, write_json, write_png
from bench.scale.client import send, session
from bench.scale.workload import Request, chat_body, token_ids
from bench.vs_vllm import MODEL_NAME, Mesh, PlainVllm, Server
from services.config import DEFAULT_HOME
from services.model import prepare_bundled_model

PROMPT_TOKENS = 600
OUTPUT_TOKENS = 32


async def first_token(http: aiohttp.ClientSession, url: str, seed: object) -> float:
    """Seconds to the first content chunk of one streamed chat completion whose prompt
    (the scale lab's, a function of ``seed``) no other request starts with."""
    ids = token_ids(("burst", seed), PROMPT_TOKENS)
    body = chat_body(MODEL_NAME, ids, OUTPUT_TOKENS)
    result = await send(http, url, Request("chat/completions", body, len(ids), OUTPUT_TOKENS))
    if result.status != 200 or result.ttft is None:
        raise RuntimeError(f"{url}: HTTP {result.status} {result.error}")
    return result.ttft


async def measure(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """The bursts against a started server; the hogs run during the first only."""
    bursts = []
    async with session(600) as http:
        for index in range(args.bursts):
            hogs = [
                await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
                for _ in range(args.hog if index == 0 else 0)
            ]
            try:
                firsts = await asyncio.gather(
                    *(
                        first_token(http, f"{server.url}/v1", (args.seed, index, stream))
                        for stream in range(args.streams)
                    )
                )
            finally:
                for hog in hogs:
                    hog.kill()
                    await hog.wait()
            bursts.append(sorted(firsts))
            print(f"{server.name} burst {index}: " + " ".join(f"{t:.2f}" for t in bursts[-1]))
            await asyncio.sleep(2)
    return {"server": server.name, "hog": args.hog, "first_token_s": bursts}


async def run(args: argparse.Namespace) -> None:
    """Start each server in turn, measure it, stop it."""
    home = Path(args.home)
    model_dir = prepare_bundled_model(home)
    log_dir = Path(tempfile.mkdtemp(prefix="stagemesh-bursts-"))
    results = []
    for name in args.servers:
        server: Server = (
            Mesh(name, home, log_dir, [])
            if name == "mesh"
            else PlainVllm(name, model_dir, log_dir, 1, 4096, tuned=False)
        )
        try:
            await server.start()
            results.append(await measure(server, args))
        finally:
            server.stop()
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "png", "home")}
        write_json(Path(args.json), {"settings": settings, "results": results})
    if args.png:
        series = {
            row["server"]: (
                [float(i) for i in range(len(row["first_token_s"]))],
                [max(burst) for burst in row["first_token_s"]],
            )
            for row in results
        }
        title = f"slowest first token per burst ({args.hog} busy process(es) in burst 0)"
        write_png(Path(args.png), title, "burst", series, "seconds")


def main() -> None:
    """Parse the flags and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="mesh,vllm", help="mesh and/or vllm")
    parser.add_argument("--bursts", type=int, default=4)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--hog", type=int, default=1, help="busy processes in burst 0")
    parser.add_argument("--seed", type=int, default=7)
    add_output_arguments(parser, DEFAULT_HOME)
    args = parser.parse_args()
    args.servers = args.servers.split(",")
    if set(args.servers) - {"mesh", "vllm"}:
        parser.error("--servers takes mesh and vllm")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
