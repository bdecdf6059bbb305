"""The prompt audit log: a real router over the session's stages writes one JSON line
per request (streamed and not, HTTP and gRPC), every line written by a clean shutdown;
the content modes and rotation on the log writer itself, with real files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import openai
import pytest

from router_svc.audit import AuditLog
from router_svc.auth import ApiKeys
from router_svc.config import AuditSettings, RouterConfig
from services.clients import RouterClient
from services.config import build_config
from services.operator.etcd_server import EmbeddedEtcd
from services.pb import common_pb2, router_pb2
from tests.support.stages import Mesh, router_process, running

PROMPT = "Name a colour."


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.asyncio(loop_scope="session")
async def test_router_writes_a_line_per_request(
    etcd: EmbeddedEtcd, home: Path, mesh: Mesh, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    router, http_port = router_process(
        etcd.endpoint,
        home,
        tmp_path,
        "--audit-log",
        str(audit),
        "--audit-content",
        "full",
        "--worker-wait",
        "3",
    )
    router.env["STAGEMESH_API_KEY"] = "audited-key"
    async with running(router):
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1",
            api_key="audited-key",
            max_retries=0,
            timeout=300,
        )
        chat = await client.chat.completions.create(
            model="", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0
        )
        stream = await client.completions.create(
            model="", prompt=PROMPT, max_tokens=4, temperature=0, stream=True
        )
        streamed = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
        async with RouterClient(router.grpc_address, api_key="audited-key") as grpc_client:
            result = await grpc_client.generate_unary(
                router_pb2.RouterGenerateRequest(
                    token_ids=router_pb2.TokenIds(ids=[1, 2, 3]),
                    sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0),
                    request_id="audited-grpc",
                )
            )
        with pytest.raises(openai.NotFoundError):  # refused before it started: audited all the same
            await client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    # The router has stopped: every line is on disk.
    lines = _lines(audit)
    (refused,) = [line for line in lines if line["status"] != "ok"]
    assert refused["status"] == "ModelNotFound" and refused["model"] == "no-such-model"
    assert refused["input"] == [PROMPT] and refused["output"] == []
    lines.remove(refused)
    assert len(lines) == 3, lines
    by_id = {line["request_id"]: line for line in lines}
    key_id = ApiKeys.key_id("Bearer audited-key")
    assert all(line["api_key_id"] == key_id for line in lines)
    assert "audited-key" not in audit.read_text()

    chat_line = by_id[chat.id.removeprefix("chatcmpl-")]
    assert chat_line["input"][0]["messages"][0]["content"] == PROMPT
    assert chat_line["output"] == [chat.choices[0].message.content]
    assert chat.usage is not None
    assert chat_line["completion_tokens"] == chat.usage.completion_tokens
    assert chat_line["prompt_tokens"] == chat.usage.prompt_tokens
    assert chat_line["finish_reasons"] == ["FINISH_REASON_LENGTH"] and chat_line["status"] == "ok"
    assert any(str(worker).startswith("decode:") for worker in chat_line["workers"])
    assert 0 < float(chat_line["latency_s"]) < 300

    (streamed_line,) = [line for line in lines if line["input"] == [PROMPT]]
    assert streamed_line["output"] == [streamed]
    grpc_line = by_id["audited-grpc"]
    assert grpc_line["input"] == [[1, 2, 3]] and grpc_line["output"] == [result.completions[0].text]


def test_content_modes_and_rotation(tmp_path: Path) -> None:
    request = router_pb2.RouterGenerateRequest(text="secret prompt")
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=2)
    for mode, expect_input, expect_output in (
        ("full", "secret prompt", "an answer"),
        (
            "hash",
            "sha256:" + hashlib.sha256(b"secret prompt").hexdigest(),
            "sha256:" + hashlib.sha256(b"an answer").hexdigest(),
        ),
        ("none", None, None),
    ):
        path = tmp_path / f"{mode}.jsonl"
        log = AuditLog(AuditSettings(log=str(path), content=mode))
        log.record(
            request_id="r1",
            key_id="k",
            model="m",
            requests=[request],
            outputs=["an answer"],
            finish_reasons=["FINISH_REASON_STOP"],
            usage=usage,
            started=0.0,
            workers=["decode:d"],
            error=None,
        )
        log.close()
        (line,) = _lines(path)
        assert line["input"] == [expect_input] and line["output"] == [expect_output], mode
        if mode != "full":
            assert "secret" not in path.read_text()

    rotated = tmp_path / "rotated.jsonl"
    log = AuditLog(AuditSettings(log=str(rotated), content="full", max_mib=1, backups=2))
    big = router_pb2.RouterGenerateRequest(text="x" * 100_000)
    for i in range(30):  # ~3 MB of lines through a 1 MiB file
        log.record(
            request_id=f"r{i}",
            key_id="",
            model="m",
            requests=[big],
            outputs=[""],
            finish_reasons=[""],
            usage=usage,
            started=0.0,
            workers=[],
            error=None,
        )
    log.close()
    files = sorted(tmp_path.glob("rotated.jsonl*"))
    assert [f.name for f in files] == ["rotated.jsonl", "rotated.jsonl.1", "rotated.jsonl.2"]
    assert all(f.stat().st_size <= (1 << 20) + 200_000 for f in files)
    assert _lines(rotated)[-1]["request_id"] == "r29"  # the newest line is in the live file
    # Only the router's user may read what it audits: new files, rotated ones, and one
    # that was there before under a looser mode.
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}
    loose = tmp_path / "loose.jsonl"
    loose.write_text("")
    loose.chmod(0o644)
    AuditLog(AuditSettings(log=str(loose), content="none")).close()
    assert loose.stat().st_mode & 0o777 == 0o600
    # A content mode the log has not is refused as the settings are read, naming the flag.
    with pytest.raises(SystemExit, match="--audit-content: 'everything' is not one of"):
        build_config(RouterConfig, {"audit_content": "everything"}, environ={})
