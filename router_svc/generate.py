"""How the router runs a request through the stages.

One request becomes: tokenize (or check the given ids) → for each of its ``n``
sequences, pick a decode worker and, when disaggregating, a prefill worker → Prefill
for a KV handle → decode Generate with the handle → the generated ids detokenized
here, with the decoder the tokenizer stage exports → text deltas to the caller.

Failure policy, in the order things can go wrong:

- no tokenizer or decode member: wait up to ``worker_wait``, then UNAVAILABLE (503);
- a member refuses the connection: set it aside, try the next one;
- the prefill fails or times out: decode the whole request on the decode worker
  (aggregated), as llm-d's routing sidecar does; a disaggregated request never fails
  for want of a prefill worker;
- the decode worker cannot collect the handle (NOT_FOUND: expired, or the prefill
  worker died): run the same request aggregated;
- anything after the first token: the error goes to the caller (the text so far has
  been sent; replaying it elsewhere would duplicate or diverge).

Cancelling the caller's request cancels every internal call it has open, and each
stage aborts its part (the engines abort the vLLM request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import grpc
from prometheus_client import Counter, Histogram

from router_svc.affinity import SessionAffinity
from router_svc.config import RouterConfig
from router_svc.policy import DECISIONS, Choice, Policy
from router_svc.workers import Peer, Workers
from services.aio import cancel_and_wait
from services.clients import EngineClient, TokenizerClient
from services.detokenizer import TokenDecoder
from services.errors import DeadlineExceeded, InvalidRequest, NotFound, Unavailable, from_rpc_error
from services.kv_hash import chain_hashes
from services.membership import role_name
from services.pb import common_pb2, engine_pb2, router_pb2, tokenizer_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

SEQUENCES = Counter(
    "stagemesh_router_sequences_total",
    "Sequences started, by how their prompt was prefilled",
    ["mode"],  # disaggregated | aggregated
)
PREFILL_FALLBACKS = Counter(
    "stagemesh_router_prefill_fallbacks_total",
    "Sequences decoded aggregated after their remote prefill or KV pull failed",
    ["reason"],
)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TIME_TO_FIRST_TOKEN = Histogram(
    "stagemesh_request_ttft_seconds",
    "From a sequence's request arriving to its first generated token",
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "stagemesh_request_itl_seconds",
    "Time between generated tokens of a sequence, as streamed to the caller",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
)
END_TO_END = Histogram(
    "stagemesh_request_e2e_seconds",
    "From a sequence's request arriving to its last token",
    buckets=_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("stagemesh_router_prompt_tokens_total", "Prompt tokens of routed sequences")
PREFIX_HIT_TOKENS = Counter(
    "stagemesh_router_prefix_hit_tokens_total",
    "Prompt tokens the chosen prefilling worker already held, per the router's KV index",
)

#: Prompt ids given to the detokenizer as context (tokenizers render a token
#: differently at the start of a text, e.g. a leading space).
_CONTEXT_IDS = 6
#: Attempts on other members after a connection failure.
_ATTEMPTS = 3


@dataclass
class Prompt:
    """A tokenized, checked prompt and the facts of its model."""

    model: str
    token_ids: list[int]
    info: tokenizer_pb2.ModelInfo
    arrived: float
    #: The client's sticky-routing key ("" when none).
    session_id: str = ""
    _hashes: dict[int, list[int]] = field(default_factory=dict)

    def hashes(self, block_size: int) -> list[int]:
        """The prompt's chained block hashes for a KV block size (computed once per size)."""
        if block_size <= 0:
            return []
        if block_size not in self._hashes:
            self._hashes[block_size] = chain_hashes(self.token_ids, block_size)
        return self._hashes[block_size]


@dataclass
class _Decoding:
    """An open decode stream whose first message has arrived."""

    peer: Peer
    call: grpc.aio.UnaryStreamCall
    first: engine_pb2.GenerateResponse
    #: Prompt tokens the remote prefill found cached (disaggregated only).
    prefill_cached: int
    disaggregated: bool


class Orchestrator:
    """Runs requests through the mesh's stages; shared by the gRPC API and the HTTP bridge."""

    def __init__(self, config: RouterConfig, workers: Workers, policy: Policy) -> None:
        self.config = config
        self.workers = workers
        self.policy = policy
        self.affinity = SessionAffinity(config.session_ttl, config.max_sessions)
        self._infos: dict[str, asyncio.Future[tokenizer_pb2.ModelInfo]] = {}
        self._decoders: dict[str, asyncio.Future[TokenDecoder]] = {}

    def deadline(self, client_remaining: float | None = None) -> float:
        """Monotonic deadline of a request: the configured limit or the client's, if shorter."""
        limit = self.config.request_timeout
        if client_remaining is not None:
            limit = min(limit, client_remaining)
        return time.monotonic() + limit

    # -- models -------------------------------------------------------------

    async def resolve_model(self, name: str) -> str:
        """The model a request names (empty: the mesh's default); NOT_FOUND when none serves it."""
        tokenizer = await self.workers.pick(
            common_pb2.ROLE_TOKENIZER, "", self.config.worker_wait
        )
        if not name:
            if not tokenizer.member.models:
                raise Unavailable("the tokenizer member lists no models")
            return tokenizer.member.models[0]
        served = {m for p in self.workers.candidates(common_pb2.ROLE_TOKENIZER) for m in p.member.models}
        if name not in served:
            raise NotFound(f"model {name!r} is not served here; models: {', '.join(sorted(served)) or 'none'}")
        return name

    async def model_info(self, model: str) -> tokenizer_pb2.ModelInfo:
        return await fetch_once(self._infos, model, lambda: self._with_tokenizer(model, lambda c: c.model_info(model)))

    async def decoder(self, model: str) -> TokenDecoder:
        """The model's decoder, fetched from a tokenizer member on the model's first request."""
        return await fetch_once(self._decoders, model, lambda: self._with_tokenizer(model, lambda c: c.decoder(model)))

    def max_model_len(self, model: str, info: tokenizer_pb2.ModelInfo) -> int:
        """The shortest context any engine serving ``model`` accepts (the tokenizer's if none say)."""
        lengths = [
            p.member.max_model_len for p in self.workers.peers.values()
            if p.member.max_model_len and p.serves(model)
        ]
        return min(lengths, default=info.max_model_len)

    async def model_cards(self) -> list[router_pb2.ModelCard]:
        """Every model a tokenizer serves, with its context length and engine members."""
        names = dict.fromkeys(
            m for p in self.workers.candidates(common_pb2.ROLE_TOKENIZER) for m in p.member.models
        )
        cards = []
        for name in names:
            card = router_pb2.ModelCard(name=name)
            card.max_model_len = self.max_model_len(name, await self.model_info(name))
            for peer in self.workers.peers.values():
                if peer.role != common_pb2.ROLE_TOKENIZER and name in peer.member.models:
                    role = role_name(peer.role)
                    card.members_by_role[role] = card.members_by_role.get(role, 0) + 1
            cards.append(card)
        return cards

    # -- a request ------------------------------------------------------------

    async def prepare(self, request: router_pb2.RouterGenerateRequest) -> Prompt:
        """Resolve the model, tokenize (or check the ids) and check the length."""
        arrived = time.monotonic()
        model = await self.resolve_model(request.model)
        info = await self.model_info(model)
        limit = self.max_model_len(model, info)
        kind = request.WhichOneof("input")
        chars = len(request.text) if kind == "text" else sum(len(m.content) for m in request.chat.messages)
        if info.max_token_chars and chars > limit * info.max_token_chars:
            # Certainly too long: refuse before the tokenizer spends seconds on it.
            raise InvalidRequest(
                f"the prompt has {chars} characters, more than {model!r} can fit in its "
                f"context length of {limit} tokens"
            )
        if kind == "text":
            if not request.text:
                raise InvalidRequest("the prompt is empty")
            reply = await self._with_tokenizer(model, lambda c: c.tokenize(request.text, model))
            ids = list(reply.token_ids)
        elif kind == "chat":
            messages = [
                {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                for m in request.chat.messages
            ]
            add = request.chat.add_generation_prompt if request.chat.HasField("add_generation_prompt") else True
            reply = await self._with_tokenizer(
                model,
                lambda c: c.tokenize_chat(messages, model, add, request.chat.continue_final_message),
            )
            ids = list(reply.token_ids)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            for position, token_id in enumerate(ids):
                if token_id >= info.vocab_size:
                    raise InvalidRequest(
                        f"token id {token_id} at position {position} is outside the vocabulary "
                        f"(size {info.vocab_size})"
                    )
        else:
            raise InvalidRequest("the request has no input: set text, chat or token_ids")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if len(ids) >= limit:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; {model!r} accepts at most {limit - 1} "
                f"(context length {limit}, with room for one generated token)"
            )
        return Prompt(model, ids, info, arrived, request.session_id)

    async def generate(
        self, request: router_pb2.RouterGenerateRequest, deadline: float, prompt: Prompt | None = None
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """Stream the request's deltas; the last message carries the usage totals."""
        n = request.n or 1
        if n > self.config.max_n:
            raise InvalidRequest(f"n must be between 1 and {self.config.max_n}, got {n}")
        request_id = request.request_id or uuid.uuid4().hex
        if prompt is None:
            prompt = await self.prepare(request)
        usage = common_pb2.Usage(prompt_tokens=len(prompt.token_ids))
        streams = [
            self._sequence(prompt, request, index, request_id, deadline, usage) for index in range(n)
        ]
        async with contextlib.aclosing(merge(streams)) as deltas:
            async for delta in deltas:
                delta.request_id = request_id
                yield delta
        yield router_pb2.RouterGenerateResponse(usage=usage, request_id=request_id)

    async def complete(
        self, request: router_pb2.RouterGenerateRequest, deadline: float, prompt: Prompt | None = None
    ) -> router_pb2.RouterGenerateResult:
        """The whole result at once: each sequence's deltas joined."""
        if prompt is None:
            prompt = await self.prepare(request)
        result = router_pb2.RouterGenerateResult(model=prompt.model)
        completions = [router_pb2.Completion(index=i) for i in range(request.n or 1)]
        async with contextlib.aclosing(self.generate(request, deadline, prompt)) as deltas:
            async for delta in deltas:
                result.request_id = delta.request_id
                if delta.HasField("usage"):
                    result.usage.CopyFrom(delta.usage)
                    continue
                completion = completions[delta.index]
                completion.text += delta.text
                completion.token_ids.extend(delta.token_ids)
                completion.logprobs.extend(delta.logprobs)
                if delta.finish_reason:
                    completion.finish_reason = delta.finish_reason
                    completion.stop_reason = delta.stop_reason
        result.completions.extend(completions)
        return result

    # -- one sequence ---------------------------------------------------------

    def _sampling(
        self, request: router_pb2.RouterGenerateRequest, prompt: Prompt, index: int
    ) -> common_pb2.SamplingParams:
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        if not sampling.ignore_eos:
            # Engines skip their tokenizer, so they know only the generation config's
            # EOS; the tokenizer's may differ (chat models end turns on their own token).
            known = set(sampling.stop_token_ids)
            sampling.stop_token_ids.extend(i for i in prompt.info.eos_token_ids if i not in known)
        if index and sampling.HasField("seed"):
            sampling.seed += index  # n samples with one seed must still differ
        return sampling

    async def _sequence(
        self,
        prompt: Prompt,
        request: router_pb2.RouterGenerateRequest,
        index: int,
        request_id: str,
        deadline: float,
        usage: common_pb2.Usage,
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """One sequence: the decode stream's ids, detokenized here, as deltas.

        Detokenizing in the router (with the decoder the tokenizer stage exports) keeps
        each generated token to one message in and one out: through the tokenizer's
        Detokenize stream it cost two more messages and a hop, the largest share of
        the router's per-token cost (docs/design.md, "Where detokenization runs").
        """
        sampling = self._sampling(request, prompt, index)
        sequence_id = f"{request_id}-{index}"
        decoder = await self.decoder(prompt.model)
        detokenizer = decoder.detokenizer(
            prompt.token_ids[-_CONTEXT_IDS:],
            sampling.stop,
            sampling.include_stop_str_in_output,
            sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") else True,
        )
        decoding = await self._open_decode(prompt, sampling, sequence_id, deadline)
        last_token_at = time.monotonic()
        TIME_TO_FIRST_TOKEN.observe(last_token_at - prompt.arrived)
        reply: engine_pb2.GenerateResponse | object = decoding.first
        try:
            while True:
                if reply is grpc.aio.EOF:
                    raise Unavailable(f"decode {decoding.peer.member.instance_id}: the stream ended "
                                      "without a finish reason")
                assert isinstance(reply, engine_pb2.GenerateResponse)
                text = detokenizer.push(reply.token_ids)
                if reply.finish_reason and not detokenizer.stopped:
                    text += detokenizer.finish()
                delta = router_pb2.RouterGenerateResponse(index=index, text=text)
                if request.return_token_ids:
                    delta.token_ids.extend(reply.token_ids)
                if reply.logprobs:
                    delta.logprobs.extend(reply.logprobs)
                    _name_tokens(decoder, delta.logprobs)
                if detokenizer.stopped:
                    decoding.call.cancel()  # the engine aborts the rest
                    delta.finish_reason = common_pb2.FINISH_REASON_STOP
                    delta.stop_reason = detokenizer.stop_reason
                elif reply.finish_reason:
                    delta.finish_reason = reply.finish_reason
                    if reply.HasField("stop_token_id") and reply.stop_token_id not in prompt.info.eos_token_ids:
                        delta.stop_reason = str(reply.stop_token_id)
                now = time.monotonic()
                if reply is not decoding.first and reply.token_ids:
                    gap = (now - last_token_at) / len(reply.token_ids)
                    for _ in reply.token_ids:
                        INTER_TOKEN_LATENCY.observe(gap)
                last_token_at = now
                if delta.finish_reason:
                    END_TO_END.observe(now - prompt.arrived)
                    self._account(usage, index, detokenizer.num_tokens, decoding, reply)
                if delta.text or delta.token_ids or delta.logprobs or delta.finish_reason:
                    yield delta
                if delta.finish_reason:
                    return
                reply = await decoding.call.read()
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, f"decode {decoding.peer.member.instance_id}") from None
        finally:
            decoding.call.cancel()
            decoding.peer.in_flight -= 1

    @staticmethod
    def _account(
        usage: common_pb2.Usage,
        index: int,
        completion: int,
        decoding: _Decoding,
        last: engine_pb2.GenerateResponse,
    ) -> None:
        usage.completion_tokens += completion
        if index == 0:  # the prompt is counted once, as OpenAI does for n > 1
            if decoding.disaggregated:
                usage.cached_tokens = decoding.prefill_cached
            else:  # the engine reports it with its finish; a stop string ends earlier
                usage.cached_tokens = last.usage.cached_tokens

    async def _open_decode(
        self, prompt: Prompt, sampling: common_pb2.SamplingParams, sequence_id: str, deadline: float
    ) -> _Decoding:
        """A decode stream with its first message in hand, after prefill and fallbacks."""
        handle, cached, prefill_hit = await self._prefill(prompt, sampling, sequence_id, deadline)
        tried: frozenset[str] = frozenset()
        while True:
            candidates = await self.workers.wait_candidates(
                common_pb2.ROLE_DECODE, prompt.model, self.config.worker_wait, tried
            )
            choice = self._choose(common_pb2.ROLE_DECODE, candidates, prompt, sequence_id)
            peer = choice.peer
            assert isinstance(peer.client, EngineClient)
            peer.in_flight += 1
            call = peer.client.generate(
                prompt.token_ids, sampling, handle, request_id=sequence_id, timeout=_remaining(deadline)
            )
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as error:
                call.cancel()
                peer.in_flight -= 1
                code = error.code()
                if code == grpc.StatusCode.UNAVAILABLE and len(tried) + 1 < _ATTEMPTS:
                    self.workers.mark_down(peer)
                    tried |= {peer.key}
                    continue
                if code == grpc.StatusCode.NOT_FOUND and handle is not None:
                    log.warning("%s: decode could not collect the KV (%s); decoding aggregated",
                                sequence_id, error.details())
                    PREFILL_FALLBACKS.labels("kv_not_collected").inc()
                    handle, cached = None, 0
                    continue
                raise from_rpc_error(error, f"decode {peer.member.instance_id}") from None
            except BaseException:
                call.cancel()
                peer.in_flight -= 1
                raise
            if first is grpc.aio.EOF:
                call.cancel()
                peer.in_flight -= 1
                raise Unavailable(f"decode {peer.member.instance_id} ended the stream without output")
            SEQUENCES.labels("disaggregated" if handle is not None else "aggregated").inc()
            # Counted once, for the worker that computed the prompt.
            PREFIX_HIT_TOKENS.inc(
                prefill_hit if handle is not None else choice.matched_blocks * peer.member.kv_block_size
            )
            return _Decoding(peer, call, first, cached, handle is not None)

    async def _prefill(
        self, prompt: Prompt, sampling: common_pb2.SamplingParams, sequence_id: str, deadline: float
    ) -> tuple[common_pb2.KvTransferHandle | None, int, int]:
        """A KV handle from the chosen prefill worker, the tokens it found cached and the
        tokens the index predicted it holds; or (None, 0, 0) to run aggregated.

        Conditional disaggregation: the prompt goes to a prefill worker only when the
        part of it that worker does not hold is at least ``--disagg-min-tokens``, and
        the prefill pool is not saturated; otherwise the decode worker computes it.
        """
        PROMPT_TOKENS.inc(len(prompt.token_ids))
        candidates = self.workers.candidates(common_pb2.ROLE_PREFILL, prompt.model)
        if not candidates:
            return None, 0, 0
        if all(p.queued() >= self.config.kv_max_queue for p in candidates):
            DECISIONS.labels(self.policy.name, "disaggregation", "local_prefill_saturated").inc()
            return None, 0, 0
        choice = self._choose(common_pb2.ROLE_PREFILL, candidates, prompt, sequence_id)
        uncached = len(prompt.token_ids) - choice.matched_blocks * choice.peer.member.kv_block_size
        if uncached < self.config.disagg_min_tokens:
            DECISIONS.labels(self.policy.name, "disaggregation", "local_short_uncached").inc()
            return None, 0, 0
        DECISIONS.labels(self.policy.name, "disaggregation", "remote").inc()
        peer = choice.peer
        assert isinstance(peer.client, EngineClient)
        timeout = min(self.config.prefill_timeout, _remaining(deadline))
        async with self.workers.using(peer):
            try:
                reply = await peer.client.prefill(
                    prompt.token_ids, sampling, request_id=f"{sequence_id}-prefill", timeout=timeout
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise from_rpc_error(error, "prefill") from None
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    self.workers.mark_down(peer)
                log.warning("%s: prefill on %s failed (%s: %s); decoding aggregated",
                            sequence_id, peer.member.instance_id, error.code().name, error.details())
                PREFILL_FALLBACKS.labels(error.code().name.lower()).inc()
                return None, 0, 0
        return reply.handle, reply.cached_tokens, len(prompt.token_ids) - uncached

    def _choose(self, role: int, candidates: list[Peer], prompt: Prompt, sequence_id: str) -> Choice:
        """Apply session affinity, then the routing policy; count and log the decision.

        A session goes back to its last worker while that worker is a candidate and its
        queue is below ``--kv-max-queue``; the policy still scores it, so the prefix it
        holds is counted as for any other choice.
        """
        pinned = self.affinity.get(prompt.session_id, role)
        sticky = [p for p in candidates if p.key == pinned and p.queued() < self.config.kv_max_queue]
        choice = self.policy.choose(sticky or candidates, prompt.hashes(candidates[0].member.kv_block_size))
        if sticky:
            choice = replace(choice, reason="session_affinity")
        self.affinity.remember(prompt.session_id, role, choice.peer.key)
        DECISIONS.labels(self.policy.name, role_name(role), choice.reason).inc()
        log.debug(
            "%s: %s -> %s (%s, %d prefix blocks, %d queued)", sequence_id, role_name(role),
            choice.peer.member.instance_id, choice.reason, choice.matched_blocks, choice.peer.queued(),
        )
        return choice

    async def _with_tokenizer(
        self, model: str, call: Callable[[TokenizerClient], Awaitable[T]]
    ) -> T:
        """Run a unary tokenizer call on the least-loaded member, moving on if it is down."""
        tried: frozenset[str] = frozenset()
        while True:
            peer = await self.workers.pick(
                common_pb2.ROLE_TOKENIZER, model, self.config.worker_wait, tried
            )
            assert isinstance(peer.client, TokenizerClient)
            async with self.workers.using(peer):
                try:
                    return await call(peer.client)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE or len(tried) + 1 >= _ATTEMPTS:
                        raise from_rpc_error(error, "tokenizer") from None
                    self.workers.mark_down(peer)
                    tried |= {peer.key}


async def fetch_once(cache: dict[str, asyncio.Future[T]], key: str, fetch: Callable[[], Awaitable[T]]) -> T:
    """``fetch()``'s result for ``key``, fetched once per key for the router's lifetime.

    Concurrent first callers share one fetch (a burst of first requests for a model
    would otherwise each download and rebuild its decoder); a caller cancelled while
    waiting leaves the fetch running for the others; a failed fetch is forgotten, so
    the next caller tries again.
    """
    future = cache.get(key)
    if future is None:
        future = cache[key] = asyncio.ensure_future(fetch())

        def forget_failure(done: asyncio.Future[T]) -> None:
            if (done.cancelled() or done.exception() is not None) and cache.get(key) is done:
                del cache[key]

        future.add_done_callback(forget_failure)
    return await asyncio.shield(future)


def _name_tokens(decoder: TokenDecoder, logprobs: Iterable[common_pb2.PositionLogprobs]) -> None:
    """Fill each log-probability entry's token text."""
    entries = [entry for position in logprobs for entry in (position.chosen, *position.top)]
    ids = sorted({entry.token_id for entry in entries})
    texts = dict(zip(ids, decoder.token_texts(ids), strict=True))
    for entry in entries:
        entry.token = texts[entry.token_id]


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the request ran out of time")
    return left


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Interleave several async iterators as their items come; the first error ends all.

    Closing the merged iterator (or cancelling its consumer) cancels every source,
    which closes each and runs its cleanup.
    """
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[bool, object]] = asyncio.Queue()

    async def drain(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((True, item))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((False, exc))
            return
        await queue.put((False, None))

    tasks = [asyncio.create_task(drain(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            ok, value = await queue.get()
            if ok:
                yield value  # type: ignore[misc]
            elif value is None:
                running -= 1
            else:
                raise value  # type: ignore[misc]
    finally:
        for task in tasks:
            await cancel_and_wait(task)
