"""The ``stagemesh`` command: run the embedded mesh, prepare models, run single stages.

stagemesh up                 etcd + every stage on this host, with the bundled model
stagemesh model prepare      turn the bundled GGUF into a float32 HF model directory
stagemesh status             members registered in etcd, with their health and load
stagemesh health ADDRESS     exit 0 if the stage at ADDRESS is SERVING (container probes)
stagemesh certs --out DIR    a development CA and a TLS certificate per stage
stagemesh etcd               the embedded etcd server alone (foreground)
stagemesh tokenizer [...]    one tokenizer stage (flags: stagemesh tokenizer --help)
stagemesh prefill [...]      one prefill engine stage
stagemesh decode [...]       one decode engine stage
stagemesh router [...]       one router stage (gRPC API and OpenAI HTTP bridge)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from services import credentials
from services.certs import STAGES
from services.config import DEFAULT_HOME, ENV_PREFIX, StageConfig, build_config, parse_endpoints
from services.credentials import MESH_KEY_ENV, MeshCredentials
from services.placement import LAYOUTS

if TYPE_CHECKING:
    from services.certs import CertFiles
    from services.etcd_server import EmbeddedEtcd
    from services.mesh_start import StopRequest
    from services.placement import Layout
    from services.ports import PortClaim

#: Stage subcommands and the module each runs; the stage parses its own flags.
STAGE_MODULES = {
    "tokenizer": "tokenizer_svc",
    "prefill": "prefill_svc",
    "decode": "decode_svc",
    "kvstore": "kvstore_svc",
    "router": "router_svc",
}


def _home(args: argparse.Namespace) -> Path:
    return Path(build_config(StageConfig, {"home": args.home}).home)


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from services.model import prepare_bundled_model

    path = prepare_bundled_model(_home(args), force=args.force)
    print(path)
    return 0


def cmd_etcd(args: argparse.Namespace) -> int:
    from services.etcd_server import EmbeddedEtcd
    from services.exits import StartFailed
    from services.ports import PortClaim, taken

    etcd = EmbeddedEtcd(
        client_port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        host=args.host,
    )
    try:
        for port in taken([PortClaim(etcd.client_port, "--port", "etcd", etcd.host)]):
            raise StartFailed(f"{port.reason()}; stop it, or choose another port with --port")
        etcd.start()
    except StartFailed as exc:
        print(f"stagemesh etcd: {exc}", file=sys.stderr)
        etcd.stop()
        return 1
    print(f"etcd on {etcd.endpoint} (data in {etcd.data_dir}); Ctrl-C stops it", flush=True)
    try:
        _wait_for_signal()
    finally:
        etcd.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import aetcd.exceptions

    from services.clients import EngineClient, KvStoreClient, health_status
    from services.etcd import EtcdSession
    from services.membership import MEMBERS_PREFIX, RecordReader, role_name
    from services.pb import common_pb2

    _install_credentials(args)

    async def load_of(member: common_pb2.Member) -> str:
        try:
            if member.role == common_pb2.ROLE_KVSTORE:
                async with KvStoreClient(member.grpc_address, timeout=2.0) as store:
                    stats = await store.stats()
                looked_up = stats.hit_blocks + stats.miss_blocks
                return (
                    f"blocks {stats.used_blocks}/{stats.capacity_blocks} "
                    f"hit {stats.hit_blocks / looked_up if looked_up else 0:.0%} evicted {stats.evictions}"
                )
            if member.role not in (common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE):
                return ""
            async with EngineClient(member.grpc_address, role=role_name(member.role)) as client:
                load = await client.load(timeout=2.0)
        except Exception:  # noqa: BLE001 - shown as unknown, the health column says why
            return "?"
        return (
            f"run {load.running_requests} wait {load.waiting_requests} "
            f"kv {load.kv_cache_usage:.0%} hit {load.prefix_cache_hit_rate:.0%}"
        )

    async def collect() -> list[tuple[str, ...]]:
        session = EtcdSession(parse_endpoints(args.etcd))
        try:
            client = await session.client()
            listing = await client.get_prefix(MEMBERS_PREFIX.encode())
        finally:
            await session.close()
        # Only records a holder of the mesh key wrote: status calls each member with the token.
        reader = RecordReader(common_pb2.Member.FromString)
        members = sorted(reader.read_all(listing).values(), key=lambda m: (m.role, m.grpc_address))
        if reader.refused:
            print(
                f"stagemesh status: ignored {len(reader.refused)} member record(s) not sealed with this "
                f"mesh's key ({', '.join(sorted(set(reader.refused.values())))}); a mesh with a key needs "
                "--mesh-key-file or STAGEMESH_MESH_KEY",
                file=sys.stderr,
            )
        health = await asyncio.gather(*(health_status(m.grpc_address) for m in members))
        loads = await asyncio.gather(*(load_of(m) for m in members))
        return [
            (
                role_name(m.role),
                m.instance_id,
                m.grpc_address,
                status,
                ",".join([*m.models, *(f"+{a.name}" for a in m.adapters)]),
                load,
            )
            for m, status, load in zip(members, health, loads)
        ]

    try:
        rows = asyncio.run(collect())
    except (aetcd.exceptions.ClientError, TimeoutError) as exc:
        print(
            f"stagemesh status: etcd at {args.etcd} is unreachable or refused ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no answer'}); an etcd with TLS needs "
            "--tls-cert, --tls-key and --tls-ca, one with users (stagemesh up) --etcd-user and "
            "--etcd-password-file",
            file=sys.stderr,
        )
        return 1
    header = ("ROLE", "INSTANCE", "ADDRESS", "HEALTH", "MODELS", "LOAD")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from services.certs import make_certs

    made = make_certs(Path(args.out), hosts=args.host, stages=args.stage or STAGES, days=args.days)
    for stage, files in made.items():
        print(f"{stage:<10} {' '.join(files.flags())}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """One grpc.health.v1 check: a probe for container runtimes that ship no grpc_health_probe."""
    from services.clients import health_status

    _install_credentials(args)
    status = asyncio.run(health_status(args.address, args.service, timeout=args.timeout))
    print(status)
    return 0 if status == "SERVING" else 1


def _layout(args: argparse.Namespace, cores: list[int], gpus: int) -> Layout:
    """The layout ``--layout`` / ``--prefill`` / ``--decode`` ask for on this host shape;
    one the host cannot hold ends the command with the reason."""
    from services.placement import PlacementError, choose_layout

    try:
        return choose_layout(cores, gpus, args.layout, args.prefill, args.decode)
    except PlacementError as exc:
        raise SystemExit(f"stagemesh {args.command}: {exc}") from None


def cmd_layout(args: argparse.Namespace) -> int:
    """Print the layout, then the same placement for systemd drop-ins and compose's .env."""
    from services.placement import allowed_cores, format_cores, visible_gpus

    cores = list(range(args.cores)) if args.cores else allowed_cores()
    layout = _layout(args, cores, args.gpus if args.gpus is not None else len(visible_gpus()))
    print(layout.describe())
    light = format_cores(layout.light_cores)
    print(
        "\nsystemd: one drop-in per unit, /etc/systemd/system/<unit>.d/cores.conf ([Service] then this line)"
    )
    for unit in ("stagemesh-etcd", "stagemesh-tokenizer", "stagemesh-router", "stagemesh-kvstore"):
        if unit != "stagemesh-kvstore" or layout.kvstore:
            print(f"  {unit + '.service':<32} CPUAffinity={light}")
    for i, engine in layout.numbered():
        unit = f"stagemesh-{engine.role}@{i}.service"
        gpu = (
            f"   (and CUDA_VISIBLE_DEVICES={engine.gpu} in its env file)"
            if engine.gpu is not None
            else ""
        )
        print(f"  {unit:<32} CPUAffinity={format_cores(engine.cores)}{gpu}")
    print("\ncompose: in .env beside compose.yaml (replicas of a service share its cores)")
    for role in ("prefill", "decode"):
        first = next((engine for engine in layout.engines if engine.role == role), None)
        if first is not None:
            print(f"  STAGEMESH_{role.upper()}_CPUS={format_cores(first.cores)}")
    print(f"  STAGEMESH_LIGHT_CPUS={light}")
    if not layout.count("prefill"):
        print("  and run it with: docker compose up --scale prefill=0 --scale kvstore=0")
    return 0


def _router_keys(args: argparse.Namespace) -> dict[str, str]:
    """The router's key settings, as environment. Keys typed on ``up``'s own command line
    stay visible in its argv (Python cannot rewrite the process's command line), so say so."""
    if args.api_key and args.api_key != os.environ.get("STAGEMESH_API_KEY", ""):
        print(
            "warning: --api-key on a command line is visible to every local user (ps); prefer "
            "STAGEMESH_API_KEY or --api-key-file",
            file=sys.stderr,
        )
    keys = {"STAGEMESH_API_KEY": args.api_key, "STAGEMESH_API_KEY_FILE": args.api_key_file}
    return {name: value for name, value in keys.items() if value}


def cmd_up(args: argparse.Namespace) -> int:
    from services.certs import make_certs
    from services.etcd_server import EmbeddedEtcd
    from services.exits import StartFailed
    from services.launcher import ProcessGroup, StageProcess, Supervisor
    from services.mesh_start import StopRequest, stop_mesh, supervise_etcd, wait_ready
    from services.model import prepare_bundled_model
    from services.placement import allowed_cores, format_cores, visible_gpus

    _apply_port_offset(args)
    gpus = visible_gpus()
    layout = _layout(args, allowed_cores(), len(gpus))
    models = args.model or [""]
    if layout.count("decode") < len(models) and args.decode is None:
        args.decode = len(models)  # every model needs a decode engine of its own
        if args.prefill is None:  # and a layout without prefill engines stays without
            args.prefill = layout.count("prefill")
        layout = _layout(args, allowed_cores(), len(gpus))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print(_describe_sim(args) if args.engine == "sim" else layout.describe(), flush=True)
    home = _home(args)
    if "" in models:
        prepare_bundled_model(home)
    run_dir = Path(tempfile.mkdtemp(prefix="stagemesh-up-"))  # mode 0700: the key files stay ours
    light_cores = list(layout.light_cores)
    # The mesh's credentials (services/credentials.py): the operator's key or a fresh one
    # for this run, in a file (never on a command line), and with --tls a development CA
    # and a certificate per stage. The command itself is a member too: it probes health.
    mesh_key_file = run_dir / "mesh.key"
    mesh_key_file.touch(mode=0o600)
    mesh_key_file.write_text(os.environ.get(MESH_KEY_ENV) or secrets.token_hex(32))
    certs = make_certs(run_dir / "tls", hosts=[args.host]) if args.tls else {}
    own = certs.get("client")
    credentials.install(
        MeshCredentials.load(
            mesh_key_file=str(mesh_key_file),
            tls_cert=str(own.cert) if own else "",
            tls_key=str(own.key) if own else "",
            tls_ca=str(own.ca) if own else "",
        )
    )
    etcd = EmbeddedEtcd(
        client_port=args.etcd_port,
        data_dir=run_dir / "etcd",
        cores=light_cores,
        tls=certs.get("etcd"),
    )
    group = ProcessGroup()
    common = [
        "--etcd",
        etcd.endpoint,
        "--home",
        str(home),
        "--metrics-port",
        "0",
        "--host",
        args.host,
        "--mesh-key-file",
        str(mesh_key_file),
    ]
    router = ["--http-port", str(args.http_port)] + (["--allow-open"] if args.allow_open else [])
    if layout.disagg_min_tokens is not None:
        router += ["--disagg-min-tokens", str(layout.disagg_min_tokens)]
    # Simulated engines hold no tensors to store.
    kvstore_mib = (
        args.kvstore_mib
        if args.kvstore_mib is not None
        else (1024 if layout.kvstore and args.engine != "sim" else 0)
    )
    # (name, module, gRPC port, extra flags, cores, environment). The n-th prefill/decode
    # takes the base port + 2n; each engine owns its cores (services.placement).
    plan: list[tuple[str, str, int, list[str], list[int], dict[str, str]]] = [
        (
            "tokenizer",
            "tokenizer_svc",
            args.tokenizer_port,
            ["--model", ",".join(args.model)] if args.model else [],
            light_cores,
            {},
        ),
        # Keys reach the router through its environment, not its command line (ps shows that).
        ("router", "router_svc", args.router_port, router, light_cores, _router_keys(args)),
    ]
    if kvstore_mib > 0:
        plan.append(
            (
                "kvstore",
                "kvstore_svc",
                args.kvstore_port,
                ["--capacity-mib", str(kvstore_mib), *_kvstore_disk(args)],
                light_cores,
                {},
            )
        )
    plan += _sim_plan(args) if args.engine == "sim" else []
    for i, engine in [] if args.engine == "sim" else layout.numbered():
        base = args.prefill_port if engine.role == "prefill" else args.decode_port
        name = engine.role if i == 0 else f"{engine.role}-{i}"
        # Engines of each role take the models in turn; the first model's get the adapters.
        model = models[i % len(models)]
        flags = ["--model", model] if model else []
        if model == models[0]:
            flags += [flag for spec in args.lora for flag in ("--lora", spec)]
            flags += ["--enable-lora"] if args.enable_lora else []
        flags += ["--cpu-cores", format_cores(engine.cores)]
        env = {}
        if engine.gpu is not None:
            flags += ["--device", "cuda"]
            env["CUDA_VISIBLE_DEVICES"] = gpus[engine.gpu]
        plan.append((name, f"{engine.role}_svc", base + 2 * i, flags, list(engine.cores), env))
    claims = _port_claims(args, etcd, [(name, port) for name, _, port, *_ in plan])
    stop = StopRequest()  # from here on a signal stops the children in order, never a traceback

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    bound: list[PortClaim] = []  # the ports this run holds, to see free again on the way out
    try:
        _check_ports(claims, report)
        bound = claims
        etcd.start()
        etcd_users = _etcd_users(etcd.endpoint, run_dir)
        credentials.install(
            dataclasses.replace(
                credentials.current(),
                etcd_user="client",
                etcd_password=etcd_users["client"].read_text(),
            )
        )
        stages = [
            group.add(
                StageProcess(
                    name,
                    module,
                    [
                        *common,
                        *_tls_flags(certs, name),
                        *_etcd_flags(etcd_users, name),
                        "--port",
                        str(port),
                        *extra,
                    ],
                    f"127.0.0.1:{port}",
                    run_dir,
                    env={**os.environ, **env},
                    cores=cores,
                )
            )
            for name, module, port, extra, cores, env in plan
        ]
        supervisor = Supervisor(stages, report)
        started = time.monotonic()
        print(
            f"starting {', '.join(name for name, *_ in plan)} (engines take a minute on CPU)...",
            flush=True,
        )
        if not asyncio.run(wait_ready(stages, supervisor, etcd, args.start_timeout, stop, report)):
            return 130  # stopped while starting
        endpoints = "".join(
            f"  {stage.name + ' gRPC':<18}{stage.grpc_address}\n" for stage in stages
        )
        http = f"http://127.0.0.1:{args.http_port}"
        print(
            f"\nstagemesh is up in {time.monotonic() - started:.1f}s (logs in {run_dir})\n"
            f"  {'OpenAI HTTP':<18}{http}/v1\n"
            f"  {'etcd':<18}{etcd.endpoint}\n{endpoints}\n"
            "try it:\n"
            f"  curl {http}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            '    -d \'{"model": "", "messages": [{"role": "user", "content": "What is the capital of France?"}]}\'\n'
            f"  grpcurl {f'-cacert {own.ca} -authority stagemesh' if own else '-plaintext'} "
            f'-d \'{{"text": "Once upon a time"}}\' 127.0.0.1:{args.router_port} '
            "stagemesh.v1.RouterService/Generate\n"
            f"  stagemesh status --etcd {etcd.endpoint} --mesh-key-file {mesh_key_file} "
            f"{' '.join(_etcd_flags(etcd_users, 'client'))}{' ' + ' '.join(own.flags()) if own else ''}\n\n"
            "Ctrl-C stops everything.",
            flush=True,
        )

        def supervise() -> None:
            supervise_etcd(etcd, report)
            supervisor.check()

        _wait_for_signal(every=supervise, stop=stop)
        return 0
    except StartFailed as exc:
        print(f"stagemesh up: {exc}", file=sys.stderr, flush=True)
        if exc.detail:
            print(exc.detail, file=sys.stderr, flush=True)
        return 1
    finally:
        if bound:
            print("stopping...", flush=True)
            stop_mesh(group, etcd, bound, report)
            print("stopped.", flush=True)
        else:  # nothing started: no logs to keep
            shutil.rmtree(run_dir, ignore_errors=True)


def _sim_counts(args: argparse.Namespace) -> tuple[int, int]:
    """Simulated prefill and decode engines: ``--prefill``/``--decode``, else one decode."""
    return args.prefill or 0, 1 if args.decode is None else args.decode


def _describe_sim(args: argparse.Namespace) -> str:
    prefill, decode = _sim_counts(args)
    return (
        f"simulated engines ({args.sim_profile}, speedup {args.sim_speedup:g}): {prefill} prefill, "
        f"{decode} decode, one process per role; they compute no model (see docs/design.md)"
    )


#: A stage ``up`` starts: name, module, gRPC port, extra flags, cores, environment.
_Planned = tuple[str, str, int, list[str], list[int], dict[str, str]]


def _kvstore_disk(args: argparse.Namespace) -> list[str]:
    """The store's disk-tier flags, when ``--kvstore-disk-dir`` names one."""
    if not args.kvstore_disk_dir:
        return []
    return ["--disk-dir", args.kvstore_disk_dir, "--disk-gib", str(args.kvstore_disk_gib)]


def _sim_plan(args: argparse.Namespace) -> list[_Planned]:
    """``--engine sim``: one process per role holding all its simulated engines
    (``--sim-engines``), on the light stages' cores: they compute nothing."""
    sim = [
        "--engine",
        "sim",
        "--sim-profile",
        args.sim_profile,
        "--sim-speedup",
        str(args.sim_speedup),
    ]
    plan: list[_Planned] = []
    for role, count, port in zip(
        ("prefill", "decode"), _sim_counts(args), (args.prefill_port, args.decode_port)
    ):
        if count:
            plan.append((role, f"{role}_svc", port, [*sim, "--sim-engines", str(count)], [], {}))
    return plan


def _etcd_users(endpoint: str, run_dir: Path) -> dict[str, Path]:
    """etcd's authentication on for this run (services.etcd.enable_authentication): a
    fresh password per role, each in a 0600 file of the run directory; the files by role."""
    from services.etcd import WRITES, EtcdSession, enable_authentication

    files = {role: run_dir / f"etcd-{role}.password" for role in WRITES}
    for path in files.values():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(16))

    async def enable() -> None:
        session = EtcdSession(parse_endpoints(endpoint))
        try:
            passwords = {role: path.read_text() for role, path in files.items()}
            await enable_authentication(await session.client(), passwords, secrets.token_hex(16))
        finally:
            await session.close()

    asyncio.run(enable())
    return files


def _etcd_flags(users: dict[str, Path], stage: str) -> list[str]:
    """A stage's etcd user and password file (``prefill-1`` is the ``prefill`` user)."""
    role = stage.split("-")[0]
    return ["--etcd-user", role, "--etcd-password-file", str(users[role])]


def _tls_flags(certs: dict[str, CertFiles], stage: str) -> list[str]:
    """A stage's TLS flags (``prefill-1`` uses prefill's certificate); none without TLS."""
    files = certs.get(stage.split("-")[0])
    return files.flags() if files else []


#: `up`'s port settings, each moved by ``--port-offset``.
_UP_PORTS = (
    "http_port",
    "router_port",
    "etcd_port",
    "tokenizer_port",
    "prefill_port",
    "decode_port",
    "kvstore_port",
)
#: Seconds `up` waits for ports a stopping mesh still holds.
_PORT_WAIT = 15.0


def _apply_port_offset(args: argparse.Namespace) -> None:
    """Move every port of `up` by ``--port-offset``: a second mesh beside the first."""
    for name in _UP_PORTS:
        port = getattr(args, name)
        if port and args.port_offset:
            port += args.port_offset
            if not 0 < port < 65536:
                raise SystemExit(
                    f"stagemesh up: --port-offset {args.port_offset} puts --{name.replace('_', '-')} at {port}"
                )
            setattr(args, name, port)


def _port_claims(
    args: argparse.Namespace, etcd: EmbeddedEtcd, stages: list[tuple[str, int]]
) -> list[PortClaim]:
    """Every port `up` binds (its etcd's client port, the router's HTTP port, each
    stage's gRPC port), with the setting that moves it."""
    from services.ports import PortClaim

    return [
        PortClaim(etcd.client_port, "--etcd-port", "etcd", etcd.host),
        PortClaim(args.http_port, "--http-port", "router HTTP", args.host),
        *(
            PortClaim(port, f"--{name.split('-')[0]}-port", f"{name} gRPC", args.host)
            for name, port in stages
        ),
    ]


def _check_ports(claims: list[PortClaim], report: Callable[[str], None]) -> None:
    """Every claimed port free, after a short wait for a mesh that is stopping; else
    :class:`StartFailed` with a line per taken port."""
    from services import ports
    from services.exits import StartFailed

    found = ports.wait_for(claims, _PORT_WAIT, report)
    if found:
        raise StartFailed(
            "\nstagemesh up: ".join(
                f"{t.reason()}; stop it, or move it with {t.claim.setting} (or every port with --port-offset N)"
                for t in found
            )
        )


def _wait_for_signal(
    every: Callable[[], None] | None = None, stop: StopRequest | None = None
) -> None:
    """Block until SIGINT/SIGTERM/SIGHUP, calling ``every`` twice a second meanwhile."""
    from services.mesh_start import StopRequest

    if stop is None:  # (a StopRequest no signal has reached is falsy)
        stop = StopRequest()
    while not stop:
        if every is not None:
            every()
        time.sleep(0.5)


def _add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="auto: engines and roles from this host's cores and GPUs (printed at start); "
        "aggregated: engines that prefill and decode; pd: separate prefill engines",
    )
    parser.add_argument(
        "--prefill", type=int, default=None, help="prefill engines to run (overrides the layout's)"
    )
    parser.add_argument(
        "--decode", type=int, default=None, help="decode engines to run (overrides the layout's)"
    )


#: The stage settings a tool presents to the stages with (services/credentials.py).
_CREDENTIAL_SETTINGS = (
    "mesh_key_file",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "etcd_user",
    "etcd_password_file",
)


def _add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    """The mesh credentials a tool presents to the stages, as each stage takes them."""
    for name in _CREDENTIAL_SETTINGS:
        parser.add_argument(
            f"--{name.replace('_', '-')}", default=None, help=f"[env {ENV_PREFIX}{name.upper()}]"
        )


def _install_credentials(args: argparse.Namespace) -> None:
    """Flags, else ``STAGEMESH_*`` (the mesh key too), resolved as a stage resolves them."""
    given = {name: getattr(args, name) for name in _CREDENTIAL_SETTINGS}
    credentials.install(build_config(StageConfig, given).credentials())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagemesh", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--home",
        default=None,
        help=f"state directory [env {ENV_PREFIX}HOME; default {DEFAULT_HOME}]",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run etcd and every stage on this host")
    up.add_argument(
        "--model",
        action="append",
        default=[],
        help="NAME=PATH or PATH of a HF model directory (default: bundled); repeat it to serve several "
        "base models, the engines of each role taking them in turn (each model gets a decode engine)",
    )
    up.add_argument(
        "--lora",
        action="append",
        default=[],
        help="NAME=PATH of a LoRA adapter (PEFT directory) for the first model's engines, served as model "
        "NAME; repeat for more. More can be loaded at run time (POST /v1/load_lora_adapter)",
    )
    up.add_argument(
        "--enable-lora",
        action="store_true",
        help="LoRA on in the first model's engines without adapters at start, to load them at run time",
    )
    _add_layout_arguments(up)
    up.add_argument(
        "--engine",
        choices=("vllm", "sim"),
        default="vllm",
        help="sim: simulated engines that compute no model, for width (--prefill/--decode of them, "
        "one process per role; see docs/design.md)",
    )
    up.add_argument(
        "--sim-profile", default="dynamo-default", help="sim: timing profile name or JSON file"
    )
    up.add_argument(
        "--sim-speedup", type=float, default=1.0, help="sim: divide simulated times by this"
    )
    up.add_argument(
        "--host",
        default="127.0.0.1",
        help="address every stage binds (gRPC and HTTP); 0.0.0.0 serves other hosts too (see docs/deploy.md)",
    )
    up.add_argument(
        "--api-key",
        default=os.environ.get("STAGEMESH_API_KEY", ""),
        help="API keys the router's HTTP and gRPC APIs require, comma-separated; on a command line ps shows "
        "them: prefer the environment or --api-key-file [env STAGEMESH_API_KEY; default: none]",
    )
    up.add_argument(
        "--api-key-file",
        default=os.environ.get("STAGEMESH_API_KEY_FILE", ""),
        help="a file of API keys, one per line ('KEY admin' may also load adapters) [env STAGEMESH_API_KEY_FILE]",
    )
    up.add_argument(
        "--allow-open",
        action="store_true",
        help="with --host other than loopback and no key: serve the APIs open on purpose",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS between the stages and to etcd, with a development CA made for this run (in its log dir)",
    )
    up.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP port")
    up.add_argument("--router-port", type=int, default=50051, help="router gRPC port")
    up.add_argument("--etcd-port", type=int, default=2379)
    up.add_argument("--tokenizer-port", type=int, default=50052)
    up.add_argument("--prefill-port", type=int, default=50053)
    up.add_argument("--decode-port", type=int, default=50054)
    up.add_argument("--kvstore-port", type=int, default=50050)
    up.add_argument(
        "--kvstore-mib",
        type=int,
        default=None,
        help="KV store capacity in MiB (0: no store; default 1024 when the layout has prefill engines, "
        "the store's only users, else none)",
    )
    up.add_argument(
        "--kvstore-disk-dir",
        default="",
        help="the KV store's disk tier: a directory blocks are written behind to and read "
        "back from, kept across restarts (it must exist); empty: memory only",
    )
    up.add_argument("--kvstore-disk-gib", type=float, default=16.0, help="GiB of it to fill")
    up.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="added to every port above: a second mesh beside the first (e.g. 100: HTTP on 8100, etcd on 2479)",
    )
    up.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="seconds every stage has to become ready (engines load for a minute or more on CPU); past it "
        "`up` names the stages still starting and shows their logs",
    )
    up.set_defaults(func=cmd_up)

    placement = sub.add_parser(
        "layout",
        help="the engines, roles and cores `up` would choose here, as compose and systemd settings",
    )
    _add_layout_arguments(placement)
    placement.add_argument(
        "--cores", type=int, default=0, help="plan for a host with this many cores (0: this one)"
    )
    placement.add_argument(
        "--gpus", type=int, default=None, help="plan for this many GPUs (default: this host's)"
    )
    placement.set_defaults(func=cmd_layout)

    model = sub.add_parser("model", help="manage models").add_subparsers(
        dest="action", required=True
    )
    prepare = model.add_parser("prepare", help="prepare the bundled model (float32 HF directory)")
    prepare.add_argument("--force", action="store_true", help="prepare again even if present")
    prepare.set_defaults(func=cmd_model_prepare)

    status = sub.add_parser("status", help="members registered in etcd, with health")
    status.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints")
    _add_credential_arguments(status)
    status.set_defaults(func=cmd_status)

    certs = sub.add_parser("certs", help="make a development CA and a TLS certificate per stage")
    certs.add_argument(
        "--out", required=True, help="directory for ca.pem and <stage>.pem / <stage>-key.pem"
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="a host name or address the stages are dialled at (repeat; localhost and 127.0.0.1 are always in)",
    )
    certs.add_argument(
        "--stage",
        action="append",
        default=[],
        help=f"only these certificates (default: {', '.join(STAGES)})",
    )
    certs.add_argument("--days", type=int, default=365, help="validity of the certificates")
    certs.set_defaults(func=cmd_certs)

    probe = sub.add_parser("health", help="check one stage's gRPC health (exit 0 when SERVING)")
    probe.add_argument(
        "address", nargs="?", default="127.0.0.1:50051", help="host:port of the stage"
    )
    probe.add_argument("--service", default="", help="health service name ('' is the whole stage)")
    probe.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    _add_credential_arguments(probe)
    probe.set_defaults(func=cmd_health)

    etcd = sub.add_parser("etcd", help="run the embedded etcd server in the foreground")
    etcd.add_argument("--port", type=int, default=2379)
    etcd.add_argument("--host", default="127.0.0.1")
    etcd.add_argument("--data-dir", default="", help="keep data here (default: a temporary dir)")
    etcd.set_defaults(func=cmd_etcd)

    for name in STAGE_MODULES:
        sub.add_parser(
            name, help=f"run one {name} stage (see: stagemesh {name} --help)", add_help=False
        )
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
