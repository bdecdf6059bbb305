"""The OpenAI-compatible HTTP API's application: routes, middleware, and serving.

aiohttp rather than an ASGI stack: it runs inside the stage's own event loop without
taking over signals, and with ``handler_cancellation`` a client that disconnects
cancels its handler, which cancels every internal call of the request (the engines
abort their work).

Every request passes the middleware in this order: errors (anything raised becomes
OpenAI's error body, :mod:`router_svc.http.errors`), the host and origin checks
(:mod:`router_svc.http.guard`), the API key, then the JSON content type. This module
only wires routes; each endpoint family is a module of its own (``chat``,
``completions``, ``responses``, ``admin``), and all of them stream through
:mod:`router_svc.http.sse`.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import hdrs, web

from router_svc.adapters import AdapterControl
from router_svc.auth import ApiKeys
from router_svc.http.admin import Admin
from router_svc.http.bodies import BodyBudget
from router_svc.http.chat import ChatCompletions
from router_svc.http.completions import Completions
from router_svc.http.errors import Handler, error_middleware
from router_svc.http.guard import ConnectionCap, Connections, RequestGuard
from router_svc.http.incoming import CALLER
from router_svc.http.response_store import ResponseStore
from router_svc.http.responses import Responses
from router_svc.pipeline import Pipeline

log = logging.getLogger(__name__)

#: Seconds between sweeps of expired stored responses.
_SWEEP_SECONDS = 30.0


class HttpBridge:
    """The HTTP API of one router process: build it, :meth:`start` it on a port (shared
    with the other ``--workers`` processes), :meth:`stop` it."""

    def __init__(
        self,
        pipeline: Pipeline,
        max_body_mib: int,
        keys: ApiKeys | None = None,
        open_metrics: bool = True,
        responses: ResponseStore | None = None,
        adapters: AdapterControl | None = None,
        guard: RequestGuard | None = None,
        connections: Connections | None = None,
        bodies_mib: int = 256,
    ) -> None:
        self._guard = guard or RequestGuard("127.0.0.1", (), ())
        self._connections = connections or Connections()
        self._max_body = max_body_mib * 1024 * 1024
        self.bodies = BodyBudget(bodies_mib << 20, self._max_body)
        self._keys = keys or ApiKeys(())
        #: Paths served without a key: health always (load balancers), metrics unless asked.
        self._open_paths = {"/health", "/metrics"} if open_metrics else {"/health"}
        self._chat = ChatCompletions(pipeline)
        self._completions = Completions(pipeline)
        self._responses = Responses(
            pipeline, responses if responses is not None else ResponseStore(1000, 3600.0)
        )
        self._admin = Admin(pipeline, adapters)
        self._has_adapters = adapters is not None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: The port it listens on, once started.
        self.port = 0

    def app(self) -> web.Application:
        """The application: middleware and routes."""
        app = web.Application(
            client_max_size=self._max_body,
            middlewares=[
                error_middleware(self._max_body),
                self._guard.middleware,
                self._authorized,
                self._guard.json_bodies,
                self.bodies.middleware,
            ],
        )
        self._guard.install(app)
        responses, admin = self._responses, self._admin
        app.router.add_post("/v1/chat/completions", self._chat.create)
        app.router.add_post("/v1/completions", self._completions.create)
        app.router.add_post("/v1/responses", responses.create)
        app.router.add_get("/v1/responses/{id}", responses.retrieve)
        app.router.add_delete("/v1/responses/{id}", responses.delete)
        app.router.add_post("/v1/responses/{id}/cancel", responses.cancel)
        app.router.add_post("/tokenize", admin.tokenize)
        app.router.add_post("/detokenize", admin.detokenize)
        app.router.add_get("/v1/models", admin.models)
        app.router.add_get("/v1/models/{model}", admin.model)
        if self._has_adapters:
            app.router.add_post("/v1/load_lora_adapter", admin.load_adapter)
            app.router.add_post("/v1/unload_lora_adapter", admin.unload_adapter)
        app.router.add_get("/health", admin.health)
        app.router.add_get("/metrics", admin.metrics)
        return app

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Serve on ``host:port``; ``reuse_port`` shares it with the router's other
        ``--workers`` processes (SO_REUSEPORT)."""
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=self._connections.idle_timeout,
        )
        await self._runner.setup()
        assert self._runner.server is not None
        ConnectionCap(self._runner.server, self._connections.max_connections)
        site = web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:  # taken since the stage checked its ports: one line, no traceback
            raise SystemExit(
                f"cannot bind the HTTP bridge on {host}:{port} (--http-port): {exc.strerror}"
            ) from None
        server = site._server  # the bound port has no public accessor
        sockets = server.sockets if isinstance(server, asyncio.Server) else []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        log.info("OpenAI-compatible HTTP on %s:%d", host, self.port)
        self._sweeper = asyncio.create_task(self._sweep_responses(), name="responses-sweeper")

    async def _sweep_responses(self) -> None:
        """Expired responses leave memory even when nobody asks for them."""
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            self._responses.store.sweep()

    async def stop(self) -> None:
        """Stop serving: background responses are cancelled, open requests end."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        background = self._responses.background
        for task in list(background):
            task.cancel()
        if background:
            await asyncio.wait(background)
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _authorized(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The API key, checked before the body is read (401 with OpenAI's body); the
        caller it names is kept on the request."""
        if request.path not in self._open_paths:
            request[CALLER] = self._keys.check(request.headers.get(hdrs.AUTHORIZATION))
        return await handler(request)
