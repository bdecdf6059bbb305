"""`stagemesh up` as the tests run it: a real process, on ports of the test's choosing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def up_command(home: Path, ports: dict[str, int], *extra: str) -> list[str]:
    """`stagemesh up` on these ports (``{"http": 8000, ...}``, each its ``--NAME-port``)."""
    return [
        sys.executable,
        "-m",
        "services.cli",
        "--home",
        str(home),
        "up",
        *(arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))),
        *extra,
    ]


def start_up(home: Path, ports: dict[str, int], *extra: str) -> subprocess.Popen[str]:
    """:func:`up_command` started, its output (stderr too) on a pipe."""
    return subprocess.Popen(
        up_command(home, ports, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def banner(up: subprocess.Popen[str], timeout: float = 600) -> list[str]:
    """The lines `up` prints until it says it is up (it must not exit before)."""
    assert up.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not any("Ctrl-C stops everything" in line for line in lines):
        assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
        lines.append(up.stdout.readline())
    return lines
