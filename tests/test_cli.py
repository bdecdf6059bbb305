"""`stagemesh up` as a user runs it: it starts, reports its endpoints, serves, and
Ctrl-C stops everything it started."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from services.net import free_port
from services.operator.launcher import StageProcess, Supervisor
from services.placement import allowed_cores, choose_layout, visible_gpus
from tests.support.polling import eventually, eventually_sync
from tests.support.up import banner as banner_of
from tests.support.up import start_up


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def probe(port: int) -> tuple[int, str]:
    """``stagemesh health``: its exit code and what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "health", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout.strip()


def stage_pid(role: str, port: int) -> int:
    """The pid of the ``role`` stage serving gRPC on ``port`` (its process group's leader)."""
    wanted = [f"{role}_svc", "--port", str(port)]
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if wanted[0] in argv and any(argv[i : i + 2] == wanted[1:] for i in range(len(argv))):
            return int(entry.name)
    raise AssertionError(f"no {role} stage on port {port}")


async def serves_again(client: openai.AsyncOpenAI, timeout: float) -> None:
    """Wait until a chat request through the mesh succeeds again."""

    async def serves() -> None:
        try:
            await client.chat.completions.create(
                model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, timeout=30
            )
        except openai.APIError as error:
            raise AssertionError(f"the mesh did not serve again: {error}") from None

    await eventually(serves, timeout, interval=1)


@pytest.mark.isolated
async def test_up_serves_and_ctrl_c_stops_everything(
    home: Path, model_dir: Path, tmp_path: Path
) -> None:
    # `stagemesh up` as the README starts it: the automatic layout for this host (on a
    # two-core CI machine, one engine that prefills and decodes on both cores).
    layout = choose_layout(allowed_cores(), len(visible_gpus()))
    roles = ["tokenizer", "router", *sorted({engine.role for engine in layout.engines})]
    if layout.kvstore:
        roles.append("kvstore")
    ports = {
        name: free_port()
        for name in ("etcd", "tokenizer", "prefill", "decode", "kvstore", "router", "http")
    }
    up = start_up(home, ports)
    try:
        lines = await asyncio.to_thread(banner_of, up)
        banner = "".join(lines)
        assert banner.startswith(f"layout {layout.name}: "), (
            banner
        )  # it says what it chose, and why
        for name in ("etcd", "http", *roles):
            assert f"127.0.0.1:{ports[name]}" in banner, name

        # The whole mesh answers through the router.
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key="unused"
        )
        reply = await client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=12,
        )
        assert "Paris" in (reply.choices[0].message.content or "")
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{ports['http']}/metrics")).text
        # A short prompt is not worth a NIXL handoff in any automatic layout.
        assert 'stagemesh_router_sequences_total{mode="aggregated"} 1.0' in metrics

        # etcd takes only the mesh's users: status as the banner says to run it, and without
        # a user it is refused.
        command = next(
            line.split() for line in lines if line.strip().startswith("stagemesh status")
        )
        assert "--etcd-user" in command, banner
        anonymous = subprocess.run(  # noqa: ASYNC221 - the test waits on nothing else meanwhile
            [
                sys.executable,
                "-m",
                "services.cli",
                "status",
                "--etcd",
                f"127.0.0.1:{ports['etcd']}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert anonymous.returncode == 1 and "--etcd-user" in anonymous.stderr, anonymous.stderr
        status = subprocess.run(  # noqa: ASYNC221 - the test waits on nothing else meanwhile
            [sys.executable, "-m", "services.cli", *command[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        rows = status.stdout.splitlines()
        for role in roles:
            assert any(line.startswith(role) and "SERVING" in line for line in rows), status.stdout
        assert any(line.startswith("decode") and "run 0 wait 0" in line for line in rows), (
            status.stdout
        )
        assert probe(ports["router"]) == (0, "SERVING")  # the containers' health check

        # Supervision: a stage killed outright comes back, and nobody has to act.
        for role in ("router", "decode"):
            os.killpg(stage_pid(role, ports[role]), signal.SIGKILL)
            await serves_again(client, timeout=300)
        assert up.poll() is None

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0
        output = "".join(lines) + up.stdout.read()  # type: ignore[union-attr]
        for role in ("router", "decode"):
            assert f"{role} exited with code -9; restarting it in 1s" in output, output
            assert f"restarting {role}\n" in output
        for name, port in ports.items():
            assert not port_open(port), f"{name} port {port} still open after Ctrl-C"
        assert probe(ports["router"]) == (1, "UNREACHABLE")

        # Once Ctrl-C returned, the same mesh starts again at once, on the same ports.
        up = start_up(home, ports)
        await asyncio.to_thread(banner_of, up)
        await serves_again(client, timeout=60)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0
    finally:
        if up.poll() is None:
            up.kill()


def test_status_without_etcd_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "status", "--etcd", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "etcd at 127.0.0.1:" in done.stderr, done.stderr
    assert "unreachable" in done.stderr and "Traceback" not in done.stderr


def test_layout_prints_the_same_placement_for_systemd_and_compose() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "layout", "--layout", "pd", "--cores", "16"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.startswith("layout pd: 16 cores"), done.stdout
    assert "stagemesh-router.service         CPUAffinity=0\n" in done.stdout
    assert "stagemesh-prefill@0.service      CPUAffinity=1-7\n" in done.stdout
    assert "stagemesh-decode@0.service       CPUAffinity=8-15\n" in done.stdout
    assert "STAGEMESH_DECODE_CPUS=8-15\n" in done.stdout


def test_a_core_outside_the_allowed_set_stops_an_engine_at_once(home: Path) -> None:
    # Checked before the engine stack loads: the answer comes in a second, not a minute.
    beyond = max(allowed_cores()) + 1
    done = subprocess.run(
        [sys.executable, "-m", "decode_svc", "--home", str(home), "--cpu-cores", f"0-{beyond}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert f"core(s) {beyond} are outside the cores this process may use" in done.stderr, (
        done.stderr
    )


def test_stages_do_not_outlive_a_killed_launcher() -> None:
    # A launcher that dies hard (SIGKILL, OOM) must not leave its children running.
    code = (
        "from services.operator.etcd_server import EmbeddedEtcd; e = EmbeddedEtcd(client_port=0); "
        "e.start(); "
        "print(e.process.pid, flush=True); import time; time.sleep(120)"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())  # type: ignore[union-attr]
    launcher.kill()
    launcher.wait()

    def gone() -> None:
        assert (
            not Path(f"/proc/{child}").exists()
            or Path(f"/proc/{child}/stat").read_text().split()[2] in "ZX"
        ), "etcd outlived its launcher"

    eventually_sync(gone, timeout=10, interval=0.1)


def test_supervisor_restarts_with_backoff_and_forgives_a_stable_run(tmp_path: Path) -> None:
    """Real child processes, a hand-driven clock: an exited stage starts again after 1 s,
    then 2 s, 4 s...; one that then runs for a minute starts the count over."""
    now = [0.0]
    lines: list[str] = []
    quitter = StageProcess("quitter", "this", [], "127.0.0.1:1", tmp_path)  # prints a poem, exits 0
    quitter.start()
    supervisor = Supervisor([quitter], lines.append, clock=lambda: now[0])

    def exited_then_checked(at: float) -> None:
        assert quitter.process is not None
        quitter.process.wait(timeout=30)
        now[0] = at
        supervisor.check()

    exited_then_checked(0.0)
    assert "quitter exited with code 0; restarting it in 1s" in lines[-1]
    now[0] = 0.9
    supervisor.check()
    assert not quitter.alive() and len(lines) == 1
    now[0] = 1.0
    supervisor.check()
    assert lines[-1] == "restarting quitter"
    exited_then_checked(1.0)
    assert "restarting it in 2s" in lines[-1]
    now[0] = 3.0
    supervisor.check()
    exited_then_checked(3.0)
    assert "restarting it in 4s" in lines[-1]

    # The same stage, now one that keeps running: a stable minute resets the backoff.
    quitter.module, quitter.args = "http.server", ["0", "--bind", "127.0.0.1"]
    now[0] = 7.0
    supervisor.check()
    assert quitter.alive()
    now[0] = 67.0
    supervisor.check()
    quitter.kill()
    supervisor.check()
    assert "restarting it in 1s" in lines[-1]
