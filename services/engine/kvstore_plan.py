"""The KV-store connector's scheduler side (vLLM's engine core, one thread): which
prompt blocks to load from the store and which to write to it, step by step.

For a new request it names the prompt's full blocks by the mesh's chain hash
(:mod:`services.kv.hashing`), asks the owning stores for the longest stored prefix
(``Lookup`` pins the hits) and, when that reaches past the engine's own prefix cache,
tells vLLM those tokens are computed externally. Each step it also plans writes of the
prompt blocks the step completes. The worker side (:mod:`services.engine.kvstore_io`)
moves the bytes. Both name the request's agent session to the store, so that a session
that comes back finds its blocks kept.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from services.config import parse_endpoints
from services.engine.sampling import SESSION_ARG
from services.kv.hashing import chain_hashes, chain_root
from services.kv.shards import ShardMap, ShardMapFollower
from services.kv.store_link import Hit, Prefix, StoreError, StoreLink

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Load:
    """Blocks to read from the store into ``block_ids`` before this step's forward."""

    req_id: str
    block_ids: list[int]
    hits: list[Hit]
    prefix: Prefix


@dataclasses.dataclass
class Save:
    """Prompt blocks this step completes, to write to the store after it."""

    req_id: str
    hashes: list[int]
    block_ids: list[int]
    #: The request's agent session ("" for none): the store keeps a session's blocks.
    session_id: str = ""


@dataclasses.dataclass
class StoreConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells the worker each step: blocks to load and to save, and where."""

    loads: list[Load]
    saves: list[Save]
    shards: ShardMap


@dataclasses.dataclass
class _Tracked:
    """A running request, as the scheduler side follows it to plan its writes."""

    prompt: list[int]
    block_ids: list[int]
    saved_blocks: int
    has_saves: bool = False


def session_of(request: Request) -> str:
    """The agent session the engine's stage put in the request's ``extra_args``, or ""."""
    extra = request.sampling_params.extra_args if request.sampling_params else None
    return str((extra or {}).get(SESSION_ARG, ""))


class SchedulerSide:
    """Lookups, load and write planning, in vLLM's scheduler (one thread)."""

    def __init__(self, block_size: int, layout: str, extra: dict[str, Any]) -> None:
        self._block_size = block_size
        self._layout = layout
        self._retry_seconds = float(extra.get("retry_seconds", 5.0))
        # Hits stay pinned from this lookup until the worker has read them, normally the
        # same step; the pin only needs to outlast a slow step (released explicitly).
        self._pin_seconds = float(extra.get("pin_seconds", 120.0))
        self._link = StoreLink(None, rpc_timeout=float(extra.get("rpc_timeout", 1.0)))
        self._follower = ShardMapFollower(parse_endpoints(str(extra["etcd"])))
        if not extra.get("disabled"):
            self._follower.start()  # without it the map stays empty: no lookups, no writes
        self._down_until = 0.0
        self._lookups: dict[str, tuple[Prefix, int]] = {}
        self._loads: dict[str, Load] = {}
        self._tracked: dict[str, _Tracked] = {}
        #: Chain hashes of each live request's full prompt blocks, computed once: a
        #: waiting request is looked up again at every scheduling attempt.
        self._hashes: dict[str, list[int]] = {}
        #: (cache_salt, LoRA adapter) of the requests that have either (vLLM gives them
        #: only with the Request): blocks are named with them, loads and saves alike.
        self._roots: dict[str, tuple[str, str]] = {}
        #: The agent session of the requests that name one (the store keeps its blocks).
        self._sessions: dict[str, str] = {}

    def close(self) -> None:
        for prefix, _ in self._lookups.values():
            self._link.release(prefix)
        self._follower.stop()
        self._link.close()

    def _shards(self) -> ShardMap | None:
        shards = self._follower.current
        if not shards or time.monotonic() < self._down_until:
            return None
        return shards

    def _failed(self, exc: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning(
                "KV store unavailable (%s); computing without it for %.0fs",
                exc,
                self._retry_seconds,
            )
        self._down_until = time.monotonic() + self._retry_seconds

    def matched(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens the store holds past the engine's own prefix cache (whole blocks, never
        the prompt's last token, which vLLM must compute to sample)."""
        self._forget_lookup(request.request_id)
        adapter = request.lora_request.lora_name if request.lora_request is not None else ""
        if request.cache_salt or adapter:
            self._roots[request.request_id] = (request.cache_salt or "", adapter)
        session = session_of(request)
        if session:
            self._sessions[request.request_id] = session
        shards = self._shards()
        prompt = request.prompt_token_ids or []
        usable = (len(prompt) - 1) // self._block_size
        local = num_computed_tokens // self._block_size
        if shards is None or usable <= local:
            return 0
        hashes = self._prompt_hashes(request.request_id, prompt)[:usable]
        try:
            prefix = self._link.lookup(
                shards, self._layout, hashes, self._pin_seconds, session_id=session
            )
        except StoreError as exc:
            self._failed(exc)
            return 0
        if len(prefix.hits) <= local:
            self._link.release(prefix)
            return 0
        self._lookups[request.request_id] = (prefix, local)
        return (len(prefix.hits) - local) * self._block_size

    def allocated(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        entry = self._lookups.pop(request.request_id, None)
        if entry is None:
            return
        prefix, local = entry
        count = num_external_tokens // self._block_size
        if count <= 0:
            self._link.release(prefix)
            return
        self._loads[request.request_id] = Load(
            request.request_id,
            list(block_ids[local : local + count]),
            prefix.hits[local : local + count],
            prefix,
        )

    def plan(self, out: SchedulerOutput) -> StoreConnectorMetadata:
        shards = self._shards()
        meta = StoreConnectorMetadata(list(self._loads.values()), [], shards or ShardMap())
        self._loads.clear()
        for new in out.scheduled_new_reqs:
            tracked = _Tracked(
                list(new.prompt_token_ids or []),
                list(new.block_ids[0]),
                saved_blocks=new.num_computed_tokens // self._block_size,
            )
            self._tracked[new.req_id] = tracked
            self._plan_save(
                meta,
                new.req_id,
                tracked,
                new.num_computed_tokens + out.num_scheduled_tokens[new.req_id],
            )
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            known = self._tracked.get(req_id)
            new_blocks = cached.new_block_ids[i]
            if known is None:
                continue
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:
                    known.block_ids = list(new_blocks[0])
                else:
                    known.block_ids.extend(new_blocks[0])
            self._plan_save(
                meta,
                req_id,
                known,
                cached.num_computed_tokens[i] + out.num_scheduled_tokens[req_id],
            )
        return meta

    def _plan_save(
        self, meta: StoreConnectorMetadata, req_id: str, tracked: _Tracked, done_tokens: int
    ) -> None:
        full = min(done_tokens, len(tracked.prompt)) // self._block_size
        if not meta.shards or full <= tracked.saved_blocks:
            return
        hashes = self._prompt_hashes(req_id, tracked.prompt)
        meta.saves.append(
            Save(
                req_id,
                hashes[tracked.saved_blocks : full],
                tracked.block_ids[tracked.saved_blocks : full],
                self._sessions.get(req_id, ""),
            )
        )
        tracked.saved_blocks = full
        tracked.has_saves = True

    def finished(self, req_id: str) -> bool:
        """Whether the request's blocks must wait for its writes (reported by the worker)."""
        self._forget_lookup(req_id)
        self._hashes.pop(req_id, None)
        self._roots.pop(req_id, None)
        self._sessions.pop(req_id, None)
        tracked = self._tracked.pop(req_id, None)
        return tracked is not None and tracked.has_saves

    def _prompt_hashes(self, req_id: str, prompt: list[int]) -> list[int]:
        hashes = self._hashes.get(req_id)
        if hashes is None:
            root = chain_root(*self._roots.get(req_id, ("", "")))
            hashes = self._hashes[req_id] = chain_hashes(prompt, self._block_size, root)
        return hashes

    def _forget_lookup(self, req_id: str) -> None:
        entry = self._lookups.pop(req_id, None)
        if entry is not None:
            self._link.release(entry[0])
