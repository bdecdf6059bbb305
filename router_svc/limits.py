"""The limits on what one request may ask for: a section of the router's settings.

Kept apart from request preparation so the router's config (and ``stagemesh up``, which
reads its defaults) need not import what preparation imports.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.config import setting
from services.errors import InvalidRequest
from services.pb import router_pb2, tokenizer_pb2


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``--max-n``, ``--max-batch``, ...): checked on the
    message alone, before anything is sized by it or any stage is asked. The router's
    config holds it as a section (``config.limits``), each field a ``--max-*`` setting."""

    n: int = setting(16, "most sequences one request may ask for (n)")
    batch: int = setting(256, "most prompts one completions request may batch")
    stops: int = setting(16, "most stop strings, and most stop token ids, one request may set")
    stop_chars: int = setting(256, "longest stop string, in characters")
    messages: int = setting(2048, "most messages one chat request may carry")
    logit_bias: int = setting(300, "most token ids one request may bias (logit_bias)")
    constraint_chars: int = setting(
        65_536,
        "longest output constraint (JSON schema, regex, grammar, all choices), in characters",
    )
    id_chars: int = setting(256, "longest request_id or session id (x-session-id), in characters")
    tokens_limit: int = setting(
        0,
        "largest max_tokens a request may ask for, and the default when it sets none "
        "(0: any; the engines cap it at the context length)",
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
            from router_svc.constraints import check_constraint  # llguidance: only when used

            check_constraint(sampling.structured_outputs, self.constraint_chars)
        self.check_chat(request.chat)
        if self.tokens_limit:
            if not sampling.HasField("max_tokens"):
                sampling.max_tokens = self.tokens_limit  # "up to the context" is more than allowed
            elif sampling.max_tokens > self.tokens_limit:
                raise InvalidRequest(
                    f"max_tokens must be at most {self.tokens_limit}, got {sampling.max_tokens}",
                    "max_tokens",
                )
        return n
