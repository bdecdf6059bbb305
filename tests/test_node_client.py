"""A client in another language: Node.js with @grpc/grpc-js calls the router's gRPC
Generate, using only the .proto files, and gets the same text as a Python client."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from services.clients import RouterClient
from services.pb import common_pb2, router_pb2
from tests.support.stages import Mesh

pytestmark = pytest.mark.asyncio(loop_scope="session")

NODE_DIR = Path(__file__).parent / "node"
PROMPT = "The three primary colors are"


async def test_node_grpc_client_generates(mesh: Mesh, router: RouterClient) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed for this test (the README's install lists it)"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "run: npm ci --prefix tests/node"
    )
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_DIR / "generate.js"),
        mesh.router.grpc_address,
        PROMPT,
        "12",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=300)
    assert process.returncode == 0, err.decode()
    reply = json.loads(out.decode().strip().splitlines()[-1])

    expected = await router.generate_unary(
        router_pb2.RouterGenerateRequest(
            text=PROMPT, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=12)
        )
    )
    assert reply["text"] == expected.completions[0].text and reply["text"]
    assert reply["finish"] == "FINISH_REASON_LENGTH"
    assert reply["usage"]["completion_tokens"] == 12
