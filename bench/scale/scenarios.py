"""The scale lab's scenarios: each builds deployments, drives them, and returns rows.

A row is one measured step of one deployment: the client's summary
(``bench.scale.client.summarize``) plus the CPU each of the deployment's process groups
spent in that step, per request and per output token (``bench.scale.cpu``).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bench.scale.client import Run, closed_loop, open_loop, summarize
from bench.scale.cpu import per_unit, read_groups, spent
from bench.scale.deploy import Deployment, EngineSpec
from bench.scale.workload import PdMix, TenantWorkload, stream_prompts

MODEL = "SmolLM2-135M-Instruct"
Row = dict[str, Any]


def build(
    target: str, spec: EngineSpec, policy: str, args: argparse.Namespace, log_dir: Path
) -> Deployment:
    """The deployment of ``target`` with ``spec``'s engines behind ``policy``'s router.

    Policy names are stagemesh's (``kv_aware``, ``least_load``, ``round_robin``, plus
    ``random``); each target maps them to its own router's modes. ``stagemesh:N`` runs
    the router with ``--workers N``."""
    if target == "dynamo":
        from bench.scale.dynamo import DynamoDeployment

        return DynamoDeployment(
            spec, policy, args.model_dir, MODEL, log_dir, kv_transfer_gbps=args.kv_transfer_gbps
        )
    name, _, workers = target.partition(":")
    if name == "stagemesh" and (not workers or workers.isdigit()):
        from bench.scale.mesh import MeshDeployment

        return MeshDeployment(
            spec,
            policy,
            args.model_dir,
            MODEL,
            log_dir,
            Path(args.home),
            kv_transfer_gbps=args.kv_transfer_gbps,
            router_workers=int(workers or 1),
        )
    raise SystemExit(f"unknown target {target!r} (dynamo, stagemesh, stagemesh:N)")


async def measure(
    deployment: Deployment, drive: Callable[[str], Awaitable[Run]], **labels: Any
) -> Row:
    """One step: CPU of every process group before and after ``drive(base_url)``."""
    before = read_groups(deployment.process_groups())
    run = await drive(deployment.base_url)
    after = read_groups(deployment.process_groups())
    row: Row = {"deployment": deployment.name, **labels, **summarize(run)}
    row.update(per_unit(spent(before, after), row["ok"], row["output_tokens"]))
    print(
        f"   {deployment.name} {labels}: {row['ok']}/{row['requests']} ok, "
        f"{row['output_tps']:.0f} tok/s, "
        f"TTFT p90 {row['ttft_p90_ms']:.0f} ms, hit {row['hit_rate']:.0%}, "
        f"client {row['client_core_share']:.0%} of a core",
        flush=True,
    )
    return row


def targets_and_policies(args: argparse.Namespace) -> Iterable[tuple[str, str]]:
    """Every (target, policy) pair the run compares, targets outermost."""
    for target in args.target:
        for policy in args.policies:
            yield target, policy


async def routing(args: argparse.Namespace, spec: EngineSpec, log_dir: Path) -> list[Row]:
    """llm-d's multi-tenant workload over a QPS ramp, per target and router policy. Every
    deployment starts fresh (cold caches) and gets the same requests."""
    workload = TenantWorkload(
        tenants=args.tenants,
        prefix_tokens=args.prefix_tokens,
        query_tokens=args.query_tokens,
        output_tokens=args.output_tokens,
        qps=tuple(args.qps),
        step_seconds=args.step_seconds,
        seed=args.seed,
        text=args.text,
    )
    rows = []
    for target, policy in targets_and_policies(args):
        async with build(target, spec, policy, args, log_dir) as deployment:
            for rate, schedule in workload.steps(deployment.model):
                rows.append(
                    await measure(deployment, partial(open_loop, schedule=schedule), qps=rate)
                )
    return rows


async def pd(args: argparse.Namespace, spec: EngineSpec, log_dir: Path) -> list[Row]:
    """Disaggregated (``--prefill`` P + ``--engines`` D) against aggregated serving on the
    same number of engines, on a prefill-heavy and a decode-heavy mix."""
    prefill = args.prefill or max(1, spec.engines // 4)
    layouts = {
        "aggregated": replace(spec, prefill=0),
        "pd": replace(spec, prefill=prefill, engines=max(1, spec.engines - prefill)),
    }
    rows = []
    for target, policy in targets_and_policies(args):
        for layout, layout_spec in layouts.items():
            async with build(target, layout_spec, policy, args, log_dir) as deployment:
                for mix in args.mixes:
                    workload = PdMix(mix, tuple(args.qps), args.step_seconds, args.seed, args.text)
                    for rate, schedule in workload.steps(deployment.model):
                        rows.append(
                            await measure(
                                deployment,
                                partial(open_loop, schedule=schedule),
                                layout=layout,
                                mix=mix,
                                qps=rate,
                            )
                        )
    return rows


async def token_path(args: argparse.Namespace, spec: EngineSpec, log_dir: Path) -> list[Row]:
    """N concurrent streams back to back (short prompts, long outputs): tokens per second
    delivered and the CPU every process spends per token."""
    rows = []
    for target, policy in targets_and_policies(args):
        async with build(target, spec, policy, args, log_dir) as deployment:
            for streams in args.streams:
                requests = stream_prompts(
                    deployment.model,
                    max(streams, 64),
                    args.stream_prompt_tokens,
                    args.stream_output_tokens,
                    args.seed,
                    chat=args.chat,
                )
                drive = partial(
                    closed_loop, requests=requests, streams=streams, duration=args.step_seconds
                )
                rows.append(await measure(deployment, drive, streams=streams))
    return rows


async def control_plane(args: argparse.Namespace, spec: EngineSpec, log_dir: Path) -> list[Row]:
    """Membership reaction, load-poll cost, KV-index decisions: stagemesh's own control
    plane (bench/scale/control.py)."""
    if args.target != ["stagemesh"]:
        raise SystemExit(
            "the control-plane scenario measures stagemesh's members: --target stagemesh"
        )
    from bench.scale.control import control_plane as measure_control_plane

    return await measure_control_plane(args, spec, log_dir)


SCENARIOS: dict[str, Callable[[argparse.Namespace, EngineSpec, Path], Awaitable[list[Row]]]] = {
    "routing": routing,
    "peer": routing,
    "pd": pd,
    "token-path": token_path,
    "control-plane": control_plane,
}
