"""The mesh's error taxonomy: what a caller should do about each failure.

Every error a stage raises on purpose is a :class:`StageError`; the server turns it
into the gRPC status named here, so each kind means the same thing everywhere:

- :class:`InvalidRequest` — the caller's input is wrong. Never retried; returned to the
  user as a 4xx.
- :class:`NotFound` — a named thing (model, request, transfer handle) does not exist.
- :class:`Unavailable` — this stage cannot take the call now (starting, draining,
  overloaded, a dependency down). The router retries on another member.
- :class:`DeadlineExceeded` — the call ran out of time.
- :class:`StageDead` — the stage is broken beyond this call (its engine died). The
  router stops using the member; the supervisor should replace the process.

Anything else escaping a handler is a bug and becomes INTERNAL with a generic message
(the details go to the stage's log, not to the caller).
"""

from __future__ import annotations

import grpc


class StageError(Exception):
    """Base of the deliberate errors; ``code`` is the gRPC status it becomes."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(StageError):
    """The request is malformed or out of range. Fix the input; do not retry."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StageError):
    """The named model, request or handle does not exist (or no longer does)."""

    code = grpc.StatusCode.NOT_FOUND


class Unavailable(StageError):
    """Temporarily unable to serve; retry later or on another member."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(StageError):
    """The call did not finish in the time it was given."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StageDead(StageError):
    """The stage cannot serve any further call; replace the process."""

    code = grpc.StatusCode.INTERNAL


#: Status codes after which trying the same call on another member may succeed.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


_BY_CODE: dict[grpc.StatusCode, type[StageError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(error: grpc.aio.AioRpcError, where: str) -> StageError:
    """A downstream stage's failure as the error this stage passes on to its caller.

    The kind survives (a bad request stays a bad request); ``where`` names the stage
    so the message says who refused. Codes without a meaning for the caller
    (INTERNAL, UNKNOWN, ...) become :class:`Unavailable`: another member may do better.
    """
    kind = _BY_CODE.get(error.code(), Unavailable)
    return kind(f"{where}: {error.details() or error.code().name}")
