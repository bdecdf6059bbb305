"""The life of a stage process: serve, join the mesh, drain, leave.

Every stage runs through :func:`run_stage`:

1. the gRPC server starts with the standard health service (NOT_SERVING) and
   reflection, so probes and ``grpcurl`` work from the first second;
2. the Prometheus endpoint starts;
3. the stage loads what it needs (:meth:`Stage.start`: a tokenizer, an engine);
4. it registers its Member record in etcd (retrying until etcd answers);
5. health turns SERVING.

On SIGTERM or SIGINT it drains: health turns NOT_SERVING and the member is
deregistered at once (routers stop picking it), new calls are still accepted for
``drain_seconds`` (callers that picked it a moment ago), then the server refuses new
calls and gives in-flight ones ``grace_seconds`` to finish before cancelling them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar

import grpc
from google.protobuf import descriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Info, start_http_server

from services import __version__, credentials, exposition
from services.config import StageConfig
from services.credentials import MESSAGE_LIMITS, CallGuard
from services.etcd import EtcdSession
from services.exposition import process_local
from services.log import configure_logging
from services.membership import Registration, role_name
from services.pb import common_pb2
from services.rpc import Authorize, register_service

log = logging.getLogger(__name__)

STAGE_INFO = process_local(Info("stagemesh_stage", "The stage this process runs"))


class Stage(abc.ABC):
    """What a stage plugs into the shared runtime: its services and how it starts and stops."""

    #: The stage's role (a ``common_pb2.Role`` value).
    role: ClassVar[common_pb2.Role]
    #: Serves users, not only other stages: its API takes callers without the mesh's
    #: credentials (the router; it checks API keys instead).
    public: ClassVar[bool] = False
    #: One of several processes bound to the same ports (SO_REUSEPORT; a router's
    #: ``--workers``): its parent checked the ports, and each process binds them shared.
    shares_ports: bool = False

    @abc.abstractmethod
    def services(self) -> list[tuple[descriptor.ServiceDescriptor, object]]:
        """The gRPC services this stage serves, each with its servicer object."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load what the stage needs before it may serve (runs while health is NOT_SERVING)."""

    async def stop(self) -> None:
        """Release resources after the server stopped; the default has nothing to release."""

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Server interceptors for every call (the router's API-key check); none by default."""
        return []

    def describe(self, member: common_pb2.Member) -> None:
        """Fill the stage-specific Member fields (models, KV block size, NIXL address)."""

    def watch_member(self, publish: Callable[[], Awaitable[None]]) -> None:
        """Receive the call that publishes the Member record again, for a stage whose
        :meth:`describe` can change while it runs (an engine loads an adapter). Given
        once the member is registered; the default ignores it."""

    def etcd_entries(self, member: common_pb2.Member) -> dict[str, bytes]:
        """Other etcd keys the stage publishes under its membership lease (the KV
        store's shard entry); they appear and vanish with the member."""
        return {}

    def failure(self) -> str | None:
        """Why the stage can no longer serve (e.g. its engine died), or None while it can.

        Polled once a second after start; a failure drains the stage and ends the
        process with exit code 1, so its supervisor replaces it.
        """
        return None


class _CannotStart(Exception):
    """A stage's start raised SystemExit: carried through the drain to :func:`run_stage`."""

    def __init__(self, code: str | int | None) -> None:
        super().__init__(code)
        self.code = code


class StageServer:
    """Runs one :class:`Stage` behind a grpc.aio server, with health, metrics and membership."""

    def __init__(self, config: StageConfig, stage: Stage) -> None:
        self.config = config
        self.stage = stage
        self.port = 0
        self.metrics_port = 0
        self.registration: Registration | None = None
        self.exit_code = 0
        self._started_at = 0.0
        self._service_names: list[str] = []
        self.credentials = credentials.current()

    def build(self) -> None:
        """Create the loop-bound objects; runs inside the event loop that serves."""
        guards: list[grpc.aio.ServerInterceptor] = []
        if not self.stage.public:
            names = [service.full_name for service, _ in self.stage.services()]
            guards.append(CallGuard(self.credentials.check_caller, names))
        self.server = grpc.aio.server(
            interceptors=[*guards, *self.stage.interceptors()],
            # Off unless shared: a port another process holds must fail the bind.
            options=[*MESSAGE_LIMITS, ("grpc.so_reuseport", int(self.stage.shares_ports))],
        )
        self.health = health.aio.HealthServicer()
        self._session = EtcdSession(self.config.etcd_endpoints)
        self._stopping = asyncio.Event()

    @property
    def grpc_address(self) -> str:
        """The address other stages dial: the advertised host with the bound port."""
        return f"{self.config.advertise_host}:{self.port}"

    def stop(self) -> None:
        """Begin draining (what SIGTERM does)."""
        self._stopping.set()

    async def serve(self) -> None:
        """Start, serve until :meth:`stop` (SIGTERM/SIGINT), drain and stop."""
        await self._start_server()
        try:
            start_task = asyncio.create_task(self._start_stage())
            stop_task = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait(
                {start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if start_task in done:
                start_task.result()  # a failed start ends the process with its error
                watchdog = asyncio.create_task(self._watch_failure())
                await self._stopping.wait()
                watchdog.cancel()
            else:
                start_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start_task
        finally:
            await self._drain()

    def _authorize(self) -> Authorize | None:
        """Under mutual TLS, a check of each caller's certificate role (a public stage and
        a plaintext mesh have none: API keys and the stage token are their credentials)."""
        if self.credentials.tls is None or self.stage.public:
            return None
        role, check = role_name(self.stage.role), self.credentials.check_peer_role
        return lambda method, context: check(role, method, context.auth_context())

    async def _start_server(self) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        authorize = self._authorize()
        for service, servicer in self.stage.services():
            methods = register_service(self.server, service, servicer, authorize)
            self._service_names.append(service.full_name)
            log.debug("serving %s: %s", service.full_name, ", ".join(methods))
        reflection.enable_server_reflection(
            [
                *self._service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        tls = self.credentials.tls
        try:
            if tls is None:
                self.port = self.server.add_insecure_port(address)
            else:  # mutual TLS, except on a public stage's port (users hold API keys)
                self.port = self.server.add_secure_port(
                    address, tls.server_credentials(not self.stage.public)
                )
        except RuntimeError:  # grpc's "Failed to bind": taken since run_stage checked
            self.port = 0
        if self.port == 0:
            self.config.check_ports()  # one line naming the holder, when it is a taken port
            raise SystemExit(f"cannot bind gRPC on {address}")
        await self.server.start()
        if self.config.metrics_port >= 0:
            httpd, _ = start_http_server(
                self.config.metrics_port, addr=self.config.host, registry=exposition.registry()
            )
            self.metrics_port = int(httpd.server_port)
        role = common_pb2.Role.Name(self.stage.role)
        STAGE_INFO.info({"role": role, "instance": self.config.instance_id, "version": __version__})
        log.info(
            "gRPC%s on %s:%d (advertised %s), metrics on %s",
            " (TLS)" if tls else "",
            self.config.host,
            self.port,
            self.grpc_address,
            f":{self.metrics_port}" if self.metrics_port else "off",
        )

    async def _start_stage(self) -> None:
        started = time.monotonic()
        try:
            await self.stage.start()
        except SystemExit as exc:
            # A setting that cannot work, found while loading (the engine refused the
            # model). Out of a task, asyncio would end the loop without the drain and
            # log the task as never retrieved: carried out as an ordinary error instead.
            raise _CannotStart(exc.code) from None
        log.info(
            "%s ready in %.1fs", common_pb2.Role.Name(self.stage.role), time.monotonic() - started
        )
        self._started_at = time.time()
        member = self._member()
        self.registration = Registration(
            self._session, member, self.config.lease_ttl, extra=self.stage.etcd_entries(member)
        )
        await self.registration.start()
        self.stage.watch_member(self._publish)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving as %s", self.registration.key)

    def _member(self) -> common_pb2.Member:
        """The stage's Member record as of now."""
        member = common_pb2.Member(
            instance_id=self.config.instance_id,
            role=self.stage.role,
            grpc_address=self.grpc_address,
            metrics_address=(
                f"{self.config.advertise_host}:{self.metrics_port}" if self.metrics_port else ""
            ),
            version=__version__,
            started_at=self._started_at,
            labels=self.config.labels,
        )
        self.stage.describe(member)
        return member

    async def _publish(self) -> None:
        """Write the record again; when etcd cannot take it now, the next registration
        (after a lost lease) carries it, and the failure is logged."""
        if self.registration is None:
            return
        try:
            await self.registration.update(self._member())
        except Exception as exc:  # noqa: BLE001 - etcd unreachable: logged, the stage keeps serving
            log.warning("could not publish the member record: %s", exc)

    async def _watch_failure(self) -> None:
        while (reason := self.stage.failure()) is None:
            await asyncio.sleep(1.0)
        log.error("stage failed: %s; leaving the mesh", reason)
        self.exit_code = 1
        self._stopping.set()

    async def _set_health(self, status: int) -> None:
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    async def _drain(self) -> None:
        log.info("draining")
        await self.health.enter_graceful_shutdown()
        if self.registration is not None:
            await self.registration.close()
        await asyncio.sleep(self.config.drain_seconds)
        await self.server.stop(self.config.grace_seconds)
        await self.stage.stop()
        await self._session.close()
        log.info("stopped")


def run_stage(config: StageConfig, stage: Stage) -> None:
    """Entry point shared by every stage's ``__main__``: logging, uvloop, serve."""
    run_stages([(config, stage)])


def run_stages(stages: list[tuple[StageConfig, Stage]]) -> None:
    """Serve several stages in one process (simulated engines, ``--sim-engines``): each
    has its own server, lease and member record, and all drain on SIGTERM/SIGINT. One
    that fails leaves the mesh alone; the process ends when all have stopped, with the
    worst exit code."""
    import uvloop

    first = stages[0][0]
    configure_logging(first.log_level, first.log_format, first.ROLE, first.instance_id)
    credentials.install(first.credentials())
    for config, stage in stages:
        if not stage.shares_ports:
            config.check_ports()
    servers = [StageServer(config, stage) for config, stage in stages]

    async def serve_all() -> None:
        loop = asyncio.get_running_loop()
        for server in servers:
            server.build()

        def stop_all() -> None:
            for server in servers:
                server.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_all)
        await asyncio.gather(*(server.serve() for server in servers))

    try:
        uvloop.run(serve_all())
    except _CannotStart as exc:
        raise SystemExit(exc.code) from None
    if code := max(server.exit_code for server in servers):
        raise SystemExit(code)
