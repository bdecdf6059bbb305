"""What tests send the mesh and read back: shared prompts, a raw HTTP post, a metric, a
process's memory."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from openai.types.chat import ChatCompletionMessageParam

from tests.support.stages import Mesh

QUESTION_TEXT = "What is the capital of France?"
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION_TEXT}]
STORY = "Once upon a time, in a small village by the sea,"


async def post(mesh: Mesh, path: str, body: bytes | dict[str, object]) -> httpx.Response:
    """POST ``body`` (raw bytes, or a dict sent as JSON) to the mesh's HTTP bridge."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=120) as http:
        return await http.post(path, content=content, headers={"Content-Type": "application/json"})


async def metric(mesh: Mesh, name: str) -> float:
    """Sum of a router metric's samples whose line starts with ``name``."""
    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        text = (await http.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def rss_mib(pid: int) -> float:
    """A process's resident memory, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
