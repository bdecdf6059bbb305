"""The Grafana dashboard and the Prometheus configs against a running mesh: every metric
a dashboard query names is exported by some stage (router, engines, KV store), and the
scrape configs point at the ports the stages really serve /metrics on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

from services.etcd import EtcdSession
from services.membership import MEMBERS_PREFIX, RecordReader
from services.operator.etcd_server import EmbeddedEtcd
from services.pb import common_pb2
from tests.support.stages import Mesh, kvstore_process, private_etcd, running

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "stagemesh.json"


def queried_metrics() -> set[str]:
    """The metric families the dashboard's queries read (suffixes of samples dropped)."""
    dashboard = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            found = re.findall(r"\bstagemesh_[a-z0-9_]+", target["expr"])
            assert found, target["expr"]
            names |= {_family(name) for name in found}
    return names


def _family(name: str) -> str:
    """A series name without its sample suffix (``_bucket``, ``_count``, ``_sum``, ``_total``)."""
    return re.sub(r"_(bucket|count|sum|total)$", "", name)


def exported(text: str) -> set[str]:
    return {_family(name) for name in re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE)}


@pytest.mark.asyncio(loop_scope="session")
async def test_every_dashboard_query_names_a_real_metric(
    etcd: EmbeddedEtcd, mesh: Mesh, home: Path, tmp_path: Path
) -> None:
    session = EtcdSession([("127.0.0.1", etcd.client_port)])
    try:
        listing = await (await session.client()).get_prefix(MEMBERS_PREFIX.encode())
    finally:
        await session.close()
    members = list(RecordReader(common_pb2.Member.FromString).read_all(listing).values())
    urls = [f"{mesh.http_url}/metrics"]
    urls += [f"http://{m.metrics_address}/metrics" for m in members if m.metrics_address]
    names: set[str] = set()
    async with httpx.AsyncClient(timeout=30) as http:
        for url in urls:
            names |= exported((await http.get(url)).text)
        # A KV store of its own (on its own etcd, out of the session mesh's way).
        with private_etcd() as store_etcd:
            store = kvstore_process(store_etcd.endpoint, home, tmp_path, 16)
            async with running(store):
                port = int(re.search(r"metrics on :(\d+)", store.log_path.read_text()).group(1))  # type: ignore[union-attr]
                names |= exported((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
    assert {common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE} <= {
        m.role for m in members if m.metrics_address
    }
    missing = queried_metrics() - names
    assert not missing, f"the dashboard queries metrics no stage exports: {sorted(missing)}"


def test_scrape_configs_match_the_deployments() -> None:
    compose = yaml.safe_load((MONITORING.parent.parent / "compose.yaml").read_text())
    services = compose["services"]
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    (dns,) = jobs["stagemesh-stages"]["dns_sd_configs"]
    for name in dns["names"]:
        assert services[name]["environment"]["STAGEMESH_METRICS_PORT"] == str(dns["port"]), name
    (router,) = jobs["stagemesh-router"]["static_configs"][0]["targets"]
    assert router == f"router:{services['router']['environment']['STAGEMESH_HTTP_PORT']}"
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
    mounted = " ".join(services["grafana"]["volumes"])
    assert "./deploy/monitoring/grafana/dashboards:/var/lib/grafana/dashboards" in mounted
    provider = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "dashboards" / "stagemesh.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    systemd = yaml.safe_load((MONITORING / "prometheus-systemd.yml").read_text())
    assert {job["job_name"] for job in systemd["scrape_configs"]} == set(jobs)
