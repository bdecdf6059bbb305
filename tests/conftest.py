"""Fixtures that start real processes: etcd, stage processes, the prepared model.

Expensive things start once per test session (etcd, the shared tokenizer stage, the
prepared model). Tests that must kill or restart something start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import openai
import pytest
import pytest_asyncio

from services import credentials
from services.clients import EngineClient, RouterClient, TokenizerClient
from services.config import DEFAULT_HOME
from services.credentials import MESH_KEY_ENV, MeshCredentials
from services.etcd import EtcdSession
from services.etcd_server import EmbeddedEtcd
from services.launcher import StageProcess
from services.model import prepare_bundled_model
from services.net import free_port
from services.pb import common_pb2, engine_pb2

#: Every stage the tests start shares a mesh key, so KV handles are signed and checked,
#: and internal APIs demand the stage token, as in a deployed mesh
#: (services/credentials.py). The test process is a member too: its clients send the token.
MESH_KEY = os.environ.setdefault(MESH_KEY_ENV, "stagemesh-tests-" + os.urandom(8).hex())
credentials.install(MeshCredentials(mesh_key=MESH_KEY.encode()))

#: Seconds a stage process may take to become SERVING (imports + tokenizer load).
STAGE_START_TIMEOUT = 120.0

#: CI sets this and installs the system tools (.ci/run); elsewhere a check whose tool or
#: privilege is missing skips with the reason.
REQUIRE_TOOLS = os.environ.get("STAGEMESH_REQUIRE_DEPLOY_TOOLS") == "1"


def skip_unless_required(reason: str) -> None:
    """Skip for ``reason`` on a developer's machine; fail in CI, where the check must run."""
    if REQUIRE_TOOLS:
        pytest.fail(f"{reason}, and CI requires this check (STAGEMESH_REQUIRE_DEPLOY_TOOLS=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def home() -> Path:
    """The stagemesh home used by the tests (the user's, so the model is prepared once)."""
    return Path(os.environ.get("STAGEMESH_HOME", DEFAULT_HOME))


@pytest.fixture(scope="session")
def model_dir(home: Path) -> Path:
    return prepare_bundled_model(home)


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir: Path):
    """transformers' own tokenizer for the model: the reference the stage must match."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@contextlib.contextmanager
def private_etcd() -> Iterator[EmbeddedEtcd]:
    """A real etcd on a free port, stopped on the way out."""
    server = EmbeddedEtcd(client_port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def etcd() -> Iterator[EmbeddedEtcd]:
    with private_etcd() as server:
        yield server


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path


def make_small_llama(path: Path, tokenizer_dir: Path) -> Path:
    """A two-layer Llama with 4 heads (2 KV heads), random weights, and the tokenizer
    from ``tokenizer_dir``: a second model that starts in seconds (and whose heads
    split over two tensor-parallel ranks, which the bundled model's 9 do not)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.5,  # spread logits: no near-ties in argmax
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tokenizer_process(
    name: str, etcd_endpoint: str, home: Path, log_dir: Path, *extra: str
) -> StageProcess:
    """A tokenizer stage process on a free port (not started)."""
    port = free_port()
    return StageProcess(
        name,
        "tokenizer_svc",
        [
            "--port",
            str(port),
            "--etcd",
            etcd_endpoint,
            "--home",
            str(home),
            "--log-level",
            "DEBUG",
            *extra,
        ],
        f"127.0.0.1:{port}",
        log_dir,
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tokenizer_stage(
    etcd: EmbeddedEtcd, home: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[StageProcess]:
    """The session's shared tokenizer stage."""
    stage = tokenizer_process(
        "tokenizer", etcd.endpoint, home, tmp_path_factory.mktemp("logs"), "--metrics-port", "0"
    )
    async with running(stage):
        yield stage


@contextlib.asynccontextmanager
async def running(
    stage: StageProcess, timeout: float = STAGE_START_TIMEOUT
) -> AsyncIterator[StageProcess]:
    """Start a stage, wait until it is SERVING, and stop it on the way out."""
    stage.start()
    try:
        await stage.wait_healthy(timeout)
        yield stage
    finally:
        stage.stop()


def kvstore_process(
    etcd_endpoint: str, home: Path, log_dir: Path, capacity_mib: int, *extra: str
) -> StageProcess:
    """A KV store stage on a free port (not started)."""
    port = free_port()
    return StageProcess(
        "kvstore",
        "kvstore_svc",
        [
            "--port",
            str(port),
            "--etcd",
            etcd_endpoint,
            "--home",
            str(home),
            "--capacity-mib",
            str(capacity_mib),
            "--log-level",
            "DEBUG",
            "--metrics-port",
            "0",
            *extra,
        ],
        f"127.0.0.1:{port}",
        log_dir,
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tokenizer(tokenizer_stage: StageProcess) -> AsyncIterator[TokenizerClient]:
    async with TokenizerClient(tokenizer_stage.grpc_address) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def etcd_session(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdSession]:
    session = EtcdSession([("127.0.0.1", etcd.client_port)])
    yield session
    await session.close()


#: Engines start in tens of seconds on CPU; two at once on two cores take longer.
ENGINE_START_TIMEOUT = 420.0
#: The session prefill engine keeps uncollected KV this long (short, to test the lease).
PREFILL_LEASE_SECONDS = 8


def engine_process(
    role: str, etcd_endpoint: str, home: Path, log_dir: Path, *extra: str
) -> StageProcess:
    """An engine stage process (prefill_svc or decode_svc) on free ports (not started)."""
    port = free_port()
    return StageProcess(
        role,
        f"{role}_svc",
        [
            "--port",
            str(port),
            "--etcd",
            etcd_endpoint,
            "--home",
            str(home),
            "--kv-cache-gib",
            "1",
            "--max-model-len",
            "4096",
            "--metrics-port",
            "0",
            *extra,
        ],
        f"127.0.0.1:{port}",
        log_dir,
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine_stages(
    etcd: EmbeddedEtcd, home: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[StageProcess, StageProcess]]:
    """One prefill and one decode stage for the session, each pinned to its own core."""
    log_dir = tmp_path_factory.mktemp("engine-logs")
    prefill = engine_process(
        "prefill",
        etcd.endpoint,
        home,
        log_dir,
        "--cpu-cores",
        "0",
        "--kv-lease-seconds",
        str(PREFILL_LEASE_SECONDS),
    )
    decode = engine_process("decode", etcd.endpoint, home, log_dir, "--cpu-cores", "1")
    prefill.start()
    decode.start()
    try:
        await asyncio.gather(
            prefill.wait_healthy(ENGINE_START_TIMEOUT), decode.wait_healthy(ENGINE_START_TIMEOUT)
        )
        yield prefill, decode
    finally:
        prefill.stop()
        decode.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def prefill(engine_stages: tuple[StageProcess, StageProcess]) -> AsyncIterator[EngineClient]:
    async with EngineClient(engine_stages[0].grpc_address) as client:
        yield client


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def decode(engine_stages: tuple[StageProcess, StageProcess]) -> AsyncIterator[EngineClient]:
    async with EngineClient(engine_stages[1].grpc_address) as client:
        yield client


async def disaggregated(
    prefill: EngineClient,
    decode: EngineClient,
    prompt: list[int],
    params: common_pb2.SamplingParams,
) -> tuple[list[int], engine_pb2.PrefillResponse]:
    """Prefill on one engine, decode on the other with the handle; the generated ids.

    On a CI host whose two cores are saturated by both engines a handle can miss its
    collection: vLLM's NIXL handshake waits a fixed 5 s for the prefill side channel,
    and a starved decode process can reach the handle after its lease ran out. Either
    way the decode answers NOT_FOUND, and the caller is to prefill again (the router
    does the same, then falls back to aggregated decode); here we prefill again, twice
    at most.
    """
    for attempt in range(3):
        prefilled = await prefill.prefill(prompt, params)
        try:
            ids = [
                t
                async for reply in decode.generate(prompt, params, kv_handle=prefilled.handle)
                for t in reply.token_ids
            ]
            return ids, prefilled
        except grpc.aio.AioRpcError as error:
            if attempt == 2 or error.code() != grpc.StatusCode.NOT_FOUND:
                raise
    raise AssertionError("unreachable")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``isolated`` start engines of their own: run them first, before the
    session's engines exist (on a small host, idle engines slow a new one's start
    several-fold). Tests marked ``disruptive`` kill session stages: run them last."""

    def order(item: pytest.Item) -> int:
        if item.get_closest_marker("isolated"):
            return 0
        return 2 if item.get_closest_marker("disruptive") else 1

    items.sort(key=order)


class Mesh:
    """The session's router stage in front of the session tokenizer and engines."""

    def __init__(
        self, router: StageProcess, http_port: int, prefill: StageProcess, decode: StageProcess
    ) -> None:
        self.router = router
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.prefill = prefill
        self.decode = decode


def router_process(
    etcd_endpoint: str, home: Path, log_dir: Path, *extra: str
) -> tuple[StageProcess, int]:
    """A router stage on free ports (not started), and its HTTP port."""
    port, http_port = free_port(), free_port()
    router = StageProcess(
        "router",
        "router_svc",
        [
            "--port",
            str(port),
            "--http-port",
            str(http_port),
            "--etcd",
            etcd_endpoint,
            "--home",
            str(home),
            "--metrics-port",
            "0",
            "--host",
            "127.0.0.1",
            *extra,
        ],
        f"127.0.0.1:{port}",
        log_dir,
    )
    return router, http_port


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mesh(
    etcd: EmbeddedEtcd,
    home: Path,
    tokenizer_stage: StageProcess,
    engine_stages: tuple[StageProcess, StageProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Mesh]:
    """A router over the session's stages: the whole mesh, started once."""
    router, http_port = router_process(
        etcd.endpoint,
        home,
        tmp_path_factory.mktemp("router-logs"),
        "--worker-wait",
        "3",
        "--log-level",
        "DEBUG",
    )
    async with running(router):
        yield Mesh(router, http_port, *engine_stages)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def router(mesh: Mesh) -> AsyncIterator[RouterClient]:
    async with RouterClient(mesh.router.grpc_address) as client:
        yield client


@pytest.fixture(scope="session")
def client(mesh: Mesh) -> openai.AsyncOpenAI:
    """The official OpenAI SDK pointed at the mesh's HTTP bridge."""
    return openai.AsyncOpenAI(
        base_url=f"{mesh.http_url}/v1", api_key="unused", max_retries=0, timeout=300
    )
