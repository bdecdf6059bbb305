"""The scale lab: simulated engines at width, driven at accelerator token rates.

    python -m bench.scale --scenario routing --target dynamo --engines 8 --qps 2,3
    python -m bench.scale --scenario peer --target dynamo,stagemesh     # one table, both
    python -m bench.scale --scenario pd|token-path|control-plane ... [--json F] [--png F]

Scenarios (issue 27):

- ``routing``: llm-d's multi-tenant shared-prefix workload scaled to the host (tenants
  each with a long shared prefix, fresh queries, Poisson arrivals over a QPS ramp) per
  router policy: output tok/s, TTFT p50/p90/p99, ITL, the engines' prefix hit rate, and
  CPU per request of the router and engines;
- ``peer``: the routing workload with ``kv_aware`` on every ``--target`` side by side;
- ``pd``: disaggregated (P prefill + D decode) against aggregated engines on a
  prefill-heavy and a decode-heavy mix;
- ``token-path``: N concurrent streams back to back: tokens/s delivered, TTFT and ITL,
  CPU per token of every process;
- ``control-plane``: stagemesh's members under churn (``bench.scale.mesh``).

Targets: ``dynamo`` (NVIDIA Dynamo's frontend and mocker engines, ``make
bench-dynamo-env``; bench/scale/dynamo.py) and ``stagemesh`` (its simulated engines;
bench/scale/mesh.py). Both get the same ``EngineSpec``: engine count, block size, KV
blocks, batch limits and the speedup of the mocker's timing model.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import add_output_arguments, print_table, write_json, write_png
from bench.scale.deploy import EngineSpec
from bench.scale.scenarios import SCENARIOS, Row
from bench.vs_vllm import cpu_model
from services.config import DEFAULT_HOME
from services.model import prepare_bundled_model
from services.placement import allowed_cores

COLUMNS = [
    ("deployment", "deployment", ""),
    ("layout", "layout", ""),
    ("mix", "mix", ""),
    ("qps", "QPS", "g"),
    ("streams", "streams", "d"),
    ("requests", "req", "d"),
    ("ok", "ok", "d"),
    ("rejected_429", "429", "d"),
    ("errors", "err", "d"),
    ("output_tps", "out tok/s", ".0f"),
    ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
    ("ttft_p90_ms", "TTFT p90 ms", ".0f"),
    ("ttft_p99_ms", "TTFT p99 ms", ".0f"),
    ("itl_p50_ms", "ITL p50 ms", ".1f"),
    ("itl_p99_ms", "ITL p99 ms", ".1f"),
    ("hit_rate", "hit", ".0%"),
    ("client_core_share", "client core", ".0%"),
    # control-plane rows
    ("measure", "measure", ""),
    ("n", "n", "d"),
    ("p50_ms", "p50 ms", ".0f"),
    ("max_ms", "max ms", ".0f"),
    ("cpu_ms_per_s", "router CPU ms/s", ".1f"),
    ("cpu_ms_per_poll", "CPU ms/poll", ".3f"),
    ("index_mib", "index MiB", ".0f"),
    ("decisions_per_s", "decisions/s", ",.0f"),
]


def numbers(text: str) -> list[float]:
    """Comma-separated numbers (``4,8,16``), as a flag's type."""
    return [float(x) for x in text.split(",") if x.strip()]


def words(text: str) -> list[str]:
    """Comma-separated names (``dynamo,stagemesh``), as a flag's type."""
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The lab's flags; engines' shape is one group, the same for every target."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="routing")
    parser.add_argument(
        "--target",
        type=words,
        default=["dynamo"],
        help="dynamo, stagemesh, stagemesh:N (router --workers N), comma-separated",
    )
    parser.add_argument(
        "--policies",
        type=words,
        default=None,
        help="router policies (stagemesh names: kv_aware,least_load,round_robin,random); "
        "default kv_aware,round_robin (peer: kv_aware)",
    )
    engines = parser.add_argument_group("engines (the same for every target)")
    defaults = EngineSpec()
    engines.add_argument("--engines", type=int, default=defaults.engines)
    engines.add_argument(
        "--prefill", type=int, default=0, help="P/D: prefill engines (pd scenario: engines/4)"
    )
    engines.add_argument("--block-size", type=int, default=defaults.block_size)
    engines.add_argument("--kv-blocks", type=int, default=defaults.kv_blocks)
    engines.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    engines.add_argument(
        "--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens
    )
    engines.add_argument("--speedup", type=float, default=10.0, help="divides simulated step times")
    engines.add_argument(
        "--kv-transfer-gbps", type=float, default=None, help="P/D KV transfer bandwidth"
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--qps", type=numbers, default=[2.0, 3.0], help="QPS ramp (routing, peer, pd)"
    )
    load.add_argument(
        "--step-seconds", type=float, default=30.0, help="length of each QPS or streams step"
    )
    load.add_argument("--tenants", type=int, default=48)
    load.add_argument("--prefix-tokens", type=int, default=6_000)
    load.add_argument("--query-tokens", type=int, default=1_200)
    load.add_argument("--output-tokens", type=int, default=1_000)
    load.add_argument("--mixes", type=words, default=["prefill-heavy", "decode-heavy"])
    load.add_argument("--streams", type=lambda t: [int(x) for x in numbers(t)], default=[64, 256])
    load.add_argument("--stream-prompt-tokens", type=int, default=64)
    load.add_argument("--stream-output-tokens", type=int, default=256)
    load.add_argument("--chat", action="store_true", help="token-path through /v1/chat/completions")
    load.add_argument(
        "--text",
        action="store_true",
        help="text prompts instead of token ids (lengths approximate)",
    )
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--churn-rounds", type=int, default=3, help="control-plane: join/drain/crash rounds"
    )
    add_output_arguments(parser, DEFAULT_HOME)
    args = parser.parse_args(argv)
    if args.policies is None:
        args.policies = ["kv_aware"] if args.scenario == "peer" else ["kv_aware", "round_robin"]
    return args


def spec_from(args: argparse.Namespace) -> EngineSpec:
    """The engines every target of this run gets (pd runs its own layouts from it)."""
    return EngineSpec(
        engines=args.engines,
        prefill=args.prefill if args.scenario != "pd" else 0,
        block_size=args.block_size,
        kv_blocks=args.kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        speedup=args.speedup,
    )


def print_cpu(rows: list[Row]) -> None:
    """Where the CPU went: each process group's ms per request and per output token."""
    print("\nCPU per request / per output token (ms), by process group:")
    for row in rows:
        groups = sorted(
            key.removesuffix("_cpu_s")
            for key in row
            if key.endswith("_cpu_s") and key != "client_cpu_s"
        )
        cells = [
            f"{g} {row[f'{g}_cpu_ms_per_request']:.2f} / {row[f'{g}_cpu_ms_per_token']:.4f}"
            for g in groups
        ]
        step = ", ".join(f"{k} {row[k]}" for k in ("layout", "mix", "qps", "streams") if k in row)
        client = (
            f"client {row['client_cpu_s'] * 1000 / max(1, row['requests']):.2f} / "
            f"{row['client_cpu_s'] * 1000 / max(1, row['output_tokens']):.4f}"
        )
        print(f"  {row['deployment']} ({step}): " + "; ".join([*cells, client]))


def plot(path: Path, scenario: str, rows: list[Row], host: dict[str, Any]) -> None:
    """TTFT p90 against QPS per deployment (tokens/s against streams for the token path)."""
    x_key, y_key, y_label = (
        ("streams", "output_tps", "output tok/s")
        if scenario == "token-path"
        else ("qps", "ttft_p90_ms", "TTFT p90 (ms)")
    )
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        name = "/".join(str(row[k]) for k in ("deployment", "layout", "mix") if k in row)
        xs, ys = series.setdefault(name, ([], []))
        xs.append(row[x_key])
        ys.append(row[y_key])
    write_png(
        path,
        f"scale lab: {scenario}, {host['cores']} cores, {host['date']}",
        x_key,
        series,
        y_label,
    )


async def main(args: argparse.Namespace) -> None:
    """Run one scenario over every target, print the table and write JSON and PNG."""
    args.model_dir = prepare_bundled_model(Path(args.home))
    spec = spec_from(args)
    log_dir = Path(tempfile.mkdtemp(prefix="stagemesh-scale-"))
    print(
        f"scale lab: {args.scenario} on {', '.join(args.target)}, {spec.describe()}; logs in "
        f"{log_dir}",
        flush=True,
    )
    rows = await SCENARIOS[args.scenario](args, spec, log_dir)
    print()
    print_table(rows, [c for c in COLUMNS if any(c[0] in row for row in rows)])
    measured_steps = args.scenario != "control-plane"
    if measured_steps:
        print_cpu(rows)
    host = {
        "cores": len(allowed_cores()),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "png", "model_dir")}
    if args.json:
        write_json(
            Path(args.json),
            {"host": host, "spec": spec.__dict__, "settings": settings, "rows": rows},
        )
    if args.png and measured_steps:
        plot(Path(args.png), args.scenario, rows, host)


if __name__ == "__main__":
    try:  # uvloop, where installed, halves the client's CPU per chunk
        import uvloop

        uvloop.run(main(parse_args()))
    except ImportError:
        asyncio.run(main(parse_args()))
