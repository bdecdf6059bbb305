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

What a prefill gave, and releasing its KV when no decode engine will collect it, is
:mod:`router_svc.handoff`; the open stream the pipeline reads is
:mod:`router_svc.decoding`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from router_svc.affinity import SessionAffinity
from router_svc.config import RouterConfig
from router_svc.decoding import Decoding, first_reply
from router_svc.failover import Failover
from router_svc.handoff import KvLease, KvReleases, PrefillOutcome, kv_mismatch
from router_svc.metrics import (
    DECISIONS,
    PREFILL_FALLBACKS,
    PREFIX_HIT_TOKENS,
    PROMPT_TOKENS,
    SEQUENCES,
)
from router_svc.policy import Choice, Policy
from router_svc.prepare import Prompt
from router_svc.saturation import Saturation
from router_svc.workers import Peer, Workers
from services.clients import EngineClient
from services.errors import (
    DeadlineExceeded,
    InvalidRequest,
    KvNotCollected,
    PermissionDenied,
    StageError,
    Unavailable,
)
from services.membership import role_name
from services.pb import common_pb2, engine_pb2

log = logging.getLogger(__name__)


def remaining(deadline: float) -> float:
    """Seconds left until a monotonic deadline; DEADLINE_EXCEEDED when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the request ran out of time")
    return left


class Dispatcher:
    """Chooses workers (session affinity, then the policy) and opens decode streams."""

    def __init__(
        self, config: RouterConfig, workers: Workers, policy: Policy, saturation: Saturation
    ) -> None:
        self._config = config
        self._workers = workers
        self._policy = policy
        self._saturation = saturation
        self._affinity = SessionAffinity(config.session_ttl, config.max_sessions)
        self._releases = KvReleases()

    @contextlib.asynccontextmanager
    async def decoding(
        self, prompt: Prompt, sampling: common_pb2.SamplingParams, sequence_id: str, deadline: float
    ) -> AsyncIterator[Decoding]:
        """A decode stream with its first message in hand, after prefill and fallbacks.

        The steps: prefill (or not), choose a decode worker that can take the KV, open
        its Generate stream, wait for the first message; a failure before it goes on on
        another decode worker or aggregated (:meth:`_first_message`). The call counts as
        in flight on its worker until the block exits, which cancels it (the engine
        aborts whatever it has not finished). A prefill's KV that no decode engine
        collects is released on the prefill worker as soon as that is known.
        """
        prefill = await self._prefill(prompt, sampling, sequence_id, deadline)
        failover = Failover(
            self._workers, common_pb2.ROLE_DECODE, prompt.model, self._config.worker_wait
        )
        try:
            while True:
                candidates = await failover.candidates()
                choice = self._choose_decode(candidates, prefill, prompt, sequence_id)
                peer = choice.peer
                opened = self._generate(peer, prompt, sampling, prefill, sequence_id, deadline)
                async with opened as call:
                    first = await self._first_message(call, peer, prefill, failover, sequence_id)
                    if first is None:
                        continue  # on another decode worker, or aggregated
                    _count_sequence(choice, prefill)
                    try:
                        yield Decoding(
                            peer,
                            call,
                            first,
                            prefill.cached_tokens,
                            prefill.disaggregated,
                            prefill.prefill_instance,
                        )
                    except StageError as error:
                        if error.retry_elsewhere:  # the stream broke: no new work goes there
                            self._workers.mark_down(peer)
                        raise
                    return
        finally:
            prefill.release()  # unless a decode engine collected it (or may be reading it)

    def _choose_decode(
        self, candidates: list[Peer], prefill: PrefillOutcome, prompt: Prompt, sequence_id: str
    ) -> Choice:
        """The decode worker; with a handle, one whose KV layout takes the prefill's KV
        (when none does, the sequence goes on aggregated)."""
        if prefill.lease is not None:
            source = prefill.lease.peer.member
            fitting = [c for c in candidates if not kv_mismatch(source, c.member)]
            if fitting:
                candidates = fitting
            else:
                log.warning(
                    "%s: no decode worker takes KV from %s (%s differs); decoding aggregated",
                    sequence_id,
                    source.instance_id,
                    kv_mismatch(source, candidates[0].member),
                )
                prefill.abandon("layout_mismatch")
        return self._choose(common_pb2.ROLE_DECODE, candidates, prompt, sequence_id)

    @contextlib.asynccontextmanager
    async def _generate(
        self,
        peer: Peer,
        prompt: Prompt,
        sampling: common_pb2.SamplingParams,
        prefill: PrefillOutcome,
        sequence_id: str,
        deadline: float,
    ) -> AsyncIterator[grpc.aio.UnaryStreamCall]:
        """A Generate call on ``peer`` (with the prefill's handle when there is one),
        counted in flight there and cancelled when the block exits."""
        assert isinstance(peer.client, EngineClient)
        async with self._workers.using(peer):
            call = peer.client.generate(
                prompt.token_ids,
                sampling,
                prefill.handle,
                request_id=sequence_id,
                timeout=remaining(deadline),
                adapter=prompt.adapter,
                session_id=prompt.session_id,
                min_ids_per_message=self._saturation.ids_per_message(),
            )
            prefill.reading = prefill.disaggregated
            try:
                yield call
            finally:
                call.cancel()

    async def _first_message(
        self,
        call: grpc.aio.UnaryStreamCall,
        peer: Peer,
        prefill: PrefillOutcome,
        failover: Failover,
        sequence_id: str,
    ) -> engine_pb2.GenerateResponse | None:
        """The stream's first message; None when the sequence is to go on elsewhere: on
        another decode worker (``failover`` set this one aside), aggregated (this one
        could not collect the KV), or both. Other failures are raised.

        A handle is never handed to a second decode engine: the failed one may have
        read it before it failed, and the prefill engine frees the blocks at the first
        read.
        """
        try:
            return await first_reply(call, peer)
        except StageError as error:
            if prefill.disaggregated:
                # An answer from the engine (it refused, or could not pull) means it is
                # not reading. A broken call or a deadline may leave it pulling: the
                # lease frees that KV.
                prefill.reading = isinstance(error, (Unavailable, DeadlineExceeded))
            # Not collected: expired or gone, or refused (the engines' mesh keys
            # differ: a misconfiguration, logged, but not a lost request).
            collect_failed = prefill.disaggregated and isinstance(
                error, KvNotCollected | PermissionDenied
            )
            if not collect_failed and not failover.retry(peer, error):
                raise
            if prefill.disaggregated:
                log.warning("%s: %s; decoding aggregated", sequence_id, error)
                prefill.abandon(_fallback_reason(error, collect_failed))
            return None

    async def _prefill(
        self, prompt: Prompt, sampling: common_pb2.SamplingParams, sequence_id: str, deadline: float
    ) -> PrefillOutcome:
        """A KV handle from the chosen prefill worker, or an aggregated outcome.

        Conditional disaggregation: the prompt goes to a prefill worker only when the
        part of it that worker does not hold is at least ``--disagg-min-tokens``, and
        the prefill pool is not saturated; otherwise the decode worker computes it.
        """
        PROMPT_TOKENS.inc(len(prompt.token_ids))
        if sampling.HasField("prompt_logprobs"):
            # Logits of the prompt: only an engine computing it has them.
            return self._local("local_prompt_logprobs")
        failover = Failover(
            self._workers, common_pb2.ROLE_PREFILL, prompt.model, self._config.worker_wait
        )
        while candidates := failover.usable():
            if all(p.load_units() >= self._config.routing.kv_max_queue for p in candidates):
                return self._local("local_prefill_saturated")
            choice = self._choose(common_pb2.ROLE_PREFILL, candidates, prompt, sequence_id)
            peer = choice.peer
            uncached = len(prompt.token_ids) - choice.matched_blocks * peer.member.kv_block_size
            if uncached < self._config.disagg_min_tokens:
                return self._local("local_short_uncached")
            DECISIONS.labels(self._policy.name, "disaggregation", "remote").inc()
            lease = KvLease(peer, f"{sequence_id}-prefill", self._releases)
            reply = await self._call_prefill(lease, prompt, sampling, failover, deadline)
            if isinstance(reply, engine_pb2.PrefillResponse):
                hit = len(prompt.token_ids) - uncached
                return PrefillOutcome(reply.handle, lease, reply.cached_tokens, hit)
            if isinstance(reply, InvalidRequest):
                raise reply
            if not failover.retry(peer, reply) or not failover.usable():
                log.warning("%s: %s; decoding aggregated", sequence_id, reply)
                PREFILL_FALLBACKS.labels(reply.code.name.lower()).inc()
                return PrefillOutcome()
            log.warning("%s: %s; trying another prefill worker", sequence_id, reply)
        return PrefillOutcome()  # no prefill member: aggregated by design

    def _local(self, reason: str) -> PrefillOutcome:
        """No remote prefill, by the disaggregation decision ``reason``."""
        DECISIONS.labels(self._policy.name, "disaggregation", reason).inc()
        return PrefillOutcome()

    async def _call_prefill(
        self,
        lease: KvLease,
        prompt: Prompt,
        sampling: common_pb2.SamplingParams,
        failover: Failover,
        deadline: float,
    ) -> engine_pb2.PrefillResponse | StageError:
        """The prefill worker's reply, or the error it failed with."""
        peer = lease.peer
        assert isinstance(peer.client, EngineClient)
        timeout = min(self._config.prefill_timeout, remaining(deadline))
        async with self._workers.using(peer):
            try:
                return await peer.client.prefill(
                    prompt.token_ids,
                    sampling,
                    request_id=lease.request_id,
                    timeout=timeout,
                    adapter=prompt.adapter,
                    session_id=prompt.session_id,
                )
            except grpc.aio.AioRpcError as rpc_error:
                if rpc_error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    lease.release()  # it may have finished as the call ran out
                return failover.error(peer, rpc_error)
            except asyncio.CancelledError:
                lease.release()  # the caller left; the prefill may have finished
                raise

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
            p
            for p in candidates
            if p.key == pinned and p.load_units() < self._config.routing.kv_max_queue
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


def _fallback_reason(error: StageError, collect_failed: bool) -> str:
    """The fallback counter's label when a decode engine failed before its first token."""
    if not collect_failed:
        return "decode_failed"
    return "handle_refused" if isinstance(error, PermissionDenied) else "kv_not_collected"


def _count_sequence(choice: Choice, prefill: PrefillOutcome) -> None:
    """Count a sequence whose decode stream opened, and the prompt tokens found cached
    (once, for the worker that computed the prompt)."""
    SEQUENCES.labels("disaggregated" if prefill.disaggregated else "aggregated").inc()
    PREFIX_HIT_TOKENS.inc(
        prefill.predicted_hit
        if prefill.disaggregated
        else choice.matched_blocks * choice.peer.member.kv_block_size
    )
