"""Loading and unloading LoRA adapters across the mesh, for operators and clients.

An adapter is loaded on every engine, prefill and decode alike, that serves its base
model: a disaggregated request needs it where the prompt is computed and where it
is decoded. Each engine then lists it in its member record, and that record is what
routes requests (:meth:`router_svc.workers.Peer.serves`): the router's own calls
return only once the router's view shows the change, so a request sent right after a
load finds the adapter, and none is routed to an engine after its unload began.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from router_svc.catalogue import Catalogue
from router_svc.workers import ENGINE_ROLES, Peer, Workers
from services.clients import EngineClient
from services.errors import AlreadyExists, InvalidRequest, ModelNotFound, StageError, from_rpc_error

log = logging.getLogger(__name__)

#: Seconds the router waits for its member view to show a load or unload.
VIEW_WAIT = 10.0


class AdapterControl:
    """Adapter loads and unloads on the engines, by the router's view of the mesh."""

    def __init__(self, workers: Workers, catalogue: Catalogue, load_timeout: float) -> None:
        self._workers = workers
        self._catalogue = catalogue
        self._timeout = load_timeout

    def _engines(self, model: str) -> list[Peer]:
        return [p for p in self._workers.peers.values() if p.role in ENGINE_ROLES and p.serves(model)]

    def _base_for(self, name: str, base_model: str) -> str:
        """The base model a new adapter attaches to: the request's, or else the only one
        whose engines run with LoRA."""
        engines = [p for p in self._workers.peers.values() if p.role in ENGINE_ROLES]
        bases = sorted({m for p in engines for m in p.member.models})
        if base_model:
            if base_model not in bases:
                raise ModelNotFound(
                    f"no engine serves base model {base_model!r}; base models: {', '.join(bases) or 'none'}",
                    "base_model",
                )
            return base_model
        with_lora = sorted({m for p in engines if p.member.adapter_slots for m in p.member.models})
        if len(with_lora) == 1:
            return with_lora[0]
        if not with_lora:
            raise InvalidRequest(
                f"no engine runs with LoRA (base models: {', '.join(bases) or 'none'}); start engines with "
                "--enable-lora or --lora"
            )
        raise InvalidRequest(
            f"engines of {len(with_lora)} base models run with LoRA ({', '.join(with_lora)}); name the one "
            f"adapter {name!r} adapts in base_model", "base_model",
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
        existing = self._catalogue.adapters().get(name)
        if existing is not None and existing.parent != base:
            raise AlreadyExists(f"adapter {name!r} is already loaded for {existing.parent!r}", "lora_name")
        engines = [p for p in self._engines(base) if p.member.adapter_slots]
        if not engines:
            raise InvalidRequest(f"no engine of {base!r} runs with LoRA; start its engines with --enable-lora or --lora")
        results = await asyncio.gather(*(self._call(p, "load", name, path) for p in engines))
        loaded = [p.member.instance_id for p, error in zip(engines, results) if error is None]
        errors = [error for error in results if error is not None]
        if not loaded:
            raise errors[0]
        for peer, error in zip(engines, results):
            if error is not None:
                log.warning("adapter %s not loaded on %s: %s", name, peer.member.instance_id, error)
        await self._wait_view(lambda: any(p.serves(name) for p in self._engines(name)), f"adapter {name} listed")
        log.info("adapter %s (%s) loaded from %s on %s", name, base, path, ", ".join(loaded))
        return loaded

    async def unload(self, name: str) -> list[str]:
        """Unload ``name`` from every engine listing it; returns when each engine has
        withdrawn it and its running requests have finished. NOT_FOUND when none lists it."""
        engines = [p for p in self._engines(name) if name not in p.member.models]
        if not name or not engines:
            raise ModelNotFound(f"adapter {name!r} is not loaded", "lora_name")
        results = await asyncio.gather(*(self._call(p, "unload", name) for p in engines))
        unloaded = [p.member.instance_id for p, error in zip(engines, results) if error is None]
        failed = [error for error in results if error is not None and not isinstance(error, ModelNotFound)]
        if failed:
            raise failed[0]
        await self._wait_view(lambda: not self._engines(name), f"adapter {name} withdrawn")
        log.info("adapter %s unloaded from %s", name, ", ".join(unloaded) or "no engine (already gone)")
        return unloaded

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
