"""The mesh's error taxonomy: what a caller should do about each failure.

Every error a stage raises on purpose is a :class:`StageError`. Each kind fixes, in one
place, everything the rest of the mesh decides about it: the gRPC status it becomes,
the HTTP status and OpenAI error ``type`` / ``code`` the bridge answers with, and
whether the router may try another member. The kind travels with the status: the
server sends its name in the ``stagemesh-error`` trailing metadata and
:func:`from_rpc_error` rebuilds the same kind on the calling side, so no caller ever
decides by a status code alone or by searching a message's text.

- :class:`InvalidRequest` — the caller's input is wrong. Never retried; a 400.
  :class:`ContextLengthExceeded` is the prompt-too-long case OpenAI gives a code.
- :class:`NotFound` — a named thing does not exist (:class:`ModelNotFound`), or no
  longer does (:class:`KvNotCollected`: the KV a handle named could not be pulled;
  the router decodes the request aggregated instead).
- :class:`Unavailable` — this member cannot take the call now (starting, draining,
  unreachable). The router sets the member aside briefly and tries another.
- :class:`Overloaded` — admitting the request would pass a bound (the router's queue).
  RESOURCE_EXHAUSTED / 429 with a Retry-After: come back later. Distinct from
  :class:`Unavailable` (503), which means no member can serve at all.
- :class:`DeadlineExceeded` — the call ran out of time. Not retried: the time is gone.
- :class:`StageDead` — the member is broken beyond this call (its engine died). The
  router sets it aside and tries another; the supervisor replaces the process.

Anything else escaping a handler is a bug and becomes INTERNAL with a generic message
(the details go to the stage's log, not to the caller).
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import ClassVar

import grpc

#: Trailing-metadata key that carries an error's kind across a gRPC hop.
KIND_KEY = "stagemesh-error"


class StageError(Exception):
    """Base of the deliberate errors; the class attributes say how each kind is handled."""

    #: The gRPC status the kind becomes.
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    #: The HTTP status the OpenAI bridge answers with.
    http_status: ClassVar[HTTPStatus] = HTTPStatus.INTERNAL_SERVER_ERROR
    #: OpenAI's ``error.type``.
    openai_type: ClassVar[str] = "server_error"
    #: OpenAI's ``error.code``, where OpenAI names one.
    openai_code: ClassVar[str | None] = None
    #: The same call may succeed on another member; this one is set aside for a while.
    retry_elsewhere: ClassVar[bool] = False
    #: Seconds after which the caller may try again (HTTP ``Retry-After``), when known.
    retry_after: float | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        #: The request field at fault (OpenAI's ``error.param``), when one is.
        self.param = param

    @classmethod
    def kind(cls) -> str:
        """The name the kind goes by on the wire."""
        return cls.__name__

    def trailing_metadata(self) -> Sequence[tuple[str, str]]:
        """What the server sends with the status so the caller rebuilds this kind."""
        return ((KIND_KEY, self.kind()),)


class InvalidRequest(StageError):
    """The request is malformed or out of range. Fix the input; do not retry."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = HTTPStatus.BAD_REQUEST
    openai_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """The prompt (with room for one generated token) does not fit the model's context."""

    openai_code = "context_length_exceeded"


class Unauthenticated(StageError):
    """The caller sent no API key, or one the API does not accept. Send a valid key."""

    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = HTTPStatus.UNAUTHORIZED
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"


class PermissionDenied(StageError):
    """The caller may not do this: a KV handle the mesh did not issue (or a stage whose
    mesh key differs). Check the mesh key; do not retry."""

    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = HTTPStatus.FORBIDDEN
    openai_type = "permission_error"


class NotFound(StageError):
    """The named request or handle does not exist (or no longer does)."""

    code = grpc.StatusCode.NOT_FOUND
    http_status = HTTPStatus.NOT_FOUND
    openai_type = "not_found_error"


class ModelNotFound(NotFound):
    """No member serves the model the request names."""

    openai_code = "model_not_found"


class KvNotCollected(NotFound):
    """A decode engine could not pull the KV a transfer handle named (expired, or the
    prefill engine is gone). The prompt must be computed again."""


class AlreadyExists(StageError):
    """The name is taken: a LoRA adapter loaded under it from elsewhere, or a model."""

    code = grpc.StatusCode.ALREADY_EXISTS
    http_status = HTTPStatus.CONFLICT
    openai_type = "invalid_request_error"


class FailedPrecondition(StageError):
    """The call is out of order for the state it names: a KV-store Commit for blocks
    whose write never completed. Fix the caller's protocol; do not retry as is."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = HTTPStatus.CONFLICT
    openai_type = "invalid_request_error"


class Unavailable(StageError):
    """Temporarily unable to serve; retry later or on another member."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = HTTPStatus.SERVICE_UNAVAILABLE
    retry_elsewhere = True


class Overloaded(StageError):
    """Admitting the request would pass a bound; try again after ``retry_after`` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = HTTPStatus.TOO_MANY_REQUESTS
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"

    def __init__(self, message: str, param: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message, param)
        self.retry_after = retry_after


class DeadlineExceeded(StageError):
    """The call did not finish in the time it was given."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = HTTPStatus.GATEWAY_TIMEOUT
    openai_type = "timeout_error"


class StageDead(StageError):
    """The stage cannot serve any further call; replace the process."""

    code = grpc.StatusCode.INTERNAL
    retry_elsewhere = True


def _kinds() -> dict[str, type[StageError]]:
    found: dict[str, type[StageError]] = {}
    pending: list[type[StageError]] = [StageError]
    while pending:
        kind = pending.pop()
        found[kind.kind()] = kind
        pending.extend(kind.__subclasses__())
    return found


#: Every kind by its wire name (the subclasses defined above).
_BY_KIND = _kinds()

#: The kind of a status that came without one: from grpc itself (a refused connection,
#: a deadline) or from a server outside the mesh.
_BY_CODE: dict[grpc.StatusCode, type[StageError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def kind_of(error: grpc.aio.AioRpcError) -> type[StageError]:
    """The kind a downstream failure stands for: the one its server named, else by code.

    Codes without a meaning for the caller (INTERNAL, UNKNOWN, ...) become
    :class:`Unavailable`: another member may do better.
    """
    for key, value in error.trailing_metadata() or ():
        if key == KIND_KEY and isinstance(value, str) and value in _BY_KIND:
            return _BY_KIND[value]
    return _BY_CODE.get(error.code(), Unavailable)


def from_rpc_error(error: grpc.aio.AioRpcError, where: str) -> StageError:
    """A downstream stage's failure as the error this stage passes on to its caller.

    The kind survives (a bad request stays a bad request); ``where`` names the stage
    so the message says who refused.
    """
    return kind_of(error)(f"{where}: {error.details() or error.code().name}")
