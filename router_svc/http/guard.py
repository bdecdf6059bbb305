"""What the HTTP API refuses before a request reaches an endpoint: browsers it was
not told to serve, names it does not answer to, bodies that are not JSON, and more
connections than it can hold.

A web page the operator opens can send requests to a router on localhost. Browsers
send "simple" cross-site POSTs (``text/plain`` bodies) without asking first, and a
page served under a rebinding DNS name can read the answers. Three checks close that:

- **Origin.** A browser names the page's origin on every cross-site request. One that
  ``--allowed-origins`` does not list gets 403, and so does its CORS preflight; listed
  origins get CORS headers (as vLLM's ``--allowed-origins``). Programs (SDKs, curl) send
  no ``Origin`` and are not affected.
- **Content type.** A request with a body must say ``application/json``: a browser
  cannot send that cross-site without a preflight, which the origin check refuses
  (415 otherwise).
- **Host.** Bound to loopback, the bridge answers only to ``localhost``, ``127.0.0.1``,
  ``[::1]`` and the names in ``--allowed-hosts`` (421): a rebinding name pointed at
  127.0.0.1 carries its own name in ``Host``. With ``--allowed-hosts`` set the check
  holds on any address.

Connections: aiohttp closes a connection that is idle, or has not sent a whole request
head, after ``--http-idle-timeout`` (its keep-alive timer runs from the connection's
start and after each answer), and :class:`ConnectionCap` closes connections past
``--http-max-connections`` as they arrive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus

from aiohttp import hdrs, web, web_protocol

from router_svc.auth import is_loopback
from router_svc.http.errors import ApiError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Names a loopback-bound bridge always answers to.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
#: Request methods whose bodies must be JSON.
_WITH_BODY = frozenset({hdrs.METH_POST, hdrs.METH_PUT, hdrs.METH_PATCH})
#: Headers a listed origin's scripts may send (the OpenAI SDKs' and ours).
_CORS_HEADERS = "Authorization, Content-Type, X-Session-Id, OpenAI-Organization, OpenAI-Project"
_ORIGIN_KEY = web.RequestKey("allowed_origin", str)


def _host_name(host: str) -> str:
    """``Host`` without its port: ``example.com:8000`` → ``example.com``,
    ``[::1]:80`` → ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """The origin, host and content-type checks, as one aiohttp middleware."""

    def __init__(
        self, bind_host: str, allowed_origins: Iterable[str], allowed_hosts: Iterable[str]
    ) -> None:
        self._origins = {o.strip().rstrip("/").lower() for o in allowed_origins if o.strip()}
        self._any_origin = "*" in self._origins
        extra = {h.strip().lower() for h in allowed_hosts if h.strip()}
        #: Host names answered to; None: any (a non-loopback bind without --allowed-hosts).
        self._hosts: frozenset[str] | None = (
            LOOPBACK_NAMES | extra if extra or is_loopback(bind_host or "0.0.0.0") else None
        )

    def install(self, app: web.Application) -> None:
        """Add the middleware's response hook (CORS headers on every answer, streams included)."""
        app.on_response_prepare.append(self._cors_headers)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """421 for a name not answered to, 403 for an origin not listed; a listed
        origin's CORS preflight is answered here (it carries no API key)."""
        host = _host_name(request.headers.get(hdrs.HOST, ""))
        if self._hosts is not None and host not in self._hosts:
            raise ApiError(
                HTTPStatus.MISDIRECTED_REQUEST,
                f"this server does not answer to the name {host!r}; add it with --allowed-hosts",
            )
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None:
            if not self._origin_allowed(origin):
                raise ApiError(
                    HTTPStatus.FORBIDDEN,
                    f"requests from the browser origin {origin!r} are refused; "
                    "add it with --allowed-origins",
                    kind="permission_error",
                )
            request[_ORIGIN_KEY] = origin
            if (
                request.method == hdrs.METH_OPTIONS
                and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
            ):
                return web.Response(
                    status=HTTPStatus.NO_CONTENT,
                    headers={
                        hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET, POST, DELETE, OPTIONS",
                        hdrs.ACCESS_CONTROL_ALLOW_HEADERS: _CORS_HEADERS,
                        hdrs.ACCESS_CONTROL_MAX_AGE: "600",
                    },
                )
        return await handler(request)

    @web.middleware
    async def json_bodies(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """415 for a body not sent as JSON (after the API key: a caller without one
        learns nothing)."""
        if (
            request.method in _WITH_BODY
            and request.body_exists
            and request.content_type != "application/json"
        ):
            raise ApiError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON sent as 'Content-Type: application/json', "
                f"not {request.content_type!r}",
            )
        return await handler(request)

    def _origin_allowed(self, origin: str) -> bool:
        return self._any_origin or origin.strip().rstrip("/").lower() in self._origins

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.get(_ORIGIN_KEY)
        if origin is not None:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
            response.headers.add(hdrs.VARY, hdrs.ORIGIN)


@dataclasses.dataclass(frozen=True)
class Connections:
    """How long an HTTP connection may idle (or take over its request head), and how
    many may be open."""

    idle_timeout: float = 15.0
    max_connections: int = 4096


class ConnectionCap:
    """Closes HTTP connections past ``limit`` as they are made.

    aiohttp has no connection limit of its own; its server object (:class:`web.Server`)
    is told of every connection made and lost, so the cap wraps those two calls."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self._limit = limit
        self._open = 0
        self.refused = 0
        made, lost = server.connection_made, server.connection_lost

        def connection_made(
            handler: web_protocol.RequestHandler, transport: asyncio.Transport
        ) -> None:
            made(handler, transport)
            self._open += 1
            if self._open > limit:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning(
                        "HTTP connections past --http-max-connections (%d): closed (%d so far)",
                        limit,
                        self.refused,
                    )
                handler.force_close()
                transport.close()

        def connection_lost(
            handler: web_protocol.RequestHandler, exc: BaseException | None = None
        ) -> None:
            self._open -= 1
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
