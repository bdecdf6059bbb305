"""Where each stage runs on a host: which cores an engine owns, and how many engines
a host runs and in which roles (``stagemesh up --layout``).

No torch, no vLLM: the launcher and every stage import this.

Two facts measured on CPU hosts shape the rules (docs/design.md, "Engines own their
cores"):

- An engine must own its cores outright. vLLM pins only its OpenMP compute threads; the
  stage process, EngineCore and any helper thread otherwise float over every core,
  preempt the compute threads, and every OpenMP barrier then waits for the slowest one.
  So :func:`take_cores` pins the whole process (and, through inheritance, everything it
  spawns) before vLLM starts.
- On a small host one engine with every core beats two with half each: on two cores
  (``bench.vs_vllm``) one engine gave 25.6 output tok/s on a multi-turn chat load, two
  one-core engines 17.1, and a prefill engine beside a decode engine 17.6 at twice the
  TTFT. The layout rules fold prefill into decode until a host has room for two
  full-width engines.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

#: Below this many cores the light stages (etcd, tokenizer, router, KV store) share the
#: engines' cores instead of getting one reserved: they use well under a core (the
#: router about 0.6 ms of CPU per generated token), and a core taken from a one- or
#: two-core engine costs it half or all of its speed.
RESERVE_FROM_CORES = 4
#: From RESERVE_FROM_CORES on, one core in this many goes to the light stages (at least one).
CORES_PER_LIGHT_CORE = 16
#: Cores one CPU engine is given before a host runs a second one. A small model's
#: matrix products stop scaling well past about this many threads, and two engines
#: that each have fewer cores than this lose to one engine with all of them.
CPU_ENGINE_CORES = 8
#: Host cores each GPU engine gets for its process and scheduler (the rest stay free).
GPU_ENGINE_CORES = 4
#: In a disaggregated layout, one engine in this many prefills (at least one).
ENGINES_PER_PREFILL = 4
#: Prompts shorter than this (uncached tokens) stay on the decode engine in an
#: automatic disaggregated layout: a NIXL handoff costs more than computing them.
AUTO_DISAGG_MIN_TOKENS = 256

LAYOUTS = ("auto", "aggregated", "pd")


class PlacementError(ValueError):
    """A core list or layout request this host cannot satisfy; the message says why."""


def parse_cores(spec: str) -> list[int]:
    """``"0-3,6"`` -> ``[0, 1, 2, 3, 6]`` (sorted, no repeats)."""
    cores: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise PlacementError(f"not a core list: {spec!r} (expected e.g. 0-3,6)") from None
        if low < 0 or high < low:
            raise PlacementError(f"not a core range: {part!r} in {spec!r}")
        cores.update(range(low, high + 1))
    if not cores:
        raise PlacementError(f"no cores in {spec!r}")
    return sorted(cores)


def format_cores(cores: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``: the form of ``--cpu-cores`` and of vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND``."""
    ordered = sorted(set(cores))
    ranges: list[str] = []
    start = previous = ordered[0]
    for core in [*ordered[1:], None]:
        if core is not None and core == previous + 1:
            previous = core
            continue
        ranges.append(str(start) if start == previous else f"{start}-{previous}")
        if core is not None:
            start = previous = core
    return ",".join(ranges)


def allowed_cores() -> list[int]:
    """The cores this process may run on (its affinity mask: a cgroup cpuset,
    ``taskset``, systemd's ``CPUAffinity=``)."""
    return sorted(os.sched_getaffinity(0))


def check_cores(spec: str, allowed: Sequence[int]) -> list[int]:
    """The cores ``spec`` names (every allowed core when empty); a core outside
    ``allowed`` is a :class:`PlacementError` naming both sets."""
    if not spec:
        return sorted(allowed)
    cores = parse_cores(spec)
    outside = sorted(set(cores) - set(allowed))
    if outside:
        raise PlacementError(
            f"--cpu-cores {spec}: core(s) {format_cores(outside)} are outside the cores this "
            f"process may use ({format_cores(allowed)}; set by its cpuset, taskset or "
            "CPUAffinity=)"
        )
    return cores


def take_cores(cores: Sequence[int]) -> None:
    """Pin every thread of this process to ``cores``, so that every thread and process
    started from now on (vLLM's EngineCore, OpenMP, NIXL's progress thread) inherits them.

    ``sched_setaffinity`` sets one thread's mask, so each thread that already exists
    (gRPC's, the interpreter's) is pinned by its id.
    """
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:
            continue  # the thread ended while we walked the list


def passive_omp_waits() -> None:
    """Make an engine's OpenMP threads sleep at a barrier instead of spinning there
    (``OMP_WAIT_POLICY=PASSIVE``), unless the operator chose otherwise.

    Every step of a CPU engine is a run of parallel regions, each ending at a barrier:
    the step goes at the pace of the slowest thread. A spinning thread holds its core
    while it waits, so another process on the engine's cores (the light stages below
    RESERVE_FROM_CORES, a client on the same host) keeps the slow thread waiting
    longer. Measured on two cores with one busy process beside a one-engine mesh, 4
    concurrent 600-token prompts: the slowest first token went from 5.4 s to 12.2 s
    with spinning, and to 9.5 s with passive waits (plain vLLM, whose compute sits on
    one core, 9.4 s); without that process, 5.1-5.6 s spinning and 5.0 s passive.
    libgomp reads the variable when it loads (with torch), so call this first.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclasses.dataclass(frozen=True)
class EngineSlot:
    """One engine of a layout: its role, the cores it owns and its GPU (if any)."""

    role: str  # "prefill" or "decode"
    cores: tuple[int, ...]
    gpu: int | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """What ``stagemesh up`` runs on this host, and why."""

    name: str  # "aggregated" or "pd"
    engines: tuple[EngineSlot, ...]
    #: Cores the light stages run on: reserved ones, or every core when they share.
    light_cores: tuple[int, ...]
    #: Run a KV store without being asked: prefill engines read and write it (one asked
    #: for beside decode engines alone is theirs; services/cli/plan.py).
    kvstore: bool
    #: The router's --disagg-min-tokens (None: the router's default).
    disagg_min_tokens: int | None
    reason: str

    def count(self, role: str) -> int:
        return sum(1 for engine in self.engines if engine.role == role)

    def numbered(self) -> list[tuple[int, EngineSlot]]:
        """Each engine with its index among the engines of its role (``decode-1``,
        ``stagemesh-decode@1``): the launcher and the unit names count the same way."""
        seen: dict[str, int] = {}
        numbered = []
        for engine in self.engines:
            numbered.append((seen.get(engine.role, 0), engine))
            seen[engine.role] = seen.get(engine.role, 0) + 1
        return numbered

    def describe(self) -> str:
        """One line per engine and one for the light stages, for the start banner."""
        lines = [f"layout {self.name}: {self.reason}"]
        for engine in self.engines:
            gpu = f", GPU {engine.gpu}" if engine.gpu is not None else ""
            lines.append(f"  {engine.role:<8} cores {format_cores(engine.cores)}{gpu}")
        lines.append(
            f"  {'light':<8} cores {format_cores(self.light_cores)} (etcd, tokenizer, router, KV "
            "store)"
        )
        return "\n".join(lines)


def choose_layout(
    cores: Sequence[int],
    gpus: int = 0,
    layout: str = "auto",
    prefill: int | None = None,
    decode: int | None = None,
) -> Layout:
    """The engines a host runs, their roles and cores, from its cores and GPUs.

    ``layout`` ``auto`` decides; ``aggregated`` (no prefill engines) and ``pd``
    (disaggregated) fix the shape, and ``prefill`` / ``decode`` fix the counts.
    """
    if layout not in LAYOUTS:
        raise PlacementError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    cores = sorted(cores)
    if not cores:
        raise PlacementError("this process may run on no core")
    if (prefill is not None and prefill < 0) or (decode is not None and decode < 1):
        raise PlacementError("a layout needs --decode 1 or more and --prefill 0 or more")
    reserve = 0 if len(cores) < RESERVE_FROM_CORES else max(1, len(cores) // CORES_PER_LIGHT_CORE)
    # The first cores take the kernel's interrupts and housekeeping, which light
    # stages tolerate better than an engine's OpenMP barriers do.
    light, engine_cores = cores[:reserve], cores[reserve:]
    if reserve:
        light_why = f"core(s) {format_cores(light)} reserved for the light stages"
    else:
        light_why = (
            "the light stages share the engine cores "
            f"(none is reserved below {RESERVE_FROM_CORES} cores)"
        )
    if gpus:
        fits, why = gpus, f"{gpus} GPU(s), one engine each"
    else:
        fits = max(1, len(engine_cores) // CPU_ENGINE_CORES)
        why = f"{len(cores)} cores, room for {fits} engine(s) of {CPU_ENGINE_CORES}+ cores"
    n_prefill, n_decode, why = _engine_counts(fits, why, layout, prefill, decode)
    roles = ["prefill"] * n_prefill + ["decode"] * n_decode
    return Layout(
        name="pd" if n_prefill else "aggregated",
        engines=tuple(_slots(roles, engine_cores or cores, gpus)),
        light_cores=tuple(light or cores),
        kvstore=n_prefill > 0,
        disagg_min_tokens=AUTO_DISAGG_MIN_TOKENS if layout == "auto" and n_prefill else None,
        reason=f"{why}; {light_why}",
    )


def _engine_counts(
    fits: int, why: str, layout: str, prefill: int | None, decode: int | None
) -> tuple[int, int, str]:
    """Prefill and decode engine counts for a host with room for ``fits`` engines, and
    ``why`` (the host's reason) extended with the choice."""
    if prefill is not None or decode is not None:
        if layout == "aggregated" and prefill:
            raise PlacementError("--layout aggregated runs no prefill engine; drop --prefill")
        n_prefill = prefill if prefill is not None else (0 if layout == "aggregated" else 1)
        n_decode = decode if decode is not None else 1
        return n_prefill, n_decode, f"{n_prefill} prefill and {n_decode} decode engine(s), as asked"
    if layout == "aggregated" or (layout == "auto" and fits < 2):
        if layout == "auto":
            why += "; one engine prefills and decodes (a second, on half the cores, would halve it)"
        return 0, fits, why
    total = max(2, fits)
    n_prefill = max(1, total // ENGINES_PER_PREFILL)
    n_decode = total - n_prefill
    if layout == "auto":
        why += (
            f"; disaggregated, one engine in {ENGINES_PER_PREFILL} prefills, prompts under "
            f"{AUTO_DISAGG_MIN_TOKENS} uncached tokens stay on the decode engine"
        )
    else:
        why += f"; disaggregated as asked: {n_prefill} prefill and {n_decode} decode engine(s)"
    return n_prefill, n_decode, why


def _slots(roles: list[str], engine_cores: Sequence[int], gpus: int) -> list[EngineSlot]:
    """Each engine's role, cores and GPU (one GPU each, when there are GPUs)."""
    if not gpus:
        shares = split_cores(engine_cores, len(roles))
        return [EngineSlot(role, tuple(share)) for role, share in zip(roles, shares)]
    if len(roles) > gpus:
        raise PlacementError(f"{len(roles)} engines asked for, but only {gpus} GPU(s)")
    shares = split_cores(engine_cores, len(roles), at_most=GPU_ENGINE_CORES)
    return [
        EngineSlot(role, tuple(share), gpu) for gpu, (role, share) in enumerate(zip(roles, shares))
    ]


def split_cores(cores: Sequence[int], count: int, at_most: int | None = None) -> list[list[int]]:
    """Give each of ``count`` engines its own contiguous share of ``cores`` (the last
    ones take the remainder), each at most ``at_most`` wide; with fewer cores than
    engines, engines share cores round-robin."""
    if count <= 0:
        return []
    if count > len(cores):
        return [[cores[i % len(cores)]] for i in range(count)]
    size, extra = divmod(len(cores), count)
    shares, start = [], 0
    for i in range(count):
        width = size + (1 if i >= count - extra else 0)
        shares.append(list(cores[start : start + min(width, at_most or width)]))
        start += width
    return shares


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: the
    variable's own list when it is set, else every GPU the driver lists. No CUDA
    library is loaded."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    driver = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []
