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
  below it, so a hot prefix cannot pile everything onto one worker.

The tiers: a block the worker holds costs nothing; a block in the mesh's KV store,
past the worker's own prefix, costs a prefill worker that uses the store (its member
label ``kvstore=on``) ``store_block_tokens``: the tokens of compute that one block's
load is worth there, the store's measured seconds per loaded block (its Lookup plus the
reader's NIXL read, polled from its Stats) over the worker's measured prefill seconds per
token (its Load), at most a whole block. A block nobody holds costs all its tokens. So
an engine hit beats a store hit beats a recompute, and by how much follows what loads
and prefills cost on this mesh now. Until both figures are measured the weight is the
prior :data:`STORE_BLOCK_PRIOR` of a block: ``bench.kvstore`` loaded a 1,500-token
prefix in 0.37-0.70 s where recomputing it took 7.0 s (docs/results/kvstore-*.json).

Every pick comes with a reason, counted in ``stagemesh_router_decisions_total``:
``prefix_hit`` (the cheapest prefix won; ``store_prefix_hit`` when part of it loads from
the store), ``load_over_prefix`` (load outweighed a cheaper prefix elsewhere),
``overloaded_fallback``, ``all_overloaded`` and ``least_load_no_prefix``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from services.config import SettingError

#: The share of a block's tokens that loading it from the KV store counts as, until the
#: store's load time and the engine's prefill time are both measured (module doc).
STORE_BLOCK_PRIOR = 0.1
#: The KV stores in the mesh now: index key -> measured seconds per loaded block (0 until
#: measured).
Stores = Callable[[], dict[str, float]]

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
    """Whether the worker loads prefixes from the KV store (prefill engines with
    --kvstore, decode engines with --kvstore-decode too)."""
    return peer.member.labels.get("kvstore") == "on"


def store_block_tokens(peer: Peer, store_seconds: float) -> float:
    """Tokens of compute that loading one block from the KV store is worth on ``peer``:
    ``store_seconds`` per block over its prefill seconds per token, at most a block (a load
    is never dearer than recomputing: past that the engine would rather compute). The
    prior share of a block until both are measured (module doc)."""
    block = peer.member.kv_block_size
    per_token = peer.load.prefill_seconds_per_token if peer.load is not None else 0.0
    if store_seconds <= 0 or per_token <= 0:
        return STORE_BLOCK_PRIOR * block
    return min(float(block), store_seconds / per_token)


@dataclass(frozen=True)
class _Prefix:
    """What a worker holds of a prompt, and what computing the rest costs it."""

    #: Leading blocks usable there: its own, or the store's past them.
    blocks: int
    #: Of those, blocks it would load from the KV store.
    from_store: int
    #: Prompt tokens' worth of work for the prompt there: the tokens of the blocks nobody
    #: holds, plus each store block's load weighed in tokens.
    cost: float


class KvAware:
    """The lowest cost in prompt tokens: uncached tokens plus weighed load (module doc)."""

    name = "kv_aware"

    def __init__(
        self, index: KvIndex, load_weight: float, max_queue: int, stores: Stores = dict
    ) -> None:
        self.index = index
        self.load_weight = load_weight
        self.max_queue = max_queue
        #: The KV stores in the mesh now, with their measured load times.
        self.stores = stores

    def prefixes(self, candidates: list[Peer], hashes: list[int]) -> dict[str, _Prefix]:
        """Each candidate's usable prefix of the prompt and its cost (module doc)."""
        stores = self.stores()
        matched = self.index.match(hashes, [p.key for p in candidates])
        in_store = self.index.match_any(hashes, stores) if stores else 0
        measured = [seconds for seconds in stores.values() if seconds > 0]
        store_seconds = sum(measured) / len(measured) if measured else 0.0
        prefixes = {}
        for p in candidates:
            own = matched[p.key]
            loaded = in_store - own if uses_store(p) and in_store > own else 0
            uncached = (len(hashes) - own - loaded) * p.member.kv_block_size
            weight = store_block_tokens(p, store_seconds) if loaded else 0.0
            prefixes[p.key] = _Prefix(own + loaded, loaded, uncached + loaded * weight)
        return prefixes

    def choose(self, candidates: list[Peer], hashes: list[int], model: str = "") -> Choice:
        prefixes = self.prefixes(candidates, hashes)
        if max(prefix.blocks for prefix in prefixes.values()) == 0:
            return Choice(candidates[0], 0, "least_load_no_prefix")
        roomy = [p for p in candidates if p.load_units() < self.max_queue]
        if not roomy:
            return Choice(candidates[0], prefixes[candidates[0].key].blocks, "all_overloaded")

        def cost(peer: Peer) -> float:
            load = peer.load_units() + peer.slot_wait(model)
            return prefixes[peer.key].cost + self.load_weight * load

        chosen = min(roomy, key=cost)  # candidates come least loaded first: ties go to the idler
        mine = prefixes[chosen.key]
        cheapest = min(prefix.cost for prefix in prefixes.values())
        if mine.cost <= cheapest:
            reason = "store_prefix_hit" if mine.from_store else "prefix_hit"
        elif min(prefixes[p.key].cost for p in roomy) > cheapest:
            reason = "overloaded_fallback"  # the cheapest prefixes are on full workers
        else:
            reason = "load_over_prefix"
        return Choice(chosen, mine.blocks, reason)


#: Builds a policy from the routing settings, the KV index and the KV stores.
Builder = Callable[["RoutingSettings", "KvIndex", Stores], Policy]


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


def make_policy(settings: RoutingSettings, index: KvIndex, stores: Stores = dict) -> Policy:
    """The policy ``--router-policy`` names, over the router's KV index."""
    registered = POLICIES.get(settings.policy)
    if registered is None:
        raise SettingError(
            f"--router-policy: no policy {settings.policy!r}; choose one of {', '.join(POLICIES)}"
        )
    return registered.build(settings, index, stores)
