"""The mesh against plain vLLM on the same host, in one run, driven by guidellm.

    python -m bench.vs_vllm [--duration 90] [--servers vllm,vllm-tuned,mesh]
                            [--json F] [--png F]          # or: make bench-vs-vllm

Starts each server in turn on this host, with the same model (float32), the same
context and the same total KV budget, and drives it with guidellm (installed in an
environment of its own: ``make bench-env``) on each scenario:

- ``multiturn``: guidellm's ``rhaiis/concurrent-1k-1k-multiturn`` scaled to a CPU host
  (200-token prompts, 32 output tokens, 3 turns, 4 shared 256-token prefixes, 4 streams);
- ``long``: ``rhaiis/concurrent-2ki-128-equal`` scaled down (1,024-token prompts,
  64 output tokens, 4 streams): prefill-heavy.

The servers:

- ``vllm``: ``vllm.entrypoints.openai.api_server`` as a user starts it, with vLLM's own
  CPU placement: the peer the mesh must beat;
- ``vllm-tuned``: the same server with the engine settings the mesh gives its one
  aggregated engine (its cores, the uniprocess executor): against it, an aggregated
  mesh shows what the mesh itself costs;
- ``mesh``: ``stagemesh up`` with its automatic layout;
- ``mesh-aggregated`` (one engine, ``--prefill 0 --decode 1``), ``mesh-dp`` (two
  engines that each prefill and decode, ``--prefill 0 --decode 2``) and ``mesh-pd``
  (``--layout pd``): when asked for, and only when their engines differ from the
  automatic layout's.

Prints one table per scenario (requests, output tok/s, TTFT p50/p95/p99, ITL p50/p95,
e2e p50)
with each server's ratio to ``vllm``, and where the time went: busy share of each core
and CPU seconds per process, sampled from /proc during each run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.report import add_output_arguments, print_table, write_json
from services.config import DEFAULT_HOME
from services.model import prepare_bundled_model
from services.net import free_port
from services.operator.launcher import StageProcess, cpu_seconds, process_stat
from services.placement import allowed_cores, choose_layout, format_cores, visible_gpus

MODEL_NAME = "SmolLM2-135M-Instruct"
#: Where ``make bench-env`` installs guidellm (its dependencies clash with vLLM's).
GUIDELLM = Path(".venv-guidellm/bin/guidellm")
SCENARIOS: dict[str, dict[str, Any]] = {
    "multiturn": {
        "data": {
            "prompt_tokens": 200,
            "output_tokens": 32,
            "turns": 3,
            "prefix_tokens": 256,
            "prefix_count": 4,
        },
        "streams": 4,
    },
    "long": {"data": {"prompt_tokens": 1024, "output_tokens": 64}, "streams": 4},
}
#: Mesh servers: ``stagemesh up``'s (--layout, --prefill, --decode); None leaves it to the layout.
MESH_LAYOUTS: dict[str, tuple[str, int | None, int | None]] = {
    "mesh": ("auto", None, None),
    "mesh-aggregated": ("aggregated", 0, 1),
    "mesh-dp": ("aggregated", 0, 2),
    "mesh-pd": ("pd", None, None),
}
SERVERS = ("vllm", "vllm-tuned", *MESH_LAYOUTS)
COLUMNS = [
    ("server", "server", ""),
    ("requests", "requests", "d"),
    ("output_tps", "out tok/s", ".1f"),
    ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
    ("ttft_p95_ms", "TTFT p95 ms", ".0f"),
    ("ttft_p99_ms", "TTFT p99 ms", ".0f"),
    ("itl_p50_ms", "ITL p50 ms", ".1f"),
    ("itl_p95_ms", "ITL p95 ms", ".1f"),
    ("e2e_p50_s", "e2e p50 s", ".2f"),
    ("tps_ratio", "tok/s vs vllm", ".2f"),
    ("ttft_ratio", "TTFT p50 vs vllm", ".2f"),
]


class Server:
    """One OpenAI-compatible server under test: start, its URL, its processes, stop."""

    name: str
    url: str
    pid: int

    async def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class PlainVllm(Server):
    """vLLM's own OpenAI server on this host; ``tuned`` gives it the mesh engine's settings."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        log_dir: Path,
        kv_gib: int,
        max_model_len: int,
        tuned: bool,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
        cores = allowed_cores()
        if tuned:  # what services/engine does for an engine that owns every core
            env.update(
                VLLM_CPU_OMP_THREADS_BIND=format_cores(cores), VLLM_ENABLE_V1_MULTIPROCESSING="0"
            )
        self._process = StageProcess(
            name,
            "vllm.entrypoints.openai.api_server",
            [
                "--model",
                str(model_dir),
                "--served-model-name",
                MODEL_NAME,
                "--dtype",
                "float32",
                "--max-model-len",
                str(max_model_len),
                "--port",
                str(port),
                "--enable-prefix-caching",
                *extra_args,
            ],
            "",
            log_dir,
            env=env,
            cores=cores if tuned else None,
        )

    async def start(self) -> None:
        self._process.start()
        self.pid = self._process.pid
        await wait_for_http(self.url, self._process.alive, self._process.log_tail)

    def stop(self) -> None:
        self._process.stop(60)


class Mesh(Server):
    """``stagemesh up`` on free ports, stopped with Ctrl-C as a user would."""

    def __init__(self, name: str, home: Path, log_dir: Path, flags: list[str]) -> None:
        self.name = name
        self._ports = {
            role: free_port()
            for role in ("etcd", "tokenizer", "prefill", "decode", "kvstore", "router", "http")
        }
        self.url = f"http://127.0.0.1:{self._ports['http']}"
        self.kvstore_address = f"127.0.0.1:{self._ports['kvstore']}"
        self._command = [
            sys.executable,
            "-m",
            "services.cli",
            "--home",
            str(home),
            "up",
            *flags,
            *(arg for role, port in self._ports.items() for arg in (f"--{role}-port", str(port))),
        ]
        self._log_path = log_dir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self._log_path, "wb") as log:
            return subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> None:
        self._process = self._spawn()
        self.pid = self._process.pid

        def tail() -> str:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-30:])

        await wait_for_http(
            self.url, lambda: self._process is not None and self._process.poll() is None, tail
        )
        print(tail().split("starting")[0].strip(), flush=True)  # the layout it chose

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(120)
        except subprocess.TimeoutExpired:
            self._process.kill()


async def wait_for_http(url: str, alive: Any, log_tail: Any, timeout: float = 900) -> None:
    """Until a chat completion succeeds (the first one also warms the engine up)."""
    deadline = time.monotonic() + timeout
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 8,
    }
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while True:
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up:\n{log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.post("/v1/chat/completions", json=body)).status_code == 200:
                    return
            await asyncio.sleep(2)


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it (the mesh's stages run in sessions of
    their own, so a process group would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = process_stat(int(entry.name))
        if stat is not None:
            children.setdefault(int(stat[1][1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def process_label(pid: int) -> str:
    """A readable name: a Python process's module (``-m decode_svc``), else its name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [word.decode(errors="replace") for word in argv]
    if "-m" in words and words.index("-m") + 1 < len(words):
        module = words[words.index("-m") + 1]
        return {
            "services.cli": "stagemesh up",
            "vllm.entrypoints.openai.api_server": "vllm api server",
        }.get(module, module)
    stat = process_stat(pid)
    return stat[0] if stat else "?"


def process_cpu(root: int) -> dict[str, float]:
    """CPU seconds used so far by each process under ``root``, summed by label."""
    usage: dict[str, float] = {}
    for pid in descendants(root):
        label = process_label(pid)
        usage[label] = usage.get(label, 0.0) + cpu_seconds([pid])
    return usage


def children_cpu() -> float:
    """CPU seconds of this process's finished children: guidellm, once each run ends
    (the servers are still running, so they do not count here)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def core_times() -> dict[str, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields]
            idle = values[3] + values[4]  # idle + iowait
            times[name] = (sum(values) - idle, sum(values))
    return times


@contextlib.contextmanager
def profiled(server: Server) -> Iterator[dict[str, Any]]:
    """Where the time went while the body ran: each core's busy share, and the CPU
    seconds of each of the server's processes (guidellm's own included, as 'client')."""
    profile: dict[str, Any] = {}
    cores_before, cpu_before = core_times(), process_cpu(server.pid)
    client_before = children_cpu()
    started = time.monotonic()
    yield profile
    elapsed = time.monotonic() - started
    cores_after, cpu_after = core_times(), process_cpu(server.pid)
    client_after = children_cpu()
    profile["core_busy"] = {
        core: (cores_after[core][0] - cores_before[core][0])
        / max(1, cores_after[core][1] - cores_before[core][1])
        for core in cores_after
    }
    profile["process_cpu_s"] = {
        label: round(seconds - cpu_before.get(label, 0.0), 2)
        for label, seconds in sorted(cpu_after.items(), key=lambda item: -item[1])
        if seconds - cpu_before.get(label, 0.0) > 0.05
    }
    profile["client_cpu_s"] = round(client_after - client_before, 2)
    profile["seconds"] = round(elapsed, 1)


def run_guidellm(
    server: Server, scenario: str, args: argparse.Namespace, model_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """One guidellm run; the raw report goes to ``out_dir``, the summary is returned."""
    spec = SCENARIOS[scenario]
    config = {
        "spec": {
            "backend": {
                "kind": "openai_http",
                "target": server.url,
                "request_format": "/v1/chat/completions",
                "model": MODEL_NAME,
            },
            "tokenizer": {"kind": "huggingface_auto", "model": str(model_dir)},
            "profile": {"kind": "concurrent"},
            "data": [{"kind": "synthetic_text", **spec["data"]}],
            "constraints": [{"kind": "max_duration", "seconds": args.duration}],
        },
        "benchmarks": [{"profile.streams": spec["streams"]}],
    }
    config_path = out_dir / f"{server.name}-{scenario}.scenario.json"
    report_path = out_dir / f"{server.name}-{scenario}.guidellm.json"
    config_path.write_text(json.dumps(config, indent=2))
    with open(out_dir / f"{server.name}-{scenario}.guidellm.log", "wb") as log:
        subprocess.run(
            [
                str(args.guidellm),
                "run",
                "-c",
                str(config_path),
                "--disable-console-interactive",
                "--output",
                f"kind=json,path={report_path}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=args.duration + 600,
        )
    metrics = json.loads(report_path.read_text())["benchmarks"][0]["metrics"]

    def stat(name: str, key: str) -> float:
        entry = metrics[name]["successful"]
        return float(entry["percentiles"][key] if key.startswith("p") else entry[key])

    return {
        "server": server.name,
        "requests": int(metrics["request_totals"]["successful"]),
        "errored": int(metrics["request_totals"]["errored"]),
        "output_tps": stat("output_tokens_per_second", "mean"),
        "ttft_p50_ms": stat("time_to_first_token_ms", "p50"),
        "ttft_p95_ms": stat("time_to_first_token_ms", "p95"),
        "ttft_p99_ms": stat("time_to_first_token_ms", "p99"),
        "itl_p50_ms": stat("inter_token_latency_ms", "p50"),
        "itl_p95_ms": stat("inter_token_latency_ms", "p95"),
        "e2e_p50_s": stat("request_latency", "p50"),
    }


def build_servers(
    args: argparse.Namespace, home: Path, model_dir: Path, log_dir: Path
) -> list[Server]:
    """The servers asked for; a mesh layout with the same engines as the automatic one
    runs once, as ``mesh``."""
    cores, gpus = allowed_cores(), len(visible_gpus())
    auto = choose_layout(cores, gpus)
    servers: list[Server] = []
    for name in args.servers:
        if name in ("vllm", "vllm-tuned"):
            servers.append(
                PlainVllm(
                    name,
                    model_dir,
                    log_dir,
                    len(auto.engines),
                    args.max_model_len,
                    name == "vllm-tuned",
                )
            )
            continue
        layout, prefill, decode = MESH_LAYOUTS[name]
        same = choose_layout(cores, gpus, layout, prefill, decode).engines == auto.engines
        if name != "mesh" and "mesh" in args.servers and same:
            print(
                f"{name}: the same engines as the automatic layout on this host; measured once, "
                "as 'mesh'"
            )
            continue
        flags = ["--layout", layout]
        flags += ["--prefill", str(prefill)] if prefill is not None else []
        flags += ["--decode", str(decode)] if decode is not None else []
        servers.append(Mesh(name, home, log_dir, flags))
    return servers


async def run(args: argparse.Namespace) -> None:
    """Start each server in turn and drive it with guidellm on every scenario."""
    if not args.guidellm.exists():
        raise SystemExit(f"guidellm not found at {args.guidellm}; install it with `make bench-env`")
    home = Path(args.home)
    model_dir = prepare_bundled_model(home)
    out_dir = Path(tempfile.mkdtemp(prefix="stagemesh-vs-vllm-"))
    print(f"logs and raw guidellm reports in {out_dir}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.scenarios}
    profiles: dict[str, dict[str, Any]] = {}
    for server in build_servers(args, home, model_dir, out_dir):
        print(f"\n== {server.name}: starting", flush=True)
        started = time.monotonic()
        await server.start()
        print(f"== {server.name}: up in {time.monotonic() - started:.0f} s", flush=True)
        try:
            for scenario in args.scenarios:
                with profiled(server) as profile:
                    row = await asyncio.to_thread(
                        run_guidellm, server, scenario, args, model_dir, out_dir
                    )
                results[scenario].append(row)
                profiles[f"{server.name}/{scenario}"] = profile
                print(
                    f"   {scenario}: {row['requests']} requests, {row['output_tps']:.1f} tok/s, "
                    f"TTFT p50 {row['ttft_p50_ms']:.0f} ms; cores busy "
                    + ", ".join(
                        f"{core} {share:.0%}" for core, share in profile["core_busy"].items()
                    ),
                    flush=True,
                )
        finally:
            server.stop()
    for scenario, rows in results.items():
        base = next((row for row in rows if row["server"] == "vllm"), None)
        for row in rows:
            row["tps_ratio"] = (
                row["output_tps"] / base["output_tps"] if base and base["output_tps"] else None
            )
            row["ttft_ratio"] = (
                row["ttft_p50_ms"] / base["ttft_p50_ms"] if base and base["ttft_p50_ms"] else None
            )
        spec = SCENARIOS[scenario]
        print(
            f"\n{scenario}: {spec['data']}, {spec['streams']} streams, {args.duration} s per server"
        )
        print_table(rows, COLUMNS)
    print(
        "\nwhere the time went (CPU seconds per process during each run; the client is guidellm):"
    )
    for key, profile in profiles.items():
        processes = ", ".join(
            f"{label} {seconds:.1f}" for label, seconds in profile["process_cpu_s"].items()
        )
        print(f"  {key}: {processes}; client {profile['client_cpu_s']:.1f}")
    host = {
        "cores": len(allowed_cores()),
        "gpus": len(visible_gpus()),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
        "layout": choose_layout(allowed_cores(), len(visible_gpus())).describe(),
    }
    payload = {
        "host": host,
        "duration_s": args.duration,
        "scenarios": SCENARIOS,
        "results": results,
        "profiles": profiles,
    }
    if args.json:
        write_json(Path(args.json), payload)
    if args.png:
        plot(Path(args.png), results, host)


def cpu_model() -> str:
    """The CPU's model name, for the results' host block."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def plot(path: Path, results: dict[str, list[dict[str, Any]]], host: dict[str, Any]) -> None:
    """Output tok/s and TTFT p50 per server, one pair of panels per scenario."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; skipping {path} (pip install -e '.[bench]')")
        return
    figure, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
    for column, (scenario, rows) in enumerate(results.items()):
        names = [row["server"] for row in rows]
        for line, (key, label) in enumerate(
            (("output_tps", "output tok/s"), ("ttft_p50_ms", "TTFT p50 (ms)"))
        ):
            ax = axes[line][column]
            ax.bar(
                names,
                [row[key] for row in rows],
                color=["#888" if n.startswith("vllm") else "#2a7" for n in names],
            )
            ax.set_title(f"{scenario}: {label}")
            ax.tick_params(axis="x", rotation=20)
    figure.suptitle(
        f"stagemesh vs plain vLLM, {host['cores']} cores ({host['cpu']}), {host['date']}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--servers",
        type=lambda s: [n for n in s.split(",") if n],
        default=["vllm", "vllm-tuned", "mesh"],
        help=f"comma-separated, from {', '.join(SERVERS)}",
    )
    parser.add_argument(
        "--scenarios",
        type=lambda s: [n for n in s.split(",") if n],
        default=list(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--duration", type=int, default=90, help="seconds guidellm drives each server per scenario"
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--guidellm", type=Path, default=GUIDELLM, help="the guidellm command")
    add_output_arguments(parser, DEFAULT_HOME)
    args = parser.parse_args()
    for name in args.servers:
        if name not in SERVERS:
            parser.error(f"unknown server {name!r}")
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
