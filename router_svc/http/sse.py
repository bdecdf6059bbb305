"""The one server-sent-events loop every streaming endpoint runs.

1. Await the generation's first delta *before* sending headers: an error that stops a
   request from starting (no worker, bad sampling, overload) still gets its HTTP status
   and OpenAI's error body.
2. Send the headers, then the renderer's opening events (the Responses API has some).
3. Pump: each delta through the renderer, one write per delta.
4. A mesh error after the first chunk can no longer change the status: the renderer
   turns it into its endpoint's error event.
5. The renderer's closing event (``data: [DONE]`` for chat and completions).

Endpoints differ only in their renderer (:class:`StreamRenderer`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Protocol

import orjson
from aiohttp import web

from router_svc.generation import Generation
from router_svc.http.errors import ApiError
from services.errors import StageError
from services.pb import router_pb2

log = logging.getLogger(__name__)

_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
#: The end of a chat or completions stream, as OpenAI sends it.
DONE = b"data: [DONE]\n\n"


class StreamRenderer(Protocol):
    """An endpoint's events: bytes ready to write (empty: nothing to send now)."""

    def opening(self) -> bytes:
        """What the stream starts with, before the first delta's event."""

    def delta(self, delta: router_pb2.RouterGenerateResponse) -> bytes:
        """The event(s) of one delta; the last message carries only the usage."""

    def failed(self, error: ApiError) -> bytes:
        """The event that reports a failure after the stream started."""

    def closing(self) -> bytes:
        """What the stream ends with, after its last delta or its failure."""


def data(event: dict[str, Any]) -> bytes:
    """One ``data:`` event (chat and completions name no event type).

    orjson, not the standard library: an event per engine message is the relay's most
    repeated work, and orjson encodes one in a tenth of the time (0.4 against 5 µs).
    It writes no spaces and UTF-8 as is, and a non-finite float as null (valid JSON,
    where the standard library wrote ``-Infinity``)."""
    return b"data: " + orjson.dumps(event) + b"\n\n"


def named(event: dict[str, Any]) -> bytes:
    """One event named by its ``type`` (the Responses API's form)."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


async def stream(
    request: web.Request, generation: Generation, renderer: StreamRenderer
) -> web.StreamResponse:
    """Answer ``request`` with ``generation`` as server-sent events (the steps above)."""
    async with contextlib.aclosing(aiter(generation)) as deltas:
        first = await anext(deltas)
        response = web.StreamResponse(headers=_HEADERS)
        await response.prepare(request)
        try:
            if opening := renderer.opening():
                await response.write(opening)
            delta: router_pb2.RouterGenerateResponse | None = first
            while delta is not None:
                if event := renderer.delta(delta):
                    await response.write(event)
                delta = await anext(deltas, None)
        except StageError as exc:
            error = ApiError.from_stage(exc)
            log.warning("stream %s failed after it started: %s", generation.request_id, error)
            await response.write(renderer.failed(error))
        if closing := renderer.closing():
            await response.write(closing)
        await response.write_eof()
    return response
