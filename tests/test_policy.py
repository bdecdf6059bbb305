"""Routing policies (pure logic over a KV index and load figures): kv_aware follows
the longest held prefix unless the holder is much busier or overloaded; the
baselines ignore the cache."""

from __future__ import annotations

import pytest

from router_svc.affinity import SessionAffinity
from router_svc.config import RoutingSettings
from router_svc.kv_index import KvIndex
from router_svc.policy import (
    POLICIES,
    STORE_BLOCK_PRIOR,
    KvAware,
    LeastLoad,
    RoundRobin,
    make_policy,
    store_block_tokens,
)
from router_svc.tool_parsers import ParserChoice
from router_svc.workers import Peer
from services.config import SettingError
from services.kv.hashing import chain_hashes, to_wire
from services.pb import common_pb2, engine_pb2
from services.smoothing import CounterRate, MovingMean

pytestmark = pytest.mark.unit

BLOCK = 4
PROMPT = list(range(40))  # 10 blocks


def peer(key: str, queued: int) -> Peer:
    member = common_pb2.Member(instance_id=key, role=common_pb2.ROLE_DECODE, kv_block_size=BLOCK)
    return Peer(key, member, client=None, load=engine_pb2.Load(running_requests=queued))  # type: ignore[arg-type]


def index_with(holdings: dict[str, int]) -> KvIndex:
    """An index where each worker holds the prompt's first N blocks."""
    index = KvIndex()
    for key, blocks in holdings.items():
        ids = PROMPT[: blocks * BLOCK]
        index.stored(
            key,
            common_pb2.BlockStored(
                block_hashes=[f"{key}{i}".encode() for i in range(blocks)],
                token_ids=ids,
                block_size=BLOCK,
            ),
        )
    return index


def test_kv_aware_prefers_the_prefix_holder() -> None:
    hashes = chain_hashes(PROMPT, BLOCK)
    a, b = peer("a", 0), peer("b", 1)
    choice = KvAware(index_with({"b": 8}), load_weight=4.0 * BLOCK, max_queue=8).choose(
        [a, b], hashes
    )
    assert (choice.peer.key, choice.matched_blocks, choice.reason) == ("b", 8, "prefix_hit")


def test_kv_aware_weighs_load_against_prefix() -> None:
    hashes = chain_hashes(PROMPT, BLOCK)
    a, b = (
        peer("a", 0),
        peer("b", 3),
    )  # b saves 2 blocks but has 3 more requests (12 blocks' worth of tokens)
    choice = KvAware(index_with({"b": 2}), load_weight=4.0 * BLOCK, max_queue=8).choose(
        [a, b], hashes
    )
    assert (choice.peer.key, choice.reason) == ("a", "load_over_prefix")


def test_kv_aware_falls_back_when_the_holder_is_overloaded() -> None:
    hashes = chain_hashes(PROMPT, BLOCK)
    a, b = peer("a", 2), peer("b", 8)
    choice = KvAware(index_with({"b": 10}), load_weight=0.0, max_queue=8).choose([a, b], hashes)
    assert (choice.peer.key, choice.reason) == ("a", "overloaded_fallback")
    everyone_busy = KvAware(index_with({"b": 10}), load_weight=0.0, max_queue=1).choose(
        [a, b], hashes
    )
    assert everyone_busy.reason == "all_overloaded"


def test_kv_aware_without_any_prefix_is_least_load() -> None:
    a, b = peer("a", 0), peer("b", 0)
    choice = KvAware(KvIndex(), 4.0 * BLOCK, 8).choose([a, b], chain_hashes(PROMPT, BLOCK))
    assert (choice.peer.key, choice.reason) == ("a", "least_load_no_prefix")


def test_baselines_ignore_the_cache() -> None:
    a, b = peer("a", 0), peer("b", 5)
    hashes = chain_hashes(PROMPT, BLOCK)
    assert LeastLoad().choose([a, b], hashes).peer.key == "a"
    turns = RoundRobin()
    assert [turns.choose([b, a], hashes).peer.key for _ in range(4)] == ["a", "b", "a", "b"]


def test_session_affinity_expires_and_is_capped() -> None:
    now = [0.0]
    affinity = SessionAffinity(ttl=10, capacity=2, clock=lambda: now[0])
    affinity.remember("alice", common_pb2.ROLE_DECODE, "w1")
    affinity.remember("alice", common_pb2.ROLE_PREFILL, "p1")
    assert affinity.get("alice", common_pb2.ROLE_DECODE) == "w1"
    assert affinity.get("alice", common_pb2.ROLE_PREFILL) == "p1"  # roles pin apart
    assert affinity.get("", common_pb2.ROLE_DECODE) is None  # no key, no affinity
    now[0] = 11
    assert affinity.get("alice", common_pb2.ROLE_DECODE) is None  # expired
    affinity.remember("bob", common_pb2.ROLE_DECODE, "w2")
    affinity.remember("carol", common_pb2.ROLE_DECODE, "w1")
    assert len(affinity) == 2 and affinity.get("bob", common_pb2.ROLE_DECODE) == "w2"
    affinity.remember(
        "dave", common_pb2.ROLE_DECODE, "w2"
    )  # over capacity: bob, least recent, goes
    assert affinity.get("bob", common_pb2.ROLE_DECODE) is None
    assert affinity.get("carol", common_pb2.ROLE_DECODE) == "w1"
    assert SessionAffinity(ttl=0, capacity=9).get("bob", common_pb2.ROLE_DECODE) is None


def prefill(
    key: str,
    queued: int,
    store: str,
    per_token: float = 0.0,
    role: common_pb2.Role = common_pb2.ROLE_PREFILL,
) -> Peer:
    """A prefill worker (or one of ``role``) with the KV store ``on`` or ``off``, whose
    prefill costs ``per_token`` seconds a token (0: not measured yet)."""
    member = common_pb2.Member(
        instance_id=key,
        role=role,
        kv_block_size=BLOCK,
        labels={"kvstore": store},
    )
    load = engine_pb2.Load(running_requests=queued, prefill_seconds_per_token=per_token)
    return Peer(key, member, client=None, load=load)  # type: ignore[arg-type]


def with_store(index: KvIndex, blocks: int) -> KvIndex:
    """``index`` with the KV store (key "store") holding the prompt's first N blocks."""
    hashes = chain_hashes(PROMPT, BLOCK)[:blocks]
    names = [to_wire(h) for h in hashes]
    index.stored("store", common_pb2.BlockStored(block_hashes=names, chain_names=names))
    return index


def test_kv_aware_counts_store_blocks_for_workers_that_use_the_store() -> None:
    """The KV store's events carry chain hashes; its blocks are usable by every worker
    with the store on (prefill engines, decode engines with --kvstore-decode), and by no
    other worker."""
    hashes = chain_hashes(PROMPT, BLOCK)
    index = with_store(index_with({"a": 2}), 8)
    policy = KvAware(index, load_weight=4.0 * BLOCK, max_queue=8, stores=lambda: {"store": 0.0})
    a, b = prefill("a", 0, "off"), prefill("b", 1, "on")
    choice = policy.choose([a, b], hashes)
    assert (choice.peer.key, choice.matched_blocks, choice.reason) == ("b", 8, "store_prefix_hit")
    # Without the store the holder of two blocks wins.
    assert KvAware(index, 4.0 * BLOCK, 8).choose([a, b], hashes).peer.key == "a"
    decoding, plain = (
        prefill(key, 1, store, role=common_pb2.ROLE_DECODE)
        for key, store in (("d", "on"), ("e", "off"))
    )
    choice = policy.choose([a, plain, decoding], hashes)
    assert (choice.peer.key, choice.matched_blocks, choice.reason) == ("d", 8, "store_prefix_hit")


def test_an_engine_hit_beats_a_store_hit_beats_a_recompute() -> None:
    """Equal loads, the same eight blocks: held by the engine itself, loadable from the
    store, or nowhere. Each tier wins over the one below it, whichever comes first."""
    hashes = chain_hashes(PROMPT, BLOCK)
    index = with_store(index_with({"own": 8}), 8)
    policy = KvAware(index, load_weight=4.0 * BLOCK, max_queue=8, stores=lambda: {"store": 0.0})
    own, loader, cold = (
        prefill("own", 0, "on"),
        prefill("loader", 0, "on"),
        prefill("cold", 0, "off"),
    )
    choice = policy.choose([cold, loader, own], hashes)
    assert (choice.peer.key, choice.matched_blocks, choice.reason) == ("own", 8, "prefix_hit")
    choice = policy.choose([cold, loader], hashes)
    assert (choice.peer.key, choice.matched_blocks, choice.reason) == (
        "loader",
        8,
        "store_prefix_hit",
    )
    costs = policy.prefixes([cold, loader, own], hashes)
    assert costs["own"].cost < costs["loader"].cost < costs["cold"].cost
    # Before anything is measured, a store block counts the prior share of a block.
    assert costs["loader"].cost == 2 * BLOCK + 8 * STORE_BLOCK_PRIOR * BLOCK


def test_the_measured_load_time_moves_the_choice() -> None:
    """A worker holding 6 blocks itself against one that can load all 10 from the store:
    the store's measured seconds per block, over the engines' prefill seconds per token,
    decide. A slow store loses to the shorter engine hit (which is then the cheapest
    prefix, so a prefix_hit); a fast one wins."""
    hashes = chain_hashes(PROMPT, BLOCK)
    index = with_store(index_with({"own": 6}), 10)
    # own has no store (with it, it would load the 4 blocks it lacks too).
    own, loader = prefill("own", 0, "off", per_token=0.001), prefill("loader", 0, "on", 0.001)
    seconds = {"store": 0.0}
    policy = KvAware(index, load_weight=4.0 * BLOCK, max_queue=8, stores=lambda: seconds)
    # own computes 4 blocks (16 tokens); loader computes none and loads all 10.
    seconds["store"] = 0.002  # 2 tokens of compute per block: 20 > 16
    assert store_block_tokens(loader, seconds["store"]) == pytest.approx(2.0)
    choice = policy.choose([loader, own], hashes)
    assert (choice.peer.key, choice.matched_blocks, choice.reason) == ("own", 6, "prefix_hit")
    seconds["store"] = 0.0002  # 0.2 tokens per block: 2 < 16
    choice = policy.choose([own, loader], hashes)
    assert (choice.peer.key, choice.matched_blocks, choice.reason) == (
        "loader",
        10,
        "store_prefix_hit",
    )
    # The mean of the stores that measured anything; one not measured yet is left out.
    seconds["idle-store"] = 0.0
    assert policy.choose([own, loader], hashes).peer.key == "loader"


def test_blocks_spread_over_several_stores_make_one_stored_prefix() -> None:
    """The stores split a chain's blocks by hash (a shard ring): the stored prefix runs
    while each block is in some store, not only as far as one store's own run."""
    hashes = chain_hashes(PROMPT, BLOCK)
    index = KvIndex()
    for i, chain in enumerate(hashes[:8]):
        name = [to_wire(chain)]
        index.stored(f"store{i % 2}", common_pb2.BlockStored(block_hashes=name, chain_names=name))
    policy = KvAware(index, 4.0 * BLOCK, 8, stores=lambda: {"store0": 0.0, "store1": 0.0})
    choice = policy.choose([prefill("cold", 0, "off"), prefill("loader", 0, "on")], hashes)
    assert (choice.peer.key, choice.matched_blocks, choice.reason) == (
        "loader",
        8,
        "store_prefix_hit",
    )


def test_a_store_load_never_costs_more_than_recomputing() -> None:
    """However slow the store, a block loaded from it counts at most its tokens: a
    worker that uses the store is never ranked below one that would compute the same
    blocks (the engine would rather compute than wait on such a load)."""
    hashes = chain_hashes(PROMPT, BLOCK)
    loader, cold = prefill("loader", 0, "on", per_token=0.001), prefill("cold", 0, "off", 0.001)
    assert store_block_tokens(loader, 10.0) == BLOCK
    assert store_block_tokens(loader, 0.0) == STORE_BLOCK_PRIOR * BLOCK  # store not measured
    assert store_block_tokens(prefill("new", 0, "on"), 0.002) == STORE_BLOCK_PRIOR * BLOCK
    policy = KvAware(with_store(KvIndex(), 10), 4.0 * BLOCK, 8, stores=lambda: {"store": 10.0})
    costs = policy.prefixes([loader, cold], hashes)
    assert costs["loader"].cost == costs["cold"].cost == len(hashes) * BLOCK


def test_a_stores_load_time_follows_its_counters() -> None:
    """The router's per-block time of a store: the growth of its load counters between
    polls, smoothed; a poll without loads keeps it, a restarted store counts afresh."""
    rate = CounterRate(0.5)
    assert rate.value == 0.0
    rate.update(2.0, 100)  # the first poll: the mean since the store started
    assert rate.value == pytest.approx(0.02)
    rate.update(2.0, 100)
    assert rate.value == pytest.approx(0.02)
    rate.update(3.0, 200)  # 0.01 s a block since: halfway there
    assert rate.value == pytest.approx(0.015)
    rate.update(0.5, 10)  # restarted: 0.05 s a block since it came back
    assert rate.value == pytest.approx(0.0325)
    with pytest.raises(ValueError):
        MovingMean(0.0)


def test_a_full_set_of_adapter_slots_counts_as_one_more_request() -> None:
    """An engine whose LoRA slots are all taken by other adapters makes a request for a
    new adapter wait for one: in the rank and in the KV-aware cost alike."""

    def lora_peer(key: str, queued: int, active: list[str]) -> Peer:
        member = common_pb2.Member(
            instance_id=key,
            role=common_pb2.ROLE_DECODE,
            kv_block_size=BLOCK,
            models=["base"],
            adapter_slots=1,
            adapters=[common_pb2.Adapter(name=name, parent="base") for name in ("x", "y")],
        )
        load = engine_pb2.Load(running_requests=queued, active_adapters=active)
        return Peer(key, member, client=None, load=load)  # type: ignore[arg-type]

    busy, other = lora_peer("a", 1, ["x"]), lora_peer("b", 1, ["y"])
    assert (busy.slot_wait("y"), busy.slot_wait("x"), busy.slot_wait("base")) == (1, 0, 0)
    assert busy.rank("y") > other.rank("y") and busy.rank("x") < other.rank("x")
    hashes = chain_hashes(PROMPT, BLOCK)
    policy = KvAware(index_with({"a": 2, "b": 2}), load_weight=4.0 * BLOCK, max_queue=8)
    assert policy.choose([busy, other], hashes, "y").peer.key == "b"
    assert policy.choose([other, busy], hashes, "x").peer.key == "a"


def test_kv_aware_weighs_running_requests_by_the_engines_batch() -> None:
    """Twenty running requests pass an engine that runs 32 at once over its queue limit;
    on one that runs 256 they are a fraction of its batch, and its prefix still wins."""
    hashes = chain_hashes(PROMPT, BLOCK)
    idle, busy = peer("a", 0), peer("b", 20)
    policy = KvAware(index_with({"b": 10}), load_weight=1.0, max_queue=8)
    busy.member.max_concurrency = 32
    assert policy.choose([idle, busy], hashes).peer.key == "a"
    busy.member.max_concurrency = 256
    assert busy.load_units() == 20 * 32 / 256
    assert (
        policy.choose([idle, busy], hashes).peer.key,
        policy.choose([idle, busy], hashes).reason,
    ) == ("b", "prefix_hit")
    busy.load = engine_pb2.Load(
        running_requests=20, waiting_requests=3
    )  # 3 wait for a slot: full units
    assert busy.load_units() == 3 + 20 * 32 / 256


def test_a_load_report_does_not_count_calls_that_ended_since() -> None:
    """The holder's last report still shows the request that just finished there; the
    router knows it ended, so the next request with its prefix goes there anyway."""
    hashes = chain_hashes(PROMPT, BLOCK)
    idle, holder = peer("a", 0), peer("b", 1)
    policy = KvAware(index_with({"b": 8}), load_weight=100.0 * BLOCK, max_queue=8)
    assert (
        policy.choose([idle, holder], hashes).peer.key == "a"
    )  # one request there outweighs the prefix
    holder.ended_since_report = 1
    assert holder.queued() == 0
    assert policy.choose([idle, holder], hashes).peer.key == "b"


def test_every_registered_policy_builds_under_its_name() -> None:
    """The registry is the one list: each name builds the policy of that name, and a name
    it lacks is a SettingError naming the flag and the choices."""
    for name in POLICIES:
        assert make_policy(RoutingSettings(policy=name), KvIndex()).name == name
    with pytest.raises(SettingError, match="--router-policy: no policy 'fastest'; choose one of"):
        make_policy(RoutingSettings(policy="fastest"), KvIndex())


def test_an_unknown_tool_call_parser_names_its_setting() -> None:
    """A parser name from code, not flags, still fails naming the flag it would be."""
    with pytest.raises(SettingError, match="--tool-call-parsers m: no tool-call parser 'xml'"):
        ParserChoice("hermes", {"m": "xml"})
