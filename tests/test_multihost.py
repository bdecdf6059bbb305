"""The mesh across hosts: etcd, the front stages (tokenizer, router), the prefill engine
and the decode engine each on its own "host" (a network namespace with its own address),
every stage told only where etcd is, and every connection over TLS: mutual TLS between
the stages, client certificates to etcd (certificates from ``stagemesh certs``).

A request through the router must be prefilled on one host and decoded on another, the
KV crossing between them over NIXL: nothing may assume 127.0.0.1 or a shared network
stack. A client without a certificate the mesh CA signed reaches no internal stage,
nor etcd. Skips, with the reason, only where network namespaces cannot be created.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import credentials
from services.credentials import DEFAULT_SERVER_NAME, MeshCredentials
from services.etcd import EtcdSession
from services.membership import MEMBERS_PREFIX, RecordReader
from services.operator.certs import make_certs
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from services.pb import common_pb2
from tests.netns import Hosts, unavailable
from tests.support.stages import STAGE_START_TIMEOUT, skip_unless_required

pytestmark = pytest.mark.isolated

#: Two engines starting at once on a fresh two-core host (cold compile caches): minutes.
ENGINE_START_TIMEOUT = 600.0

#: Each stage listens on its default port; on its own host there is nothing to clash with.
DEFAULT_PORTS = {"tokenizer": 50052, "prefill": 50053, "decode": 50054, "router": 50051}


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    reason = unavailable()
    if reason:
        skip_unless_required(f"network namespaces unavailable: {reason}")
    network = Hosts(["etcd", "front", "prefill", "decode"])
    try:
        network.create()
        yield network
    finally:
        network.destroy()


@pytest.mark.asyncio(loop_scope="session")
async def test_prefill_and_decode_on_different_hosts(
    hosts: Hosts, home: Path, model_dir: Path, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "tls", hosts=list(hosts.address.values()))
    outsider = make_certs(tmp_path / "another-ca", stages=["client"])["client"]
    previous = credentials.current()
    # This process is a mesh member too (it probes health and reads etcd): the client
    # certificate, and the key the stages take from the environment (tests/support/stages.py).
    client_tls = certs["client"]
    credentials.install(
        MeshCredentials.load(
            previous.mesh_key.decode(),
            tls_cert=str(client_tls.cert),
            tls_key=str(client_tls.key),
            tls_ca=str(client_tls.ca),
        )
    )
    etcd = EmbeddedEtcd(
        client_port=2379,
        peer_port=2380,
        host=hosts.address["etcd"],
        wrapper=hosts.wrapper("etcd"),
        tls=certs["etcd"],
    )
    etcd.start()
    stages: list[StageProcess] = []

    def start(role: str, host: str, *extra: str) -> StageProcess:
        stage = StageProcess(
            role,
            f"{role}_svc",
            ["--etcd", etcd.endpoint, "--home", str(home), *certs[role].flags(), *extra],
            f"{hosts.address[host]}:{DEFAULT_PORTS[role]}",
            tmp_path,
            wrapper=hosts.wrapper(host),
        )
        stage.start()
        stages.append(stage)
        return stage

    engine_flags = ("--kv-cache-gib", "1", "--max-model-len", "4096")
    try:
        prefill = start("prefill", "prefill", "--cpu-cores", "0", *engine_flags)
        decode = start("decode", "decode", "--cpu-cores", "1", *engine_flags)
        tokenizer = start("tokenizer", "front")
        # Keyless on an address other hosts reach: only on purpose (--allow-open).
        router = start("router", "front", "--worker-wait", "10", "--allow-open")
        await asyncio.gather(
            prefill.wait_healthy(ENGINE_START_TIMEOUT),
            decode.wait_healthy(ENGINE_START_TIMEOUT),
            tokenizer.wait_healthy(STAGE_START_TIMEOUT),
            router.wait_healthy(STAGE_START_TIMEOUT),
        )

        # Each member advertises its own host's address, found from the route to etcd,
        # for gRPC and for the NIXL side channel alike.
        session = EtcdSession([(hosts.address["etcd"], 2379)])
        try:
            listing = await (await session.client()).get_prefix(MEMBERS_PREFIX.encode())
        finally:
            await session.close()
        records = RecordReader(common_pb2.Member.FromString).read_all(listing)
        members = {common_pb2.Role.Name(m.role): m for m in records.values()}
        assert members["ROLE_PREFILL"].grpc_address == f"{hosts.address['prefill']}:50053"
        assert members["ROLE_PREFILL"].nixl_address.startswith(f"{hosts.address['prefill']}:")
        assert members["ROLE_DECODE"].grpc_address == f"{hosts.address['decode']}:50054"
        assert members["ROLE_DECODE"].nixl_address.startswith(f"{hosts.address['decode']}:")
        assert members["ROLE_ROUTER"].grpc_address == f"{hosts.address['front']}:50051"

        http_url = f"http://{hosts.address['front']}:8000"
        client = openai.AsyncOpenAI(
            base_url=f"{http_url}/v1", api_key="unused", max_retries=0, timeout=300
        )
        reply = await client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=12,
        )
        assert "Paris" in (reply.choices[0].message.content or "")

        # It ran disaggregated: prefilled on one host, its KV pulled over NIXL by the
        # decode on another (a failed pull would have fallen back to aggregated).
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{http_url}/metrics")).text
        assert 'stagemesh_router_sequences_total{mode="disaggregated"} 1.0' in metrics, metrics
        assert "stagemesh_router_prefill_fallbacks_total{" not in metrics, metrics

        # Without the mesh's certificate nothing internal answers: not in plaintext, not
        # with another CA's certificate, not without one. The router's public port takes
        # TLS clients without a certificate (users hold API keys), never plaintext.
        mesh_ca = client_tls.ca.read_bytes()
        foreign = grpc.ssl_channel_credentials(
            mesh_ca, outsider.key.read_bytes(), outsider.cert.read_bytes()
        )
        anonymous = grpc.ssl_channel_credentials(mesh_ca)
        for stage in (prefill, decode, tokenizer):
            for creds in (None, foreign, anonymous):
                assert await _health(stage.grpc_address, creds) == "refused", (stage.name, creds)
        assert await _health(router.grpc_address, None) == "refused"
        assert await _health(router.grpc_address, anonymous) == "SERVING"
        credentials.install(MeshCredentials(previous.mesh_key))
        plaintext = EtcdSession([(hosts.address["etcd"], 2379)], timeout=3)
        with pytest.raises(Exception):  # noqa: B017 - aetcd's connection errors have no common base
            await (await plaintext.client()).get(MEMBERS_PREFIX.encode())
        await plaintext.close()
    finally:
        credentials.install(previous)
        for stage in reversed(stages):
            stage.stop()
        etcd.stop()


async def _health(address: str, creds: grpc.ChannelCredentials | None) -> str:
    """A health check over plaintext (``creds`` None) or TLS: the status, or "refused"."""
    options = [("grpc.ssl_target_name_override", DEFAULT_SERVER_NAME)]
    chan = (
        grpc.aio.insecure_channel(address)
        if creds is None
        else grpc.aio.secure_channel(address, creds, options)
    )
    async with chan:
        try:
            reply = await health_pb2_grpc.HealthStub(chan).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError:
            return "refused"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
