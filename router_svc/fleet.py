"""``stagemesh router --workers N``: N router processes serving the same ports.

One Python router process relays about one accelerator's tokens (issue #28); vLLM's
``--api-server-count`` and SGLang's tokenizer workers answer the same limit with more
processes. Here the parent checks the ports once, then starts N copies of the router
(``--worker-index i``), each binding the gRPC and HTTP ports with SO_REUSEPORT, so the
kernel spreads connections over them. They share nothing but etcd: each keeps its own
KV index (from the same event streams), session affinity, Responses store and admission
limits, as docs/deploy.md says. Their metrics are summed through prometheus_client's
multiprocess files (:mod:`services.exposition`), so a scrape of either port sees all.

The parent forwards SIGTERM/SIGINT (each worker drains as a lone router does), restarts
a worker that crashed (not one whose settings cannot work, :data:`FINAL_EXIT_CODES`), and
stops them all when restarts come too fast, so its own supervisor (systemd, Kubernetes)
sees the failure.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

from prometheus_client import multiprocess

from router_svc.config import RouterConfig
from services.engine.replies import MAX_IDS_PER_MESSAGE
from services.exits import FINAL_EXIT_CODES
from services.exposition import MULTIPROC_DIR

log = logging.getLogger(__name__)

#: More crashes than this within :data:`RESTART_WINDOW` seconds stop the whole router.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: How often the parent looks at its workers (a signal wakes it at once).
_POLL = 0.2


def check(config: RouterConfig) -> None:
    """End with one line when the router's processes cannot work as set (``--workers``,
    and what each asks of engines, ``--behind-stream-interval``)."""
    if not 1 <= config.behind_stream_interval <= MAX_IDS_PER_MESSAGE:
        raise SystemExit(
            f"--behind-stream-interval takes 1 to {MAX_IDS_PER_MESSAGE}, "
            f"not {config.behind_stream_interval}"
        )
    if config.workers < 1:
        raise SystemExit(f"--workers must be 1 or more, not {config.workers}")
    if config.workers > 1 and (config.port == 0 or config.http_port == 0):
        raise SystemExit(
            "--workers: several router processes share fixed ports; set --port and "
            "--http-port (or -1 for no HTTP) instead of 0"
        )


def run_fleet(config: RouterConfig, argv: Sequence[str]) -> None:
    """Serve with ``config.workers`` processes started from ``argv`` until signalled."""
    config.check_ports()
    with tempfile.TemporaryDirectory(prefix="stagemesh-router-metrics-") as metrics:
        raise SystemExit(Fleet(config.workers, argv, metrics).run())


class Fleet:
    """The parent of the router's worker processes."""

    def __init__(self, count: int, argv: Sequence[str], metrics_dir: str) -> None:
        self._argv = list(argv)
        self._metrics_dir = metrics_dir
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._count = count
        self._stopping = False
        self._restarts: list[float] = []
        self._exit_code = 0

    def _spawn(self, index: int) -> None:
        command = [sys.executable, "-m", "router_svc", *self._argv]
        command += ["--workers", "1", "--worker-index", str(index)]
        env = {**os.environ, MULTIPROC_DIR: self._metrics_dir}
        self._workers[index] = subprocess.Popen(command, env=env)

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop(signum)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask every worker to drain and end (once)."""
        if not self._stopping:
            self._stopping = True
            for worker in self._workers.values():
                if worker.poll() is None:
                    worker.send_signal(signum)

    def run(self) -> int:
        """Start the workers and watch them until all have ended; the worst exit code."""
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        for index in range(self._count):
            self._spawn(index)
        while self._workers:
            time.sleep(_POLL)
            for index, worker in list(self._workers.items()):
                code = worker.poll()
                if code is not None:
                    self._ended(index, worker.pid, code)
        return self._exit_code

    def _ended(self, index: int, pid: int, code: int) -> None:
        del self._workers[index]
        multiprocess.mark_process_dead(pid, self._metrics_dir)
        if self._stopping:
            self._exit_code = max(self._exit_code, code)
            return
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
        if code in FINAL_EXIT_CODES or len(self._restarts) > MAX_RESTARTS:
            log.error("router worker %d ended with %d; stopping the router", index, code)
            self._exit_code = code or 1
            self.stop()
            return
        log.warning("router worker %d (pid %d) ended with %d; starting another", index, pid, code)
        self._spawn(index)
