"""Request preparation: a request's input becomes a checked prompt of token ids.

Everything here happens before any engine is asked for anything, so a request that
cannot be served is refused at no cost to the mesh: the limits first (pure checks of
the message, router_svc/limits.py), then the model (and admission, in the pipeline), then
the prompt, tokenized by a tokenizer member or checked against the vocabulary when the
caller sent ids, and its length against the shortest context of the engines that serve
the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from router_svc.catalogue import Catalogue
from services.errors import ContextLengthExceeded, InvalidRequest
from services.kv.hashing import chain_hashes, chain_root
from services.pb import common_pb2, router_pb2, tokenizer_pb2
from services.vocabulary import check_token_ids


@dataclass
class Prompt:
    """A tokenized, checked prompt and the facts of its model."""

    model: str
    token_ids: list[int]
    info: tokenizer_pb2.ModelInfo
    arrived: float
    #: The client's sticky-routing key ("" when none).
    session_id: str = ""
    #: The request's cache_salt: its blocks are named apart from unsalted ones.
    salt: str = ""
    #: The LoRA adapter the request runs with ("" for the base model): its blocks are
    #: named apart from the base model's and other adapters'.
    adapter: str = ""
    _hashes: dict[int, list[int]] = field(default_factory=dict)

    def hashes(self, block_size: int) -> list[int]:
        """The prompt's chained block hashes for a KV block size (computed once per size)."""
        if block_size <= 0:
            return []
        if block_size not in self._hashes:
            self._hashes[block_size] = chain_hashes(
                self.token_ids, block_size, chain_root(self.salt, self.adapter)
            )
        return self._hashes[block_size]


async def prepare(
    catalogue: Catalogue, request: router_pb2.RouterGenerateRequest, model: str
) -> Prompt:
    """Tokenize (or check the ids) for the resolved ``model`` and check the length. An
    adapter is tokenized as its base model."""
    arrived = time.monotonic()
    base = catalogue.base(model)
    info = await catalogue.info(model)
    limit = catalogue.max_model_len(model, info)
    _check_sampling_ids(request.sampling, info.vocab_size)
    kind = request.WhichOneof("input")
    chars = _characters(request)
    if info.max_token_chars and chars > limit * info.max_token_chars:
        # Certainly too long: refuse before the tokenizer spends seconds on it.
        raise ContextLengthExceeded(
            f"the prompt has {chars} characters, more than {model!r} can fit in its "
            f"context length of {limit} tokens"
        )
    if kind == "text":
        if not request.text:
            raise InvalidRequest("the prompt is empty")
        reply = await catalogue.tokenizer(base, lambda c: c.tokenize(request.text, base))
        ids = list(reply.token_ids)
    elif kind == "chat":
        reply = await catalogue.tokenizer(
            base, lambda c: c.tokenize_conversation(request.chat, base)
        )
        ids = list(reply.token_ids)
    elif kind == "token_ids":
        ids = list(request.token_ids.ids)
        check_token_ids(ids, info.vocab_size)
    else:
        raise InvalidRequest("the request has no input: set text, chat or token_ids")
    if not ids:
        raise InvalidRequest("the prompt is empty")
    if len(ids) >= limit:
        raise ContextLengthExceeded(
            f"the prompt has {len(ids)} tokens; {model!r} accepts at most {limit - 1} "
            f"(context length {limit}, with room for one generated token)"
        )
    return Prompt(
        model,
        ids,
        info,
        arrived,
        request.session_id,
        request.sampling.cache_salt,
        "" if base == model else model,
    )


def _check_sampling_ids(sampling: common_pb2.SamplingParams, vocab_size: int) -> None:
    """The token ids the sampling settings name are the model's (an engine would fail
    on one outside its vocabulary, after the prompt was prefilled)."""
    for name, ids in (
        ("logit_bias", sampling.logit_bias),
        ("allowed_token_ids", sampling.allowed_token_ids),
    ):
        check_token_ids(ids, vocab_size, name)


def _characters(request: router_pb2.RouterGenerateRequest) -> int:
    """The characters of a request's text input: what bounds its tokens before the
    tokenizer is asked (ids sent as ids have none)."""
    kind = request.WhichOneof("input")
    if kind == "text":
        return len(request.text)
    if kind != "chat":
        return 0
    return len(request.chat.tools_json) + sum(
        len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in request.chat.messages
    )
