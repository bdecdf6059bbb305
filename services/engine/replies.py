"""Engine outputs as the mesh's GenerateResponse messages.

One message may carry several outputs: the ids an engine made while the router was
behind (see :func:`services.engine.backend.batches`). Outputs have vLLM's
``RequestOutput`` shape, from either engine.
"""

from __future__ import annotations

from typing import Any

from services.pb import common_pb2, engine_pb2

#: The most ids a Generate request may ask to be held back per message
#: (``min_ids_per_message``): plenty for a relay that is behind, far short of a message
#: too large to send once logprobs ride along.
MAX_IDS_PER_MESSAGE = 64

_FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}


def _position_logprobs(
    token_id: int, entry: dict[int, Any], top_k: int
) -> common_pb2.PositionLogprobs:
    """vLLM's {token id: Logprob} at one position: the chosen token, plus the ``top_k``
    most likely (vLLM adds the chosen token to the top ones when it ranks lower)."""

    def item(tid: int) -> common_pb2.TokenLogprob:
        value = entry[tid]
        return common_pb2.TokenLogprob(
            token_id=tid, logprob=float(value.logprob), rank=int(value.rank or 0)
        )

    ranked = sorted(entry, key=lambda tid: entry[tid].rank or 0)
    return common_pb2.PositionLogprobs(
        chosen=item(token_id) if token_id in entry else common_pb2.TokenLogprob(token_id=token_id),
        top=[item(tid) for tid in ranked[:top_k]],
    )


class Reply:
    """The next GenerateResponse of a stream, built from one or more engine outputs: ids
    made while the router was behind travel in one message, with their logprobs, and the
    finish reason, stop token and usage of the last."""

    def __init__(self, request: engine_pb2.GenerateRequest) -> None:
        self._request = request
        self.message = engine_pb2.GenerateResponse()
        self.completion_tokens = 0
        self.sent = False

    def add(self, output: Any) -> None:
        request, message = self._request, self.message
        sequence = output.outputs[0]
        self.completion_tokens += len(sequence.token_ids)
        message.token_ids.extend(sequence.token_ids)
        if output.prompt_logprobs:
            message.prompt_logprobs.extend(
                _position_logprobs(token_id, entry, request.sampling.prompt_logprobs)
                for token_id, entry in zip(request.prompt_token_ids, output.prompt_logprobs)
                if entry is not None
            )
        if sequence.logprobs:
            message.logprobs.extend(
                _position_logprobs(token_id, entry, request.sampling.logprobs)
                for token_id, entry in zip(sequence.token_ids, sequence.logprobs)
                if entry is not None
            )
        if not output.finished:
            return
        message.finish_reason = _FINISH_REASONS.get(
            sequence.finish_reason or "", common_pb2.FINISH_REASON_STOP
        )
        if isinstance(sequence.stop_reason, int):
            message.stop_token_id = sequence.stop_reason
        elif sequence.finish_reason == "stop" and sequence.token_ids:
            # vLLM reports its own EOS with no stop reason (engines get no stop
            # strings, so a "stop" without one is always the EOS token).
            message.stop_token_id = sequence.token_ids[-1]
        message.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=len(request.prompt_token_ids),
                completion_tokens=self.completion_tokens,
                cached_tokens=int(output.num_cached_tokens or 0),
            )
        )

    def take(self) -> engine_pb2.GenerateResponse:
        message, self.message = self.message, engine_pb2.GenerateResponse()
        self.sent = True
        return message
