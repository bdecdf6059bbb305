"""``stagemesh layout``: the engines, roles and cores ``up`` would choose, as compose and
systemd settings."""

from __future__ import annotations

import argparse

from services.cli.common import add_layout_arguments, layout_of


def cmd_layout(args: argparse.Namespace) -> int:
    """Print the layout, then the same placement for systemd drop-ins and compose's .env."""
    from services.placement import allowed_cores, format_cores, visible_gpus

    cores = list(range(args.cores)) if args.cores else allowed_cores()
    layout = layout_of(args, cores, args.gpus if args.gpus is not None else len(visible_gpus()))
    print(layout.describe())
    light = format_cores(layout.light_cores)
    print(
        "\nsystemd: one drop-in per unit, /etc/systemd/system/<unit>.d/cores.conf "
        "([Service] then this line)"
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``layout`` and its flags."""
    placement = sub.add_parser(
        "layout",
        help="the engines, roles and cores `up` would choose here, as compose and systemd settings",
    )
    add_layout_arguments(placement)
    placement.add_argument(
        "--cores", type=int, default=0, help="plan for a host with this many cores (0: this one)"
    )
    placement.add_argument(
        "--gpus", type=int, default=None, help="plan for this many GPUs (default: this host's)"
    )
    placement.set_defaults(func=cmd_layout)
