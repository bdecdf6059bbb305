"""Request preparation: a request's input becomes a checked prompt of token ids.

Everything here happens before any engine is asked for anything, so a request that
cannot be served is refused at no cost to the mesh: the limits first (pure checks of
the message), then the model (and admission, in the pipeline), then the prompt,
tokenized by a tokenizer member or checked against the vocabulary when the caller sent
ids, and its length against the shortest context of the engines that serve the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from router_svc.catalogue import Catalogue
from router_svc.config import RouterConfig
from router_svc.constraints import check_constraint
from services.errors import ContextLengthExceeded, InvalidRequest
from services.kv.hashing import chain_hashes, chain_root
from services.pb import router_pb2, tokenizer_pb2
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


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``--max-n``, ``--max-batch``, ...): checked on the
    message alone, before anything is sized by it or any stage is asked."""

    n: int
    batch: int
    stops: int
    stop_chars: int
    messages: int
    id_chars: int
    max_tokens: int
    logit_bias: int
    constraint_chars: int

    @classmethod
    def from_config(cls, config: RouterConfig) -> Limits:
        return cls(
            config.max_n,
            config.max_batch,
            config.max_stops,
            config.max_stop_chars,
            config.max_messages,
            config.max_id_chars,
            config.max_tokens_limit,
            config.max_logit_bias,
            config.max_constraint_chars,
        )

    def check_batch(self, prompts: int) -> None:
        if prompts > self.batch:
            raise InvalidRequest(
                f"a request may batch at most {self.batch} prompts, got {prompts}", "prompt"
            )

    def check_items(self, count: int, param: str) -> None:
        """A list of conversation items (messages, Responses input items) is within
        ``--max-messages``."""
        if count > self.messages:
            raise InvalidRequest(
                f"a request may carry at most {self.messages} {param} items, got {count}", param
            )

    def check_chat(self, chat: tokenizer_pb2.ChatInput) -> None:
        """The limits on a conversation, for generation and for a bare tokenization."""
        if len(chat.tools_json) > self.constraint_chars:
            raise InvalidRequest(
                f"the tools take {len(chat.tools_json)} characters; "
                f"at most {self.constraint_chars}",
                "tools",
            )
        if len(chat.messages) > self.messages:
            raise InvalidRequest(
                f"a request may carry at most {self.messages} messages, got {len(chat.messages)}",
                "messages",
            )

    def check(self, request: router_pb2.RouterGenerateRequest) -> int:
        """The request's ``n``, once every limit holds. Under ``--max-tokens-limit`` a
        request that sets no max_tokens gets the limit as its max_tokens."""
        n = request.n or 1
        if n > self.n:
            raise InvalidRequest(f"n must be between 1 and {self.n}, got {n}", "n")
        ids = (
            ("request_id", request.request_id),
            ("session id", request.session_id),
            ("cache_salt", request.sampling.cache_salt),
        )
        for name, value in ids:
            if len(value) > self.id_chars:
                raise InvalidRequest(
                    f"the {name} has {len(value)} characters; at most {self.id_chars}"
                )
            if not value.isprintable():  # ids reach logs and engines: no control characters
                raise InvalidRequest(f"the {name} must be printable text")
        sampling = request.sampling
        if len(sampling.stop) > self.stops or len(sampling.stop_token_ids) > self.stops:
            raise InvalidRequest(
                f"at most {self.stops} stop strings and {self.stops} stop token ids", "stop"
            )
        if any(len(stop) > self.stop_chars for stop in sampling.stop):
            raise InvalidRequest(
                f"a stop string may have at most {self.stop_chars} characters", "stop"
            )
        if len(sampling.logit_bias) > self.logit_bias:
            raise InvalidRequest(
                f"logit_bias may name at most {self.logit_bias} tokens, "
                f"got {len(sampling.logit_bias)}",
                "logit_bias",
            )
        if any(not -100 <= bias <= 100 for bias in sampling.logit_bias.values()):  # NaN fails too
            raise InvalidRequest("logit_bias values must be between -100 and 100", "logit_bias")
        if len(sampling.bad_words) > self.stops or any(
            len(w) > self.stop_chars for w in sampling.bad_words
        ):
            raise InvalidRequest(
                f"at most {self.stops} bad_words of at most {self.stop_chars} characters each",
                "bad_words",
            )
        if sampling.HasField("structured_outputs"):
            check_constraint(sampling.structured_outputs, self.constraint_chars)
        self.check_chat(request.chat)
        if self.max_tokens:
            if not sampling.HasField("max_tokens"):
                sampling.max_tokens = self.max_tokens  # "up to the context" is more than allowed
            elif sampling.max_tokens > self.max_tokens:
                raise InvalidRequest(
                    f"max_tokens must be at most {self.max_tokens}, got {sampling.max_tokens}",
                    "max_tokens",
                )
        return n


def _input_chars(request: router_pb2.RouterGenerateRequest) -> int:
    """The characters of a request's text, or of its conversation and tools."""
    if request.WhichOneof("input") == "text":
        return len(request.text)
    chat = request.chat
    return len(chat.tools_json) + sum(
        len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in chat.messages
    )


async def prepare(
    catalogue: Catalogue, request: router_pb2.RouterGenerateRequest, model: str
) -> Prompt:
    """Tokenize (or check the ids) for the resolved ``model`` and check the length. An
    adapter is tokenized as its base model."""
    arrived = time.monotonic()
    base = catalogue.base(model)
    info = await catalogue.info(model)
    limit = catalogue.max_model_len(model, info)
    sampling = request.sampling
    for name, ids in (
        ("logit_bias", sampling.logit_bias),
        ("allowed_token_ids", sampling.allowed_token_ids),
    ):
        check_token_ids(ids, info.vocab_size, name)
    kind = request.WhichOneof("input")
    chars = _input_chars(request)
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
