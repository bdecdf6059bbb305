"""What every handler reads from an HTTP request: its JSON body, its caller, and its
session key; and the one way a handler starts generation with them.

Bodies are read only after the API-key and content-type middleware passed them, decoded
(gzip and deflate are what aiohttp decodes; any other coding would reach the JSON parser
still encoded), checked as UTF-8, and parsed into a pydantic model whose first error is
the 400's message. Every generation endpoint starts through :func:`generate`, so each
honours ``X-Session-Id`` and runs under its caller's key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import TypeVar

from aiohttp import hdrs, web
from pydantic import BaseModel, ValidationError

from router_svc.affinity import SESSION_HEADER
from router_svc.auth import Caller
from router_svc.generation import Generation
from router_svc.http.errors import ApiError
from router_svc.pipeline import Pipeline
from router_svc.tools import ToolRequest
from services.pb import router_pb2

#: The request's :class:`Caller`, set by the API-key middleware.
CALLER = web.RequestKey("caller", Caller)
#: Content codings aiohttp decodes.
CODINGS = frozenset({"", "identity", "gzip", "deflate"})

Body = TypeVar("Body", bound=BaseModel)
#: A request's generation, about to start (``async with`` it).
Starting = contextlib.AbstractAsyncContextManager[Generation]


def parse(model: type[Body], raw: bytes | str) -> Body:
    """``raw`` as ``model``; the first validation error is the 400 (with its field as
    ``param``), written without pydantic's prefixes."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid(exc) from None


def invalid(exc: ValidationError) -> ApiError:
    """The 400 for a body pydantic refused: its first error, where it was."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "json_invalid":
        return ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {first['msg']}")
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(
        HTTPStatus.BAD_REQUEST, f"{where}: {message}" if where else message, param=where or None
    )


async def read_body(request: web.Request, model: type[Body]) -> Body:
    """The request's body as ``model``: 415 for a coding aiohttp cannot decode, 400 for
    bytes that are not what their coding says, not UTF-8, or not the model."""
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if coding not in CODINGS:
        raise ApiError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {coding!r} is not supported; "
            f"send {', '.join(sorted(CODINGS - {''}))}",
        )
    try:
        raw = await request.read()
    except web.RequestPayloadError:  # a body that is not what its encoding says
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"the body could not be decoded as {coding or 'identity'}"
        ) from None
    try:
        raw.decode()
    except UnicodeDecodeError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid UTF-8: {exc}") from None
    return parse(model, raw)


def caller(request: web.Request) -> str:
    """The id of the API key the request came with (audit, tenancy, ownership)."""
    return request[CALLER].key_id


def session_id(request: web.Request) -> str:
    """The client's sticky-routing key (``X-Session-Id``; empty without one). It reaches
    logs and engines, so it must be printable UTF-8 (the pipeline bounds its length)."""
    session = request.headers.get(SESSION_HEADER, "")
    if not session.isprintable() or session != session.encode(errors="replace").decode():
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"the {SESSION_HEADER} header must be printable UTF-8 text"
        )
    return session


def generate(
    pipeline: Pipeline,
    request: web.Request,
    calls: Sequence[router_pb2.RouterGenerateRequest],
    tools: ToolRequest | None = None,
    session: str = "",
) -> Starting:
    """Start an HTTP request's generation: its messages carry the request's session key
    (the header's, else ``session``, a Responses chain's) and run under its caller's key.
    The header and the caller are read now, so a background response that starts later
    still has them."""
    session, key = session_id(request) or session, caller(request)
    for call in calls:
        call.session_id = session
    return pipeline.start(calls, pipeline.deadline(), key, tools)


def built(
    build: Callable[[], router_pb2.RouterGenerateRequest],
) -> router_pb2.RouterGenerateRequest:
    """A body's gRPC request; values protobuf refuses (negative ids, integers out of
    range) are 400s rather than errors of the router."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid value: {exc}") from None
