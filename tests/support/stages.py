"""Stage processes the tests start, and the mesh key every one of them shares.

Builders return a :class:`~services.launcher.StageProcess` on free ports, not started;
:func:`running` starts one, waits until it is SERVING and stops it on the way out.
Importing this module installs the tests' mesh credentials (conftest.py imports it
first, so every client the tests make sends the stage token).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services import credentials
from services.credentials import MESH_KEY_ENV, MeshCredentials
from services.net import free_port
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess

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


#: Engines start in tens of seconds on CPU; two at once on two cores take longer.
ENGINE_START_TIMEOUT = 420.0
#: The session prefill engine keeps uncollected KV this long (short, to test the lease).
PREFILL_LEASE_SECONDS = 8


@contextlib.contextmanager
def private_etcd() -> Iterator[EmbeddedEtcd]:
    """A real etcd on a free port, stopped on the way out."""
    server = EmbeddedEtcd(client_port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def running(
    stage: StageProcess, timeout: float = STAGE_START_TIMEOUT
) -> AsyncIterator[StageProcess]:
    """Start a stage, wait until it is SERVING, and stop it on the way out. A failure
    inside carries the stage's state and the end of its log (a stage that died under
    the test is otherwise only a refused connection)."""
    stage.start()
    try:
        await stage.wait_healthy(timeout)
        yield stage
    except Exception as exc:
        state = "running" if stage.alive() else f"exited ({stage.process and stage.process.poll()})"
        exc.add_note(f"{stage.name} is {state}; its log ends:\n{stage.log_tail(40)}")
        raise
    finally:
        stage.stop()


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


class Mesh:
    """The session's router stage in front of the session tokenizer and engines."""

    def __init__(
        self, router: StageProcess, http_port: int, prefill: StageProcess, decode: StageProcess
    ) -> None:
        self.router = router
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.prefill = prefill
        self.decode = decode
