"""The Helm chart's rendered manifests against the stages themselves, as test_deploy.py
checks compose.yaml: every container runs a real ``stagemesh`` subcommand, every
``STAGEMESH_*`` variable is one that stage accepts (read from its own ``--help``), probes
and ports are the stage's own, and the drain the pods are given covers what the stages
promise. ``make test-helm`` runs it (tests/deploy/helm_test.sh) with the rendered files:

    STAGEMESH_HELM_RENDERED=DIR python -m pytest tests/deploy/helm_check.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import STAGE_MODULES, build_parser
from tests.test_deploy import accepted

RENDERED = os.environ.get("STAGEMESH_HELM_RENDERED", "")
pytestmark = pytest.mark.skipif(not RENDERED, reason="make test-helm renders the chart first")


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Each values file's rendered manifests."""
    return {
        path.stem: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(Path(RENDERED).glob("*.yaml"))
    }


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each workload's pod spec, by ``Kind/name``."""
    return {
        f"{doc['kind']}/{doc['metadata']['name']}": doc["spec"]["template"]["spec"]
        for doc in docs
        if doc["kind"] in ("Deployment", "StatefulSet", "Job")
    }


@pytest.mark.parametrize("values", sorted(manifests()) if RENDERED else [])
def test_every_container_runs_real_commands_with_real_settings(values: str) -> None:
    """Stages, jobs and init containers run real subcommands with real settings."""
    docs = manifests()[values]
    stages_seen = set()
    for workload, spec in pod_specs(docs).items():
        for container in spec.get("initContainers", []) + spec["containers"]:
            command = container.get("command", [])
            args = container.get("args", [])
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if command == ["etcd"]:  # flags from ETCD_* variables, as the systemd unit's
                continue
            if command and command[0] != "stagemesh":
                continue  # the certificate hook's kubectl container
            if args and args[0] in STAGE_MODULES:
                stage = args[0]
                stages_seen.add(stage)
                flags, variables = accepted(stage)
                given = {a.split("=", 1)[0] for a in args[1:] if a.startswith("--")}
                assert given <= flags, f"{workload}: unknown flags {given - flags}"
                unknown = {k for k in env if k.startswith("STAGEMESH_")} - set(variables)
                assert not unknown, f"{workload}: {stage} has no setting for {unknown}"
                check_stage(workload, stage, container, spec, env, variables)
            else:
                # The jobs: the model, the certificates, etcd's authentication.
                parsed = build_parser().parse_args(args)
                assert parsed.func.__name__ in (
                    "cmd_model_prepare",
                    "cmd_certs",
                    "cmd_etcd_auth",
                ), workload
    assert stages_seen == set(STAGE_MODULES), values


def check_stage(
    workload: str,
    stage: str,
    container: dict[str, Any],
    spec: dict[str, Any],
    env: dict[str, str],
    variables: dict[str, str],
) -> None:
    """Probes on the stage's port over its TLS, its own certificate, and a drain that fits."""
    port = int(env.get("STAGEMESH_PORT", variables["STAGEMESH_PORT"]))
    probe = ["stagemesh", "health", f"127.0.0.1:{port}"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["exec"]["command"] == probe, (workload, kind)
    assert {p["containerPort"] for p in container["ports"]} >= {port}
    assert env["STAGEMESH_TLS_CERT"] and env["STAGEMESH_MESH_KEY_FILE"], workload
    (tls,) = [v for v in spec["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"].endswith(f"-{stage}"), (workload, tls)
    assert not any("ca-key" in str(v) for v in spec["volumes"]), workload
    drain = float(env.get("STAGEMESH_DRAIN_SECONDS", variables["STAGEMESH_DRAIN_SECONDS"]))
    grace = float(env.get("STAGEMESH_GRACE_SECONDS", variables["STAGEMESH_GRACE_SECONDS"]))
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > pause + drain + grace, workload
    if stage == "router":
        assert env.get("STAGEMESH_API_KEY_FILE") or env["STAGEMESH_ALLOW_OPEN"] == "true"


@pytest.mark.parametrize("values", sorted(manifests()) if RENDERED else [])
def test_each_stage_has_a_disruption_budget_and_engines_spread(values: str) -> None:
    """A voluntary disruption never takes a whole stage, and engines of a role spread."""
    docs = manifests()[values]
    budgets = {
        doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for doc in docs
        if doc["kind"] == "PodDisruptionBudget"
    }
    assert set(STAGE_MODULES) <= budgets, values
    for doc in docs:
        component = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if doc["kind"] == "Deployment" and component in ("prefill", "decode"):
            assert doc["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"], values
