"""What chat completions and legacy completions render alike: the envelope (id, object,
created, model), choices with their finish and stop reasons and token ids, usage, and
the stream's error and ``[DONE]`` events.

:class:`ChoiceRenderer` holds that once; :mod:`router_svc.http.chat` and
:mod:`router_svc.http.completions` subclass it with what their choices carry (a message
or a delta with tool calls; text with an echo), so no code asks which endpoint it serves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

from router_svc.generation import Generation
from router_svc.http.errors import ApiError
from router_svc.http.sse import DONE, data
from services.pb import common_pb2, router_pb2

#: OpenAI's finish reasons; an engine's abort or error never reaches a renderer.
FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
}


def usage(counts: common_pb2.Usage) -> dict[str, Any]:
    """OpenAI's usage object, with the prompt tokens served from cache."""
    return {
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.completion_tokens,
        "total_tokens": counts.prompt_tokens + counts.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": counts.cached_tokens},
    }


def prompt_logprobs(
    positions: Sequence[common_pb2.PositionLogprobs],
) -> list[dict[str, Any] | None]:
    """vLLM's prompt_logprobs: None for the first token, then per position every token
    it reports (the prompt's own and the top ones) keyed by id."""
    rendered: list[dict[str, Any] | None] = [None]
    for position in positions:
        entries = {e.token_id: e for e in (position.chosen, *position.top)}
        rendered.append(
            {
                str(token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.token}
                for token_id, e in entries.items()
            }
        )
    return rendered


class ChoiceRenderer:
    """A chat or completions answer, whole (:meth:`whole`) or as a stream
    (:meth:`delta`, with :mod:`router_svc.http.sse`'s other hooks)."""

    #: The id's prefix and the ``object`` of a whole answer and of a chunk.
    id_prefix: ClassVar[str]
    whole_object: ClassVar[str]
    chunk_object: ClassVar[str]

    def __init__(self, generation: Generation, include_usage: bool = False) -> None:
        self._id = self.id_prefix + generation.request_id
        self._created = int(time.time())
        self._model = generation.model
        self._include_usage = include_usage
        self._envelope = {
            "id": self._id,
            "object": self.chunk_object,
            "created": self._created,
            "model": self._model,
        }

    def whole(self, result: router_pb2.RouterGenerateResult) -> dict[str, Any]:
        """The whole answer's body."""
        wants_logprobs = any(c.logprobs for c in result.completions)
        choices = []
        for completion in result.completions:
            choice: dict[str, Any] = {
                "index": completion.index,
                "finish_reason": FINISH.get(completion.finish_reason),
                "stop_reason": completion.stop_reason or None,
            }
            self._fill(choice, completion, wants_logprobs)
            if completion.token_ids:
                choice["token_ids"] = list(completion.token_ids)
            choices.append(choice)
        return {
            "id": self._id,
            "object": self.whole_object,
            "created": self._created,
            "model": result.model,
            "choices": choices,
            "usage": usage(result.usage),
        }

    def delta(self, delta: router_pb2.RouterGenerateResponse) -> bytes:
        """One delta's chunk; the usage chunk if asked for; nothing for text held back."""
        if delta.HasField("usage"):
            return self._chunk([], delta.usage) if self._include_usage else b""
        choice = self._delta_choice(delta)
        if choice is None:
            return b""
        if delta.token_ids:
            choice["token_ids"] = list(delta.token_ids)
        if delta.finish_reason:
            choice["stop_reason"] = delta.stop_reason or None
        return self._chunk([choice])

    def opening(self) -> bytes:
        """Chat and completions streams open with their first chunk."""
        return b""

    def failed(self, error: ApiError) -> bytes:
        """OpenAI's error body as a chunk of its own."""
        return data(error.body())

    def closing(self) -> bytes:
        """``[DONE]``, after the last chunk or the error."""
        return DONE

    def _chunk(
        self, choices: list[dict[str, Any]], counts: common_pb2.Usage | None = None
    ) -> bytes:
        event: dict[str, Any] = {**self._envelope, "choices": choices}
        if self._include_usage:
            event["usage"] = usage(counts) if counts is not None else None
        return data(event)

    def _fill(
        self, choice: dict[str, Any], completion: router_pb2.Completion, wants_logprobs: bool
    ) -> None:
        """Add what this endpoint's whole choice carries (and adjust its finish reason)."""
        raise NotImplementedError

    def _delta_choice(self, delta: router_pb2.RouterGenerateResponse) -> dict[str, Any] | None:
        """This endpoint's streamed choice for a delta, with its ``finish_reason``; None
        when there is nothing to send yet."""
        raise NotImplementedError
