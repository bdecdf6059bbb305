"""One sequence of a request: the engine's generated ids in, the caller's deltas out.

Detokenizing in the router (with the decoder the tokenizer stage exports) keeps each
engine message to one message in and one out: through the tokenizer stage (its
former Detokenize stream) it cost two more messages and a hop, the largest share of the router's
per-token cost (docs/design.md, "Where detokenization runs"). Stop strings are found
here for the same reason; when one ends the sequence, the engine's stream is
cancelled and the engine aborts the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

from router_svc.prepare import Prompt
from services.detokenizer import TokenDecoder
from services.pb import common_pb2, engine_pb2, router_pb2

#: Prompt ids given to the detokenizer as context (tokenizers render a token
#: differently at the start of a text, e.g. a leading space).
_CONTEXT_IDS = 6


def sampling_for(
    request: router_pb2.RouterGenerateRequest, prompt: Prompt, sample: int
) -> common_pb2.SamplingParams:
    """The engine's sampling settings for sample ``sample`` (of ``n``) of a prompt."""
    sampling = common_pb2.SamplingParams()
    sampling.CopyFrom(request.sampling)
    if not sampling.ignore_eos:
        # Engines skip their tokenizer, so they know only the generation config's
        # EOS; the tokenizer's may differ (chat models end turns on their own token).
        known = set(sampling.stop_token_ids)
        sampling.stop_token_ids.extend(i for i in prompt.info.eos_token_ids if i not in known)
    if sample and sampling.HasField("seed"):
        sampling.seed += sample  # n samples with one seed must still differ
    return sampling


class SequenceRun:
    """Turns one sequence's engine replies into deltas, and knows when it has finished."""

    def __init__(
        self,
        prompt: Prompt,
        sampling: common_pb2.SamplingParams,
        decoder: TokenDecoder,
        index: int,
        return_token_ids: bool,
    ) -> None:
        self._prompt = prompt
        self._decoder = decoder
        self._index = index
        self._return_token_ids = return_token_ids
        self._include_stop = sampling.include_stop_str_in_output
        self._has_stops = bool(sampling.stop)
        #: Stop tokens generated but kept out of the text (counted, not shown).
        self._hidden = 0
        self._detokenizer = decoder.detokenizer(
            prompt.token_ids[-_CONTEXT_IDS:],
            sampling.stop,
            sampling.include_stop_str_in_output,
            sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") else True,
        )

    def _push(self, ids: list[int]) -> tuple[str, int]:
        """The text ``ids`` complete, and how many of them were used: all, or with stop
        strings those up to the one that completed a stop (then pushed one at a time)."""
        detokenizer = self._detokenizer
        if len(ids) < 2 or not self._has_stops:
            return detokenizer.push(ids), len(ids)
        text = ""
        for used, token_id in enumerate(ids, 1):
            text += detokenizer.push([token_id])
            if detokenizer.stopped:
                return text, used
        return text, len(ids)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far (up to the stop string, when one ended the sequence)."""
        return self._detokenizer.num_tokens + self._hidden

    def delta(self, reply: engine_pb2.GenerateResponse) -> router_pb2.RouterGenerateResponse:
        """The caller's delta for one engine reply; ``finish_reason`` set on the last one.

        A reply may carry several ids (the engine coalesces while the router is behind).
        When a stop string ends the sequence inside it, the ids after the one that
        completed the stop are dropped with their logprobs, so text, usage and logprobs
        read as they would have one id per reply."""
        detokenizer = self._detokenizer
        ids = list(reply.token_ids)
        stopped_by_token = (
            reply.HasField("stop_token_id") and ids and ids[-1] == reply.stop_token_id
        )
        # As vLLM: the token that ended the sequence is not part of its text, which
        # matters once special tokens are shown (skip_special_tokens false).
        hide_last = stopped_by_token and not self._include_stop
        text, used = self._push(ids[:-1] if hide_last else ids)
        kept = used if detokenizer.stopped else len(ids)
        self._hidden += bool(hide_last and not detokenizer.stopped)
        if reply.finish_reason and not detokenizer.stopped:
            text += detokenizer.finish()
        delta = router_pb2.RouterGenerateResponse(index=self._index, text=text)
        if self._return_token_ids:
            delta.token_ids.extend(reply.token_ids[:kept])
        if reply.logprobs:
            delta.logprobs.extend(reply.logprobs[:kept])
            _name_tokens(self._decoder, delta.logprobs)
        if reply.prompt_logprobs:
            delta.prompt_logprobs.extend(reply.prompt_logprobs)
            _name_tokens(self._decoder, delta.prompt_logprobs)
        if detokenizer.stopped:
            delta.finish_reason = common_pb2.FINISH_REASON_STOP
            delta.stop_reason = detokenizer.stop_reason
        elif reply.finish_reason:
            delta.finish_reason = reply.finish_reason
            eos = self._prompt.info.eos_token_ids
            if reply.HasField("stop_token_id") and reply.stop_token_id not in eos:
                delta.stop_reason = str(reply.stop_token_id)
        return delta


def has_content(delta: router_pb2.RouterGenerateResponse) -> bool:
    """Whether a delta carries anything for the caller (a held-back partial stop does not)."""
    return bool(
        delta.text
        or delta.token_ids
        or delta.logprobs
        or delta.prompt_logprobs
        or delta.finish_reason
    )


def _name_tokens(decoder: TokenDecoder, logprobs: Iterable[common_pb2.PositionLogprobs]) -> None:
    """Fill each log-probability entry's token text."""
    entries = [entry for position in logprobs for entry in (position.chosen, *position.top)]
    ids = sorted({entry.token_id for entry in entries})
    texts = dict(zip(ids, decoder.token_texts(ids), strict=True))
    for entry in entries:
        entry.token = texts[entry.token_id]
