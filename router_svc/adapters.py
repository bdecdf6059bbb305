"""Loading and unloading LoRA adapters across the mesh, for operators and clients.

An adapter is loaded on every engine, prefill and decode alike, that serves its base
model: a disaggregated request needs it where the prompt is computed and where it
is decoded. Each engine then lists it in its member record, and that record is what
routes requests (:meth:`router_svc.workers.Peer.serves`): the router's own calls
return only once the router's view shows the change, so a request sent right after a
load finds the adapter, and none is routed to an engine after its unload began.

What was loaded at run time is also written to etcd, under
``/stagemesh/v1/adapters/<name>`` without a lease: the mesh's wanted adapters, which
outlive any router and any engine. They are sealed like member records
(:mod:`services.records`): an intent that no holder of the mesh key wrote under its
name is ignored and counted, so a process that can only write to etcd cannot make the
routers load a directory of its choosing on every engine. Every router reconciles the
engines with it: an engine of the base model that does not list a wanted adapter (it
restarted, or joined later) gets it loaded. Loads are idempotent on the engines, so several routers doing
this at once is harmless. A request for a wanted adapter that no engine has loaded
waits for that (up to ``--worker-wait``) instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc

from router_svc.catalogue import Catalogue
from router_svc.workers import Peer, Workers
from services import credentials
from services.aio import cancel_and_wait
from services.clients import EngineClient
from services.errors import (
    AlreadyExists,
    InvalidRequest,
    ModelNotFound,
    StageError,
    Unavailable,
    from_rpc_error,
)
from services.etcd import EtcdSession
from services.membership import ROOT, MemberWatcher
from services.pb import common_pb2

log = logging.getLogger(__name__)

#: Where the mesh's wanted adapters live in etcd (one common_pb2.Adapter per name).
ADAPTERS_PREFIX = ROOT + "adapters/"
#: Seconds the router waits for its member view to show a load or unload.
VIEW_WAIT = 10.0
#: Seconds between reconciliations (in memory; engines are called only when one lacks
#: a wanted adapter), and before an engine that refused one is asked again.
RECONCILE_SECONDS = 2.0
RETRY_SECONDS = 60.0


class AdapterControl:
    """Adapter loads and unloads on the engines, by the router's view of the mesh, and
    the wanted adapters in etcd that keep engines that join later in line."""

    def __init__(
        self,
        session: EtcdSession,
        workers: Workers,
        catalogue: Catalogue,
        load_timeout: float,
        wait: float,
    ) -> None:
        self._session = session
        self._workers = workers
        self._catalogue = catalogue
        self._timeout = load_timeout
        self._wait = wait
        self._wanted: MemberWatcher[common_pb2.Adapter] = MemberWatcher(
            session, ADAPTERS_PREFIX, parse=common_pb2.Adapter.FromString
        )
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: (engine key, adapter name) -> when an engine that refused it is asked again.
        self._retry_at: dict[tuple[str, str], float] = {}

    def start(self) -> None:
        self._wanted.start()
        self._task = asyncio.create_task(self._reconcile_loop(), name="adapter reconciler")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await self._wanted.close()

    def wanted(self) -> dict[str, common_pb2.Adapter]:
        """The adapters loaded at run time and not unloaded since, by name."""
        return {a.name: a for a in self._wanted.members.values()}

    async def ensure(self, name: str) -> None:
        """For a request naming ``name``: when it is a wanted adapter that no engine lists
        now, have it loaded and wait (up to ``--worker-wait``) until one does."""
        if name not in self.wanted() or self._engines(name):
            return
        self._wake.set()
        deadline = time.monotonic() + self._wait
        while not self._engines(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _engines(self, model: str) -> list[Peer]:
        return self._workers.engines(model)

    def _base_for(self, name: str, base_model: str) -> str:
        """The base model a new adapter attaches to: the request's, or else the only one
        whose engines run with LoRA."""
        engines = self._workers.engines()
        bases = sorted({m for p in engines for m in p.member.models})
        if base_model:
            if base_model not in bases:
                raise ModelNotFound(
                    f"no engine serves base model {base_model!r}; base models: "
                    f"{', '.join(bases) or 'none'}",
                    "base_model",
                )
            return base_model
        with_lora = sorted({m for p in engines if p.member.adapter_slots for m in p.member.models})
        if len(with_lora) == 1:
            return with_lora[0]
        if not with_lora:
            raise InvalidRequest(
                f"no engine runs with LoRA (base models: {', '.join(bases) or 'none'}); start "
                "engines with "
                "--enable-lora or --lora"
            )
        raise InvalidRequest(
            f"engines of {len(with_lora)} base models run with LoRA ({', '.join(with_lora)}); "
            "name the one "
            f"adapter {name!r} adapts in base_model",
            "base_model",
        )

    async def load(self, name: str, path: str, base_model: str = "") -> list[str]:
        """Load ``name`` from ``path`` on every engine of its base model; the instance ids
        that loaded it. Engines that refuse it are logged; when all refuse, the first
        refusal is the answer (INVALID_ARGUMENT for an adapter that does not fit)."""
        if not name or not path:
            raise InvalidRequest("give the adapter's name (lora_name) and directory (lora_path)")
        base = self._base_for(name, base_model)
        if name in {m for p in self._workers.peers.values() for m in p.member.models}:
            raise AlreadyExists(f"{name!r} is the name of a base model", "lora_name")
        existing = self._catalogue.adapters().get(name) or self.wanted().get(name)
        if existing is not None and existing.parent != base:
            raise AlreadyExists(
                f"adapter {name!r} is already loaded for {existing.parent!r}", "lora_name"
            )
        engines = [p for p in self._engines(base) if p.member.adapter_slots]
        if not engines:
            raise InvalidRequest(
                f"no engine of {base!r} runs with LoRA; start its engines with --enable-lora or "
                "--lora"
            )
        results = await asyncio.gather(*(self._call(p, "load", name, path) for p in engines))
        loaded = [p.member.instance_id for p, error in zip(engines, results) if error is None]
        errors = [error for error in results if error is not None]
        if not loaded:
            raise errors[0]
        for peer, error in zip(engines, results):
            if error is not None:
                log.warning("adapter %s not loaded on %s: %s", name, peer.member.instance_id, error)
        wanted = common_pb2.Adapter(name=name, parent=base, source=path)
        try:
            client = await self._session.client()
            key = ADAPTERS_PREFIX + name
            await client.put(
                key.encode(), credentials.current().records.seal(key, wanted.SerializeToString())
            )
        except Exception as exc:  # noqa: BLE001 - the engines serve it; only later joiners miss it
            log.warning(
                "adapter %s is loaded but not recorded in etcd (%s): engines that join later lack "
                "it",
                name,
                exc,
            )
        await self._wait_view(
            lambda: any(p.serves(name) for p in self._engines(name)), f"adapter {name} listed"
        )
        log.info("adapter %s (%s) loaded from %s on %s", name, base, path, ", ".join(loaded))
        return loaded

    async def unload(self, name: str) -> list[str]:
        """Unload ``name`` from every engine listing it; returns when each engine has
        withdrawn it and its running requests have finished. NOT_FOUND when none lists it."""
        engines = [p for p in self._engines(name) if name not in p.member.models]
        was_wanted = name in self.wanted()
        if not name or not (engines or was_wanted):
            raise ModelNotFound(f"adapter {name!r} is not loaded", "lora_name")
        # No longer wanted first, so that no router loads it again behind this unload.
        try:
            client = await self._session.client()
            await client.delete((ADAPTERS_PREFIX + name).encode())
        except Exception as exc:  # noqa: BLE001 - any etcd failure: nothing was unloaded
            raise Unavailable(
                f"etcd did not take the unload of {name!r} ({exc}); nothing was unloaded"
            ) from None
        await self._wait_view(lambda: name not in self.wanted(), f"adapter {name} not wanted")
        engines = [
            p for p in self._engines(name) if name not in p.member.models
        ]  # a reconcile may have added one
        results = await asyncio.gather(*(self._call(p, "unload", name) for p in engines))
        unloaded = [p.member.instance_id for p, error in zip(engines, results) if error is None]
        failed = [
            error for error in results if error is not None and not isinstance(error, ModelNotFound)
        ]
        if failed:
            raise failed[0]
        await self._wait_view(lambda: not self._engines(name), f"adapter {name} withdrawn")
        log.info(
            "adapter %s unloaded from %s", name, ", ".join(unloaded) or "no engine (already gone)"
        )
        return unloaded

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RECONCILE_SECONDS)
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:  # logged with its traceback; the next round tries again
                log.exception("adapter reconciliation failed")

    async def reconcile(self) -> None:
        """Load each wanted adapter on the engines of its base model that run with LoRA
        and do not list it (one that refused it is asked again after RETRY_SECONDS)."""
        now = time.monotonic()
        work = [
            (peer, adapter)
            for adapter in self.wanted().values()
            for peer in self._engines(adapter.parent)
            if peer.member.adapter_slots
            and not peer.serves(adapter.name)
            and self._retry_at.get((peer.key, adapter.name), 0.0) <= now
        ]
        results = await asyncio.gather(*(self._call(p, "load", a.name, a.source) for p, a in work))
        for (peer, adapter), error in zip(work, results):
            if error is None:
                log.info(
                    "adapter %s loaded on %s, which did not have it",
                    adapter.name,
                    peer.member.instance_id,
                )
            else:
                self._retry_at[(peer.key, adapter.name)] = now + RETRY_SECONDS
                log.warning(
                    "adapter %s could not be loaded on %s: %s",
                    adapter.name,
                    peer.member.instance_id,
                    error,
                )

    async def _call(self, peer: Peer, action: str, name: str, path: str = "") -> StageError | None:
        """One engine's load or unload; its failure as an error value (None: done)."""
        assert isinstance(peer.client, EngineClient)
        try:
            if action == "load":
                await peer.client.load_adapter(name, path, timeout=self._timeout)
            else:
                await peer.client.unload_adapter(name, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            return from_rpc_error(error, f"{peer.member.instance_id}")
        return None

    @staticmethod
    async def _wait_view(done: Callable[[], bool], what: str) -> None:
        """Wait until the router's member view satisfies ``done`` (etcd's watch brings
        the engines' new records within milliseconds)."""
        deadline = time.monotonic() + VIEW_WAIT
        while not done():
            if time.monotonic() > deadline:
                log.warning("%s: the router's view did not follow within %.0fs", what, VIEW_WAIT)
                return
            await asyncio.sleep(0.05)
