"""Ports a process is about to bind: is one taken, and by whom.

``stagemesh up`` checks every port of its mesh before it starts anything, and each stage
checks its own before it serves. A taken port is then one line that names the port, the
setting that moves it and, where this host lets us see it, the process holding it,
instead of a hang or a traceback a minute later.

A port counts as taken when a socket with SO_REUSEADDR cannot bind it. That is how
gRPC, aiohttp, Prometheus' server and etcd bind theirs, so a stopped process's
connections still in TIME_WAIT do not count, and a listener does.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: /proc/net/tcp's state code for a listening socket.
_LISTEN = "0A"


@dataclasses.dataclass(frozen=True)
class PortClaim:
    """A port a process will bind, and the setting that chooses it."""

    port: int
    #: The flag that moves it (``--http-port``).
    setting: str
    #: What listens there, for people (``router HTTP``); empty when the setting says it.
    what: str = ""
    host: str = "127.0.0.1"

    def describe(self) -> str:
        """``port 8000 (router HTTP, --http-port)``."""
        return f"port {self.port} ({', '.join(filter(None, (self.what, self.setting)))})"


@dataclasses.dataclass(frozen=True)
class Holder:
    """A process holding a listening socket."""

    pid: int
    command: str

    @property
    def stagemesh(self) -> bool:
        """One of a mesh's own processes (a stage, its etcd, ``stagemesh up``): one that
        is stopping releases its ports in seconds."""
        return "stagemesh" in self.command or "_svc" in self.command

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


@dataclasses.dataclass(frozen=True)
class Taken:
    """A claimed port that cannot be bound now, and why."""

    claim: PortClaim
    #: The process listening on it, when this host shows it.
    holder: Holder | None
    #: The bind error when it is not "in use" (an address this host does not have, a
    #: privileged port).
    error: str = ""

    def reason(self) -> str:
        """``port 8000 (router HTTP, --http-port) is in use by pid 42 (python3 -m http.server)``."""
        if self.error:
            return f"{self.claim.describe()} cannot be bound on {self.claim.host}: {self.error}"
        by = f" by {self.holder}" if self.holder else " by another process"
        return f"{self.claim.describe()} is in use{by}"


def bind_error(host: str, port: int) -> int | None:
    """The errno binding ``host:port`` fails with now (SO_REUSEADDR, as servers bind), or
    None when it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno or errno.EINVAL
    return None


def _listening_inodes(port: int, net: Path) -> set[str]:
    """Inodes of the listening TCP sockets on ``port`` in a ``/proc/.../net`` directory."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (net / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if (
                len(fields) > 9
                and fields[3] == _LISTEN
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    return inodes


def _holds(pid: str, sockets: set[str]) -> bool:
    """Whether process ``pid`` has one of ``sockets`` (``socket:[inode]``) open."""
    try:
        fds = os.scandir(f"/proc/{pid}/fd")
    except OSError:
        return False
    with fds:
        for fd in fds:
            try:
                if os.readlink(fd.path) in sockets:
                    return True
            except OSError:
                continue
    return False


def _command(pid: int, width: int = 80) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    words = [arg.decode(errors="replace") for arg in argv]
    command = " ".join(
        " ".join([Path(words[0]).name, *words[1:]]).split()
    )  # its name, not path; one line
    return command if len(command) <= width else command[: width - 3] + "..."


def holder(port: int) -> Holder | None:
    """The process listening on ``port`` in this network namespace, or None when no
    process this user may inspect holds it (another user's, or none any more)."""
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port, Path("/proc/net"))}
    if not sockets:
        return None
    for entry in Path("/proc").glob("[0-9]*"):
        if _holds(entry.name, sockets):
            return Holder(int(entry.name), _command(int(entry.name)))
    return None


def listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` itself listens on ``port`` (read in its own network
    namespace), or None when /proc does not tell: proof that a port answers from the
    process we started and not from another that got there first."""
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port, Path(f"/proc/{pid}/net"))}
    if not Path(f"/proc/{pid}/fd").is_dir():
        return None
    return _holds(str(pid), sockets) if sockets else False


def taken(claims: Sequence[PortClaim]) -> list[Taken]:
    """The claims that cannot be bound now, with who holds each."""
    found = []
    for claim in claims:
        code = bind_error(claim.host, claim.port)
        if code is None:
            continue
        if code != errno.EADDRINUSE:
            found.append(Taken(claim, None, os.strerror(code)))
            continue
        who = holder(claim.port)
        if who is None and bind_error(claim.host, claim.port) is None:
            continue  # its holder exited between the two looks
        found.append(Taken(claim, who))
    return found


def wait_for(
    claims: Sequence[PortClaim], wait: float, say: Callable[[str], None], *, anyone: bool = False
) -> list[Taken]:
    """The claims still taken after waiting up to ``wait`` seconds for them to be released.

    Only ports held by a mesh's own processes are waited for (a mesh that was just
    stopped drains for a few seconds); any other holder is not going away, and is
    reported at once. ``anyone`` waits whoever holds them (after a mesh's own
    shutdown, whose children have all exited).
    """
    found = taken(claims)
    if not found or not (anyone or all(t.holder is not None and t.holder.stagemesh for t in found)):
        return found
    holders = sorted({str(t.holder.pid) for t in found if t.holder is not None})
    say(
        f"waiting up to {wait:.0f}s for port(s) {', '.join(str(t.claim.port) for t in found)} to "
        "be released "
        f"by pid(s) {', '.join(holders) or '?'}{'' if anyone else ' (a mesh that is stopping?)'}"
    )
    deadline = time.monotonic() + wait
    while found and time.monotonic() < deadline:
        time.sleep(0.25)
        found = taken([t.claim for t in found])
    return found
