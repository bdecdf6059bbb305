"""The guard hook with a real guard process (tests/guard_server.py) in front of a real
router over the session's stages: allow, deny (403 and 429, over HTTP and gRPC),
rewrite, the output phase, and both failure policies when the guard is gone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from router_svc.auth import ApiKeys
from services.clients import RouterClient
from services.net import free_port
from services.operator.etcd_server import EmbeddedEtcd
from services.pb import common_pb2, router_pb2
from tests.support.stages import Mesh, router_process, running


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A guard process; yields it, its URL and the file of checks it received."""
    port, log = free_port(), tmp_path / "checks.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "tests.guard_server", str(port), str(log)])
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError("the guard process exited") from None
                time.sleep(0.05)
        yield process, f"http://127.0.0.1:{port}/check", log
    finally:
        process.kill()
        process.wait()


def _openai(http_port: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{http_port}/v1", api_key="guarded", max_retries=0, timeout=300
    )


def _chat(text: str) -> Any:
    return [{"role": "user", "content": text}]


@pytest.mark.asyncio(loop_scope="session")
async def test_guard_allows_denies_and_rewrites(
    etcd: EmbeddedEtcd,
    home: Path,
    mesh: Mesh,
    tmp_path: Path,
    guard: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, url, checks = guard
    audit = tmp_path / "audit.jsonl"
    router, http_port = router_process(
        etcd.endpoint,
        home,
        tmp_path,
        "--guard-url",
        url,
        "--guard-output",
        "true",
        "--guard-fail",
        "closed",
        "--worker-wait",
        "3",
        "--audit-log",
        str(audit),
        "--audit-content",
        "none",
    )
    router.env["STAGEMESH_API_KEY"] = "guarded"
    async with running(router):
        client = _openai(http_port)
        allowed = await client.chat.completions.create(
            model="", messages=_chat("Name a colour."), max_tokens=3
        )
        assert allowed.choices[0].message.content

        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.chat.completions.create(
                model="", messages=_chat("a forbidden question"), max_tokens=3
            )
        assert "forbidden topic" in str(denied.value)
        with pytest.raises(openai.RateLimitError, match="too many requests for this user"):
            await client.completions.create(model="", prompt="please slow down", max_tokens=3)

        # Rewritten: the guard's prompt and token budget, not the client's.
        rewritten = await client.completions.create(
            model="", prompt="rewrite me now", max_tokens=8, temperature=0
        )
        assert rewritten.usage is not None and rewritten.usage.completion_tokens == 2

        # The output phase: a completed result the guard denies is not returned.
        with pytest.raises(openai.PermissionDeniedError, match="output withheld"):
            await client.chat.completions.create(
                model="", messages=_chat("deny output please"), max_tokens=3
            )
        async with RouterClient(router.grpc_address, api_key="guarded") as grpc_client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await grpc_client.generate_unary(
                    router_pb2.RouterGenerateRequest(
                        text="forbidden over gRPC", sampling=common_pb2.SamplingParams(max_tokens=2)
                    )
                )
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        seen = [json.loads(line) for line in checks.read_text().splitlines()]
        assert {check["api_key_id"] for check in seen} == {ApiKeys.key_id("Bearer guarded")}
        assert [check["phase"] for check in seen].count("output") == 3  # allowed, rewritten, denied
        assert seen[0]["request"]["chat"]["messages"][0]["content"] == "Name a colour."

        # The guard is gone: closed means refused, with a clear 503.
        process.kill()
        process.wait()
        with pytest.raises(openai.InternalServerError) as unguarded:
            await client.completions.create(model="", prompt="Name a colour.", max_tokens=2)
        assert unguarded.value.status_code == 503 and "guard is unavailable" in str(unguarded.value)
        metrics = (await httpx.AsyncClient().get(f"http://127.0.0.1:{http_port}/metrics")).text
    # Refused requests are audited too, each with the kind of its refusal.
    statuses = sorted(json.loads(line)["status"] for line in audit.read_text().splitlines())
    assert statuses == [
        "Overloaded",
        "PermissionDenied",
        "PermissionDenied",
        "PermissionDenied",
        "Unavailable",
        "ok",
        "ok",
    ]
    for series in (
        'stagemesh_router_guard_decisions_total{decision="deny",phase="input"} 3.0',
        'stagemesh_router_guard_decisions_total{decision="rewrite",phase="input"} 1.0',
        'stagemesh_router_guard_decisions_total{decision="deny",phase="output"} 1.0',
        'stagemesh_router_guard_decisions_total{decision="fail_closed",phase="input"} 1.0',
    ):
        assert series in metrics, series
    assert "stagemesh_router_guard_seconds_count" in metrics


@pytest.mark.asyncio(loop_scope="session")
async def test_guard_failing_open_serves(
    etcd: EmbeddedEtcd, home: Path, mesh: Mesh, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/check"  # nothing listens there
    router, http_port = router_process(
        etcd.endpoint,
        home,
        tmp_path,
        "--guard-url",
        dead,
        "--guard-fail",
        "open",
        "--worker-wait",
        "3",
    )
    async with running(router):
        reply = await _openai(http_port).completions.create(
            model="", prompt="Name a colour.", max_tokens=2
        )
        assert reply.choices[0].text is not None
        metrics = (await httpx.AsyncClient().get(f"http://127.0.0.1:{http_port}/metrics")).text
    assert (
        'stagemesh_router_guard_decisions_total{decision="fail_open",phase="input"} 1.0' in metrics
    )
