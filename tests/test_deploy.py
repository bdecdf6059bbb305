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

from router_svc.config import RouterConfig
from services.auth import ApiKeys, open_api_refusal
from services.certs import STAGES
from services.cli import STAGE_MODULES, build_parser
from services.config import build_config
from services.engine.config import EngineConfig
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


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def our_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
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
    compose = load(COMPOSE)
    etcd_command = " ".join(compose["services"]["etcd"]["command"])
    listen = re.search(r"--listen-client-urls=https://0\.0\.0\.0:(\d+)", etcd_command)
    assert listen is not None, etcd_command
    etcd_port = int(listen.group(1))
    # etcd serves only clients with a certificate from the mesh CA the certs job makes.
    assert {
        "--client-cert-auth",
        "--trusted-ca-file=/tls/ca.pem",
        "--cert-file=/tls/etcd.pem",
    } <= set(compose["services"]["etcd"]["command"])
    assert (
        compose["services"]["etcd"]["depends_on"]["certs"]["condition"]
        == "service_completed_successfully"
    )
    services = our_services(compose)
    assert {"certs", "model", "tokenizer", "prefill", "decode", "kvstore", "router"} <= set(
        services
    )
    made = set(STAGES)
    for name, service in services.items():
        command = service["command"]
        if command[0] not in STAGE_MODULES:
            # The one-shot jobs: the model, and the certificates every stage and etcd use.
            assert command in (
                ["model", "prepare"],
                ["certs", "--out", "/var/lib/stagemesh/tls", "--host", "etcd"],
            ), name
            assert (
                build_parser().parse_args(command).func.__name__
                == f"cmd_{'model_prepare' if command[0] == 'model' else 'certs'}"
            )
            continue
        flags, variables = accepted(command[0])
        given = [arg.split("=", 1)[0] for arg in command[1:] if arg.startswith("--")]
        assert set(given) <= flags, f"{name}: unknown flags {set(given) - flags}"
        environment = service.get("environment", {})
        unknown = {key for key in environment if key.startswith("STAGEMESH_")} - set(variables)
        assert not unknown, f"{name}: {command[0]} has no setting for {unknown}"

        # Found through etcd only, once etcd answers and the model is prepared.
        assert environment["STAGEMESH_ETCD"] == f"etcd:{etcd_port}", name
        assert service["depends_on"]["etcd"]["condition"] == "service_healthy", name
        assert service["depends_on"]["model"]["condition"] == "service_completed_successfully", name
        assert "models:/var/lib/stagemesh/models" in service["volumes"], name
        assert "STAGEMESH_ADVERTISE_HOST" not in environment, (
            f"{name}: replicas must advertise their own address"
        )
        # Mutual TLS with the stage's own certificate, and the mesh key, on every stage.
        tls = "/var/lib/stagemesh/tls"
        assert environment["STAGEMESH_TLS_CERT"] == f"{tls}/{name}.pem" and name in made, name
        assert environment["STAGEMESH_TLS_KEY"] == f"{tls}/{name}-key.pem", name
        assert environment["STAGEMESH_TLS_CA"] == f"{tls}/ca.pem", name
        assert environment["STAGEMESH_MESH_KEY"] == "${STAGEMESH_MESH_KEY:-}", name
        assert f"tls:{tls}:ro" in service["volumes"], name

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


def test_compose_images_split_light_and_engine_stages() -> None:
    """The light image (no torch, no vLLM) runs the tokenizer and router; the engine image the rest."""
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
    base, gpu = load(COMPOSE), load(COMPOSE_GPU)
    assert set(gpu["services"]) == {"model", "prefill", "decode"} <= set(base["services"])
    for name in ("prefill", "decode"):
        service = gpu["services"][name]
        assert service["build"]["args"]["ENGINE_EXTRA"] == "engine-gpu"
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
    lines = logical_lines(ROOT / "docker" / f"{name}.Dockerfile")
    base = next(line.split("=", 1)[1] for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), (
        f"base image not pinned to a release: {base}"
    )
    assert sum(line.startswith("FROM ") for line in lines) == 2  # build stage + runtime stage
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
    assert ".venv" in ignored and ".git" in ignored


def unit_files() -> list[Path]:
    return sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.target"))


def unit_values(path: Path, key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in path.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def env_keys(path: Path) -> set[str]:
    return {
        line.split("=", 1)[0]
        for line in path.read_text().splitlines()
        if re.match(r"^[A-Z_]+=", line)
    }


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
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
        assert "stagemesh-etcd.service" in " ".join(unit_values(unit, "After")), unit.name
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
    etcd_help = subprocess.run(
        [str(Path(sys.executable).parent / "etcd"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    etcd_flags = set(re.findall(r"--([a-z][a-z0-9-]*)", etcd_help.stdout + etcd_help.stderr))
    for key in env_keys(UNITS / "etcd.env"):
        flag = key.removeprefix("ETCD_").lower().replace("_", "-")
        assert flag in etcd_flags, f"etcd.env: etcd has no --{flag}"


def _interpolated(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}`` interpolation, as ``docker compose config`` renders it."""
    return re.sub(
        r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value
    )


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
