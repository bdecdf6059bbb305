"""`stagemesh up` on a host that is not empty: a port something else holds ends it at
once with one line naming the port and the setting that moves it, a stage that cannot
start ends it with that stage's own reason, and nothing it started is left running.

Every check here happens before an engine loads, so these tests take seconds.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services import ports
from services.exits import EXIT_CONFIG, FINAL_EXIT_CODES, StartFailed
from services.net import free_port
from services.operator.launcher import StageProcess, Supervisor
from tests.support.up import banner, start_up, up_command

#: `stagemesh up`'s port settings, by the name in their flag (``--etcd-port``).
PORT_NAMES = ("etcd", "http", "router", "tokenizer", "prefill", "decode", "kvstore")

#: Another program (not a stagemesh one) listening on the port in argv[1].
LISTEN = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "print('listening', flush=True); time.sleep(300)\n"
)


def mesh_ports() -> dict[str, int]:
    return {name: free_port() for name in PORT_NAMES}


def up(
    home: Path, mesh: dict[str, int], *extra: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `stagemesh up` to its end: what it printed, and how long it took."""
    started = time.monotonic()
    done = subprocess.run(
        up_command(home, mesh, *extra), capture_output=True, text=True, timeout=120, check=False
    )
    return done, time.monotonic() - started


@contextlib.contextmanager
def listener(port: int) -> Iterator[int]:
    """A process listening on ``port`` for the duration; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LISTEN, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "listening"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def started_for(etcd_port: int) -> list[str]:
    """Live processes of the mesh whose etcd is on ``etcd_port``: the etcd itself and
    every stage (each is told the endpoint), vLLM engine cores inherit the stage's
    command line."""
    endpoint = f"127.0.0.1:{etcd_port}"
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if endpoint in argv and state not in ("Z", "X"):
            found.append(f"{entry.name}: {argv}")
    return found


@pytest.mark.parametrize("name", ["etcd", "http", "router"])
def test_a_taken_port_ends_up_at_once_naming_the_port_and_its_setting(
    home: Path, model_dir: Path, name: str
) -> None:
    mesh = mesh_ports()
    with listener(mesh[name]) as holder:
        done, took = up(home, mesh)
    assert done.returncode == 1, done.stderr
    assert took < 30
    # One line: the port, what it is for, the setting that moves it, who holds it.
    lines = [line for line in done.stderr.splitlines() if line.startswith("stagemesh up:")]
    assert len(lines) == 1, done.stderr
    assert f"port {mesh[name]} (" in lines[0] and f"--{name}-port" in lines[0], lines[0]
    assert f"in use by pid {holder} (" in lines[0], lines[0]
    assert "--port-offset" in lines[0]
    assert "Traceback" not in done.stderr
    assert not started_for(mesh["etcd"])


def test_port_offset_moves_every_port(home: Path, model_dir: Path) -> None:
    # The offset applies to each port: the one it moves the HTTP port onto is checked.
    mesh = mesh_ports()
    offset = 7
    with listener(mesh["http"] + offset):
        done, _ = up(home, mesh, "--port-offset", str(offset))
    assert done.returncode == 1
    assert (
        f"stagemesh up: port {mesh['http'] + offset} (router HTTP, --http-port) is in use"
        in done.stderr
    ), done.stderr
    assert not started_for(mesh["etcd"] + offset)


def test_a_bad_model_path_ends_up_with_the_stage_s_own_reason(
    home: Path, model_dir: Path, tmp_path: Path
) -> None:
    # The stages start, and the first to read the model path ends `up` with its reason.
    mesh = mesh_ports()
    missing = tmp_path / "no-such-model"
    done, took = up(home, mesh, "--model", str(missing))
    assert done.returncode == 1, done.stderr
    assert took < 60
    reason = f"--model {missing}: {missing} is not a Hugging Face model directory (no config.json)"
    lines = [line for line in done.stderr.splitlines() if line.startswith("stagemesh up:")]
    assert len(lines) == 1 and "cannot start: stagemesh " in lines[0] and reason in lines[0], (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert not started_for(mesh["etcd"])


def test_a_stage_not_ready_by_the_start_timeout_is_named_with_its_log(
    home: Path, model_dir: Path
) -> None:
    # The engine is still loading when the deadline passes: `up` names it, shows its
    # log, and stops it mid-load (its whole process group).
    mesh = mesh_ports()
    done, took = up(home, mesh, "--start-timeout", "8")
    assert done.returncode == 1, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("stagemesh up:")]
    assert "decode" in line.split(" not ready after 8s (--start-timeout)")[0], line
    assert "--- decode ---" in done.stderr
    assert re.search(r"\[\s*\d+s\] ready: -; starting: tokenizer, router, ", done.stdout), (
        done.stdout
    )  # progress
    assert "Traceback" not in done.stderr
    assert took < 60
    assert not started_for(mesh["etcd"])


def test_an_engine_that_refuses_its_model_ends_up_with_vllm_s_reason(
    home: Path, model_dir: Path, tmp_path: Path
) -> None:
    # A model directory vLLM cannot serve (an architecture it does not know), whose
    # tokenizer is fine: the tokenizer and router start, and the engine's own reason,
    # from vLLM's check of the model, ends `up`. No EngineCore is left behind.
    model = tmp_path / "unknown-architecture"
    model.mkdir()
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (model / item.name).symlink_to(item)
    config = json.loads((model_dir / "config.json").read_text())
    (model / "config.json").write_text(
        json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]})
    )
    mesh = mesh_ports()
    done, _ = up(home, mesh, "--model", str(model))
    assert done.returncode == 1, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("stagemesh up:")]
    assert line.startswith(
        "stagemesh up: decode cannot start: stagemesh decode: the engine cannot start"
    ), line
    assert "NoSuchModelForCausalLM" in line and len(line) < 600, line
    assert "Traceback" not in done.stderr
    assert not started_for(mesh["etcd"])


def test_up_started_while_the_last_one_stops_waits_for_its_ports_and_serves(
    home: Path, model_dir: Path
) -> None:
    # Simulated engines: the mesh's ports and processes are the real ones, in seconds.
    mesh = mesh_ports()
    first = start_up(home, mesh, "--engine", "sim")
    second: subprocess.Popen[str] | None = None
    try:
        banner(first, timeout=120)
        first.send_signal(signal.SIGINT)
        second = start_up(home, mesh, "--engine", "sim")  # at once, while the first drains
        assert first.wait(timeout=60) == 0
        banner(second, timeout=120)
        reply = httpx.post(
            f"http://127.0.0.1:{mesh['http']}/v1/completions",
            json={"model": "", "prompt": "Once upon a time", "max_tokens": 4},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=60) == 0
        assert all(ports.bind_error("127.0.0.1", port) is None for port in mesh.values())
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()


def test_a_stage_alone_on_a_taken_port_is_one_line() -> None:
    port, http_port = free_port(), free_port()
    for flag, taken in (("--port", port), ("--http-port", http_port)):
        with listener(taken) as holder:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "services.cli",
                    "router",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--http-port",
                    str(http_port),
                    "--etcd",
                    f"127.0.0.1:{free_port()}",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        assert done.returncode == EXIT_CONFIG
        assert done.stderr.startswith(
            f"stagemesh router: port {taken} ({flag}) is in use by pid {holder} ("
        ), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


def test_a_stage_that_cannot_start_is_not_restarted(tmp_path: Path) -> None:
    # Real stage process, real exit code: a restart cannot free a taken port.
    port = free_port()
    with listener(port):
        router = StageProcess(
            "router",
            "router_svc",
            ["--host", "127.0.0.1", "--port", str(port), "--http-port", "-1"],
            f"127.0.0.1:{port}",
            tmp_path,
        )
        router.start()
        assert router.process is not None and router.process.wait(timeout=60) == EXIT_CONFIG
    supervisor = Supervisor([router], lambda line: None)
    with pytest.raises(StartFailed) as failed:
        supervisor.check(give_up_on=FINAL_EXIT_CODES)
    assert f"router cannot start: stagemesh router: port {port} (--port) is in use" in str(
        failed.value
    )
    assert not router.alive()


def test_ports_in_time_wait_are_free_and_listeners_are_named() -> None:
    # A server that closed its side of a connection leaves it in TIME_WAIT: that port
    # binds again at once (SO_REUSEADDR, as the stages bind), so it is not "taken".
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    server.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # without SO_REUSEADDR, TIME_WAIT still blocks it
    assert ports.taken([ports.PortClaim(port, "--port")]) == []

    port = free_port()
    claim = ports.PortClaim(port, "--port")
    with listener(port) as holder:
        [found] = ports.taken([claim])
        assert found.holder is not None and found.holder.pid == holder
        assert not found.holder.stagemesh
        assert ports.listens(holder, port) is True
        assert ports.listens(holder, free_port()) is False
