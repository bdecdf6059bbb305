"""Membership that cannot be forged: a process that can write to etcd but holds neither
the mesh key nor a stage certificate cannot become a stage. Real etcd, a real router
process, and gRPC servers of the test's own that record every call they receive."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from pathlib import Path

import aetcd
import grpc
import httpx
import pytest
import pytest_asyncio

from router_svc.adapters import ADAPTERS_PREFIX
from services import credentials
from services.config import parse_endpoints
from services.credentials import STAGE_TOKEN, MeshCredentials
from services.etcd import WRITES, EtcdSession, enable_authentication
from services.membership import MemberWatcher, RecordReader, Registration, member_key
from services.operator.certs import CertFiles, make_certs
from services.operator.etcd_server import EmbeddedEtcd
from services.pb import common_pb2, engine_pb2
from services.records import RecordRejected, RecordSigner
from tests.support.polling import eventually
from tests.support.stages import (
    kvstore_process,
    private_etcd,
    router_process,
    running,
    tokenizer_process,
)

#: The router polls engines' load this often (seconds); a member it trusts hears from it within it.
POLL = 0.2


class Recorder:
    """A gRPC server that accepts any method and records each call's name and metadata.
    It answers GetLoad with an idle engine's load (what a fake member would report to
    win traffic) and every other call with UNIMPLEMENTED."""

    def __init__(self, tls: CertFiles | None = None) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._tls = tls
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        self.address = ""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method
        self.calls.append((method, dict(details.invocation_metadata or ())))

        async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if method.endswith("/GetLoad"):
                return engine_pb2.Load().SerializeToString()
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "a recorder")
            return b""

        return grpc.unary_unary_rpc_method_handler(answer)

    async def start(self) -> str:
        if self._tls is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            pair = [(self._tls.key.read_bytes(), self._tls.cert.read_bytes())]
            port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(pair))
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    def with_token(self) -> list[str]:
        return [method for method, metadata in self.calls if STAGE_TOKEN in metadata]


async def polled(recorder: Recorder, who: str) -> None:
    """Wait until the router has asked ``recorder`` for its load, with the stage token."""

    async def check() -> None:
        calls = recorder.with_token()
        assert "/stagemesh.v1.EngineService/GetLoad" in calls, (
            f"the {who} was never polled: {recorder.calls}"
        )

    await eventually(check, timeout=10, interval=0.05)


@pytest_asyncio.fixture(loop_scope="session")
async def recorders() -> AsyncIterator[tuple[Recorder, Recorder]]:
    """An intruder's server and a genuine member's, both listening."""
    pair = (Recorder(), Recorder())
    for recorder in pair:
        await recorder.start()
    yield pair
    for recorder in pair:
        await recorder.server.stop(0)


def decode_member(instance: str, address: str) -> common_pb2.Member:
    """A decode member as an engine would describe itself, claiming room to spare."""
    return common_pb2.Member(
        instance_id=instance,
        role=common_pb2.ROLE_DECODE,
        grpc_address=address,
        models=["any"],
        kv_block_size=16,
        max_concurrency=100_000,
    )


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text page (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


@pytest.mark.asyncio(loop_scope="session")
async def test_a_forged_member_gets_no_call_and_the_router_counts_it(
    recorders: tuple[Recorder, Recorder], home: Path, tmp_path: Path
) -> None:
    """An outsider with write access to etcd and no mesh key registers decode members
    (unsigned, signed under another mesh's key, or a genuine record copied under its
    own key and lease) pointing at its own listening server. The router never calls it,
    while a genuine member registered beside it is polled within a poll interval. Each
    refusal is logged once per key and counted on the router's metrics."""
    intruder, genuine = recorders
    with private_etcd() as etcd:
        router, http_port = router_process(
            etcd.endpoint, home, tmp_path, "--load-interval", str(POLL), "--worker-wait", "1"
        )
        async with running(router):
            insider = EtcdSession([("127.0.0.1", etcd.client_port)])
            outsider = EtcdSession([("127.0.0.1", etcd.client_port)])
            registration = Registration(insider, decode_member("genuine", genuine.address), ttl=5)
            try:
                await registration.start()
                client = await outsider.client()
                lease = await client.lease(30)
                forged = decode_member("forged", intruder.address)
                key = member_key(forged)
                values = {  # key suffix: (value, the reason it is refused)
                    "unsigned": (
                        RecordSigner(b"").seal(key, forged.SerializeToString(), lease.id),
                        "unsigned",
                    ),
                    "bare": (
                        forged.SerializeToString(),
                        "unsigned",
                    ),  # a Member, as before records were sealed
                    "other-mesh": (
                        RecordSigner(b"another mesh").seal(
                            key, forged.SerializeToString(), lease.id
                        ),
                        "bad_signature",
                    ),
                    "garbage": (b"\xff\xfe not a record", "malformed"),
                }
                for suffix, (value, _) in values.items():
                    await client.put(f"{key}-{suffix}".encode(), value, lease=lease.id)
                # The genuine record, copied under the outsider's key and lease.
                genuine_value = (await client.get(registration.key.encode())).value
                await client.put(f"{key}-replayed".encode(), genuine_value, lease=lease.id)
                # A wanted adapter no holder of the key wrote: routers must not load it.
                evil = common_pb2.Adapter(name="evil", parent="any", source="/tmp/evil")
                await client.put(
                    (ADAPTERS_PREFIX + "evil").encode(),
                    RecordSigner(b"").seal(ADAPTERS_PREFIX + "evil", evil.SerializeToString()),
                )

                await polled(genuine, "genuine member")
                await asyncio.sleep(
                    POLL * 10
                )  # ten more polls for the forged ones to be called, if trusted
                assert intruder.calls == []

                async with httpx.AsyncClient(timeout=10) as http:
                    page = (await http.get(f"http://127.0.0.1:{http_port}/metrics")).text
                for reason in ("unsigned", "bad_signature", "malformed", "replayed"):
                    assert (
                        metric(
                            page,
                            "stagemesh_etcd_records_rejected_total",
                            kind="members",
                            reason=reason,
                        )
                        >= 1
                    )
                assert (
                    metric(
                        page,
                        "stagemesh_etcd_records_rejected_total",
                        kind="adapters",
                        reason="unsigned",
                    )
                    >= 1
                )

                # Written again, a refused key is counted again but not logged again.
                await client.put(f"{key}-unsigned".encode(), values["unsigned"][0], lease=lease.id)
                await asyncio.sleep(POLL * 3)
                log = router.log_path.read_text()
                for suffix in (*values, "replayed"):
                    assert log.count(f"ignoring the etcd record {key}-{suffix}:") == 1, suffix
                assert log.count(f"ignoring the etcd record {ADAPTERS_PREFIX}evil:") == 1

                # The operator's view skips them too, and says so (it calls each member it lists).
                status = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "services.cli",
                    "status",
                    "--etcd",
                    etcd.endpoint,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(status.communicate(), 60)
                assert status.returncode == 0, err
                assert "genuine" in out.decode() and "forged" not in out.decode(), out
                assert "ignored 5 member record(s)" in err.decode(), err
                assert intruder.calls == []
            finally:
                await registration.close()
                await insider.close()
                await outsider.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_record_counts_only_under_its_own_key_and_lease(etcd_session: EtcdSession) -> None:
    """A signed record copied under another key, or onto another lease, is refused; the
    original stays; a record under the key and lease it was sealed for is taken."""
    signer = credentials.current().records
    assert signer.enabled  # the tests' process holds the mesh key (tests/support/stages.py)
    prefix = f"/stagemesh-test/{time.monotonic_ns()}/"
    client = await etcd_session.client()
    lease, other_lease = await client.lease(30), await client.lease(30)
    member = common_pb2.Member(instance_id="a", role=common_pb2.ROLE_TOKENIZER)
    sealed = signer.seal(prefix + "a", member.SerializeToString(), lease.id)
    await client.put((prefix + "a").encode(), sealed, lease=lease.id)
    await client.put((prefix + "b").encode(), sealed, lease=lease.id)  # another key
    watcher: MemberWatcher[common_pb2.Member] = MemberWatcher(
        etcd_session, prefix, retry_seconds=0.2
    )
    watcher.start()
    try:
        await watcher.wait_for(lambda m: prefix + "a" in m, timeout=10)
        await client.put(
            (prefix + "a").encode(), sealed, lease=other_lease.id
        )  # the right key, another lease
        await watcher.wait_for(lambda m: prefix + "a" not in m, timeout=10)
        await client.put((prefix + "a").encode(), sealed, lease=lease.id)
        await watcher.wait_for(lambda m: prefix + "a" in m, timeout=10)
        assert set(watcher.members) == {prefix + "a"} and watcher.members[prefix + "a"] == member
    finally:
        await watcher.close()
        await client.delete_prefix(prefix.encode())
        await client.revoke_lease(lease.id)
        await client.revoke_lease(other_lease.id)


def test_records_are_sealed_under_a_key_of_their_own() -> None:
    """The record key is neither the mesh key nor the stage token: neither a token seen
    on the wire nor a KV handle's MAC can seal a record; without a key nothing is checked."""
    mesh = MeshCredentials(mesh_key=b"k")
    payload = b"\x0a\x01a"
    sealed = mesh.records.seal("/k", payload, 7)
    assert mesh.records.open("/k", sealed, 7) == payload
    for forger in (RecordSigner(mesh.stage_token.encode()), RecordSigner(b"k" * 2)):
        with pytest.raises(RecordRejected, match="signature does not hold"):
            mesh.records.open("/k", forger.seal("/k", payload, 7), 7)
    assert (
        RecordSigner(b"").open("/elsewhere", sealed, 0) == payload
    )  # a development mesh takes all


@pytest.mark.asyncio(loop_scope="session")
async def test_under_tls_only_a_certificate_of_the_members_role_serves(
    home: Path, tmp_path: Path, model_dir: Path
) -> None:
    """Under mutual TLS a router calls a member only if the member's certificate names
    the member's role: a holder of the mesh key and of the ``client`` certificate who
    registers a decode member serving with that certificate gets no call. And a stage
    refuses a caller whose certificate's role cannot call it (PERMISSION_DENIED)."""
    certs = make_certs(tmp_path / "tls")
    previous = credentials.current()
    client_tls = certs["client"]
    credentials.install(
        MeshCredentials.load(
            previous.mesh_key.decode(),
            tls_cert=str(client_tls.cert),
            tls_key=str(client_tls.key),
            tls_ca=str(client_tls.ca),
        )
    )
    as_client, as_decode = Recorder(certs["client"]), Recorder(certs["decode"])
    for recorder in (as_client, as_decode):
        await recorder.start()
    etcd = EmbeddedEtcd(client_port=0, tls=certs["etcd"])
    etcd.start()
    session = EtcdSession([("127.0.0.1", etcd.client_port)])
    registrations = [
        Registration(session, decode_member("client-cert", as_client.address), ttl=5),
        Registration(session, decode_member("decode-cert", as_decode.address), ttl=5),
    ]
    try:
        router, _ = router_process(
            etcd.endpoint, home, tmp_path, *certs["router"].flags(), "--load-interval", str(POLL)
        )
        async with running(router):
            async with asyncio.timeout(60):  # start() retries for as long as etcd refuses
                for registration in registrations:
                    await registration.start()
            await polled(as_decode, "decode-certificate member")
            await asyncio.sleep(POLL * 10)
            assert as_client.calls == []
        await refused_by_role(etcd, home, tmp_path, certs)
    finally:
        for registration in registrations:
            await registration.close()
        await session.close()
        etcd.stop()
        for recorder in (as_client, as_decode):
            await recorder.server.stop(0)
        credentials.install(previous)


def tls_channel(address: str, files: CertFiles, role: str) -> grpc.aio.Channel:
    """A mutual-TLS channel to a ``role`` stage at ``address``, presenting ``files``."""
    creds = grpc.ssl_channel_credentials(
        files.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
    )
    options = [("grpc.ssl_target_name_override", f"{role}.stagemesh")]
    return grpc.aio.secure_channel(address, creds, options=options)


async def status_of(call: Awaitable[object]) -> grpc.StatusCode:
    """The status a call ends with (OK when it answers)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def refused_by_role(
    etcd: EmbeddedEtcd, home: Path, tmp_path: Path, certs: Mapping[str, CertFiles]
) -> None:
    """A tokenizer stage under TLS takes the router's certificate and refuses the KV
    store's: a KV store never calls a tokenizer. A KV store takes an engine's certificate
    for the connector's calls (Lookup) but not for what only the router reads (its KV
    snapshot), and only the operator's ``client`` certificate may empty it."""
    from services.pb import kvstore_pb2, kvstore_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

    token = credentials.current().call_metadata
    stage = tokenizer_process(
        "tokenizer", etcd.endpoint, home, tmp_path, *certs["tokenizer"].flags()
    )
    async with running(stage):
        for role, code in (
            ("router", grpc.StatusCode.OK),
            ("kvstore", grpc.StatusCode.PERMISSION_DENIED),
        ):
            async with tls_channel(stage.grpc_address, certs[role], "tokenizer") as chan:
                call = tokenizer_pb2_grpc.TokenizerServiceStub(chan).Tokenize(
                    tokenizer_pb2.TokenizeRequest(text="hello"), metadata=token, timeout=30
                )
                assert await status_of(call) == code, role
    store = kvstore_process(etcd.endpoint, home, tmp_path, 16, *certs["kvstore"].flags())
    async with running(store):
        denied = grpc.StatusCode.PERMISSION_DENIED
        for role, method, request, code in (
            ("prefill", "Lookup", kvstore_pb2.LookupRequest(), grpc.StatusCode.OK),
            ("prefill", "GetKvSnapshot", common_pb2.KvSnapshotRequest(), denied),
            ("router", "GetKvSnapshot", common_pb2.KvSnapshotRequest(), grpc.StatusCode.OK),
            ("router", "Evict", kvstore_pb2.EvictRequest(), denied),
        ):
            async with tls_channel(store.grpc_address, certs[role], "kvstore") as chan:
                stub = kvstore_pb2_grpc.KvStoreServiceStub(chan)
                call = getattr(stub, method)(request, metadata=token, timeout=30)
                assert await status_of(call) == code, (role, method)


@contextlib.asynccontextmanager
async def etcd_as(endpoint: str, user: str = "", password: str = "") -> AsyncIterator[aetcd.Client]:
    """A connected etcd client of its own, as ``user`` (none: unauthenticated)."""
    previous = credentials.current()
    credentials.install(dataclasses.replace(previous, etcd_user=user, etcd_password=password))
    session = EtcdSession(parse_endpoints(endpoint))
    try:
        client = await session.client()
    finally:
        credentials.install(previous)
    try:
        yield client
    finally:
        await session.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
@pytest.mark.asyncio(loop_scope="session")
async def test_with_etcd_authentication_each_role_writes_only_its_own_keys(
    home: Path, tmp_path: Path, tls: bool
) -> None:
    """As `stagemesh up` runs etcd (with --tls too): without a password nothing under the
    mesh's tree can be written or deleted, a role writes only its own members' keys, and
    a real stage with its role's user registers, is seen, and leaves."""
    passwords = {role: f"{role}-secret" for role in WRITES}
    certs = make_certs(tmp_path / "tls") if tls else {}
    previous = credentials.current()
    if tls:
        own = certs["client"]
        credentials.install(
            MeshCredentials.load(
                previous.mesh_key.decode(),
                tls_cert=str(own.cert),
                tls_key=str(own.key),
                tls_ca=str(own.ca),
            )
        )
    etcd = EmbeddedEtcd(client_port=0, tls=certs.get("etcd"))
    etcd.start()
    try:
        await roles_write_only_their_keys(etcd, passwords)
        password_file = tmp_path / "tokenizer.password"
        password_file.write_text(passwords["tokenizer"])
        stage = tokenizer_process(
            "tokenizer",
            etcd.endpoint,
            home,
            tmp_path,
            "--etcd-user",
            "tokenizer",
            "--etcd-password-file",
            str(password_file),
            *(certs["tokenizer"].flags() if tls else ()),
        )
        async with running(stage), etcd_as(etcd.endpoint, "client", passwords["client"]) as client:
            listing = await client.get_prefix(b"/stagemesh/v1/members/tokenizer/")
            members = RecordReader(common_pb2.Member.FromString).read_all(listing)
            assert [m.grpc_address for m in members.values()] == [stage.grpc_address]
        assert (
            stage.process is not None and stage.process.returncode == 0
        )  # its lease revoked, it left cleanly
        async with etcd_as(etcd.endpoint, "client", passwords["client"]) as client:
            assert not list(await client.get_prefix(b"/stagemesh/v1/members/"))
    finally:
        etcd.stop()
        credentials.install(previous)


async def roles_write_only_their_keys(etcd: EmbeddedEtcd, passwords: Mapping[str, str]) -> None:
    """Turn authentication on; then an anonymous client writes nothing, a tokenizer no
    decode key and no wanted adapter, and a decode its own role's keys."""
    async with etcd_as(etcd.endpoint) as root:
        await enable_authentication(root, passwords, "root-secret")
    decode_key = "/stagemesh/v1/members/decode/forged"
    async with etcd_as(etcd.endpoint) as anonymous:
        with pytest.raises(Exception, match="user name is empty|permission denied|invalid auth"):
            await anonymous.put(decode_key.encode(), b"x")
    async with etcd_as(etcd.endpoint, "tokenizer", passwords["tokenizer"]) as tokenizer:
        with pytest.raises(Exception, match="permission denied"):
            await tokenizer.put(decode_key.encode(), b"x")
        with pytest.raises(Exception, match="permission denied"):
            await tokenizer.put((ADAPTERS_PREFIX + "evil").encode(), b"x")
    async with etcd_as(etcd.endpoint, "decode", passwords["decode"]) as decode:
        await decode.put(
            decode_key.encode(), b"x"
        )  # its own role's key (the seal decides the rest)
        await decode.delete(decode_key.encode())
