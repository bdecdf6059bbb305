"""``stagemesh up``: etcd and every stage on this host, supervised, until Ctrl-C.

The steps: choose the layout (services.placement), plan a process per stage
(services/cli/plan.py), make this run's credentials (services/cli/up_secrets.py), check
every port, start etcd and the stages, wait until each is ready, print how to reach the
mesh, supervise until a signal, then stop everything in order.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli.common import add_layout_arguments, home_of, layout_of, wait_for_signal
from services.cli.plan import StagePlan, add_plan_arguments, describe_sim, plan_stages
from services.cli.up_ports import add_port_arguments, apply_port_offset, check_ports, port_claims
from services.cli.up_secrets import RunSecrets

if TYPE_CHECKING:
    from services.operator.etcd_server import EmbeddedEtcd
    from services.operator.launcher import ProcessGroup, StageProcess
    from services.placement import Layout
    from services.ports import PortClaim


def up_layout(args: argparse.Namespace, gpus: list[str]) -> Layout:
    """The layout for this host; every ``--model`` gets a decode engine of its own (and a
    layout without prefill engines stays without)."""
    from services.placement import allowed_cores

    layout = layout_of(args, allowed_cores(), len(gpus))
    models = args.model or [""]
    if layout.count("decode") < len(models) and args.decode is None:
        args.decode = len(models)
        if args.prefill is None:
            args.prefill = layout.count("prefill")
        layout = layout_of(args, allowed_cores(), len(gpus))
    return layout


def report(line: str) -> None:
    """A progress or supervision line, on stderr at once."""
    print(line, file=sys.stderr, flush=True)


def banner(
    args: argparse.Namespace,
    etcd: EmbeddedEtcd,
    stages: list[StageProcess],
    secrets: RunSecrets,
    run_dir: Path,
    took: float,
) -> str:
    """How to reach the mesh that just came up: its endpoints and three commands."""
    endpoints = "".join(f"  {stage.name + ' gRPC':<18}{stage.grpc_address}\n" for stage in stages)
    http = f"http://127.0.0.1:{args.http_port}"
    own = secrets.own
    grpc_tls = f"-cacert {own.ca} -authority stagemesh" if own else "-plaintext"
    question = '{"role": "user", "content": "What is the capital of France?"}'
    return (
        f"\nstagemesh is up in {took:.1f}s (logs in {run_dir})\n"
        f"  {'OpenAI HTTP':<18}{http}/v1\n"
        f"  {'etcd':<18}{etcd.endpoint}\n{endpoints}\n"
        "try it:\n"
        f"  curl {http}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "", "messages": [{question}]}}\'\n'
        f'  grpcurl {grpc_tls} -d \'{{"text": "Once upon a time"}}\' '
        f"127.0.0.1:{args.router_port} stagemesh.v1.RouterService/Generate\n"
        f"  stagemesh status --etcd {etcd.endpoint} {' '.join(secrets.stage_flags('client'))}"
        "\n\nCtrl-C stops everything."
    )


def run_mesh(
    args: argparse.Namespace,
    plans: list[StagePlan],
    etcd: EmbeddedEtcd,
    group: ProcessGroup,
    secrets: RunSecrets,
    bound: list[PortClaim],
) -> int:
    """Start etcd and the planned stages, wait for them, serve until a signal. ``bound``
    gets the ports this run holds once they are checked free (to see free again after)."""
    from services.operator.launcher import Supervisor
    from services.operator.mesh_start import StopRequest, supervise_etcd, wait_ready

    claims = port_claims(args, etcd.client_port, etcd.host, plans)
    stop = StopRequest()  # from here on a signal stops the children in order, never a traceback
    check_ports(claims, report)
    bound += claims
    etcd.start()
    run_dir = secrets.mesh_key_file.parent
    secrets.enable_etcd_users(etcd.endpoint, run_dir)
    shared = ["--etcd", etcd.endpoint, "--home", str(home_of(args)), "--metrics-port", "0"]
    shared += ["--host", args.host]
    stages = [
        group.add(plan.process([*shared, *secrets.stage_flags(plan.name)], run_dir))
        for plan in plans
    ]
    supervisor = Supervisor(stages, report)
    started = time.monotonic()
    names = ", ".join(plan.name for plan in plans)
    print(f"starting {names} (engines take a minute on CPU)...", flush=True)
    if not asyncio.run(wait_ready(stages, supervisor, etcd, args.start_timeout, stop, report)):
        return 130  # stopped while starting
    took = time.monotonic() - started
    print(banner(args, etcd, stages, secrets, run_dir, took), flush=True)

    def supervise() -> None:
        supervise_etcd(etcd, report)
        supervisor.check()

    wait_for_signal(every=supervise, stop=stop)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Run the mesh on this host until a signal; a start that fails says why in a line
    (and the logs of the stages it concerns), and stops what did start."""
    from services.exits import StartFailed
    from services.model import prepare_bundled_model
    from services.operator.etcd_server import EmbeddedEtcd
    from services.operator.launcher import ProcessGroup
    from services.operator.mesh_start import stop_mesh
    from services.placement import visible_gpus

    apply_port_offset(args)
    gpus = visible_gpus()
    layout = up_layout(args, gpus)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print(describe_sim(args) if args.engine == "sim" else layout.describe(), flush=True)
    if "" in (args.model or [""]):  # the bundled model
        prepare_bundled_model(home_of(args))
    run_dir = Path(tempfile.mkdtemp(prefix="stagemesh-up-"))  # mode 0700: the key files stay ours
    secrets = RunSecrets.create(run_dir, args.tls, args.host)
    etcd = EmbeddedEtcd(
        client_port=args.etcd_port,
        data_dir=run_dir / "etcd",
        cores=list(layout.light_cores),
        tls=secrets.certs.get("etcd"),
    )
    group = ProcessGroup()
    bound: list[PortClaim] = []  # the ports this run holds, to see free again on the way out
    try:
        return run_mesh(args, plan_stages(args, layout, gpus), etcd, group, secrets, bound)
    except StartFailed as exc:
        report(f"stagemesh up: {exc}")
        if exc.detail:
            report(exc.detail)
        return 1
    finally:
        if bound:
            print("stopping...", flush=True)
            stop_mesh(group, etcd, bound, report)
            print("stopped.", flush=True)
        else:  # nothing started: no logs to keep
            shutil.rmtree(run_dir, ignore_errors=True)


def add_key_arguments(up: argparse.ArgumentParser) -> None:
    """The router's API keys and who may reach it. Keys are best given in a file or the
    environment: a key on ``up``'s command line shows in ``ps`` (``up`` warns)."""
    up.add_argument(
        "--api-key",
        default=os.environ.get("STAGEMESH_API_KEY", ""),
        help="API keys the router's HTTP and gRPC APIs require, comma-separated; on a command "
        "line ps shows them: prefer --api-key-file or the environment "
        "[env STAGEMESH_API_KEY; default: none]",
    )
    up.add_argument(
        "--api-key-file",
        default=os.environ.get("STAGEMESH_API_KEY_FILE", ""),
        help="a file of API keys, one per line ('KEY admin' may also load adapters); only its "
        "path shows in ps [env STAGEMESH_API_KEY_FILE]",
    )
    up.add_argument(
        "--allow-open",
        action="store_true",
        help="with --host other than loopback and no key: serve the APIs open on purpose",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS between the stages and to etcd, with a development CA made for this "
        "run (in its log dir)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``up`` and its flags."""
    up = sub.add_parser("up", help="run etcd and every stage on this host")
    up.add_argument(
        "--model",
        action="append",
        default=[],
        help="NAME=PATH or PATH of a HF model directory (default: bundled); repeat it to serve "
        "several base models, the engines of each role taking them in turn (each model gets a "
        "decode engine)",
    )
    up.add_argument(
        "--lora",
        action="append",
        default=[],
        help="NAME=PATH of a LoRA adapter (PEFT directory) for the first model's engines, "
        "served as model NAME; repeat for more. More can be loaded at run time "
        "(POST /v1/load_lora_adapter)",
    )
    up.add_argument(
        "--enable-lora",
        action="store_true",
        help="LoRA on in the first model's engines without adapters at start, to load them at "
        "run time",
    )
    add_layout_arguments(up)
    add_plan_arguments(up)
    up.add_argument(
        "--host",
        default="127.0.0.1",
        help="address every stage binds (gRPC and HTTP); 0.0.0.0 serves other hosts too "
        "(see docs/deploy.md)",
    )
    add_key_arguments(up)
    add_port_arguments(up)
    up.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="seconds every stage has to become ready (engines load for a minute or more on "
        "CPU); past it `up` names the stages still starting and shows their logs",
    )
    up.set_defaults(func=cmd_up)
