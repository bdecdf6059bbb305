"""The ``stagemesh`` command: run the embedded mesh, prepare models, run single stages.

    stagemesh up                 etcd + every stage on this host, with the bundled model
    stagemesh model prepare      turn the bundled GGUF into a float32 HF model directory
    stagemesh status             members registered in etcd, with their health
    stagemesh etcd               the embedded etcd server alone (foreground)
    stagemesh tokenizer [...]    one tokenizer stage (flags: stagemesh tokenizer --help)
    stagemesh prefill [...]      one prefill engine stage
    stagemesh decode [...]       one decode engine stage
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from services.config import DEFAULT_HOME, ENV_PREFIX, StageConfig, build_config, parse_endpoints

if TYPE_CHECKING:
    from services.launcher import StageProcess

#: Stage subcommands and the module each runs; the stage parses its own flags.
STAGE_MODULES = {"tokenizer": "tokenizer_svc", "prefill": "prefill_svc", "decode": "decode_svc"}


def _home(args: argparse.Namespace) -> Path:
    return Path(build_config(StageConfig, {"home": args.home}).home)


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from services.model import prepare_bundled_model

    path = prepare_bundled_model(_home(args), force=args.force)
    print(path)
    return 0


def cmd_etcd(args: argparse.Namespace) -> int:
    from services.etcd import EmbeddedEtcd

    etcd = EmbeddedEtcd(
        client_port=args.port, data_dir=Path(args.data_dir) if args.data_dir else None, host=args.host
    )
    etcd.start()
    print(f"etcd on {etcd.endpoint} (data in {etcd.data_dir}); Ctrl-C stops it", flush=True)
    try:
        _wait_for_signal()
    finally:
        etcd.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from services.clients import health_status
    from services.etcd import EtcdSession
    from services.membership import MEMBERS_PREFIX, role_name
    from services.pb import common_pb2

    async def collect() -> list[tuple[str, str, str, str, str]]:
        session = EtcdSession(parse_endpoints(args.etcd))
        try:
            client = await session.client()
            listing = await client.get_prefix(MEMBERS_PREFIX.encode())
        finally:
            await session.close()
        members = [common_pb2.Member.FromString(kv.value) for kv in listing]
        health = await asyncio.gather(*(health_status(m.grpc_address) for m in members))
        return [
            (role_name(m.role), m.instance_id, m.grpc_address, status, ",".join(m.models))
            for m, status in zip(members, health)
        ]

    rows = asyncio.run(collect())
    header = ("ROLE", "INSTANCE", "ADDRESS", "HEALTH", "MODELS")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.etcd import EmbeddedEtcd
    from services.launcher import ProcessGroup, StageProcess
    from services.model import prepare_bundled_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    home = _home(args)
    if not args.model:
        prepare_bundled_model(home)
    run_dir = Path(tempfile.mkdtemp(prefix="stagemesh-up-"))
    etcd = EmbeddedEtcd(client_port=args.etcd_port, data_dir=run_dir / "etcd")
    etcd.start()
    group = ProcessGroup()
    common = ["--etcd", etcd.endpoint, "--home", str(home)]
    model = ["--model", args.model] if args.model else []
    prefill_cores, decode_cores = split_cores(sorted(os.sched_getaffinity(0)))
    # (name, module, gRPC port, extra flags): every stage of the mesh, engines pinned
    # to their own cores so they do not fight over them.
    plan = [
        ("tokenizer", "tokenizer_svc", args.tokenizer_port, []),
        ("prefill", "prefill_svc", args.prefill_port, ["--cpu-cores", prefill_cores]),
        ("decode", "decode_svc", args.decode_port, ["--cpu-cores", decode_cores]),
    ]
    try:
        stages = [
            group.add(
                StageProcess(
                    name, module,
                    [*common, *model, "--port", str(port), "--metrics-port", "0", *extra],
                    f"127.0.0.1:{port}", run_dir,
                )
            )
            for name, module, port, extra in plan
        ]
        started = time.monotonic()
        print(f"starting {', '.join(name for name, *_ in plan)} (engines take a minute on CPU)...", flush=True)
        asyncio.run(_wait_all_healthy(stages, timeout=args.start_timeout))
        endpoints = "".join(f"  {stage.name + ' gRPC':<18}{stage.grpc_address}\n" for stage in stages)
        tokenizer_address = stages[0].grpc_address
        print(
            f"\nstagemesh is up in {time.monotonic() - started:.1f}s (logs in {run_dir})\n"
            f"  {'etcd':<18}{etcd.endpoint}\n{endpoints}\n"
            "try it:\n"
            f"  grpcurl -plaintext -d '{{\"text\": \"Hello, mesh!\"}}' {tokenizer_address} "
            "stagemesh.v1.TokenizerService/Tokenize\n"
            f"  stagemesh status --etcd {etcd.endpoint}\n\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        return 0 if _wait_for_signal(watch=stages) else 1
    finally:
        print("stopping...", flush=True)
        group.stop_all()
        etcd.stop(wipe=True)
        print("stopped.", flush=True)


def split_cores(cores: list[int]) -> tuple[str, str]:
    """Split this process's CPU cores between the prefill and decode engines.

    With one core both share it; otherwise prefill takes the first half and decode
    the rest. Returned in vLLM's VLLM_CPU_OMP_THREADS_BIND form ("0-3" or "0,2,5").
    """
    half = max(len(cores) // 2, 1)
    first, second = cores[:half], cores[half:] or cores[:half]
    return _core_list(first), _core_list(second)


def _core_list(cores: list[int]) -> str:
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return ",".join(map(str, cores))


async def _wait_all_healthy(stages: list[StageProcess], timeout: float) -> None:
    await asyncio.gather(*(stage.wait_healthy(timeout) for stage in stages))


def _wait_for_signal(watch: list[StageProcess] | None = None) -> bool:
    """Block until SIGINT/SIGTERM (True) or until a watched stage exits on its own (False)."""
    stop = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop:
        for stage in watch or []:
            if not stage.alive():
                print(f"{stage.name} exited unexpectedly:\n{stage.log_tail()}", file=sys.stderr)
                return False
        time.sleep(0.5)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagemesh", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--home", default=None, help=f"state directory [env {ENV_PREFIX}HOME; default {DEFAULT_HOME}]"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run etcd and every stage on this host")
    up.add_argument("--model", default="", help="NAME=PATH or PATH of a HF model directory (default: bundled)")
    up.add_argument("--etcd-port", type=int, default=2379)
    up.add_argument("--tokenizer-port", type=int, default=50052)
    up.add_argument("--prefill-port", type=int, default=50053)
    up.add_argument("--decode-port", type=int, default=50054)
    up.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for all stages")
    up.set_defaults(func=cmd_up)

    model = sub.add_parser("model", help="manage models").add_subparsers(dest="action", required=True)
    prepare = model.add_parser("prepare", help="prepare the bundled model (float32 HF directory)")
    prepare.add_argument("--force", action="store_true", help="prepare again even if present")
    prepare.set_defaults(func=cmd_model_prepare)

    status = sub.add_parser("status", help="members registered in etcd, with health")
    status.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints")
    status.set_defaults(func=cmd_status)

    etcd = sub.add_parser("etcd", help="run the embedded etcd server in the foreground")
    etcd.add_argument("--port", type=int, default=2379)
    etcd.add_argument("--host", default="127.0.0.1")
    etcd.add_argument("--data-dir", default="", help="keep data here (default: a temporary dir)")
    etcd.set_defaults(func=cmd_etcd)

    for name in STAGE_MODULES:
        sub.add_parser(name, help=f"run one {name} stage (see: stagemesh {name} --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in STAGE_MODULES:
        import runpy

        sys.argv = [f"stagemesh {argv[0]}", *argv[1:]]
        runpy.run_module(STAGE_MODULES[argv[0]], run_name="__main__")
        return 0
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
