"""What ``stagemesh up`` starts: a :class:`StagePlan` per stage, built from the layout and
``up``'s flags.

Each plan names the stage's config class, which gives the module to run and the defaults:
``up``'s port flags default to each stage's own ``--port`` default, the KV store's size to
its ``--capacity-mib``, the simulated engines' settings to the engine stage's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from decode_svc.config import DecodeConfig
from kvstore_svc.config import KvStoreConfig
from prefill_svc.config import PrefillConfig
from router_svc.config import RouterConfig
from services.config import StageConfig, default_of
from services.engine.config import EngineConfig
from services.operator.launcher import StageProcess
from services.placement import Layout, format_cores
from tokenizer_svc.config import TokenizerConfig

#: The stages ``up`` can start, by role; each has a ``--ROLE-port`` flag on ``up``.
STAGES: dict[str, type[StageConfig]] = {
    config.ROLE: config
    for config in (RouterConfig, TokenizerConfig, PrefillConfig, DecodeConfig, KvStoreConfig)
}


@dataclasses.dataclass
class StagePlan:
    """One stage process ``up`` starts: the n-th of its role (``decode-1``), on a port,
    with the flags, cores and environment that differ from the stage's defaults."""

    config: type[StageConfig]
    port: int
    flags: list[str] = dataclasses.field(default_factory=list)
    cores: list[int] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    index: int = 0

    @property
    def role(self) -> str:
        """The stage's role, as its config names it."""
        return self.config.ROLE

    @property
    def name(self) -> str:
        """``decode`` for the first of a role, ``decode-1`` for the next: as logs and units."""
        return self.role if self.index == 0 else f"{self.role}-{self.index}"

    @property
    def module(self) -> str:
        """The package whose ``__main__`` runs the stage (``decode_svc``)."""
        return self.config.__module__.split(".")[0]

    def process(self, shared: list[str], log_dir: Path) -> StageProcess:
        """The stage's process (not started): ``shared`` flags, then the plan's own."""
        return StageProcess(
            self.name,
            self.module,
            [*shared, "--port", str(self.port), *self.flags],
            f"127.0.0.1:{self.port}",
            log_dir,
            env={**os.environ, **self.env},
            cores=self.cores,
        )


def router_keys(args: argparse.Namespace) -> dict[str, str]:
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


def kvstore_mib(args: argparse.Namespace, layout: Layout) -> int:
    """``--kvstore-mib``, else the store's default size when prefill engines (its users
    by default) run vLLM or ``--kvstore-disk-dir`` asks for a disk tier, else no store:
    simulated engines hold no tensors to store."""
    if args.kvstore_mib is not None:
        return int(args.kvstore_mib)
    if (layout.kvstore or args.kvstore_disk_dir) and args.engine != "sim":
        return int(default_of(KvStoreConfig, "capacity_mib"))
    return 0


def light_plans(args: argparse.Namespace, layout: Layout) -> list[StagePlan]:
    """The tokenizer, the router and (when it has users) the KV store, on the light cores.
    Keys reach the router through its environment, not its command line (ps shows that)."""
    cores = list(layout.light_cores)
    router = ["--http-port", str(args.http_port)] + (["--allow-open"] if args.allow_open else [])
    if layout.disagg_min_tokens is not None:
        router += ["--disagg-min-tokens", str(layout.disagg_min_tokens)]
    plans = [
        StagePlan(
            TokenizerConfig,
            args.tokenizer_port,
            ["--model", ",".join(args.model)] if args.model else [],
            cores,
        ),
        StagePlan(RouterConfig, args.router_port, router, cores, router_keys(args)),
    ]
    if (mib := kvstore_mib(args, layout)) > 0:
        store = ["--capacity-mib", str(mib), *kvstore_disk(args)]
        plans.append(StagePlan(KvStoreConfig, args.kvstore_port, store, cores))
    return plans


def kvstore_disk(args: argparse.Namespace) -> list[str]:
    """The store's disk-tier flags, when ``--kvstore-disk-dir`` names one."""
    if not args.kvstore_disk_dir:
        return []
    return ["--disk-dir", args.kvstore_disk_dir, "--disk-gib", str(args.kvstore_disk_gib)]


def engine_plans(args: argparse.Namespace, layout: Layout, gpus: list[str]) -> list[StagePlan]:
    """One process per engine of the layout, each owning its cores (services.placement);
    the n-th of a role takes its role's base port + 2n. Engines of each role take the
    models in turn; the first model's get the adapters."""
    models = args.model or [""]
    # With no prefill engine, a store that runs has only the decode engines to serve:
    # they load prefixes from it and write what they compute (there are no handoffs,
    # so its recompute-on-failed-pull policy changes nothing else).
    store_decode = (
        ["--kvstore-decode"]
        if kvstore_mib(args, layout) > 0 and not layout.count("prefill")
        else []
    )
    plans = []
    for i, engine in layout.numbered():
        config = STAGES[engine.role]
        model = models[i % len(models)]
        flags = ["--model", model] if model else []
        if model == models[0]:
            flags += [flag for spec in args.lora for flag in ("--lora", spec)]
            flags += ["--enable-lora"] if args.enable_lora else []
        flags += ["--cpu-cores", format_cores(engine.cores)]
        flags += store_decode if engine.role == "decode" else []
        env = {}
        if engine.gpu is not None:
            flags += ["--device", "cuda"]
            env["CUDA_VISIBLE_DEVICES"] = gpus[engine.gpu]
        port = getattr(args, f"{engine.role}_port") + 2 * i
        plans.append(StagePlan(config, port, flags, list(engine.cores), env, index=i))
    return plans


def sim_counts(args: argparse.Namespace) -> tuple[int, int]:
    """Simulated prefill and decode engines: ``--prefill``/``--decode``, else one decode."""
    return args.prefill or 0, 1 if args.decode is None else args.decode


def describe_sim(args: argparse.Namespace) -> str:
    """The start banner's line for ``--engine sim`` (there is no layout to print)."""
    prefill, decode = sim_counts(args)
    return (
        f"simulated engines ({args.sim_profile}, speedup {args.sim_speedup:g}): {prefill} "
        f"prefill, {decode} decode, one process per role; they compute no model "
        "(see docs/design.md)"
    )


def sim_plans(args: argparse.Namespace) -> list[StagePlan]:
    """``--engine sim``: one process per role holding all its simulated engines
    (``--sim-engines``), on the light stages' cores: they compute nothing."""
    sim = ["--engine", "sim", "--sim-profile", args.sim_profile]
    sim += ["--sim-speedup", str(args.sim_speedup)]
    plans = []
    for config, count in zip((PrefillConfig, DecodeConfig), sim_counts(args)):
        if count:
            port = getattr(args, f"{config.ROLE}_port")
            plans.append(StagePlan(config, port, [*sim, "--sim-engines", str(count)]))
    return plans


def plan_stages(args: argparse.Namespace, layout: Layout, gpus: list[str]) -> list[StagePlan]:
    """Every stage ``up`` starts (etcd aside), in start order."""
    engines = sim_plans(args) if args.engine == "sim" else engine_plans(args, layout, gpus)
    return [*light_plans(args, layout), *engines]


def add_plan_arguments(up: argparse.ArgumentParser) -> None:
    """``up``'s flags for the engines and the KV store, with the stages' own defaults."""
    up.add_argument(
        "--engine",
        choices=("vllm", "sim"),
        default=default_of(EngineConfig, "engine"),
        help="sim: simulated engines that compute no model, for width (--prefill/--decode of "
        "them, one process per role; see docs/design.md)",
    )
    up.add_argument(
        "--sim-profile",
        default=default_of(EngineConfig, "sim_profile"),
        help="sim: timing profile name or JSON file",
    )
    up.add_argument(
        "--sim-speedup",
        type=float,
        default=default_of(EngineConfig, "sim_speedup"),
        help="sim: divide simulated times by this",
    )
    up.add_argument(
        "--kvstore-mib",
        type=int,
        default=None,
        help="KV store capacity in MiB (0: no store; default "
        f"{default_of(KvStoreConfig, 'capacity_mib')} when the layout has prefill engines, "
        "the store's only users, else none)",
    )
    up.add_argument(
        "--kvstore-disk-dir",
        default="",
        help="the KV store's disk tier: a directory blocks are written behind to and read "
        "back from, kept across restarts (it must exist); empty: memory only",
    )
    up.add_argument(
        "--kvstore-disk-gib",
        type=float,
        default=default_of(KvStoreConfig, "disk_gib"),
        help="GiB of it to fill",
    )
