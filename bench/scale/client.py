"""The scale lab's load generator: streamed OpenAI requests over aiohttp, open-loop
(Poisson arrivals that do not wait for answers) or closed-loop (N streams back to back).

Per request it records TTFT, the gaps between content chunks (ITL), output and prompt
tokens and ``cached_tokens`` from the final usage event, and the HTTP status of a failure
(429 apart from the rest). It must never be what limits a run on a two-core host, so:

- bodies arrive serialized (``bench.scale.workload``); the loop only sends bytes;
- one wake-up per network read, however many events it holds; an event is classified
  by byte patterns, not parsed: only the usage event (one per request) and an error
  event go through ``json.loads``;
- one session with ``TCPConnector(limit=0)`` (aiohttp's default caps at 100 connections);
- the run reports the client's own CPU seconds and how late it sent against the schedule.

A "token" for ITL is a content-bearing chunk (as vLLM's and guidellm's benchmarks count
it); output token counts come from the usage event when the server sends one, else from
the chunk count.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.scale.workload import Request

#: Chunks that carry no generated text: usage-only, role-only and finish-only events, as
#: compact JSON (vLLM, Dynamo) or with Python's default separators (stagemesh).
_EMPTY_MARKERS = tuple(
    marker
    for compact in (b'"choices":[]', b'"text":""', b'"content":""', b'"delta":{}')
    for marker in (compact, compact.replace(b":", b": ", 1))
)
#: The usage event's object (other chunks carry none, or ``"usage":null``).
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


@dataclass(slots=True)
class Result:
    """One request's outcome; times in seconds from its send."""

    sent: float
    ttft: float | None = None
    done: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0
    #: When the last content chunk arrived (for the next gap).
    last: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    #: 200 for success, the HTTP status of a refusal, 0 for a transport failure, -1 for
    #: an error event inside a stream.
    status: int = 200
    error: str = ""
    #: Seconds a refusal asked the client to wait (its Retry-After header).
    retry_after: float = 0.0


def _read_usage(line: bytes, result: Result) -> None:
    usage = json.loads(line[6:]).get("usage")
    if not usage:
        return
    result.output_tokens = int(usage.get("completion_tokens") or 0)
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    result.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def _take_line(line: bytes, result: Result, now: float) -> bool:
    """Account one line of the event stream arrived at ``now``; True when the stream ends."""
    if not line.startswith(b"data: "):
        return False
    if line.startswith(b"data: [DONE]"):
        return True
    if any(marker in line for marker in _USAGE_MARKERS):
        _read_usage(line, result)
    if line.startswith(b'data: {"error"'):
        error = json.loads(line[6:])["error"]
        result.status, result.error = (
            -1,
            str(error.get("message") if isinstance(error, dict) else error)[:200],
        )
        return True
    if any(marker in line for marker in _EMPTY_MARKERS):
        return False
    if result.ttft is None:
        result.ttft = now
    else:
        result.itl.append(now - result.last)
    result.last = now
    result.chunks += 1
    return False


async def _read_stream(reply: aiohttp.ClientResponse, result: Result, started: float) -> None:
    """Consume one server-sent-event stream into ``result``: one wake-up per network read
    (whatever it holds), its lines split here; a line cut by a read waits for the next."""
    pending = b""
    async for data in reply.content.iter_any():
        now = time.perf_counter() - started
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if _take_line(line.rstrip(b"\r"), result, now):
                return
    if pending:
        _take_line(pending.rstrip(b"\r"), result, time.perf_counter() - started)


async def send(http: aiohttp.ClientSession, base_url: str, request: Request) -> Result:
    """One streamed request; never raises (a failure is a result with its status)."""
    started = time.perf_counter()
    result = Result(sent=started)
    try:
        async with http.post(
            f"{base_url}/{request.path}", data=request.body, headers=_HEADERS
        ) as reply:
            if reply.status != 200:
                result.status, result.error = reply.status, (await reply.text())[:200]
                result.retry_after = float(reply.headers.get("Retry-After", 0) or 0)
            else:
                await _read_stream(reply, result, started)
    except (TimeoutError, aiohttp.ClientError, ValueError) as error:
        result.status, result.error = 0, f"{type(error).__name__}: {error}"[:200]
    result.done = time.perf_counter() - started
    if result.status == 200 and not result.output_tokens:
        result.output_tokens = result.chunks
    return result


def session(timeout: float = 3_600.0) -> aiohttp.ClientSession:
    """A client session with no connection cap (every stream gets its own connection)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=30),
    )


@dataclass
class Run:
    """What one measured step produced: results, its wall time, the client's CPU and lag."""

    results: list[Result]
    wall_s: float
    client_cpu_s: float
    #: Worst delay between a request's scheduled and actual send (open loop only).
    max_lag_s: float = 0.0


async def open_loop(base_url: str, schedule: Sequence[tuple[float, Request]]) -> Run:
    """Send each request at its scheduled time whatever the server is doing, then wait
    for every answer. Wall time runs from the step's start to the last answer."""
    cpu_before = time.process_time()
    tasks: list[asyncio.Task[Result]] = []
    max_lag = 0.0
    async with session() as http:
        start = time.perf_counter()
        for at, request in schedule:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            tasks.append(asyncio.create_task(send(http, base_url, request)))
        results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start
    return Run(results, wall, time.process_time() - cpu_before, max_lag)


async def closed_loop(
    base_url: str, requests: Sequence[Request], streams: int, duration: float
) -> Run:
    """``streams`` concurrent streams, each sending its next request as soon as the last
    ends (after a refusal, once its ``Retry-After`` has passed, as the OpenAI SDKs
    wait), until ``duration`` has passed (requests then in flight finish and count)."""
    cpu_before = time.process_time()
    results: list[Result] = []
    async with session() as http:
        start = time.perf_counter()
        deadline = start + duration

        async def stream(offset: int) -> None:
            index = offset
            while time.perf_counter() < deadline:
                result = await send(http, base_url, requests[index % len(requests)])
                results.append(result)
                index += streams
                await asyncio.sleep(result.retry_after)

        await asyncio.gather(*(stream(i) for i in range(streams)))
        wall = time.perf_counter() - start
    return Run(results, wall, time.process_time() - cpu_before)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks
    (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(run: Run) -> dict[str, Any]:
    """The figures a table shows for one step (times in ms, rates per second)."""
    ok = [r for r in run.results if r.status == 200]
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    gaps = [gap * 1000 for r in ok for gap in r.itl]
    errors: dict[str, int] = {}
    for r in run.results:
        if r.status != 200:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "requests": len(run.results),
        "ok": len(ok),
        "rejected_429": errors.get("429", 0),
        "errors": sum(errors.values()) - errors.get("429", 0),
        "errors_by_status": errors,
        "wall_s": run.wall_s,
        "output_tokens": output,
        "output_tps": output / run.wall_s if run.wall_s else 0.0,
        **{f"ttft_p{q}_ms": percentile(ttfts, q) for q in (50, 90, 95, 99)},
        **{f"itl_p{q}_ms": percentile(gaps, q) for q in (50, 95, 99)},
        "prompt_tokens": prompt,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "client_cpu_s": run.client_cpu_s,
        "client_core_share": run.client_cpu_s / run.wall_s if run.wall_s else 0.0,
        "client_max_lag_ms": run.max_lag_s * 1000,
    }
