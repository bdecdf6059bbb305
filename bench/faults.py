"""What killing each stage costs N concurrent streams.

    python -m bench.faults [--streams 16] [--max-tokens 48]
                           [--stages decode,prefill,tokenizer,router] [--json F]

Starts etcd, the tokenizer, one prefill engine, two decode engines and a router (its
defaults: migration on). For each stage in turn: N greedy streams through the router's
gRPC API on an unbroken mesh, then the same N streams with that stage killed
(SIGKILL to its process group) once half of them have their first token, then the
stage started again. Prints, per stage: streams completed and failed, sequences the
router migrated, completed streams whose ids differ from the unbroken run, and the
end-to-end latency (p50 and max) of the streams with the fault next to without.

On two cores the engines share them (prefill on core 0, both decodes on core 1), so
the latencies are the host's, not a production mesh's; the counts are what matter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.report import add_output_arguments, print_table, write_json
from services.clients import RouterClient
from services.config import DEFAULT_HOME
from services.etcd_server import EmbeddedEtcd
from services.launcher import ProcessGroup, StageProcess
from services.model import prepare_bundled_model
from services.net import free_port
from services.pb import common_pb2, router_pb2

STAGES = ("decode", "prefill", "tokenizer", "router")


async def stream(
    router: RouterClient, prompt: str, max_tokens: int, started: asyncio.Event
) -> dict[str, Any]:
    """One greedy stream: its ids, its end-to-end seconds, and the error if it failed."""
    request = router_pb2.RouterGenerateRequest(
        text=prompt,
        return_token_ids=True,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    begun = time.monotonic()
    ids: list[int] = []
    try:
        async for delta in router.generate(request, timeout=600):
            if delta.token_ids and not ids:
                started.set()
            ids.extend(delta.token_ids)
    except grpc.aio.AioRpcError as error:
        return {"ids": ids, "e2e": time.monotonic() - begun, "error": error.code().name}
    return {"ids": ids, "e2e": time.monotonic() - begun, "error": None}


async def burst(
    router_address: str, prompts: list[str], max_tokens: int, victim: StageProcess | None
) -> list[dict[str, Any]]:
    """Every prompt streamed at once; ``victim`` is killed once half have a token."""
    events = [asyncio.Event() for _ in prompts]
    async with RouterClient(router_address) as router:
        tasks = [
            asyncio.create_task(stream(router, p, max_tokens, e)) for p, e in zip(prompts, events)
        ]
        if victim is not None:
            while sum(e.is_set() for e in events) < len(prompts) // 2:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(victim.kill)
        return await asyncio.gather(*tasks)


async def migrations(http_url: str) -> float:
    """The router's migration counter (streams moved after their engine broke)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{http_url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("stagemesh_router_migrations_total ")
    )


def summary(
    stage: str, unbroken: list[dict[str, Any]], faulted: list[dict[str, Any]], migrated: float
) -> dict[str, Any]:
    """One row: how the streams that ran through a stage's death ended, against a calm run."""
    done = [r for r in faulted if r["error"] is None]
    return {
        "stage": stage,
        "streams": len(faulted),
        "completed": len(done),
        "failed": len(faulted) - len(done),
        "migrated": int(migrated),
        "differing": sum(
            r["ids"] != u["ids"] for r, u in zip(faulted, unbroken) if r["error"] is None
        ),
        "e2e_p50_s": statistics.median(r["e2e"] for r in unbroken),
        "e2e_max_s": max(r["e2e"] for r in unbroken),
        "fault_e2e_p50_s": statistics.median(r["e2e"] for r in done) if done else None,
        "fault_e2e_max_s": max((r["e2e"] for r in done), default=None),
        "errors": sorted({r["error"] for r in faulted if r["error"]}),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start a mesh, then kill each asked-for stage under load, one at a time."""
    home = Path(args.home)
    prepare_bundled_model(home)
    log_dir = Path(tempfile.mkdtemp(prefix="stagemesh-bench-faults-"))
    etcd = EmbeddedEtcd(client_port=0)
    etcd.start()
    group = ProcessGroup()
    http_port = free_port()

    def stage(name: str, module: str, *extra: str) -> StageProcess:
        port = free_port()
        return group.add(
            StageProcess(
                name,
                module,
                [
                    "--port",
                    str(port),
                    "--etcd",
                    etcd.endpoint,
                    "--home",
                    str(home),
                    "--metrics-port",
                    "0",
                    *extra,
                ],
                f"127.0.0.1:{port}",
                log_dir,
            )
        )

    rows = []
    try:
        print(f"starting the mesh (logs in {log_dir})...", flush=True)
        stages = {
            "tokenizer": stage("tokenizer", "tokenizer_svc"),
            "prefill": stage("prefill", "prefill_svc", "--cpu-cores", "0"),
            "decode": stage("decode", "decode_svc", "--cpu-cores", "1"),
            "decode-2": stage("decode-2", "decode_svc", "--cpu-cores", "1"),
            "router": stage(
                "router", "router_svc", "--http-port", str(http_port), "--host", "127.0.0.1"
            ),
        }
        await asyncio.gather(*(s.wait_healthy(900) for s in stages.values()))
        await asyncio.sleep(3)  # the router's first load polls
        router_address, http_url = stages["router"].grpc_address, f"http://127.0.0.1:{http_port}"
        prompts = [
            f"Report {i}: the weather over the northern sea today is" for i in range(args.streams)
        ]
        for name in args.stages:
            unbroken = await burst(router_address, prompts, args.max_tokens, None)
            before = await migrations(http_url)
            print(f"{name}: {args.streams} streams, killed once half have a token...", flush=True)
            faulted = await burst(router_address, prompts, args.max_tokens, stages[name])
            stages[name].start()
            await stages[name].wait_healthy(900)
            after = await migrations(http_url)
            rows.append(summary(name, unbroken, faulted, after - before if name != "router" else 0))
            await asyncio.sleep(12)  # the killed member's lease runs out; the view settles
    finally:
        group.stop_all()
        etcd.stop()
    return rows


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--stages",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(STAGES),
        help=f"comma-separated, of {', '.join(STAGES)}",
    )
    add_output_arguments(parser, DEFAULT_HOME)
    args = parser.parse_args()
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    with contextlib.suppress(KeyboardInterrupt):
        rows = asyncio.run(run(args))
        print(
            f"\nKilling one stage under {args.streams} concurrent greedy streams of "
            f"{args.max_tokens} tokens"
        )
        print_table(
            rows,
            [
                ("stage", "killed", "s"),
                ("completed", "completed", "d"),
                ("failed", "failed", "d"),
                ("migrated", "migrated", "d"),
                ("differing", "differing ids", "d"),
                ("e2e_p50_s", "e2e p50 s", ".2f"),
                ("fault_e2e_p50_s", "with fault p50 s", ".2f"),
                ("e2e_max_s", "e2e max s", ".2f"),
                ("fault_e2e_max_s", "with fault max s", ".2f"),
            ],
        )
        if args.json:
            write_json(
                Path(args.json),
                {
                    "benchmark": "faults",
                    "settings": {k: v for k, v in vars(args).items() if k not in ("json", "png")},
                    "rows": rows,
                },
            )


if __name__ == "__main__":
    main()
