"""Request bodies held at once are bounded (``--max-bodies-mib``, router_svc/http/bodies.py):
a request whose body would pass the bound gets 429 before its body is read, and the
room comes back when the request holding it ends. Simulated engines: what is tested is
the router's HTTP door, not an engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.support.sim import sim_mesh

KIB = 1024


async def stalled_upload(port: int, length: int) -> asyncio.StreamWriter:
    """A completion request that announces ``length`` body bytes and sends only a few:
    its handler waits for the rest, holding the body's room."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
            '{"model": "", "prompt": "'
        ).encode()
    )
    await writer.drain()
    return writer


@pytest.mark.asyncio(loop_scope="session")
async def test_bodies_past_the_bound_get_429_until_the_holder_ends(
    home: Path, tmp_path: Path
) -> None:
    flags = ("--max-bodies-mib", "1", "--max-body-mib", "1")
    async with sim_mesh(home, tmp_path, {"sim-decode": 1}, *flags) as mesh:
        base = str(mesh.client.base_url)
        port = int(base.split(":")[2].split("/")[0])
        body = {"model": "", "prompt": "x" * (400 * KIB), "max_tokens": 1}
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            holder = await stalled_upload(port, 700 * KIB)
            await asyncio.sleep(0.5)  # the holder's handler is waiting for its body
            refused = await http.post("completions", json=body)
            assert refused.status_code == 429, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert "--max-bodies-mib" in refused.json()["error"]["message"]
            small = await http.post(
                "completions", json={"model": "", "prompt": "hi", "max_tokens": 1}
            )
            assert small.status_code == 200, small.text  # small bodies still fit
            holder.close()
            await holder.wait_closed()
            await asyncio.sleep(0.5)
            served = await http.post("completions", json=body)
            assert served.status_code != 429, served.text
