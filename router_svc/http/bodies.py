"""Request bodies held at once, bounded in bytes, overall and per caller.

A body is bounded alone (``--max-body-mib``, 413 past it), but not what many of them
hold together: 4,096 connections each sending 8 MiB is 32 GiB read into memory, then
parsed into objects several times larger. So each request with a body holds its size
(its Content-Length; the whole ``--max-body-mib`` when it is chunked) from before its
body is read until its handler ends, when what was built from the body is gone too.
Past ``--max-bodies-mib`` in all, or a quarter of it for one API key, a new request
gets 429 with Retry-After before a byte of its body is read, so one tenant's big bodies
cannot take the memory every tenant's requests need.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

from router_svc.http.errors import ApiError
from router_svc.http.incoming import CALLER

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The share of the whole budget one API key may hold.
PER_CALLER_SHARE = 4


class BodyBudget:
    """Bytes of request bodies held by requests in progress (:meth:`middleware`)."""

    def __init__(self, limit: int, max_body: int) -> None:
        self.limit = limit
        self._max_body = max_body
        self.held = 0
        self._by_caller: dict[str, int] = {}

    def _take(self, caller: str, size: int) -> None:
        mine = self._by_caller.get(caller, 0)
        if self.held + size > self.limit or mine + size > max(
            self.limit // PER_CALLER_SHARE, self._max_body
        ):
            raise ApiError(
                HTTPStatus.TOO_MANY_REQUESTS,
                "the router holds as many request bodies as --max-bodies-mib allows "
                f"({self.limit >> 20} MiB, a quarter of it per API key); try again shortly",
                retry_after=1.0,
            )
        self.held += size
        self._by_caller[caller] = mine + size

    def _give_back(self, caller: str, size: int) -> None:
        self.held -= size
        left = self._by_caller[caller] - size
        if left:
            self._by_caller[caller] = left
        else:
            del self._by_caller[caller]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Hold the body's size while the request runs (after the API key is known)."""
        if not request.body_exists:
            return await handler(request)
        size = min(request.content_length or self._max_body, self._max_body)
        caller = request[CALLER].key_id if CALLER in request else ""
        self._take(caller, size)
        try:
            return await handler(request)
        finally:
            self._give_back(caller, size)
