"""How the router picks a worker among the usable members of a role.

Three policies, chosen with ``--router-policy``, each registered once in
:data:`POLICIES` (which the setting's choices and help, and the benchmarks, read):

- ``round_robin``: in turn, blind to load and cache (the baseline);
- ``least_load``: least queued work, then KV-cache use;
- ``kv_aware`` (default): the lowest cost, where cost is the prompt tokens the worker
  would have to compute (those in blocks it does not already hold, per the KV index)
  plus ``--kv-load-weight`` tokens for every unit of load there (and one more when a
  LoRA adapter's request would wait there for an adapter slot). A unit is a request
  waiting for a batch slot, or a running request on an engine with a 32-sequence
  batch; on a wider engine a running request counts its share of 32 (``Peer.load_units``:
  an accelerator running 256 sequences is barely slowed by 20 of them). So a worker
  holding a long prefix wins unless it is that much busier. Both terms are in tokens,
  so the balance does not shift with the engines' KV block size. A worker whose load
  reaches ``--kv-max-queue`` units is passed over for the least-loaded one while any is
  below it, so a hot prefix cannot pile everything onto one worker. Blocks in the
  mesh's KV store count as held by every prefill worker that uses the store (its
  member label ``kvstore=on``): loading them costs a NIXL read, not a forward pass.

Every pick comes with a reason, counted in ``stagemesh_router_decisions_total``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from services.config import SettingError
from services.pb import common_pb2

if TYPE_CHECKING:  # the router's config reads the registry: it imports nothing of the router's
    from router_svc.config import RoutingSettings
    from router_svc.kv_index import KvIndex
    from router_svc.workers import Peer


@dataclass(frozen=True)
class Choice:
    """A policy's pick, with why (the reason label of the decisions counter)."""

    peer: Peer
    #: Leading prompt blocks the chosen worker holds (0 when unknown).
    matched_blocks: int
    reason: str


class Policy(Protocol):
    """What the dispatcher asks of every policy: one pick among usable workers."""

    name: str

    def choose(self, candidates: list[Peer], hashes: list[int], model: str = "") -> Choice:
        """Pick one of ``candidates`` (non-empty, least loaded first) for a prompt's block
        hashes, for a request naming ``model`` (a LoRA adapter may wait for a slot)."""


class RoundRobin:
    """In turn, blind to load and cache: the baseline the others are measured against."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: list[Peer], hashes: list[int], model: str = "") -> Choice:
        ordered = sorted(candidates, key=lambda p: p.key)
        return Choice(ordered[next(self._turn) % len(ordered)], 0, "round_robin")


class LeastLoad:
    """The least loaded worker (candidates come sorted by load), blind to the cache."""

    name = "least_load"

    def choose(self, candidates: list[Peer], hashes: list[int], model: str = "") -> Choice:
        return Choice(candidates[0], 0, "least_load")


def uses_store(peer: Peer) -> bool:
    """Whether the worker loads prefixes from the KV store (prefill engines with --kvstore)."""
    return peer.role == common_pb2.ROLE_PREFILL and peer.member.labels.get("kvstore") == "on"


class KvAware:
    """The lowest cost in prompt tokens: uncached tokens plus weighed load (module doc)."""

    name = "kv_aware"

    def __init__(
        self,
        index: KvIndex,
        load_weight: float,
        max_queue: int,
        stores: Callable[[], list[str]] = list,
    ) -> None:
        self.index = index
        self.load_weight = load_weight
        self.max_queue = max_queue
        #: Index keys of the KV stores in the mesh now.
        self.stores = stores

    def choose(self, candidates: list[Peer], hashes: list[int], model: str = "") -> Choice:
        stores = self.stores()
        matched = self.index.match(hashes, [p.key for p in candidates] + stores)
        in_store = max((matched.pop(key) for key in stores), default=0)
        from_store = set()
        for p in candidates:
            if in_store > matched[p.key] and uses_store(p):
                matched[p.key] = in_store
                from_store.add(p.key)
        best_match = max(matched.values(), default=0)
        if best_match == 0:
            return Choice(candidates[0], 0, "least_load_no_prefix")
        roomy = [p for p in candidates if p.load_units() < self.max_queue]
        if not roomy:
            return Choice(candidates[0], matched[candidates[0].key], "all_overloaded")

        def cost(peer: Peer) -> float:
            uncached = (len(hashes) - matched[peer.key]) * peer.member.kv_block_size
            return uncached + self.load_weight * (peer.load_units() + peer.slot_wait(model))

        chosen = min(roomy, key=cost)  # candidates come least loaded first: ties go to the idler
        reason = "prefix_hit" if matched[chosen.key] == best_match else "load_over_prefix"
        if reason == "prefix_hit" and chosen.key in from_store:
            reason = "store_prefix_hit"
        if len(roomy) < len(candidates) and matched[chosen.key] < best_match:
            reason = "overloaded_fallback"
        return Choice(chosen, matched[chosen.key], reason)


#: Builds a policy from the routing settings, the KV index and the KV stores' index keys.
Builder = Callable[["RoutingSettings", "KvIndex", Callable[[], list[str]]], Policy]


@dataclass(frozen=True)
class Registered:
    """A policy as ``--router-policy`` names it: a line for the help, and its builder."""

    summary: str
    build: Builder


#: Every routing policy, by name: the one list ``--router-policy`` (its choices and help),
#: :func:`make_policy` and the benchmarks (bench.policies, bench.scale) read.
POLICIES: dict[str, Registered] = {
    "round_robin": Registered(
        "in turn, blind to load and cache (the baseline)", lambda *_: RoundRobin()
    ),
    "least_load": Registered("least queued work, then KV-cache use", lambda *_: LeastLoad()),
    "kv_aware": Registered(
        "fewest prompt tokens to compute, plus --kv-load-weight tokens per unit of load",
        lambda settings, index, stores: KvAware(
            index, settings.kv_load_weight, settings.kv_max_queue, stores
        ),
    ),
}


def make_policy(
    settings: RoutingSettings, index: KvIndex, stores: Callable[[], list[str]] = list
) -> Policy:
    """The policy ``--router-policy`` names, over the router's KV index."""
    registered = POLICIES.get(settings.policy)
    if registered is None:
        raise SettingError(
            f"--router-policy: no policy {settings.policy!r}; choose one of {', '.join(POLICIES)}"
        )
    return registered.build(settings, index, stores)
