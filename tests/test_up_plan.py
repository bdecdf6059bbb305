"""What `stagemesh up` plans to start, read without starting it: a StagePlan per stage,
whose defaults are the stages' own (services/cli/plan.py)."""

from __future__ import annotations

import pytest

from decode_svc.config import DecodeConfig
from kvstore_svc.config import KvStoreConfig
from prefill_svc.config import PrefillConfig
from router_svc.config import RouterConfig
from services.cli import build_parser
from services.cli.plan import plan_stages
from services.placement import choose_layout
from tokenizer_svc.config import TokenizerConfig

pytestmark = pytest.mark.unit


def test_up_takes_its_defaults_from_the_stage_configs() -> None:
    """Change a stage's default port or the store's size, and `up` follows."""
    args = build_parser().parse_args(["up"])
    for config in (RouterConfig, TokenizerConfig, PrefillConfig, DecodeConfig, KvStoreConfig):
        assert getattr(args, f"{config.ROLE}_port") == config().port, config.ROLE
    assert args.http_port == RouterConfig().http_port
    assert args.sim_profile == PrefillConfig().sim_profile
    layout = choose_layout(range(16), 0, "pd", 1, 2)
    store = next(p for p in plan_stages(args, layout, []) if p.role == "kvstore")
    assert store.flags == ["--capacity-mib", str(KvStoreConfig().capacity_mib)]
    disk = build_parser().parse_args(["up", "--kvstore-disk-dir", "/d"])
    store = next(p for p in plan_stages(disk, layout, []) if p.role == "kvstore")
    assert store.flags[2:] == ["--disk-dir", "/d", "--disk-gib", str(KvStoreConfig().disk_gib)]


def test_a_pd_layout_plans_a_process_per_engine_on_its_own_cores() -> None:
    """Each engine of a role takes its base port + 2n, its cores, and the models in turn."""
    args = build_parser().parse_args(
        ["up", "--model", "a=/m/a", "--model", "b=/m/b", "--port-offset", "0"]
    )
    layout = choose_layout(range(32), 0, "pd", 1, 2)
    plans = {plan.name: plan for plan in plan_stages(args, layout, [])}
    assert list(plans) == ["tokenizer", "router", "kvstore", "prefill", "decode", "decode-1"]
    assert plans["decode-1"].module == "decode_svc"
    assert plans["decode-1"].port == args.decode_port + 2
    assert plans["decode"].flags[:2] == ["--model", "a=/m/a"]
    assert plans["decode-1"].flags[:2] == ["--model", "b=/m/b"]
    assert set(plans["decode"].cores).isdisjoint(plans["decode-1"].cores)
    assert plans["tokenizer"].flags == ["--model", "a=/m/a,b=/m/b"]


def test_sim_engines_run_one_process_per_role() -> None:
    """`--engine sim`: every simulated engine of a role in one process, no KV store."""
    args = build_parser().parse_args(["up", "--engine", "sim", "--prefill", "2", "--decode", "3"])
    plans = plan_stages(args, choose_layout(range(2), 0, "auto"), [])
    assert [plan.name for plan in plans] == ["tokenizer", "router", "prefill", "decode"]
    decode = plans[-1]
    assert decode.flags[-2:] == ["--sim-engines", "3"] and decode.cores == []


def test_a_store_beside_an_aggregated_engine_is_used_by_it() -> None:
    """No prefill engine: a store runs when asked for (its size, or a disk tier), and the
    decode engine loads from it and writes to it; without one, the engine is told nothing."""
    layout = choose_layout(range(2), 0, "auto")
    assert not layout.count("prefill")
    for flags in (["--kvstore-mib", "64"], ["--kvstore-disk-dir", "/d"]):
        plans = {
            p.name: p for p in plan_stages(build_parser().parse_args(["up", *flags]), layout, [])
        }
        assert "kvstore" in plans, flags
        assert "--kvstore-decode" in plans["decode"].flags, flags
    plans = {p.name: p for p in plan_stages(build_parser().parse_args(["up"]), layout, [])}
    assert "kvstore" not in plans and "--kvstore-decode" not in plans["decode"].flags
    pd = choose_layout(range(16), 0, "pd", 1, 1)
    plans = {p.name: p for p in plan_stages(build_parser().parse_args(["up"]), pd, [])}
    assert "kvstore" in plans and "--kvstore-decode" not in plans["decode"].flags
