"""`stagemesh up` as a user runs it: it starts, reports its endpoints, serves, and
Ctrl-C stops everything it started."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.clients import TokenizerClient
from services.etcd import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_up_serves_and_ctrl_c_stops_everything(home: Path, model_dir: Path, tmp_path: Path) -> None:
    etcd_port, tokenizer_port = free_port(), free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--home", str(home), "up",
         "--etcd-port", str(etcd_port), "--tokenizer-port", str(tokenizer_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 180
        while not any("Ctrl-C stops everything" in line for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(await asyncio.to_thread(up.stdout.readline))  # type: ignore[union-attr]
        banner = "".join(lines)
        assert f"127.0.0.1:{etcd_port}" in banner and f"127.0.0.1:{tokenizer_port}" in banner

        async with TokenizerClient(f"127.0.0.1:{tokenizer_port}") as client:
            assert list((await client.tokenize("hello")).token_ids)

        status = subprocess.run(
            [sys.executable, "-m", "services.cli", "status", "--etcd", f"127.0.0.1:{etcd_port}"],
            capture_output=True, text=True, timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "tokenizer" in status.stdout and "SERVING" in status.stdout

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        assert not port_open(etcd_port) and not port_open(tokenizer_port)
    finally:
        if up.poll() is None:
            up.kill()
