"""The router's public surface against hostile callers (issue #30, router half): key
settings that mean a mistake, browsers and rebinding names, bodies that are not JSON,
tenants apart (stored responses, the prefix cache, engine request ids), memory a caller
can make the router hold, admin apart from use, and connections that cost nothing to
open. Real routers over the session's stages; the store and key parsing also alone."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from router_svc.auth import ApiKeys, open_api_refusal
from router_svc.http.protocol import ChatMessage
from router_svc.http.response_store import ResponseStore, Stored
from router_svc.http.responses_protocol import ResponsesRequest
from services.clients import EngineClient, RouterClient
from services.credentials import MESSAGE_LIMITS
from services.engine.adapters import AdapterSet
from services.errors import FailedPrecondition, InvalidRequest, NotFound, PermissionDenied
from services.operator.etcd_server import EmbeddedEtcd
from services.pb import common_pb2, router_pb2, router_pb2_grpc
from tests.support.requests import rss_mib
from tests.support.stages import Mesh, router_process, running, skip_unless_required

A, B, ADMIN = "tenant-a", "tenant-b", "operator"
GOOD_ORIGIN = "http://good.example"
IDLE_SECONDS = 3
MAX_CONNECTIONS = 12


# -- no mesh -------------------------------------------------------------------------


def test_a_key_setting_without_a_key_is_a_startup_error(tmp_path: Path) -> None:
    for keys, admin in ((" ", ""), (" , ", ""), ("", " ")):
        with pytest.raises(SystemExit, match="holds no key"):
            ApiKeys.from_settings(keys, "", admin)
    for text in ("", "\n\n", "# only a comment\n  # and another\n"):
        (tmp_path / "keys").write_text(text)
        with pytest.raises(SystemExit, match="holds no key"):
            ApiKeys.from_settings("", str(tmp_path / "keys"))
    (tmp_path / "keys").write_text("# team keys\nuser-key\nops-key admin\n")
    scoped = ApiKeys.from_settings("", str(tmp_path / "keys"))
    assert not scoped.check("Bearer user-key").admin and scoped.check("Bearer ops-key").admin
    with pytest.raises(PermissionDenied, match="admin key"):
        scoped.check("Bearer user-key").require_admin("loading an adapter")
    (tmp_path / "keys").write_text("k root\n")
    with pytest.raises(SystemExit, match="unknown scope 'root'"):
        ApiKeys.from_settings("", str(tmp_path / "keys"))
    assert (
        ApiKeys.from_settings("", "").check(None).admin
    )  # no keys at all: open, the operator's own


def test_an_open_api_binds_loopback_unless_told() -> None:
    open_api, keyed = ApiKeys(()), ApiKeys(["k"])
    refusal = open_api_refusal(open_api, ["0.0.0.0", "127.0.0.1"], allow_open=False)
    assert "--allow-open" in refusal and "0.0.0.0" in refusal and "\n" not in refusal
    assert open_api_refusal(open_api, ["", "::1"], allow_open=False)  # empty binds every address
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert not open_api_refusal(open_api, [host], allow_open=False), host
    assert not open_api_refusal(open_api, ["0.0.0.0"], allow_open=True)
    assert not open_api_refusal(keyed, ["0.0.0.0"], allow_open=False)


def _entry(owner: str, text: str, stored_at: float | None = None) -> Stored:
    response = {
        "id": f"resp_{owner}_{time.monotonic_ns()}",
        "status": "completed",
        "background": False,
    }
    at = time.monotonic() if stored_at is None else stored_at
    return Stored(response, [ChatMessage(role="user", content=text)], at, owner)


def test_the_response_store_is_bounded_per_owner_and_private() -> None:
    store = ResponseStore(1000, 3600.0, max_bytes=4 << 20, owner_bytes=1 << 20)
    a = [_entry("a", "x" * 300_000) for _ in range(5)]
    b = _entry("b", "y" * 300_000)
    store.put(b)
    for entry in a:
        store.put(entry)
    # a's oldest went to keep a within its MiB; b's response was not touched.
    kept = [e for e in a if _stored(store, e)]
    assert kept == a[-3:] and _stored(store, b)
    assert store.bytes <= 4 << 20
    with pytest.raises(NotFound):  # another owner: as if never stored
        store.get(b.response["id"], "a")
    with pytest.raises(NotFound):
        store.delete(b.response["id"], "a")
    with pytest.raises(InvalidRequest, match="store: false"):  # alone larger than a key's share
        store.put(_entry("a", "z" * (2 << 20)))
    old = _entry("c", "old", stored_at=time.monotonic() - 7200)
    store.put(old)  # stored long ago: the next sweep drops it unread
    store.sweep()
    assert not _stored(store, old) and len(store) == 4


def _stored(store: ResponseStore, entry: Stored) -> bool:
    try:
        return store.get(entry.response["id"], entry.owner) is entry
    except NotFound:
        return False


def test_metadata_has_openai_limits() -> None:
    ok = {f"k{i}": "v" * 512 for i in range(16)}
    ResponsesRequest.model_validate({"input": "hi", "metadata": ok})
    for bad in ({**ok, "one-more": ""}, {"k" * 65: "v"}, {"k": "v" * 513}):
        with pytest.raises(ValueError, match="metadata"):
            ResponsesRequest.model_validate({"input": "hi", "metadata": bad})


# -- a keyed router over the session's stages -------------------------------------


@dataclasses.dataclass
class Keyed:
    http_url: str
    grpc_address: str
    pid: int


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keyed(
    etcd: EmbeddedEtcd, home: Path, mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Keyed]:
    """A router with two inference keys and an admin key, one allowed origin, a short
    idle timeout, a small connection cap and a small bound on non-streamed answers."""
    router, http_port = router_process(
        etcd.endpoint,
        home,
        tmp_path_factory.mktemp("trust-router"),
        "--worker-wait",
        "3",
        "--allowed-origins",
        GOOD_ORIGIN,
        "--http-idle-timeout",
        str(IDLE_SECONDS),
        "--http-max-connections",
        str(MAX_CONNECTIONS),
        "--max-result-mib",
        "1",
    )
    router.env.update(STAGEMESH_API_KEY=f"{A},{B}", STAGEMESH_ADMIN_KEY=ADMIN)
    async with running(router):
        yield Keyed(f"http://127.0.0.1:{http_port}", router.grpc_address, router.pid)


def _as(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


@pytest.mark.asyncio(loop_scope="session")
async def test_browsers_rebinding_names_and_non_json_bodies_are_refused(
    mesh: Mesh, keyed: Keyed
) -> None:
    body = b'{"model": "", "prompt": "The sea is", "max_tokens": 2}'
    async with httpx.AsyncClient(
        base_url=mesh.http_url, timeout=120
    ) as http:  # keyless, on loopback
        plain = await http.post(
            "/v1/completions", content=body, headers={"Content-Type": "text/plain"}
        )
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
        evil = await http.post(
            "/v1/completions",
            content=body,
            headers={"Content-Type": "application/json", "Origin": "http://evil.example"},
        )
        assert evil.status_code == 403 and evil.json()["error"]["type"] == "permission_error"
        for path in ("/v1/responses", "/v1/load_lora_adapter"):  # the CSRF targets of the issue
            forged = await http.post(
                path, content=b'{"input": "hi"}', headers={"Content-Type": "text/plain"}
            )
            assert forged.status_code in (403, 415), (path, forged.text)
        rebound = await http.get("/v1/models", headers={"Host": "attacker.example:8000"})
        assert (
            rebound.status_code == 421 and "--allowed-hosts" in rebound.json()["error"]["message"]
        )
        assert (await http.get("/v1/models", headers={"Host": "localhost"})).status_code == 200

    http_url = keyed.http_url
    async with httpx.AsyncClient(base_url=http_url, timeout=120) as http:
        preflight = await http.options(
            "/v1/completions",
            headers={"Origin": GOOD_ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        assert (
            preflight.status_code == 204
            and preflight.headers["Access-Control-Allow-Origin"] == GOOD_ORIGIN
        )
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
        bad_preflight = await http.options(
            "/v1/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert bad_preflight.status_code == 403
        served = await http.post(
            "/v1/completions",
            content=body,
            headers=_as(A, **{"Content-Type": "application/json", "Origin": GOOD_ORIGIN}),
        )
        assert (
            served.status_code == 200
            and served.headers["Access-Control-Allow-Origin"] == GOOD_ORIGIN
        )
        # Without the key a caller learns nothing else (not even that the body is wrong).
        assert (await http.post("/v1/completions", content=body)).status_code == 401


@pytest.mark.asyncio(loop_scope="session")
async def test_stored_responses_belong_to_their_key(keyed: Keyed) -> None:
    http_url = keyed.http_url
    async with httpx.AsyncClient(base_url=http_url, timeout=300) as http:
        made = await http.post(
            "/v1/responses",
            headers=_as(A),
            json={"model": "", "input": "Say hello.", "max_output_tokens": 3, "temperature": 0},
        )
        assert made.status_code == 200, made.text
        response_id = made.json()["id"]
        assert (await http.get(f"/v1/responses/{response_id}", headers=_as(A))).status_code == 200
        for call in (
            http.get(f"/v1/responses/{response_id}", headers=_as(B)),
            http.post(f"/v1/responses/{response_id}/cancel", headers=_as(B)),
            http.delete(f"/v1/responses/{response_id}", headers=_as(B)),
            http.post(
                "/v1/responses",
                headers=_as(B),
                json={
                    "model": "",
                    "input": "Go on.",
                    "previous_response_id": response_id,
                    "max_output_tokens": 2,
                },
            ),
        ):
            reply = await call
            assert reply.status_code == 404, reply.text
        assert (
            await http.get(f"/v1/responses/{response_id}", headers=_as(A))
        ).status_code == 200  # B deleted nothing


@pytest.mark.asyncio(loop_scope="session")
async def test_responses_bodies_are_checked_before_anything_is_stored(keyed: Keyed) -> None:
    http_url = keyed.http_url
    big_items = [
        {"role": "user", "content": "hello " * 300}
    ] * 2049  # ~4 MiB, more items than allowed
    too_long = [
        {"role": "user", "content": "words " * 2000}
    ] * 40  # fits the item count, not the context
    async with httpx.AsyncClient(base_url=http_url, timeout=300) as http:
        before, rss = await _stored_bytes(http), rss_mib(keyed.pid)
        for bomb in (big_items, too_long):
            replies = await asyncio.gather(
                *(
                    http.post(
                        "/v1/responses",
                        headers=_as(A),
                        json={"model": "", "input": bomb, "background": True},
                    )
                    for _ in range(10)
                )
            )
            assert {r.status_code for r in replies} == {400}, replies[0].text
        many_keys = {f"k{i}": "v" for i in range(17)}
        reply = await http.post(
            "/v1/responses",
            headers=_as(A),
            json={"model": "", "input": "hi", "background": True, "metadata": many_keys},
        )
        assert reply.status_code == 400 and "16 keys" in reply.text
        assert await _stored_bytes(http) == before
        assert rss_mib(keyed.pid) < rss + 200
        good = await http.post(
            "/v1/responses",
            headers=_as(A),
            json={"model": "", "input": "Say hi.", "max_output_tokens": 2},
        )
        assert good.status_code == 200


async def _stored_bytes(http: httpx.AsyncClient) -> float:
    found = re.search(
        r"^stagemesh_router_responses_stored_bytes (\S+)$",
        (await http.get("/metrics")).text,
        re.MULTILINE,
    )
    assert found, "the router exports the Responses store's size"
    return float(found.group(1))


@pytest.mark.asyncio(loop_scope="session")
async def test_keys_share_no_prefix_cache(keyed: Keyed, prefill: EngineClient) -> None:
    """A's prompt is cached for A, and tells B nothing: B's same prompt hits no block,
    salted or not (the key's salt is combined with any B chooses)."""
    block = (await prefill.load()).kv_block_size
    prompt = " ".join(
        f"Ledger {i}: {i * 37 % 101} crowns owed by house {i % 13}." for i in range(60)
    )

    async def cached(http: httpx.AsyncClient, key: str, salt: str | None = None) -> int:
        body = {"model": "", "prompt": prompt, "max_tokens": 1, "temperature": 0}
        reply = await http.post(
            "/v1/completions", headers=_as(key), json=body | ({"cache_salt": salt} if salt else {})
        )
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        assert usage["prompt_tokens"] > 4 * block
        return int(usage["prompt_tokens_details"]["cached_tokens"])

    async with httpx.AsyncClient(base_url=keyed.http_url, timeout=300) as http:
        await cached(http, A)
        assert await cached(http, A) >= 4 * block  # A's own prefix is reused
        assert await cached(http, B) == 0
        await cached(http, A, "shared")
        assert await cached(http, B, "shared") == 0  # the same chosen salt does not join tenants
        assert await cached(http, A, "shared") >= 4 * block


@pytest.mark.asyncio(loop_scope="session")
async def test_admission_counts_sequences_and_whole_answers_are_bounded(keyed: Keyed) -> None:
    async with httpx.AsyncClient(base_url=keyed.http_url, timeout=300) as http:
        fan_out = await http.post(
            "/v1/completions",
            headers=_as(A),
            json={"model": "", "prompt": ["hi"] * 256, "n": 16, "max_tokens": 1},
        )
        assert fan_out.status_code == 400 and "4096 sequences" in fan_out.text, fan_out.text
        # 16 sequences of 192 tokens with 20 alternatives each: ~1.2 MiB, past the 1 MiB held whole.
        body = {
            "model": "",
            "prompt": "Once upon a time",
            "n": 16,
            "max_tokens": 192,
            "logprobs": 20,
            "ignore_eos": True,
            "temperature": 1.0,
        }
        whole = await http.post("/v1/completions", headers=_as(A), json=body)
        assert whole.status_code == 400 and "stream: true" in whole.text, whole.text[:300]
        streamed = await http.post("/v1/completions", headers=_as(A), json=body | {"stream": True})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        # Parsed, not searched: "error" is a token the model may sample or list as an alternative.
        events = [
            json.loads(line.removeprefix("data: "))
            for line in streamed.text.splitlines()
            if line.startswith("data: {")
        ]
        assert events and not [e for e in events if "error" in e], streamed.text[-2000:]


@pytest.mark.asyncio(loop_scope="session")
async def test_adapters_need_an_admin_key(keyed: Keyed) -> None:
    async with httpx.AsyncClient(base_url=keyed.http_url, timeout=120) as http:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            denied = await http.post(
                path, headers=_as(A), json={"lora_name": "x", "lora_path": "/etc"}
            )
            assert denied.status_code == 403 and "admin key" in denied.json()["error"]["message"], (
                denied.text
            )
        allowed = await http.post(
            "/v1/unload_lora_adapter", headers=_as(ADMIN), json={"lora_name": "never-loaded"}
        )
        assert allowed.status_code == 404, (
            allowed.text
        )  # past the scope check: there is no such adapter
    for key in (A, B):
        async with RouterClient(keyed.grpc_address, api_key=key) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.unload_adapter("never-loaded")
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.asyncio(loop_scope="session")
async def test_a_request_id_is_named_under_its_key(keyed: Keyed) -> None:
    """B choosing the id A's running request has neither fails nor touches A's."""
    long_run = common_pb2.SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    short = common_pb2.SamplingParams(max_tokens=2, temperature=0)
    async with (
        RouterClient(keyed.grpc_address, api_key=A) as a,
        RouterClient(keyed.grpc_address, api_key=B) as b,
    ):
        first = a.generate(
            router_pb2.RouterGenerateRequest(
                text="Count slowly:", request_id="job-1", sampling=long_run
            )
        )
        started = await anext(aiter(first))
        assert started.request_id == "job-1"
        other = await b.generate_unary(
            router_pb2.RouterGenerateRequest(text="Hi", request_id="job-1", sampling=short)
        )
        assert other.usage.completion_tokens == 2 and other.request_id == "job-1"
        rest = [delta async for delta in first]
        assert rest[-1].usage.completion_tokens == 48
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await b.generate_unary(
                router_pb2.RouterGenerateRequest(text="Hi", request_id="job\n2", sampling=short)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.asyncio(loop_scope="session")
async def test_idle_and_excess_connections_are_closed(keyed: Keyed) -> None:
    host, port = keyed.http_url.removeprefix("http://").split(":")

    async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, int(port))

    # A connection that never finishes its request head is closed after the idle timeout.
    reader, writer = await opened()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    for _ in range(IDLE_SECONDS * 4):  # a header line now and then keeps nothing open
        if reader.at_eof():
            break
        writer.write(b"X-Slow: 1\r\n")
        await asyncio.sleep(0.5)
    assert await asyncio.wait_for(reader.read(), IDLE_SECONDS + 5) == b""
    assert time.monotonic() - started < IDLE_SECONDS + 5
    writer.close()

    # Past the cap, a new connection is closed at once; one closed makes room again.
    held = [await opened() for _ in range(MAX_CONNECTIONS)]
    extra_reader, extra_writer = await opened()
    assert await asyncio.wait_for(extra_reader.read(), 2) == b""
    for _, idle in held:
        idle.close()
    extra_writer.close()
    await asyncio.sleep(0.5)
    async with httpx.AsyncClient(base_url=keyed.http_url, timeout=60) as http:
        assert (await http.get("/health")).status_code == 200


@pytest.mark.asyncio(loop_scope="session")
async def test_a_refused_grpc_call_is_not_received_whole(keyed: Keyed) -> None:
    """Without a key, a 60 MiB request is refused having crossed at most gRPC's flow
    control window, not the whole message."""
    if shutil.which("ss") is None:
        skip_unless_required("ss (iproute2) is not installed")
    port = keyed.grpc_address.rsplit(":", 1)[1]
    big = router_pb2.RouterGenerateRequest(text="x" * (60 << 20))
    async with grpc.aio.insecure_channel(keyed.grpc_address, options=MESSAGE_LIMITS) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateUnary(big, timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ss = await asyncio.create_subprocess_exec(
            "ss",
            "-tinH",
            "state",
            "established",
            f"( sport = :{port} )",
            stdout=asyncio.subprocess.PIPE,
        )
        sockets = (await ss.communicate())[0].decode()
    received = sum(int(n) for n in re.findall(r"bytes_received:(\d+)", sockets))
    assert 0 < received < 16 << 20, received


def test_run_time_adapters_come_only_from_the_lora_root(tmp_path: Path) -> None:
    """Checked in the engine's registry before any file is read; a cap on how many."""
    root, outside = tmp_path / "adapters", tmp_path / "elsewhere"
    for directory in (root / "one", root / "two", root / "three", outside / "x"):
        directory.mkdir(parents=True)
        (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (root / "escape").symlink_to(outside / "x")
    adapters = AdapterSet(
        "base", tmp_path, max_rank=16, enabled=True, root=str(root), max_adapters=2
    )
    for path in (str(outside / "x"), "../elsewhere/x", "escape", "/etc"):
        with pytest.raises(InvalidRequest, match="--lora-root"):
            adapters.prepare("a", path)
    for name in ("one", "two"):
        prepared = adapters.prepare(name, name)
        assert isinstance(prepared, tuple) and prepared[0] == (root / name).resolve()
        adapters.add(name, *prepared)
    with pytest.raises(FailedPrecondition, match="--max-adapters"):
        adapters.prepare("three", "three")
    with pytest.raises(InvalidRequest, match="--lora-root"):  # no root: nothing loads at run time
        AdapterSet("base", tmp_path, 16, True).prepare("one", str(root / "one"))
    assert isinstance(
        AdapterSet("base", tmp_path, 16, True).prepare("x", str(outside / "x"), at_run_time=False),
        tuple,
    )
