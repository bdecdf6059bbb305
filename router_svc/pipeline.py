"""The router's one entry for a request: ``async with Pipeline.start(...) as generation``.

A request runs through the router's modules in order (docs/design.md, "Life of a
request"):

1. limits and preparation: a chat request's tools planned (:mod:`router_svc.tools`),
   the limits checked (:mod:`router_svc.prepare`), the model resolved from the
   :mod:`~router_svc.catalogue` (its tool-call parser with it), the input tokenized and
   checked;
2. for each of its sequences (every prompt of a batch, ``n`` times), dispatch
   (:mod:`router_svc.dispatch`): prefill and decode workers chosen, the decode stream
   opened;
3. the sequence (:mod:`router_svc.sequence`): generated ids detokenized, stop strings
   found;
4. metrics (:mod:`router_svc.metrics`) observed as replies pass.

:meth:`Pipeline.start` does step 1 for every prompt, and admits the request against
its model's bound (``--max-queued-requests``), so any error that stops a request from
starting is raised there, before the caller has seen anything. The gRPC service
and the HTTP bridge only render the generation (:mod:`router_svc.generation`): its
deltas as they come, or its :meth:`~Generation.result` at once. Batch prompts and
``n`` fan-out happen here and nowhere else.

Cancelling the caller's request cancels every internal call it has open, and each
stage aborts its part (the engines abort the vLLM request).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace

from router_svc.audit import AuditLog
from router_svc.auth import tenant_salt
from router_svc.catalogue import Catalogue
from router_svc.config import RouterConfig
from router_svc.dispatch import Dispatcher
from router_svc.generation import Generation
from router_svc.guard import Guard
from router_svc.metrics import IN_PROGRESS, MIGRATIONS, SequenceClock
from router_svc.policy import Policy
from router_svc.prepare import Prompt, prepare
from router_svc.saturation import Saturation
from router_svc.sequence import SequenceRun, has_content, sampling_for
from router_svc.tool_parsers import ParserChoice
from router_svc.tools import ToolPlan, ToolRequest
from router_svc.workers import Workers
from services.errors import InvalidRequest, Overloaded, StageError
from services.pb import common_pb2, router_pb2, tokenizer_pb2
from services.vocabulary import check_token_ids

log = logging.getLogger(__name__)


class Pipeline:
    """Runs requests through the mesh's stages; shared by the gRPC API and the HTTP bridge."""

    def __init__(
        self,
        config: RouterConfig,
        workers: Workers,
        policy: Policy,
        audit: AuditLog | None = None,
        guard: Guard | None = None,
    ) -> None:
        self._config = config
        # (`is None`, not `or`: a disabled log and a guard without a URL are falsy)
        self.audit = audit if audit is not None else AuditLog()
        self.guard = guard if guard is not None else Guard()
        self._workers = workers
        self.catalogue = Catalogue(workers, config.worker_wait)
        self.limits = config.limits
        #: Which parser reads each model's tool calls (``--tool-call-parser[s]``).
        self.parsers = ParserChoice(config.tool_call_parser, config.tool_call_parsers)
        #: The relay's load: new requests wait for a loop that keeps up (429 meanwhile),
        #: and while it is behind, new streams ask for several ids per engine message.
        self.saturation = Saturation(config.max_loop_lag_ms / 1000, config.behind_stream_interval)
        self._dispatch = Dispatcher(config, workers, policy, self.saturation)
        #: Sequences in progress per model (admitted by :meth:`start`, not yet finished).
        self._admitted: dict[str, int] = {}
        #: The most a non-streamed answer may hold (``--max-result-mib``).
        self.max_result_bytes = config.max_result_mib << 20

    async def tokenize(
        self, message: tokenizer_pb2.TokenizeRequest
    ) -> tuple[tokenizer_pb2.TokenizeResponse, int]:
        """A bare tokenization (vLLM's /tokenize): the model resolved and tokenized as its
        base model, a conversation checked against the request limits first. Returns the
        tokenizer's answer and the model's context length."""
        model = await self.catalogue.resolve(message.model)
        message.model = self.catalogue.base(model)
        self.limits.check_chat(message.chat)
        reply = await self.catalogue.tokenizer(
            message.model, lambda client: client.tokenize_request(message)
        )
        return reply, self.catalogue.max_model_len(model, await self.catalogue.info(model))

    async def detokenize(self, model: str, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (vLLM's /detokenize), decoded in the router as
        generated text is; an id outside the vocabulary is refused."""
        model = await self.catalogue.resolve(model)
        info = await self.catalogue.info(model)
        check_token_ids(token_ids, info.vocab_size, "tokens")
        return (await self.catalogue.decoder(model)).decode(token_ids)

    def deadline(self, client_remaining: float | None = None) -> float:
        """Monotonic deadline of a request: the configured limit or the client's, if shorter."""
        limit = self._config.request_timeout
        if client_remaining is not None:
            limit = min(limit, client_remaining)
        return time.monotonic() + limit

    def missing_roles(self) -> list[str]:
        """The roles every request needs that have no usable member now (empty: ready)."""
        needed = ((common_pb2.ROLE_TOKENIZER, "tokenizer"), (common_pb2.ROLE_DECODE, "decode"))
        return [name for role, name in needed if not self._workers.candidates(role)]

    @contextlib.asynccontextmanager
    async def start(
        self,
        requests: Sequence[router_pb2.RouterGenerateRequest],
        deadline: float,
        caller: str = "",
        tools: ToolRequest | None = None,
    ) -> AsyncIterator[Generation]:
        """Check, admit and prepare a request: one message, or several that differ only in
        their input (a batch of prompts, as OpenAI's completions take). Raises before
        anything has been generated when the request cannot start; the request holds its
        place in the model's admission count until the block exits. ``caller`` is the
        id of the caller's API key (:meth:`router_svc.auth.ApiKeys.key_id`), for the audit
        log; ``tools`` what a chat request says about tools (planned here, with the
        parser of the model the request resolves to).

        A request refused here (limits, the guard, an unknown model, overload) gets its
        audit line here; one that started gets it from its :class:`Generation`."""
        if not requests:
            raise InvalidRequest("the request has no prompt")
        request_id = requests[0].request_id or uuid.uuid4().hex
        started = time.monotonic()
        generation: Generation | None = None
        try:
            self._check_relay()
            plan = ToolPlan.build(tools) if tools is not None else None
            if plan is not None:  # before the checks: they cover the tools and their constraint
                for request in requests:
                    plan.apply(request)
            requests, n = await self._checked(requests, request_id, caller)
            model = await self.catalogue.resolve(requests[0].model)
            if plan is not None:
                plan = plan.read_by(self.parsers.for_model(model, self.catalogue.base(model)))
            with self._admission(model, len(requests) * n):
                prompts = [await prepare(self.catalogue, request, model) for request in requests]
                generation = Generation(
                    self,
                    list(zip(requests, prompts, strict=True)),
                    n,
                    request_id,
                    deadline,
                    caller,
                    plan,
                )
                yield generation
        except StageError as error:
            if generation is None:
                self.audit.record(
                    request_id=request_id,
                    key_id=caller,
                    model=requests[0].model,
                    requests=requests,
                    outputs=[],
                    finish_reasons=[],
                    usage=common_pb2.Usage(),
                    started=started,
                    workers=[],
                    error=error,
                )
            raise

    async def _checked(
        self, requests: Sequence[router_pb2.RouterGenerateRequest], request_id: str, caller: str
    ) -> tuple[Sequence[router_pb2.RouterGenerateRequest], int]:
        """The requests once the limits and the guard pass them (the guard may rewrite
        them; what it rewrites is checked again), salted with the caller's tenant, and
        their ``n``."""
        self.limits.check_batch(len(requests))
        n = max(self.limits.check(request) for request in requests)
        if self.guard:
            requests = [
                await self.guard.check_input(request, request_id, caller) for request in requests
            ]
            n = max(self.limits.check(request) for request in requests)
        if caller and not self._config.share_prefix_cache:
            for request in requests:  # after the guard: it sees what the client sent
                request.sampling.cache_salt = salted(caller, request.sampling.cache_salt)
        return requests, n

    def _check_relay(self) -> None:
        """Refuse a new request while this process's relay is saturated (see
        :mod:`router_svc.saturation`): admitted streams keep their pace."""
        if self.saturation.saturated:
            raise Overloaded(
                f"the router is relaying all it can (its event loop runs "
                f"{self.saturation.lag * 1000:.0f} ms late, busy "
                f"{self.saturation.busy_share:.0%} of the time); try again shortly"
            )

    @contextlib.contextmanager
    def _admission(self, model: str, sequences: int) -> Iterator[None]:
        """Count a request's sequences (prompts × n: what the engines run) against its
        model's bound: what the model's decode members run at once plus
        ``--max-queued-requests``. Past it: 429 / RESOURCE_EXHAUSTED; a request larger
        than the whole bound can never start, and is a 400."""
        running = sum(
            p.member.max_concurrency
            for p in self._workers.candidates(common_pb2.ROLE_DECODE, model)
        )
        bound = running + self._config.max_queued_requests
        if sequences > bound:
            raise InvalidRequest(
                f"the request asks for {sequences} sequences (prompts × n); {model!r} admits "
                f"at most {bound} at once",
                "n",
            )
        admitted = self._admitted.get(model, 0)
        if admitted + sequences > bound:
            raise Overloaded(
                f"{model!r} has {admitted} sequences in progress; with this request's "
                f"{sequences} that is more than its engines run at once ({running}) plus the "
                f"router's queue ({self._config.max_queued_requests}); try again shortly"
            )
        self._admitted[model] = admitted + sequences
        IN_PROGRESS.labels(model).inc()
        try:
            yield
        finally:
            self._admitted[model] -= sequences
            IN_PROGRESS.labels(model).dec()

    async def run_sequence(
        self,
        request: router_pb2.RouterGenerateRequest,
        prompt: Prompt,
        sample: int,
        choice: int,
        sequence_id: str,
        deadline: float,
        usage: common_pb2.Usage,
        workers: list[str],
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """Sample ``sample`` of a prompt, as output ``choice``: its deltas, and its tokens
        (with the prompt's, once per prompt) added to ``usage``; the workers it used are
        added to ``workers``."""
        sampling = sampling_for(request, prompt, sample)
        decoder = await self.catalogue.decoder(prompt.model)
        run = SequenceRun(prompt, sampling, decoder, choice, request.return_token_ids)
        clock = SequenceClock(prompt.arrived)
        generated: list[int] = []
        for migration in itertools.count():
            attempt = continuation(prompt, sampling, generated)
            attempt_id = sequence_id if not migration else f"{sequence_id}-m{migration}"
            try:
                async with self._dispatch.decoding(
                    attempt.prompt, attempt.sampling, attempt_id, deadline
                ) as decoding:
                    workers.extend(decoding.workers())
                    async for reply in decoding.replies():
                        generated.extend(reply.token_ids)
                        clock.reply(len(reply.token_ids))
                        delta = run.delta(reply)
                        if delta.finish_reason:
                            clock.finished()
                            usage.completion_tokens += run.completion_tokens
                            if sample == 0:  # the prompt is counted once, as OpenAI does for n > 1
                                usage.prompt_tokens += len(prompt.token_ids)
                                usage.cached_tokens += decoding.cached_tokens(reply)
                        if has_content(delta):
                            yield delta
                        if delta.finish_reason:
                            return
            except StageError as error:
                if not self._migrates(error, sampling, generated, migration):
                    raise
                MIGRATIONS.inc()
                log.warning(
                    "%s: %s after %d tokens; migrating it to another decode worker",
                    sequence_id,
                    error,
                    len(generated),
                )

    def _migrates(
        self,
        error: StageError,
        sampling: common_pb2.SamplingParams,
        generated: list[int],
        migration: int,
    ) -> bool:
        """Whether a broken sequence carries on on another decode worker: one that has
        tokens, broken by an error that says so, within ``--migration-limit``. A
        constrained sequence cannot: the grammar would start over at the tokens already
        generated."""
        return (
            not sampling.HasField("structured_outputs")
            and bool(generated)
            and error.retry_elsewhere
            and migration < self._config.migration_limit
        )


def salted(caller: str, requested: str) -> str:
    """The cache_salt a caller's request runs with: its key's tenant salt, and the salt
    the request asked for, if any (tenants stay apart whatever salts they choose)."""
    tenant = tenant_salt(caller)
    return f"{tenant}:{requested}" if requested else tenant


@dataclass
class Attempt:
    """What one decode attempt of a sequence is asked to do."""

    prompt: Prompt
    sampling: common_pb2.SamplingParams


def continuation(
    prompt: Prompt, sampling: common_pb2.SamplingParams, generated: list[int]
) -> Attempt:
    """The attempt that carries on a sequence after ``generated`` tokens: the prompt plus
    those tokens, with what is left of the token budget and the same sampling settings.
    A greedy sequence so continued is the one an unbroken run would have produced."""
    if not generated:
        return Attempt(prompt, sampling)
    rest = common_pb2.SamplingParams()
    rest.CopyFrom(sampling)
    if sampling.HasField("max_tokens"):
        rest.max_tokens = max(1, sampling.max_tokens - len(generated))
    rest.min_tokens = max(0, sampling.min_tokens - len(generated))
    rest.ClearField("prompt_logprobs")  # sent with the first attempt's first message
    return Attempt(replace(prompt, token_ids=prompt.token_ids + generated, _hashes={}), rest)
