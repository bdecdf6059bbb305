"""What one Python gRPC hop costs on this host: the floor under the router's cost per token.

    python -m bench.grpc_hop [--messages 200] [--gap-ms 50] [--json F]

A source process streams the decode engine's message (``GenerateResponse``), one every
``--gap-ms`` (an engine's pace at concurrency 1), each carrying its send time. A client
reads the stream straight from the source, then through a forwarder built the way the
router forwards a generated token: grpc.aio under uvloop, one message read from
upstream, one ``RouterGenerateResponse`` yielded downstream. It reports the latency from
source to client (median, p90) both ways, the difference being one hop's added
latency, and the forwarder's CPU per message, less its idle CPU.

The router cannot cost less per token than this forwarder, which does nothing else;
read ``bench.policies --policies ''`` (the router's own cost) against it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import uvloop

from bench.report import print_table, write_json
from services.clients import channel
from services.launcher import cpu_seconds
from services.net import free_port
from services.pb import engine_pb2, router_pb2

_SOURCE = "/bench.Source/Stream"
_FORWARDER = "/bench.Forwarder/Stream"


def _stamp() -> list[int]:
    """The send time as two uint32 token ids (the message has no other number field)."""
    now = time.monotonic_ns()  # one clock for every process on the host
    return [now & 0xFFFFFFFF, now >> 32]


def _sent_at(ids: Any) -> int:
    return int(ids[0]) | (int(ids[1]) << 32)


async def _serve(service: str, method: str, handler: Any, port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {method: handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def source(port: int, messages: int, gap: float) -> None:
    """A gRPC server that streams ``messages`` replies ``gap`` seconds apart."""

    async def stream(
        request: engine_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        for _ in range(messages):
            await asyncio.sleep(gap)
            yield engine_pb2.GenerateResponse(token_ids=_stamp())

    await _serve(
        "bench.Source",
        "Stream",
        grpc.unary_stream_rpc_method_handler(
            stream,
            engine_pb2.GenerateRequest.FromString,
            engine_pb2.GenerateResponse.SerializeToString,
        ),
        port,
    )


async def forwarder(port: int, upstream: str) -> None:
    """A gRPC server that relays the source's stream message by message, as the router does."""
    chan = channel(upstream)
    open_upstream = chan.unary_stream(
        _SOURCE,
        engine_pb2.GenerateRequest.SerializeToString,
        engine_pb2.GenerateResponse.FromString,
    )

    async def stream(
        request: engine_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        call = open_upstream(request)
        while (reply := await call.read()) is not grpc.aio.EOF:
            assert isinstance(reply, engine_pb2.GenerateResponse)
            yield router_pb2.RouterGenerateResponse(text=" token", token_ids=reply.token_ids)

    await _serve(
        "bench.Forwarder",
        "Stream",
        grpc.unary_stream_rpc_method_handler(
            stream,
            engine_pb2.GenerateRequest.FromString,
            router_pb2.RouterGenerateResponse.SerializeToString,
        ),
        port,
    )


async def _latencies(address: str, method: str, reply_type: Any) -> tuple[list[float], float]:
    """Each message's latency (ms) over one stream, and the stream's duration (s)."""
    async with channel(address) as chan:
        call = chan.unary_stream(
            method, engine_pb2.GenerateRequest.SerializeToString, reply_type.FromString
        )
        latencies = []
        started = time.perf_counter()
        async for reply in call(engine_pb2.GenerateRequest()):
            latencies.append((time.monotonic_ns() - _sent_at(reply.token_ids)) / 1e6)
        return latencies, time.perf_counter() - started


def _summary(path: str, latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "path": path,
        "latency_p50_ms": statistics.median(ordered),
        "latency_p90_ms": ordered[int(len(ordered) * 0.9)],
    }


async def measure(
    direct_address: str, forwarded_address: str, forwarder_pid: int
) -> dict[str, Any]:
    """The same stream read directly and through the forwarder: latency and CPU per message."""
    for address in (direct_address, forwarded_address):  # up
        async with channel(address) as chan:
            await asyncio.wait_for(chan.channel_ready(), 30)
    await _latencies(forwarded_address, _FORWARDER, router_pb2.RouterGenerateResponse)  # warm
    direct, _ = await _latencies(direct_address, _SOURCE, engine_pb2.GenerateResponse)
    before = cpu_seconds([forwarder_pid])
    forwarded, duration = await _latencies(
        forwarded_address, _FORWARDER, router_pb2.RouterGenerateResponse
    )
    busy = cpu_seconds([forwarder_pid]) - before
    before = cpu_seconds([forwarder_pid])
    await asyncio.sleep(duration)
    idle = cpu_seconds([forwarder_pid]) - before
    rows = [
        _summary("source -> client", direct),
        _summary("source -> forwarder -> client", forwarded),
    ]
    return {
        "rows": rows,
        "hop_added_ms": rows[1]["latency_p50_ms"] - rows[0]["latency_p50_ms"],
        "forwarder_cpu_ms_per_message": (busy - idle) * 1000 / len(forwarded),
    }


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument(
        "--gap-ms", type=float, default=50.0, help="time between messages at the source"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--serve-source", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-forwarder", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_source:
        uvloop.run(source(args.serve_source, args.messages, args.gap_ms / 1000))
        return
    if args.serve_forwarder:
        uvloop.run(forwarder(args.serve_forwarder, args.upstream))
        return
    source_port, forwarder_port = free_port(), free_port()
    me = [
        sys.executable,
        "-m",
        "bench.grpc_hop",
        "--messages",
        str(args.messages),
        "--gap-ms",
        str(args.gap_ms),
    ]
    processes = [
        subprocess.Popen([*me, "--serve-source", str(source_port)]),
        subprocess.Popen(
            [
                *me,
                "--serve-forwarder",
                str(forwarder_port),
                "--upstream",
                f"127.0.0.1:{source_port}",
            ]
        ),
    ]
    try:
        result = uvloop.run(
            measure(f"127.0.0.1:{source_port}", f"127.0.0.1:{forwarder_port}", processes[1].pid)
        )
    finally:
        for process in processes:
            process.kill()
            process.wait()
    print(f"\nOne grpc.aio hop, {args.messages} messages {args.gap_ms:g} ms apart")
    print_table(
        result["rows"],
        [
            ("path", "path", "s"),
            ("latency_p50_ms", "latency p50 ms", ".3f"),
            ("latency_p90_ms", "latency p90 ms", ".3f"),
        ],
    )
    print(
        f"added by the hop (p50): {result['hop_added_ms']:.3f} ms; "
        f"forwarder CPU: {result['forwarder_cpu_ms_per_message']:.3f} ms per message"
    )
    if args.json:
        settings = {"messages": args.messages, "gap_ms": args.gap_ms}
        write_json(Path(args.json), {"benchmark": "grpc_hop", "settings": settings, **result})


if __name__ == "__main__":
    main()
