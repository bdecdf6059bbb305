"""The router's live view of the mesh: every member from etcd, a client for each, and
the load figures it routes by.

Membership comes only from the etcd watch, never from static addresses. Engines are
polled for their load once per ``load_interval``, and KV stores for their load figures
(the seconds a block takes to load from them, for the KV-aware policy); between polls
the router adds the requests it has itself sent there, so a burst does not pile onto
one worker before the next poll shows it busy. A member that refuses connections is set
aside for a few seconds (its lease may outlive it by up to a TTL after a crash). A member
that leaves is no longer picked, but the calls open on it run on: its channel closes
when they are done, or after the drain grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from router_svc.kv_subscriber import KvSubscriber
from router_svc.metrics import WORKERS
from services.aio import cancel_and_wait
from services.clients import EngineClient, KvStoreClient, TokenizerClient
from services.errors import Unavailable
from services.etcd import EtcdSession
from services.membership import MemberWatcher, role_name
from services.pb import common_pb2, engine_pb2
from services.smoothing import CounterRate

log = logging.getLogger(__name__)

#: Seconds a member that refused a connection is skipped.
DOWN_SECONDS = 3.0
#: The batch (--max-num-seqs) against which one running request counts as one unit of
#: load: a CPU engine's default, where --kv-load-weight and --kv-max-queue were tuned.
REFERENCE_BATCH = 32
#: Roles whose members run an engine (and report load).
ENGINE_ROLES = frozenset({common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE})
#: How far one poll that saw loads moves a KV store's per-block load time: the last few
#: seconds of loads count most.
STORE_LOAD_WEIGHT = 0.3


@dataclass
class Peer:
    """One member as the router uses it."""

    key: str
    member: common_pb2.Member
    client: TokenizerClient | EngineClient | KvStoreClient
    #: Latest load report (engines), None until the first poll answers.
    load: engine_pb2.Load | None = None
    #: Calls this router has open on the member.
    in_flight: int = 0
    #: Calls of this router's that ended on the member since its last load report: the
    #: report still counts them (it lags up to a poll interval).
    ended_since_report: int = 0
    #: time.monotonic() until which the member is skipped.
    down_until: float = 0.0
    #: KV stores: seconds one block takes to load from there (its Lookup and the
    #: reader's NIXL read), smoothed over polls; 0 until a poll saw a load.
    block_load: CounterRate = field(default_factory=lambda: CounterRate(STORE_LOAD_WEIGHT))
    _rank_salt: float = field(default_factory=random.random)

    @property
    def role(self) -> int:
        return int(self.member.role)

    def serves(self, model: str) -> bool:
        """Whether requests for ``model`` may come here: its base model, or a LoRA
        adapter it has loaded."""
        return (
            not model
            or model in self.member.models
            or any(a.name == model for a in self.member.adapters)
        )

    def slot_wait(self, model: str) -> int:
        """1 when a request for adapter ``model`` would wait here for an adapter slot:
        every slot is taken by other adapters running now (vLLM's max_loras)."""
        if not self.member.adapter_slots or self.load is None or model in self.member.models:
            return 0
        active = self.load.active_adapters
        return int(model not in active and len(active) >= self.member.adapter_slots)

    def queued(self) -> int:
        """Requests running or waiting there: the engine's last report less this router's
        calls that ended since, or the calls this router has open on it if that is more
        (the report lags a burst, and the end of one)."""
        if self.load is None:
            return self.in_flight
        reported = self.load.running_requests + self.load.waiting_requests - self.ended_since_report
        return max(self.in_flight, reported)

    def load_units(self) -> float:
        """Queued work in units of one request on a :data:`REFERENCE_BATCH` engine: each
        request waiting for a batch slot counts 1, each running one counts the engine's
        share of that batch. An accelerator engine that runs 256 sequences at once is
        barely slower with 20 of them running; a CPU engine that runs 32 is (the load
        weight was tuned there). Waiting is the engine's report, or more when this router
        has sent more calls than the report shows."""
        queued = self.queued()
        running = min(self.load.running_requests if self.load is not None else 0, queued)
        share = REFERENCE_BATCH / max(REFERENCE_BATCH, self.member.max_concurrency)
        return (queued - running) + running * share

    def rank(self, model: str = "") -> tuple[int, float, int, float]:
        """Sort key, least loaded first: queued work (waiting counts twice, and so does
        waiting for an adapter slot), KV-cache use, then a random tie-break."""
        waiting = self.load.waiting_requests if self.load is not None else 0
        usage = self.load.kv_cache_usage if self.load is not None else 0.0
        return (
            self.queued() + waiting + self.slot_wait(model),
            usage,
            self.in_flight,
            self._rank_salt,
        )


class Workers:
    """Members by etcd key, with clients, load polling and least-loaded picking."""

    def __init__(
        self,
        session: EtcdSession,
        control_timeout: float,
        load_interval: float,
        kv_events: KvSubscriber | None = None,
        release_after: float = 31.0,
    ) -> None:
        self._watcher: MemberWatcher[common_pb2.Member] = MemberWatcher(
            session, on_change=self._on_change
        )
        self._kv_events = kv_events
        self._control_timeout = control_timeout
        self._load_interval = load_interval
        self._release_after = release_after
        self.peers: dict[str, Peer] = {}
        self._poller: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        WORKERS.source = self.states
        self._watcher.start()
        self._poller = asyncio.create_task(self._poll_loads(), name="load poller")

    async def close(self) -> None:
        await cancel_and_wait(self._poller)
        for task in self._closing:
            task.cancel()  # each still closes its member's channel
        await self._watcher.close()
        if self._kv_events is not None:
            await self._kv_events.close()
        for peer in self.peers.values():
            await peer.client.close()
        self.peers.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _on_change(self, key: str, member: common_pb2.Member | None) -> None:
        old = self.peers.get(key)
        if old is not None and (member is None or member.grpc_address != old.member.grpc_address):
            del self.peers[key]
            task = asyncio.get_running_loop().create_task(self._release(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            old = None
        if member is None:
            log.info("member left: %s", key)
            return
        if old is not None:
            old.member = member
            return
        client: TokenizerClient | EngineClient | KvStoreClient
        if member.role == common_pb2.ROLE_TOKENIZER:
            client = TokenizerClient(member.grpc_address, self._control_timeout)
        elif member.role in ENGINE_ROLES:
            client = EngineClient(
                member.grpc_address, self._control_timeout, role_name(member.role)
            )
        elif member.role == common_pb2.ROLE_KVSTORE:
            client = KvStoreClient(member.grpc_address, self._control_timeout)  # for its KV events
        else:
            return  # other routers are listed, not called
        self.peers[key] = Peer(key, member, client)
        if self._kv_events is not None and isinstance(client, (EngineClient, KvStoreClient)):
            self._kv_events.follow(key, client)
        log.info("member joined: %s at %s", key, member.grpc_address)

    async def _release(self, peer: Peer) -> None:
        """A member left: its blocks leave the KV index at once, and it is no longer picked;
        its channel closes once the calls open on it have finished (a draining stage
        finishes its streams) or after ``release_after`` seconds."""
        try:
            if self._kv_events is not None:
                await self._kv_events.forget(peer.key)
            deadline = time.monotonic() + self._release_after
            while peer.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await peer.client.close()

    def states(self) -> dict[tuple[str, ...], int]:
        """Members by (role, ``up`` or ``down``), for the workers gauge."""
        now = time.monotonic()
        counts: dict[tuple[str, ...], int] = {}
        for peer in self.peers.values():
            state = (role_name(peer.role), "down" if peer.down_until > now else "up")
            counts[state] = counts.get(state, 0) + 1
        return counts

    def stores(self) -> dict[str, float]:
        """The KV stores in the mesh by key (their blocks are in the KV index under it),
        with the seconds a block takes to load from each (0 until measured)."""
        return {peer.key: peer.block_load.value for peer in self._store_peers()}

    def _store_peers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.role == common_pb2.ROLE_KVSTORE]

    def members(self, role: int = common_pb2.ROLE_UNSPECIFIED) -> list[common_pb2.Member]:
        """Every registered member (all roles, including those the router does not call)."""
        return [
            m
            for m in self._watcher.members.values()
            if role == common_pb2.ROLE_UNSPECIFIED or m.role == role
        ]

    def engines(self, model: str = "") -> list[Peer]:
        """Every engine member (prefill and decode) serving ``model`` (any model when
        empty), usable now or not: for views of the mesh, not for picking."""
        return [p for p in self.peers.values() if p.role in ENGINE_ROLES and p.serves(model)]

    def load_of(self, instance_id: str) -> engine_pb2.Load | None:
        for peer in self.peers.values():
            if peer.member.instance_id == instance_id:
                return peer.load
        return None

    def candidates(
        self, role: int, model: str = "", exclude: frozenset[str] = frozenset()
    ) -> list[Peer]:
        """Usable members of ``role`` serving ``model``, least loaded first."""
        now = time.monotonic()
        usable = [
            p
            for p in self.peers.values()
            if p.role == role and p.serves(model) and p.key not in exclude and p.down_until <= now
        ]
        return sorted(usable, key=lambda peer: peer.rank(model))

    async def wait_candidates(
        self, role: int, model: str, wait: float, exclude: frozenset[str] = frozenset()
    ) -> list[Peer]:
        """Usable members, least loaded first; waits up to ``wait`` s for one, then UNAVAILABLE."""
        deadline = time.monotonic() + wait
        while not (found := self.candidates(role, model, exclude)):
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"no {role_name(role)} member serving {model or 'the model'!r} is available"
                )
            await asyncio.sleep(0.1)
        return found

    async def pick(
        self, role: int, model: str, wait: float, exclude: frozenset[str] = frozenset()
    ) -> Peer:
        """The least-loaded usable member (see :meth:`wait_candidates`)."""
        return (await self.wait_candidates(role, model, wait, exclude))[0]

    def mark_down(self, peer: Peer) -> None:
        """Skip a member that refused a connection for a few seconds."""
        peer.down_until = time.monotonic() + DOWN_SECONDS
        log.warning(
            "%s at %s is unreachable; skipping it for %.0fs",
            peer.key,
            peer.member.grpc_address,
            DOWN_SECONDS,
        )

    @contextlib.asynccontextmanager
    async def using(self, peer: Peer) -> AsyncIterator[Peer]:
        """Count a call as in flight on ``peer`` while it runs."""
        peer.in_flight += 1
        try:
            yield peer
        finally:
            peer.in_flight -= 1
            peer.ended_since_report += 1

    async def _poll_loads(self) -> None:
        while True:
            await asyncio.gather(
                *(self._poll(peer) for peer in self.engines()),
                *(self._poll_store(peer) for peer in self._store_peers()),
            )
            await asyncio.sleep(self._load_interval)

    async def _poll_store(self, peer: Peer) -> None:
        """One poll of a KV store's load figures; never raises (as :meth:`_poll`). A
        failed poll keeps the last per-block time: a store's speed changes slowly."""
        assert isinstance(peer.client, KvStoreClient)
        try:
            stats = await peer.client.stats(timeout=max(self._load_interval * 2, 1.0))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as error:
            log.debug("load figures of %s not read: %s", peer.key, error)
            return
        peer.block_load.update(stats.load_seconds, stats.loaded_blocks)

    async def _poll(self, peer: Peer) -> None:
        """One load poll; never raises. A failed poll leaves the load unknown: a poller
        that died here would leave every later pick blind to load."""
        assert isinstance(peer.client, EngineClient)
        try:
            ended = peer.ended_since_report
            peer.load = await peer.client.load(timeout=max(self._load_interval * 2, 1.0))
            peer.ended_since_report -= ended  # those the report already leaves out
        except grpc.aio.AioRpcError as error:
            peer.load = None
            if error.code() == grpc.StatusCode.UNAVAILABLE and peer.down_until <= time.monotonic():
                self.mark_down(peer)
        except (
            grpc.aio.UsageError
        ):  # the member left (an etcd blip) and its channel closed mid-poll
            peer.load = None
