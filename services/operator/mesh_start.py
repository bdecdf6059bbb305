"""Bringing ``stagemesh up``'s processes up, and down again.

- Every stage is supervised from its first second. One that exits while the mesh
  starts is reported with its log's tail and restarted, unless its exit code says a
  restart cannot mend it (:mod:`services.exits`): then ``up`` ends with its one line.
- A stage counts as ready when it proves it: its gRPC health is SERVING and its member
  record is in the etcd this run started (a port that answers could be another
  process's).
- While engines load, a progress line says which stages are ready and which are still
  starting. Past the start-up deadline, ``up`` names the stages that are not ready and
  shows their logs' tails.
- On the way out every stage's whole process group is killed, and ``up`` returns once
  the mesh's ports are free, so the next ``up`` can start at once.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable, Sequence

from services import ports
from services.clients import health_status
from services.etcd import EtcdSession
from services.exits import FINAL_EXIT_CODES, StartFailed
from services.membership import MEMBERS_PREFIX, RecordReader
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import ProcessGroup, StageProcess, Supervisor
from services.pb import common_pb2

#: Seconds between two looks at the starting stages.
_POLL_SECONDS = 0.5
#: Seconds between two progress lines when output is not a terminal.
_PROGRESS_EVERY = 30.0


class StopRequest:
    """SIGINT, SIGTERM and SIGHUP noted, not raised: ``up`` stops its children in order
    wherever it is, during its start too, and never with a traceback."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._note)
        if (
            signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
        ):  # under nohup, a hangup stays ignored
            signal.signal(signal.SIGHUP, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


def supervise_etcd(etcd: EmbeddedEtcd, report: Callable[[str], None]) -> None:
    """Start etcd again on its data when it exited (the stages register again)."""
    if etcd.process is not None and etcd.process.poll() is None:
        return
    report("etcd exited; starting it again on its data (stages re-register)")
    try:
        etcd.start()
    except StartFailed as exc:
        report(f"{exc}\n{exc.detail}".rstrip())


class _Progress:
    """The progress line: in place on a terminal, else a line per change (and every
    half minute, so a log shows the wait was not silent)."""

    def __init__(self, show: Callable[[str], None], in_place: bool) -> None:
        self._show = show
        self._in_place = in_place
        self._last = ""
        self._shown_at = 0.0

    def update(self, ready: Sequence[str], starting: Sequence[str], elapsed: float) -> None:
        state = f"ready: {', '.join(ready) or '-'}; starting: {', '.join(starting) or '-'}"
        line = f"[{elapsed:4.0f}s] {state}"
        now = time.monotonic()
        if self._in_place:
            self._show(f"\r{line}\033[K")
        elif state != self._last or now - self._shown_at >= _PROGRESS_EVERY:
            self._show(line + "\n")
            self._shown_at = now
        self._last = state

    def done(self) -> None:
        if self._in_place:
            self._show("\n")


async def _registered(session: EtcdSession) -> set[str]:
    """The gRPC addresses of the members registered in the mesh's etcd (none while it
    does not answer: the next look asks again)."""
    try:
        listing = await (await session.client()).get_prefix(MEMBERS_PREFIX.encode())
    except Exception:  # noqa: BLE001 - etcd restarting or slow: not ready yet, not a failure
        await session.reset()
        return set()
    # Sealed records (services/records.py): read as every watcher reads them.
    return {
        member.grpc_address
        for member in RecordReader(common_pb2.Member.FromString).read_all(listing).values()
    }


async def _ready(stages: Sequence[StageProcess], session: EtcdSession) -> list[StageProcess]:
    """The stages that prove they are ready: SERVING, and registered in our etcd."""
    alive = [stage for stage in stages if stage.alive()]
    health = await asyncio.gather(
        *(health_status(stage.grpc_address, timeout=1.0) for stage in alive)
    )
    serving = [stage for stage, status in zip(alive, health) if status == "SERVING"]
    if not serving:
        return []
    registered = await _registered(session)
    return [stage for stage in serving if stage.grpc_address in registered]


async def wait_ready(
    stages: Sequence[StageProcess],
    supervisor: Supervisor,
    etcd: EmbeddedEtcd,
    timeout: float,
    stop: StopRequest,
    report: Callable[[str], None],
) -> bool:
    """Wait until every stage is ready, supervising meanwhile; False when stopped first.

    Raises :class:`StartFailed` for a stage that cannot start (an exit code no restart
    mends) and for the stages still not ready after ``timeout`` seconds.
    """
    started = time.monotonic()
    progress = _Progress(lambda text: print(text, end="", flush=True), sys.stdout.isatty())
    session = EtcdSession([(etcd.host, etcd.client_port)], timeout=2.0)
    pending = list(stages)
    try:
        while pending and not stop:
            supervise_etcd(etcd, report)
            supervisor.check(give_up_on=FINAL_EXIT_CODES)
            for stage in await _ready(pending, session):
                pending.remove(stage)
            elapsed = time.monotonic() - started
            progress.update(
                [s.name for s in stages if s not in pending], [s.name for s in pending], elapsed
            )
            if pending and elapsed > timeout:
                progress.done()
                raise StartFailed(
                    f"{', '.join(s.name for s in pending)} not ready after {timeout:.0f}s "
                    "(--start-timeout); "
                    f"logs: {', '.join(str(s.log_path) for s in pending)}",
                    "\n".join(f"--- {s.name} ---\n{s.log_tail(15)}" for s in pending),
                )
            if pending:
                await asyncio.sleep(_POLL_SECONDS)
        progress.done()
    finally:
        await session.close()
    return not pending


def stop_mesh(
    group: ProcessGroup,
    etcd: EmbeddedEtcd,
    claims: Sequence[ports.PortClaim],
    say: Callable[[str], None],
) -> None:
    """Stop every stage (its whole process group), then etcd, then wait for the mesh's
    ports to be free; a port something else still holds is named."""
    group.stop_all()
    etcd.stop(wipe=True)
    for still in ports.wait_for(claims, 10.0, say, anyone=True):
        say(f"after stopping, {still.reason()}")
