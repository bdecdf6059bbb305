"""Translate the mesh's SamplingParams into vLLM's, validating what vLLM would reject
later (or crash on) with an error that names the field."""

from __future__ import annotations

from typing import Any

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from services.engine.lengths import output_budget
from services.errors import InvalidRequest
from services.pb import common_pb2

#: The ``SamplingParams.extra_args`` key of the request's agent session: vLLM hands the
#: KV connector the request with its sampling parameters, and nothing else of ours.
SESSION_ARG = "stagemesh_session_id"


def to_vllm(
    params: common_pb2.SamplingParams,
    prompt_tokens: int,
    max_model_len: int,
    kv_transfer_params: dict[str, Any] | None = None,
    max_tokens: int | None = None,
    session_id: str = "",
) -> SamplingParams:
    """Build vLLM sampling params for one sequence, streaming deltas.

    ``max_tokens`` overrides the request's (prefill runs with 1, and its token is
    discarded: the decode engine samples the first token, so only it applies the output
    constraints); the limits are :func:`~services.engine.lengths.output_budget`'s.
    ``session_id`` goes to the KV-store connector (see :data:`SESSION_ARG`).
    """
    prefill = max_tokens is not None
    max_tokens, min_tokens = output_budget(params, prompt_tokens, max_model_len, max_tokens)
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "min_tokens": min_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "output_kind": RequestOutputKind.DELTA,
        # Text is the tokenizer stage's job; the engine runs token-in/token-out.
        "detokenize": False,
    }
    for field in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        if params.HasField(field):
            kwargs[field] = getattr(params, field)
    if params.HasField("logprobs"):
        kwargs["logprobs"] = params.logprobs
    if params.logit_bias:
        kwargs["logit_bias"] = dict(params.logit_bias)
    if not prefill:
        if params.bad_words:
            kwargs["bad_words"] = list(params.bad_words)
        if params.allowed_token_ids:
            kwargs["allowed_token_ids"] = list(params.allowed_token_ids)
        if params.HasField("prompt_logprobs"):
            kwargs["prompt_logprobs"] = params.prompt_logprobs
        if params.HasField("structured_outputs"):
            kwargs["structured_outputs"] = _structured(params.structured_outputs)
    if kv_transfer_params is not None or session_id:
        kwargs["extra_args"] = _extra_args(kv_transfer_params, session_id)
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError, VLLMClientError) as exc:  # vLLM's own range checks
        raise InvalidRequest(f"invalid sampling parameters: {exc}") from None


def _extra_args(kv_transfer_params: dict[str, Any] | None, session_id: str) -> dict[str, Any]:
    """What vLLM passes on to the KV connectors with the request: the handoff's
    ``kv_transfer_params`` (vLLM's key) and the agent session (ours)."""
    extra: dict[str, Any] = {SESSION_ARG: session_id} if session_id else {}
    if kv_transfer_params is not None:
        extra["kv_transfer_params"] = kv_transfer_params
    return extra


def _structured(constraint: common_pb2.StructuredOutputs) -> StructuredOutputsParams:
    """vLLM's form of an output constraint (the router has checked it)."""
    kind = constraint.WhichOneof("constraint")
    if kind is None:
        raise InvalidRequest("structured_outputs sets no constraint", "structured_outputs")
    value: Any = list(constraint.choice.options) if kind == "choice" else getattr(constraint, kind)
    name = "json" if kind == "json_schema" else kind
    try:
        return StructuredOutputsParams(
            **{name: value}, disable_any_whitespace=constraint.disable_any_whitespace
        )
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise InvalidRequest(f"invalid structured_outputs: {exc}", "structured_outputs") from None
