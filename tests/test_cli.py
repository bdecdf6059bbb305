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

from services.clients import EngineClient, TokenizerClient
from services.etcd import free_port
from services.pb import common_pb2
from tests.conftest import disaggregated

def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_up_serves_and_ctrl_c_stops_everything(home: Path, model_dir: Path, tmp_path: Path) -> None:
    etcd_port, tokenizer_port, prefill_port, decode_port = (free_port() for _ in range(4))
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--home", str(home), "up",
         "--etcd-port", str(etcd_port), "--tokenizer-port", str(tokenizer_port),
         "--prefill-port", str(prefill_port), "--decode-port", str(decode_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 600
        while not any("Ctrl-C stops everything" in line for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(await asyncio.to_thread(up.stdout.readline))  # type: ignore[union-attr]
        banner = "".join(lines)
        for port in (etcd_port, tokenizer_port, prefill_port, decode_port):
            assert f"127.0.0.1:{port}" in banner

        # The stages work together: tokenize, prefill, decode with the handle, detokenize.
        async with TokenizerClient(f"127.0.0.1:{tokenizer_port}") as tokenizer, \
                EngineClient(f"127.0.0.1:{prefill_port}") as prefill, \
                EngineClient(f"127.0.0.1:{decode_port}") as decode:
            ids = list((await tokenizer.tokenize_chat([{"role": "user", "content": "What is the capital of France?"}])).token_ids)
            greedy = common_pb2.SamplingParams(temperature=0, max_tokens=12)
            out, _ = await disaggregated(prefill, decode, ids, greedy)
            assert "Paris" in await tokenizer.decode(out)

        status = subprocess.run(
            [sys.executable, "-m", "services.cli", "status", "--etcd", f"127.0.0.1:{etcd_port}"],
            capture_output=True, text=True, timeout=60,
        )
        assert status.returncode == 0, status.stderr
        for role in ("tokenizer", "prefill", "decode"):
            assert any(line.startswith(role) and "SERVING" in line for line in status.stdout.splitlines())

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0
        for port in (etcd_port, tokenizer_port, prefill_port, decode_port):
            assert not port_open(port), f"port {port} still open after Ctrl-C"
    finally:
        if up.poll() is None:
            up.kill()


def test_stages_do_not_outlive_a_killed_launcher() -> None:
    # A launcher that dies hard (SIGKILL, OOM) must not leave its children running.
    code = (
        "from services.etcd import EmbeddedEtcd; e = EmbeddedEtcd(client_port=0); e.start(); "
        "print(e.process.pid, flush=True); import time; time.sleep(120)"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())  # type: ignore[union-attr]
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] not in "ZX":
        assert time.monotonic() < deadline, "etcd outlived its launcher"
        time.sleep(0.1)
