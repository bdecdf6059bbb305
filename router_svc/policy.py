"""How the router picks a worker among the usable members of a role.

Three policies, chosen with ``--router-policy``:

- ``round_robin``: in turn, blind to load and cache (the baseline);
- ``least_load``: least queued work, then KV-cache use;
- ``kv_aware`` (default): the lowest cost, where cost is the prompt tokens the worker
  would have to compute (those in blocks it does not already hold, per the KV index)
  plus ``--kv-load-weight`` tokens for every request queued or running there. So a
  worker holding a long prefix wins unless it is that much busier. Both terms are in
  tokens, so the balance does not shift with the engines' KV block size. A worker whose queue
  reaches ``--kv-max-queue`` is passed over for the least-loaded one while any is
  below it, so a hot prefix cannot pile everything onto one worker.

Every pick comes with a reason, counted in ``stagemesh_router_decisions_total``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter

from router_svc.kv_index import KvIndex
from router_svc.workers import Peer

POLICIES = ("round_robin", "least_load", "kv_aware")

DECISIONS = Counter(
    "stagemesh_router_decisions_total",
    "Worker choices, by policy, role and the reason for the choice",
    ["policy", "role", "reason"],
)


@dataclass(frozen=True)
class Choice:
    peer: Peer
    #: Leading prompt blocks the chosen worker holds (0 when unknown).
    matched_blocks: int
    reason: str


class Policy(Protocol):
    name: str

    def choose(self, candidates: list[Peer], hashes: list[int]) -> Choice:
        """Pick one of ``candidates`` (non-empty, least loaded first) for a prompt's block hashes."""


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: list[Peer], hashes: list[int]) -> Choice:
        ordered = sorted(candidates, key=lambda p: p.key)
        return Choice(ordered[next(self._turn) % len(ordered)], 0, "round_robin")


class LeastLoad:
    name = "least_load"

    def choose(self, candidates: list[Peer], hashes: list[int]) -> Choice:
        return Choice(candidates[0], 0, "least_load")


class KvAware:
    name = "kv_aware"

    def __init__(self, index: KvIndex, load_weight: float, max_queue: int) -> None:
        self.index = index
        self.load_weight = load_weight
        self.max_queue = max_queue

    def choose(self, candidates: list[Peer], hashes: list[int]) -> Choice:
        matched = self.index.match(hashes, [p.key for p in candidates])
        best_match = max(matched.values(), default=0)
        if best_match == 0:
            return Choice(candidates[0], 0, "least_load_no_prefix")
        roomy = [p for p in candidates if p.queued() < self.max_queue]
        if not roomy:
            return Choice(candidates[0], matched[candidates[0].key], "all_overloaded")

        def cost(peer: Peer) -> float:
            uncached = (len(hashes) - matched[peer.key]) * peer.member.kv_block_size
            return uncached + self.load_weight * peer.queued()

        chosen = min(roomy, key=cost)  # candidates come least loaded first: ties go to the idler
        reason = "prefix_hit" if matched[chosen.key] == best_match else "load_over_prefix"
        if len(roomy) < len(candidates) and matched[chosen.key] < best_match:
            reason = "overloaded_fallback"
        return Choice(chosen, matched[chosen.key], reason)


def make_policy(name: str, index: KvIndex, load_weight: float, max_queue: int) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "kv_aware":
        return KvAware(index, load_weight, max_queue)
    raise ValueError(f"unknown router policy {name!r}; choose one of {', '.join(POLICIES)}")
