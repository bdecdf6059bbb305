"""Membership and lifecycle of a stage with a real etcd: registration, crash, etcd
restart, and health during start and drain."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from router_svc.workers import Peer, Workers
from services import credentials
from services.clients import EngineClient, TokenizerClient, channel, health_status
from services.detokenizer import TokenDecoder
from services.etcd import EtcdSession
from services.membership import MEMBERS_PREFIX, MemberWatcher, role_prefix
from services.net import free_port
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from services.pb import common_pb2, engine_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from tests.support.polling import eventually
from tests.support.stages import STAGE_START_TIMEOUT, tokenizer_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

TTL = 2


def keys_of(members: dict[str, common_pb2.Member], instance: str) -> bool:
    return any(key.endswith("/" + instance) for key in members)


async def watch(session: EtcdSession, prefix: str = MEMBERS_PREFIX) -> MemberWatcher:
    watcher: MemberWatcher[common_pb2.Member] = MemberWatcher(session, prefix, retry_seconds=0.2)
    watcher.start()
    return watcher


async def registered(stage: StageProcess, watcher: MemberWatcher) -> str:
    """Wait until the stage serves and its member shows in ``watcher``; its instance id
    (read from the --instance-id flag the test gave it)."""
    await stage.wait_healthy(STAGE_START_TIMEOUT)
    instance = stage.args[stage.args.index("--instance-id") + 1]
    await watcher.wait_for(lambda m: keys_of(m, instance), timeout=10)
    return instance


async def registered_instances(session: EtcdSession) -> set[str]:
    """Instance ids registered in etcd now, read directly (no watcher)."""
    try:
        listing = await (await session.client()).get_prefix(MEMBERS_PREFIX.encode())
    except Exception:  # noqa: BLE001 - etcd still coming back
        await session.reset()
        return set()
    return {kv.key.decode().rsplit("/", 1)[1] for kv in listing}


def own_stage(
    name: str, etcd: EmbeddedEtcd, home: Path, log_dir: Path, *extra: str
) -> StageProcess:
    return tokenizer_process(
        name, etcd.endpoint, home, log_dir, "--instance-id", f"{name}-{time.monotonic_ns()}", *extra
    )


async def test_registered_member_appears_under_the_prefix(
    tokenizer_stage: StageProcess, etcd_session: EtcdSession
) -> None:
    watcher = await watch(etcd_session, role_prefix(common_pb2.ROLE_TOKENIZER))
    try:
        await watcher.wait_for(lambda m: len(m) >= 1, timeout=10)
        members = [
            m for m in watcher.members.values() if m.grpc_address == tokenizer_stage.grpc_address
        ]
        assert len(members) == 1
        member = members[0]
        assert member.role == common_pb2.ROLE_TOKENIZER
        assert list(member.models) == ["SmolLM2-135M-Instruct"]
        assert member.metrics_address.startswith("127.0.0.1:")
        assert member.version and member.started_at > 0
        key = next(k for k, v in watcher.members.items() if v == member)
        assert key == f"/stagemesh/v1/members/tokenizer/{member.instance_id}"
        # The advertised metrics endpoint serves the stage's Prometheus figures.
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(
                f"http://{member.metrics_address}/metrics", timeout=5
            ).read()
        )
        assert b'stagemesh_stage_info{instance="' + member.instance_id.encode() in metrics
        assert b"stagemesh_grpc_calls_total" in metrics
    finally:
        await watcher.close()


async def test_killed_stage_disappears_within_the_lease_ttl(
    etcd: EmbeddedEtcd, home: Path, model_dir: Path, run_dir: Path, etcd_session: EtcdSession
) -> None:
    stage = own_stage("crash", etcd, home, run_dir, "--lease-ttl", str(TTL))
    stage.start()
    watcher = await watch(etcd_session)
    try:
        instance = await registered(stage, watcher)
        assert stage.process is not None
        stage.process.send_signal(signal.SIGKILL)  # no drain, no deregistration
        killed_at = time.monotonic()
        await watcher.wait_for(lambda m: not keys_of(m, instance), timeout=TTL + 5)
        gone_after = time.monotonic() - killed_at
        # etcd expires leases on its own clock with up to ~1s of slack beyond the TTL.
        assert gone_after <= TTL + 1.5, f"member lingered {gone_after:.1f}s after kill -9"
    finally:
        stage.kill()
        await watcher.close()


@pytest.mark.parametrize("keep_data", [False, True], ids=["etcd-data-lost", "etcd-data-kept"])
async def test_stage_registers_again_after_etcd_restart(
    home: Path, model_dir: Path, run_dir: Path, keep_data: bool
) -> None:
    etcd = EmbeddedEtcd(client_port=free_port(), data_dir=run_dir / "etcd")
    etcd.start()
    stage = own_stage("survivor", etcd, home, run_dir, "--lease-ttl", str(TTL))
    stage.start()
    session = EtcdSession([("127.0.0.1", etcd.client_port)])
    watcher = await watch(session)
    try:
        instance = await registered(stage, watcher)

        etcd.stop(wipe=not keep_data)
        await asyncio.sleep(TTL + 1)  # down longer than the lease lives
        etcd.start()

        # The stage re-registers on its next keep-alive, well within a few TTLs...
        async def back() -> None:
            assert instance in await registered_instances(session), stage.log_tail()

        await eventually(back, timeout=4 * TTL + 5)
        # ...and stays registered (the lease is kept alive, not a one-off put).
        await asyncio.sleep(TTL * 2)
        assert instance in await registered_instances(session)
        assert await health_status(stage.grpc_address) == "SERVING"
        # The watcher resynced after the outage and mirrors etcd again.
        expected = await registered_instances(session)
        await watcher.wait_for(
            lambda m: {key.rsplit("/", 1)[1] for key in m} == expected, timeout=5
        )
    finally:
        await watcher.close()
        await session.close()
        stage.stop()
        etcd.stop(wipe=True)


async def test_health_is_not_serving_until_registered(
    home: Path, model_dir: Path, run_dir: Path
) -> None:
    # etcd is not running yet: the stage starts, loads its model, but cannot join the
    # mesh, so it must report NOT_SERVING (and keep trying) rather than SERVING.
    etcd = EmbeddedEtcd(client_port=free_port(), data_dir=run_dir / "etcd")
    stage = own_stage("early", etcd, home, run_dir, "--lease-ttl", str(TTL))
    stage.start()
    try:

        async def answers() -> None:
            assert stage.alive(), stage.log_tail()
            assert await health_status(stage.grpc_address) != "UNREACHABLE", stage.log_tail()

        await eventually(answers, timeout=STAGE_START_TIMEOUT)
        for _ in range(10):  # model loaded or not, without etcd it never serves
            assert await health_status(stage.grpc_address) == "NOT_SERVING"
            await asyncio.sleep(0.5)
        etcd.start()
        await stage.wait_healthy(60)
    finally:
        stage.stop()
        etcd.stop(wipe=True)


async def test_drain_on_sigterm(
    etcd: EmbeddedEtcd, home: Path, model_dir: Path, run_dir: Path, etcd_session: EtcdSession
) -> None:
    stage = own_stage("drainer", etcd, home, run_dir, "--drain-seconds", "3", "--lease-ttl", "10")
    stage.start()
    watcher = await watch(etcd_session)
    try:
        instance = await registered(stage, watcher)
        async with TokenizerClient(stage.grpc_address) as client:
            ids = list((await client.tokenize("in flight across the drain")).token_ids)
            # Open a stream before SIGTERM and read it after: in-flight work finishes.
            # The decoder's export is several 1 MiB messages, held back by flow control
            # until they are read.
            async with channel(stage.grpc_address) as chan:
                stub = tokenizer_pb2_grpc.TokenizerServiceStub(chan)
                call = stub.GetDecoder(tokenizer_pb2.ModelInfoRequest())
                chunks = [(await call.read()).data]

                assert stage.process is not None
                stage.process.send_signal(signal.SIGTERM)
                # Deregistered at once (lease revoked), long before the 10 s TTL would expire.
                await watcher.wait_for(lambda m: not keys_of(m, instance), timeout=2)
                assert await health_status(stage.grpc_address) == "NOT_SERVING"

                while (reply := await call.read()) is not grpc.aio.EOF:
                    chunks.append(reply.data)
                assert len(chunks) > 1
                decoder = TokenDecoder.from_json(b"".join(chunks).decode())
                assert decoder.decode(ids) == "in flight across the drain"
        assert stage.process is not None and stage.process.wait(timeout=20) == 0
    finally:
        stage.kill()
        await watcher.close()


async def test_a_value_that_does_not_parse_is_skipped(etcd_session: EtcdSession) -> None:
    """A bad value under the prefix (by hand, or from another version) is logged and
    skipped; it never freezes the view, at the first listing or in the watch."""
    prefix = f"/stagemesh-test/{time.monotonic_ns()}/"
    client = await etcd_session.client()
    good = common_pb2.Member(instance_id="good", role=common_pb2.ROLE_TOKENIZER)
    seal = credentials.current().records.seal
    await client.put(f"{prefix}bad".encode(), b"\xff\xfe not a protobuf")
    await client.put(f"{prefix}good".encode(), seal(f"{prefix}good", good.SerializeToString()))
    watcher = await watch(etcd_session, prefix)
    try:
        await watcher.wait_for(lambda m: f"{prefix}good" in m, timeout=10)
        assert set(watcher.members) == {f"{prefix}good"}
        await client.put(
            f"{prefix}worse".encode(), seal(f"{prefix}worse", b"\x0a\xff")
        )  # a record, not a Member
        later = common_pb2.Member(instance_id="later", role=common_pb2.ROLE_TOKENIZER)
        await client.put(
            f"{prefix}later".encode(), seal(f"{prefix}later", later.SerializeToString())
        )
        await watcher.wait_for(lambda m: f"{prefix}later" in m, timeout=10)
        assert set(watcher.members) == {f"{prefix}good", f"{prefix}later"}
    finally:
        await watcher.close()
        await client.delete_prefix(prefix.encode())


@pytest.mark.asyncio(loop_scope="session")
async def test_a_load_poll_on_a_closed_channel_leaves_the_load_unknown(
    etcd_session: EtcdSession,
) -> None:
    """A member that leaves while its load is being polled has its channel closed under
    the poll: the poll must not raise, or the router's poller (one task for every
    engine) would stop and every later pick would be blind to load."""
    workers = Workers(etcd_session, control_timeout=1.0, load_interval=0.1)
    client = EngineClient(f"127.0.0.1:{free_port()}")
    peer = Peer(
        "/stagemesh/v1/members/decode/gone",
        common_pb2.Member(role=common_pb2.ROLE_DECODE),
        client,
        load=engine_pb2.Load(running_requests=1),
    )
    await client.close()
    await workers._poll(peer)
    assert peer.load is None
