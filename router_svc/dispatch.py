"""Dispatch: where a sequence runs, and getting its decode stream open.

For each sequence: choose a prefill worker and decide whether to disaggregate; if so,
Prefill there for a KV handle; then choose a decode worker and open its Generate
stream, with the handle when there is one. Failure policy, in the order things can
go wrong:

- no member of a needed role: wait up to ``--worker-wait``, then UNAVAILABLE (503);
- a member fails with a kind that says another may do better (unreachable, draining,
  engine dead): it is set aside and the next one is tried (:mod:`router_svc.failover`);
- the prefill fails otherwise (a timeout), or no prefill worker is left: the decode
  worker computes the prompt itself (aggregated), as llm-d's routing sidecar does; a
  disaggregated request never fails for want of a prefill worker;
- the decode worker cannot collect the KV (:class:`~services.errors.KvNotCollected`:
  expired, or the prefill worker died), or fails before its first token: the request
  runs aggregated (on another decode worker in the second case). A handle is never
  handed to a second decode engine: the first may have pulled the KV before it failed,
  and the prefill engine frees the blocks as soon as they are pulled;
- the decode stream breaks after its first token (the worker died, or its channel
  closed): the worker is set aside, and the pipeline migrates the sequence
  (:meth:`router_svc.pipeline.Pipeline.run_sequence`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import NoReturn

import grpc

from router_svc.affinity import SessionAffinity
from router_svc.config import RouterConfig
from router_svc.failover import Failover
from router_svc.metrics import (
    DECISIONS,
    KV_RELEASES,
    PREFILL_FALLBACKS,
    PREFIX_HIT_TOKENS,
    PROMPT_TOKENS,
    SEQUENCES,
)
from router_svc.policy import Choice, Policy
from router_svc.prepare import Prompt
from router_svc.workers import Peer, Workers
from services.clients import EngineClient
from services.errors import (
    DeadlineExceeded,
    InvalidRequest,
    KvNotCollected,
    PermissionDenied,
    StageError,
    Unavailable,
    from_rpc_error,
)
from services.membership import role_name
from services.pb import common_pb2, engine_pb2

log = logging.getLogger(__name__)


@dataclass
class Decoding:
    """An open decode stream whose first message has arrived."""

    peer: Peer
    call: grpc.aio.UnaryStreamCall
    first: engine_pb2.GenerateResponse
    #: Prompt tokens the remote prefill found cached (disaggregated only).
    prefill_cached: int
    disaggregated: bool
    #: The prefill worker's instance id (disaggregated only).
    prefill_instance: str = ""

    def workers(self) -> list[str]:
        """``role:instance`` of each worker this stream used."""
        found = [f"decode:{self.peer.member.instance_id}"]
        if self.prefill_instance:
            found.append(f"prefill:{self.prefill_instance}")
        return found

    def cached_tokens(self, last: engine_pb2.GenerateResponse) -> int:
        """Prompt tokens found cached: by the prefill worker when there was one, else as the
        decode engine reports with its finish (0 when a stop string ended it earlier)."""
        return self.prefill_cached if self.disaggregated else last.usage.cached_tokens

    async def replies(self) -> AsyncIterator[engine_pb2.GenerateResponse]:
        """The stream's messages, the first included, up to the one with a finish reason."""
        where = f"decode {self.peer.member.instance_id}"
        reply = self.first
        while True:
            yield reply
            if reply.finish_reason:
                return
            try:
                message = await self.call.read()
            except grpc.aio.AioRpcError as error:
                raise from_rpc_error(error, where) from None
            except asyncio.CancelledError:
                _raise_unless_cancelled(where)
            if message is grpc.aio.EOF:
                raise Unavailable(f"{where}: the stream ended without a finish reason")
            assert isinstance(message, engine_pb2.GenerateResponse)
            reply = checked_reply(message, where)


def remaining(deadline: float) -> float:
    """Seconds left until a monotonic deadline; DEADLINE_EXCEEDED when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the request ran out of time")
    return left


@dataclass
class KvLease:
    """A prefill's KV held for a decode engine on ``peer``, under ``request_id``."""

    peer: Peer
    request_id: str
    #: A decode engine may be pulling the KV now: releasing it could hand that engine
    #: blocks reused by another prompt, so the engine's own read notification (or the
    #: lease's end) frees it instead.
    reading: bool = False


def kv_mismatch(prefill: common_pb2.Member, decode: common_pb2.Member) -> str:
    """Why a decode engine could not take a prefill engine's KV over NIXL ("" if it can).

    The KV bytes must mean the same on both sides: the same KV dtype and block size and
    the same pipeline stages. Tensor-parallel sizes may differ when one divides the
    other (vLLM's NixlConnector splits or joins heads between ranks for dense models).
    Members that do not say (older engines) count as the defaults: TP 1, PP 1.
    """

    def size(member: common_pb2.Member, key: str) -> int:
        return int(member.labels.get(key, "1") or "1")

    if prefill.labels.get("kv_dtype", "") != decode.labels.get("kv_dtype", ""):
        return "kv_dtype"
    if (
        prefill.kv_block_size
        and decode.kv_block_size
        and prefill.kv_block_size != decode.kv_block_size
    ):
        return "block_size"
    if size(prefill, "pipeline_parallel_size") != size(decode, "pipeline_parallel_size"):
        return "pipeline_parallel"
    tp_p, tp_d = size(prefill, "tensor_parallel_size"), size(decode, "tensor_parallel_size")
    if tp_p % tp_d and tp_d % tp_p:
        return "tensor_parallel"
    return ""


class Dispatcher:
    """Chooses workers (session affinity, then the policy) and opens decode streams."""

    def __init__(self, config: RouterConfig, workers: Workers, policy: Policy) -> None:
        self._config = config
        self._workers = workers
        self._policy = policy
        self._affinity = SessionAffinity(config.session_ttl, config.max_sessions)
        #: KV releases on their way to prefill workers (kept so they are not collected).
        self._releases: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def decoding(
        self, prompt: Prompt, sampling: common_pb2.SamplingParams, sequence_id: str, deadline: float
    ) -> AsyncIterator[Decoding]:
        """A decode stream with its first message in hand, after prefill and fallbacks.

        The call counts as in flight on its worker until the block exits, which cancels
        it (the engine aborts whatever it has not finished). A prefill's KV that no
        decode engine collects is released on the prefill worker as soon as that is
        known (:class:`KvLease`), not when its lease runs out.
        """
        handle, cached, prefill_hit, lease = await self._prefill(
            prompt, sampling, sequence_id, deadline
        )
        failover = Failover(
            self._workers, common_pb2.ROLE_DECODE, prompt.model, self._config.worker_wait
        )
        try:
            while True:
                candidates = await failover.candidates()
                if lease is not None and handle is not None:
                    # Only a decode engine whose KV layout takes the prefill's KV may pull it.
                    fitting = [
                        c for c in candidates if not kv_mismatch(lease.peer.member, c.member)
                    ]
                    if not fitting:
                        reason = kv_mismatch(lease.peer.member, candidates[0].member)
                        log.warning(
                            "%s: no decode worker takes KV from %s (%s differs); decoding aggregated",
                            sequence_id,
                            lease.peer.member.instance_id,
                            reason,
                        )
                        PREFILL_FALLBACKS.labels("layout_mismatch").inc()
                        handle, cached = None, 0
                        self._release(lease)
                        lease = None
                    else:
                        candidates = fitting
                choice = self._choose(common_pb2.ROLE_DECODE, candidates, prompt, sequence_id)
                peer = choice.peer
                assert isinstance(peer.client, EngineClient)
                async with self._workers.using(peer):
                    call = peer.client.generate(
                        prompt.token_ids,
                        sampling,
                        handle,
                        request_id=sequence_id,
                        timeout=remaining(deadline),
                        adapter=prompt.adapter,
                        session_id=prompt.session_id,
                    )
                    if lease is not None:
                        lease.reading = True
                    try:
                        try:
                            first = await _first_reply(call, peer)
                        except StageError as error:
                            if lease is not None:
                                # An answer from the engine (it refused, or could not
                                # pull) means it is not reading. A broken call or a
                                # deadline may leave it pulling: the lease frees that KV.
                                lease.reading = isinstance(error, (Unavailable, DeadlineExceeded))
                            # Not collected: expired or gone, or refused (the engines' mesh
                            # keys differ: a misconfiguration, logged, but not a lost request).
                            collect_failed = (
                                isinstance(error, KvNotCollected | PermissionDenied)
                                and handle is not None
                            )
                            if not collect_failed and not failover.retry(peer, error):
                                raise
                            if handle is not None:  # it could not collect it, or it failed
                                # No other engine reads this handle: the failed one may
                                # have read it before it died, and the prefill engine
                                # frees the blocks at the first read.
                                log.warning("%s: %s; decoding aggregated", sequence_id, error)
                                reason = "decode_failed"
                                if collect_failed:
                                    reason = (
                                        "handle_refused"
                                        if isinstance(error, PermissionDenied)
                                        else "kv_not_collected"
                                    )
                                PREFILL_FALLBACKS.labels(reason).inc()
                                handle, cached = None, 0
                                self._release(lease)
                                lease = None
                            continue
                        prefill_instance = (
                            lease.peer.member.instance_id
                            if lease is not None and handle is not None
                            else ""
                        )
                        lease = None  # collected: the decode engine's read notification frees it
                        SEQUENCES.labels(
                            "disaggregated" if handle is not None else "aggregated"
                        ).inc()
                        # Counted once, for the worker that computed the prompt.
                        PREFIX_HIT_TOKENS.inc(
                            prefill_hit
                            if handle is not None
                            else choice.matched_blocks * peer.member.kv_block_size
                        )
                        try:
                            yield Decoding(
                                peer, call, first, cached, handle is not None, prefill_instance
                            )
                        except StageError as error:
                            if (
                                error.retry_elsewhere
                            ):  # the stream broke: no new work goes there for now
                                self._workers.mark_down(peer)
                            raise
                        return
                    finally:
                        call.cancel()
        finally:
            # Left without a decode engine collecting the KV (the client went away, no
            # decode member was left, the decode side failed): free it now.
            self._release(lease)

    async def _prefill(
        self, prompt: Prompt, sampling: common_pb2.SamplingParams, sequence_id: str, deadline: float
    ) -> tuple[common_pb2.KvTransferHandle | None, int, int, KvLease | None]:
        """A KV handle from the chosen prefill worker, the tokens it found cached, the
        tokens the index predicted it holds, and the lease to release if no decode
        engine collects it; or (None, 0, 0, None) to run aggregated.

        Conditional disaggregation: the prompt goes to a prefill worker only when the
        part of it that worker does not hold is at least ``--disagg-min-tokens``, and
        the prefill pool is not saturated; otherwise the decode worker computes it.
        """
        PROMPT_TOKENS.inc(len(prompt.token_ids))
        if sampling.HasField(
            "prompt_logprobs"
        ):  # logits of the prompt: only an engine computing it has them
            DECISIONS.labels(self._policy.name, "disaggregation", "local_prompt_logprobs").inc()
            return None, 0, 0, None
        failover = Failover(
            self._workers, common_pb2.ROLE_PREFILL, prompt.model, self._config.worker_wait
        )
        while candidates := failover.usable():
            if all(p.load_units() >= self._config.kv_max_queue for p in candidates):
                DECISIONS.labels(
                    self._policy.name, "disaggregation", "local_prefill_saturated"
                ).inc()
                return None, 0, 0, None
            choice = self._choose(common_pb2.ROLE_PREFILL, candidates, prompt, sequence_id)
            peer = choice.peer
            uncached = len(prompt.token_ids) - choice.matched_blocks * peer.member.kv_block_size
            if uncached < self._config.disagg_min_tokens:
                DECISIONS.labels(self._policy.name, "disaggregation", "local_short_uncached").inc()
                return None, 0, 0, None
            DECISIONS.labels(self._policy.name, "disaggregation", "remote").inc()
            assert isinstance(peer.client, EngineClient)
            timeout = min(self._config.prefill_timeout, remaining(deadline))
            lease = KvLease(peer, f"{sequence_id}-prefill")
            async with self._workers.using(peer):
                try:
                    reply = await peer.client.prefill(
                        prompt.token_ids,
                        sampling,
                        request_id=lease.request_id,
                        timeout=timeout,
                        adapter=prompt.adapter,
                        session_id=prompt.session_id,
                    )
                except grpc.aio.AioRpcError as rpc_error:
                    error = failover.error(peer, rpc_error)
                    if rpc_error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        self._release(lease)  # it may have finished as the call ran out
                except asyncio.CancelledError:
                    self._release(lease)  # the caller left; the prefill may have finished
                    raise
                else:
                    return (
                        reply.handle,
                        reply.cached_tokens,
                        len(prompt.token_ids) - uncached,
                        lease,
                    )
            if isinstance(error, InvalidRequest):
                raise error
            if not failover.retry(peer, error) or not failover.usable():
                log.warning("%s: %s; decoding aggregated", sequence_id, error)
                PREFILL_FALLBACKS.labels(error.code.name.lower()).inc()
                return None, 0, 0, None
            log.warning("%s: %s; trying another prefill worker", sequence_id, error)
        return None, 0, 0, None  # no prefill member: aggregated by design

    def _release(self, lease: KvLease | None) -> None:
        """Tell the prefill worker, off the request's path, that nobody will collect the
        KV of ``lease``, unless a decode engine may be reading it."""
        if lease is None or lease.reading:
            return
        task = asyncio.create_task(self._send_release(lease), name=f"release {lease.request_id}")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _send_release(self, lease: KvLease) -> None:
        assert isinstance(lease.peer.client, EngineClient)
        try:
            released = await lease.peer.client.abort(lease.request_id)
        except (
            grpc.aio.AioRpcError,
            grpc.aio.UsageError,
        ) as error:  # gone or closed: its lease ends it
            log.debug("%s: KV release not delivered: %s", lease.request_id, error)
            return
        KV_RELEASES.labels("released" if released else "not_held").inc()

    def _choose(
        self, role: int, candidates: list[Peer], prompt: Prompt, sequence_id: str
    ) -> Choice:
        """Apply session affinity, then the routing policy; count and log the decision.

        A session goes back to its last worker while that worker is a candidate and its
        queue is below ``--kv-max-queue``; the policy still scores it, so the prefix it
        holds is counted as for any other choice.
        """
        pinned = self._affinity.get(prompt.session_id, role)
        sticky = [
            p for p in candidates if p.key == pinned and p.load_units() < self._config.kv_max_queue
        ]
        choice = self._policy.choose(
            sticky or candidates, prompt.hashes(candidates[0].member.kv_block_size), prompt.model
        )
        if sticky:
            choice = replace(choice, reason="session_affinity")
        self._affinity.remember(prompt.session_id, role, choice.peer.key)
        DECISIONS.labels(self._policy.name, role_name(role), choice.reason).inc()
        log.debug(
            "%s: %s -> %s (%s, %d prefix blocks, %d queued)",
            sequence_id,
            role_name(role),
            choice.peer.member.instance_id,
            choice.reason,
            choice.matched_blocks,
            choice.peer.queued(),
        )
        return choice


async def _first_reply(call: grpc.aio.UnaryStreamCall, peer: Peer) -> engine_pb2.GenerateResponse:
    """The decode stream's first message; a stream that ends or fails first is an error."""
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, f"decode {peer.member.instance_id}") from None
    except asyncio.CancelledError:
        _raise_unless_cancelled(f"decode {peer.member.instance_id}")
    if first is grpc.aio.EOF:
        raise Unavailable(f"decode {peer.member.instance_id} ended the stream without output")
    assert isinstance(first, engine_pb2.GenerateResponse)
    return checked_reply(first, f"decode {peer.member.instance_id}")


def _raise_unless_cancelled(where: str) -> NoReturn:
    """Re-raise a cancellation meant for this task; one that came from the call (its
    channel was closed under it) is the member failing, not the caller leaving."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise  # noqa: PLE0704 - called from the except clause that caught it
    raise Unavailable(f"{where}: the call was cancelled (the channel to the member closed)")


#: Engine finishes that are not an answer: the engine gave up on the sequence (it is
#: shutting down, or failed), so the caller must not take the text for a whole one.
_GAVE_UP = {common_pb2.FINISH_REASON_ABORT: "aborted", common_pb2.FINISH_REASON_ERROR: "failed"}


def checked_reply(reply: engine_pb2.GenerateResponse, where: str) -> engine_pb2.GenerateResponse:
    """The reply, unless the engine ended the sequence without finishing it."""
    if reply.finish_reason in _GAVE_UP:
        raise Unavailable(
            f"{where}: the engine {_GAVE_UP[reply.finish_reason]} the sequence before it finished"
        )
    return reply
