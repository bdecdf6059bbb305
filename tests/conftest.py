"""Fixtures that start real processes: etcd, stage processes, the prepared model.

Expensive things start once per test session (etcd, the shared tokenizer stage, the
prepared model). Tests that must kill or restart something start their own, with the
builders in tests/support/. This file holds fixtures, the order tests run in, and the
guards that keep one hung or failed test from spoiling the ones after it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio

from services import credentials
from services.clients import EngineClient, RouterClient, TokenizerClient
from services.config import DEFAULT_HOME
from services.etcd import EtcdSession
from services.model import prepare_bundled_model
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from tests.support.stages import (
    ENGINE_START_TIMEOUT,
    PREFILL_LEASE_SECONDS,
    Mesh,
    engine_process,
    private_etcd,
    router_process,
    running,
    tokenizer_process,
)

#: Seconds an async test's body may run before it is cancelled. Below pytest-timeout's
#: 900: its SIGALRM fails the test from inside the event loop and leaves the test's
#: coroutine suspended on the session's loop, its ``finally`` blocks never run (whatever it
#: installed or started stays for every later test). A cancellation runs them, and its
#: traceback says which await hung.
ASYNC_TEST_TIMEOUT = 600.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Run an async test's body under ``asyncio.timeout(ASYNC_TEST_TIMEOUT)``."""
    body = getattr(item, "obj", None)
    if not inspect.iscoroutinefunction(body):
        return (yield)
    item.obj = _bounded(body)  # type: ignore[attr-defined]
    try:
        return (yield)
    finally:
        item.obj = body  # type: ignore[attr-defined]


def _bounded(
    body: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Coroutine[Any, Any, None]]:
    @functools.wraps(body)
    async def bounded(*args: Any, **kwargs: Any) -> None:
        scope = asyncio.timeout(ASYNC_TEST_TIMEOUT)
        try:
            async with scope:
                await body(*args, **kwargs)
        except TimeoutError as exc:
            if not scope.expired():
                raise
            raise TimeoutError(
                f"cancelled after {ASYNC_TEST_TIMEOUT:.0f}s; the traceback it was raised "
                "from names the await that hung"
            ) from exc

    return bounded


@pytest.fixture(autouse=True)
def _same_identity_after() -> Iterator[None]:
    """Put the test process's mesh credentials back after each test: a test that
    installs TLS ones and fails before its own ``finally`` would otherwise leave every
    later test speaking TLS to plaintext stages."""
    before = credentials.current()
    yield
    credentials.install(before)


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


@pytest.fixture(scope="session")
def etcd() -> Iterator[EmbeddedEtcd]:
    with private_etcd() as server:
        yield server


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path


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


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tokenizer(tokenizer_stage: StageProcess) -> AsyncIterator[TokenizerClient]:
    async with TokenizerClient(tokenizer_stage.grpc_address) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def etcd_session(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdSession]:
    session = EtcdSession([("127.0.0.1", etcd.client_port)])
    yield session
    await session.close()


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``isolated`` start engines of their own: run them first, before the
    session's engines exist (on a small host, idle engines slow a new one's start
    several-fold). Tests marked ``disruptive`` kill session stages: run them last."""

    def order(item: pytest.Item) -> int:
        if item.get_closest_marker("isolated"):
            return 0
        return 2 if item.get_closest_marker("disruptive") else 1

    items.sort(key=order)


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
