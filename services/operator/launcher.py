"""Starting and stopping stage processes on this host: used by ``stagemesh up`` and by
the test suite, so both run the mesh the same way an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.clients import health_status
from services.exits import StartFailed, reason_line

_PR_SET_PDEATHSIG = 1


def child_setup(cores: Sequence[int] | None = None) -> Callable[[], None]:
    """What a child runs before exec: die with the launcher, and start on ``cores``.

    Children run in their own session (so a terminal's Ctrl-C reaches only the
    launcher, which then stops them in order); PR_SET_PDEATHSIG makes a launcher that
    dies by SIGKILL still take them along: they get SIGTERM and drain as usual.
    Cores set here cover the interpreter's start too, before a stage pins itself.
    libc is loaded here, in the parent: the child between fork and exec makes only the
    two system calls, and imports nothing (an import there could wait forever on a lock
    another thread of the parent held at the fork).
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    mask = list(cores) if cores else None

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if mask:
            os.sched_setaffinity(0, mask)

    return setup


class StageProcess:
    """One stage as a child process (``python -m <module> <args>``), its output in a log file."""

    def __init__(
        self,
        name: str,
        module: str,
        args: Sequence[str],
        grpc_address: str,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
        cores: Sequence[int] | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.args = list(args)
        self.grpc_address = grpc_address
        self.log_path = log_dir / f"{name}.log"
        self.env = dict(os.environ if env is None else env)
        #: A command that execs the stage in another context, e.g. ``ip netns exec NS``.
        self.wrapper = list(wrapper)
        #: Cores the process starts on (None: the launcher's).
        self.cores = list(cores) if cores else None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", self.module, *self.args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C in a terminal reaches only the launcher
                preexec_fn=child_setup(self.cores),  # noqa: PLW1509 - two system calls, no locks
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_healthy(self, timeout: float) -> None:
        """Wait until health is SERVING; raise with the log's tail if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited during start:\n{self.log_tail()}")
            if await health_status(self.grpc_address, timeout=1.0) == "SERVING":
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} not SERVING after {timeout:.0f}s:\n{self.log_tail()}")

    def reason(self) -> str:
        """Why the stage exited, in one line: the reason it printed (``stagemesh decode:
        --model ...``), else its log's last line."""
        return reason_line(self.log_tail(40))

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``; returns the exit code.

        Whatever of its process group outlives the stage (a vLLM engine core whose
        stage exited before it) is killed too: once this returns, nothing it started runs.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL to the stage's whole process group: the crash case (no drain, no
        deregistration).

        The group, not the pid: an engine stage's vLLM engine-core and worker processes
        outlive a killed parent and keep a core busy (and, on a GPU, its memory). A
        crashed stage takes its group with it, as systemd (KillMode=control-group) and
        a container runtime do.
        """
        if self.process is None:
            return
        if self.process.poll() is None or live_processes_in_group(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        # SIGKILL is delivered but not yet acted on by every member: an engine process
        # releasing gigabytes of registered KV memory takes seconds to exit. The signal is
        # repeated in case a member was being spawned while the first went out.
        deadline = time.monotonic() + 60
        while survivors := live_processes_in_group(self.process.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name}: processes survived SIGKILL for 60 s: "
                    + "; ".join(describe_process(pid) for pid in survivors)
                )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            time.sleep(0.1)


def process_stat(pid: int) -> tuple[str, list[str]] | None:
    """A process's name and the ``/proc/PID/stat`` fields after it (state first), or None
    once it is gone. The name is cut out by its parentheses: it may hold spaces."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes still alive have used so far."""
    ticks = sum(int(stat[1][11]) + int(stat[1][12]) for pid in pids if (stat := process_stat(pid)))
    return ticks / os.sysconf("SC_CLK_TCK")


def describe_process(pid: int) -> str:
    """``pid (name) state=S wchan=...``: what a process that will not die is doing."""
    stat = process_stat(pid)
    if stat is None:
        return f"{pid} (gone)"
    name, fields = stat
    try:
        wchan = (Path("/proc") / str(pid) / "wchan").read_text() or "-"
    except OSError:
        wchan = "-"
    return f"{pid} ({name}) state={fields[0]} wchan={wchan}"


def live_processes_in_group(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` that have not exited (zombies do not count: a
    container's init may never reap them)."""
    live = []
    for entry in Path("/proc").glob("[0-9]*"):
        stat = process_stat(int(entry.name))
        if stat is not None and int(stat[1][2]) == pgid and stat[1][0] not in ("Z", "X"):
            live.append(int(entry.name))
    return live


class ProcessGroup:
    """Stage processes started together and stopped together, last started first."""

    def __init__(self) -> None:
        self.stages: list[StageProcess] = []

    def add(self, stage: StageProcess) -> StageProcess:
        stage.start()
        self.stages.append(stage)
        return stage

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every stage at once (they drain in parallel), then wait for each."""
        for stage in self.stages:
            if stage.alive():
                assert stage.process is not None
                stage.process.send_signal(signal.SIGTERM)
        for stage in reversed(self.stages):
            with contextlib.suppress(Exception):
                stage.stop(timeout)
        self.stages.clear()


@dataclass
class _Watch:
    """What the supervisor knows of one stage."""

    started: float
    #: Restarts in a row without a stable run between them (the backoff's exponent).
    failures: int = 0
    #: When the exited stage starts again (None while it runs).
    restart_at: float | None = None


class Supervisor:
    """Restarts stages that exit on their own, with exponential backoff, while the rest
    of the mesh keeps serving (``stagemesh up``; systemd's ``Restart=on-failure`` and
    compose's ``restart: on-failure`` do the same for their units).

    A stage that exits has what is left of its process group killed (a vLLM engine-core
    process outlives its stage), then starts again after ``base`` seconds, doubling per
    failure in a row up to ``ceiling``. A run of ``stable`` seconds resets the count.
    """

    def __init__(
        self,
        stages: Sequence[StageProcess],
        report: Callable[[str], None],
        base: float = 1.0,
        ceiling: float = 30.0,
        stable: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stages = list(stages)
        self._report = report
        self._base, self._ceiling, self._stable = base, ceiling, stable
        self._clock = clock
        self._watch = {stage.name: _Watch(started=clock()) for stage in self._stages}

    def check(self, give_up_on: Collection[int] = ()) -> None:
        """Look at every stage once: note exits, restart those whose backoff is over.

        A stage that exited with a code in ``give_up_on`` is not restarted: this raises
        :class:`StartFailed` with the reason it printed (``stagemesh up`` passes the
        codes a restart cannot mend while the mesh starts: a port taken, a bad flag).
        """
        now = self._clock()
        for stage in self._stages:
            watch = self._watch[stage.name]
            if watch.restart_at is None:
                if stage.alive():
                    if watch.failures and now - watch.started >= self._stable:
                        watch.failures = 0
                    continue
                code = stage.process.returncode if stage.process is not None else None
                stage.kill()  # reap what is left of its group
                if code in give_up_on:
                    raise StartFailed(
                        f"{stage.name} cannot start: {stage.reason()} (log: {stage.log_path})"
                    )
                delay = min(self._ceiling, self._base * 2**watch.failures)
                watch.failures += 1
                watch.restart_at = now + delay
                self._report(
                    f"{stage.name} exited with code {code}; restarting it in {delay:.0f}s "
                    f"(log: {stage.log_path})\n{stage.log_tail(10)}"
                )
            elif now >= watch.restart_at:
                self._report(f"restarting {stage.name}")
                stage.start()
                watch.started, watch.restart_at = now, None
