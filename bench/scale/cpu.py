"""CPU seconds per process group, read from /proc before and after a measured step.

A deployment names its processes by role (``Deployment.process_groups()``); each role's
pids are widened to their live descendants (an engine stage's own children, a frontend's
helpers), and the difference of two readings is what the role spent during the step.
The client's own CPU is measured apart, in its process (``bench.scale.client``).
"""

from __future__ import annotations

from bench.vs_vllm import descendants
from services.operator.launcher import cpu_seconds


def read_groups(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group's processes and their descendants."""
    return {
        name: cpu_seconds(sorted({d for pid in pids for d in descendants(pid)}))
        for name, pids in groups.items()
    }


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each group spent between two readings (a group that lost a process
    can read lower after; that shows as zero, not as a negative)."""
    return {name: max(0.0, after[name] - before.get(name, 0.0)) for name in after}


def per_unit(cpu: dict[str, float], requests: int, tokens: int) -> dict[str, float]:
    """Each group's CPU in ms per request and per output token."""
    figures: dict[str, float] = {}
    for name, seconds in cpu.items():
        figures[f"{name}_cpu_s"] = seconds
        figures[f"{name}_cpu_ms_per_request"] = seconds * 1000 / requests if requests else 0.0
        figures[f"{name}_cpu_ms_per_token"] = seconds * 1000 / tokens if tokens else 0.0
    return figures
