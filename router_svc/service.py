"""The router stage: RouterService over gRPC, the OpenAI-compatible HTTP bridge beside it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import ClassVar

import grpc
from google.protobuf import descriptor

from router_svc.adapters import AdapterControl
from router_svc.affinity import SESSION_HEADER
from router_svc.audit import AuditLog
from router_svc.auth import AUTHORIZATION, ApiKeys, Caller, open_api_refusal
from router_svc.config import RouterConfig
from router_svc.guard import Guard
from router_svc.http.app import HttpBridge
from router_svc.http.guard import Connections, RequestGuard
from router_svc.http.response_store import ResponseStore
from router_svc.kv_index import KvIndex
from router_svc.kv_subscriber import KvSubscriber
from router_svc.metrics import INDEX_ENTRIES, RESPONSES_STORED_BYTES
from router_svc.pipeline import Pipeline
from router_svc.policy import make_policy
from router_svc.workers import ENGINE_ROLES, Workers
from services.clients import health_status
from services.credentials import CallGuard
from services.etcd import EtcdSession
from services.membership import member_key
from services.pb import common_pb2, router_pb2
from services.server import Stage


class RouterServicer:
    """The mesh's public gRPC API."""

    def __init__(
        self,
        pipeline: Pipeline,
        workers: Workers,
        index: KvIndex,
        adapters: AdapterControl,
        keys: ApiKeys,
    ) -> None:
        self._keys = keys
        self._pipeline = pipeline
        self._workers = workers
        self._index = index
        self._adapters = adapters

    async def Generate(
        self, request: router_pb2.RouterGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """Stream text deltas; the last message carries the usage totals."""
        deadline = self._pipeline.deadline(context.time_remaining())
        caller = self._caller(context)
        async with self._pipeline.start(
            [_with_session(request, context)], deadline, caller.key_id
        ) as generation:
            async for delta in generation:
                yield delta

    async def GenerateUnary(
        self, request: router_pb2.RouterGenerateRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterGenerateResult:
        """The whole result in one reply."""
        deadline = self._pipeline.deadline(context.time_remaining())
        caller = self._caller(context)
        async with self._pipeline.start(
            [_with_session(request, context)], deadline, caller.key_id
        ) as generation:
            return await generation.result()

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        return router_pb2.ListModelsResponse(models=await self._pipeline.catalogue.cards())

    async def LoadAdapter(
        self, request: router_pb2.RouterLoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterLoadAdapterResponse:
        """Load a LoRA adapter on every engine of its base model (admin keys only)."""
        self._caller(context).require_admin("loading an adapter")
        instances = await self._adapters.load(request.name, request.path, request.base_model)
        return router_pb2.RouterLoadAdapterResponse(instances=instances)

    async def UnloadAdapter(
        self, request: router_pb2.RouterUnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterUnloadAdapterResponse:
        """Unload a LoRA adapter from every engine that has it (admin keys only)."""
        self._caller(context).require_admin("unloading an adapter")
        return router_pb2.RouterUnloadAdapterResponse(
            instances=await self._adapters.unload(request.name)
        )

    async def ListMembers(
        self, request: router_pb2.ListMembersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListMembersResponse:
        """Members as etcd lists them, each with a fresh health check and its last load."""
        workers = self._workers
        members = sorted(workers.members(request.role), key=lambda m: (m.role, m.grpc_address))
        health = await asyncio.gather(
            *(health_status(m.grpc_address, timeout=1.0) for m in members)
        )
        reply = router_pb2.ListMembersResponse()
        for member, status in zip(members, health):
            entry = reply.members.add(member=member, health=status)
            if member.role in ENGINE_ROLES:
                entry.kv_blocks_indexed = self._index.blocks_of(member_key(member))
                if (load := workers.load_of(member.instance_id)) is not None:
                    entry.load.CopyFrom(load)
        return reply

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who the call came from (its key was checked by the CallGuard already)."""
        value = dict(context.invocation_metadata() or ()).get(AUTHORIZATION)
        return self._keys.check(value if isinstance(value, str) else None)


class RouterStage(Stage):
    """Watches the mesh's members and serves the public APIs."""

    role: ClassVar[common_pb2.Role] = common_pb2.ROLE_ROUTER
    public: ClassVar[bool] = True

    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        self.shares_ports = config.worker_index >= 0
        if self.shares_ports:  # one member record per worker, even under --instance-id
            config.instance_id = f"{config.instance_id}-w{config.worker_index}"
        if config.worker_index > 0:  # worker 0 serves the metrics port, for all of them
            config.metrics_port = -1
        self._session = EtcdSession(config.etcd_endpoints)
        index = KvIndex(config.kv_index_max_blocks)
        INDEX_ENTRIES.source = lambda: {(): len(index)}
        self._workers = Workers(
            self._session,
            config.control_timeout,
            config.load_interval,
            KvSubscriber(index),
            # A leaving member drains for as long as a stage of ours would.
            release_after=config.drain_seconds + config.grace_seconds,
        )
        policy = make_policy(config.routing, index, self._workers.stores)
        self._audit = AuditLog(config.audit)
        self._guard = Guard(config.guard)
        self._pipeline = pipeline = Pipeline(
            config, self._workers, policy, self._audit, self._guard
        )
        self._adapters = adapters = AdapterControl(
            self._session,
            self._workers,
            pipeline.catalogue,
            config.adapter_load_timeout,
            config.worker_wait,
        )
        pipeline.catalogue.ensure = adapters.ensure
        self._keys = api_keys(config)
        self._servicer = RouterServicer(pipeline, self._workers, index, adapters, self._keys)
        self._bridge = (
            http_bridge(config, pipeline, adapters, self._keys) if config.http_port >= 0 else None
        )

    def services(self) -> list[tuple[descriptor.ServiceDescriptor, object]]:
        return [(router_pb2.DESCRIPTOR.services_by_name["RouterService"], self._servicer)]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if not self._keys:
            return []
        return [
            CallGuard(
                self._keys.check_metadata,
                [router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name],
            )
        ]

    async def start(self) -> None:
        self._pipeline.saturation.start()
        await self._workers.start()
        self._adapters.start()
        if self._bridge is not None:
            await self._bridge.start(
                self._config.http_host or self._config.host,
                self._config.http_port,
                reuse_port=self.shares_ports,
            )

    async def stop(self) -> None:
        if self._bridge is not None:
            await self._bridge.stop()
        await self._adapters.close()
        await self._workers.close()
        await self._session.close()
        await self._guard.close()
        await self._pipeline.saturation.close()
        self._audit.close()  # after the last request ended: every line is written

    def describe(self, member: common_pb2.Member) -> None:
        # Operators and `stagemesh status` find the HTTP bridge here.
        if self._bridge is not None:
            member.labels["http_address"] = f"{self._config.advertise_host}:{self._bridge.port}"


def http_bridge(
    config: RouterConfig, pipeline: Pipeline, adapters: AdapterControl, keys: ApiKeys
) -> HttpBridge:
    """The router's HTTP API as its settings describe it (not started:
    :meth:`HttpBridge.start` takes the port, which ``--workers`` processes share)."""
    kept = config.responses
    responses = ResponseStore(kept.max, kept.ttl, kept.max_mib << 20, kept.key_mib << 20)
    RESPONSES_STORED_BYTES.source = lambda: {(): responses.bytes}
    return HttpBridge(
        pipeline,
        config.max_body_mib,
        keys,
        open_metrics=not config.metrics_need_key,
        responses=responses,
        adapters=adapters,
        guard=RequestGuard(
            config.http_host or config.host, config.allowed_origins, config.allowed_hosts
        ),
        connections=Connections(config.http_idle_timeout, config.http_max_connections),
        bodies_mib=config.max_bodies_mib,
    )


def api_keys(config: RouterConfig) -> ApiKeys:
    """The keys the public APIs require; the router refuses to start (one line) when they
    would be open on an address other hosts reach, or /metrics keyless on the stage port
    under ``--metrics-need-key``."""
    keys = ApiKeys.from_settings(config.api_key, config.api_key_file, config.admin_key)
    http_host = config.http_host or config.host
    bound = [config.host] + ([http_host] if config.http_port >= 0 else [])
    if refusal := open_api_refusal(keys, bound, config.allow_open):
        raise SystemExit(refusal)
    if config.metrics_need_key and config.metrics_port >= 0:
        raise SystemExit(
            "--metrics-need-key: the stage's --metrics-port would serve /metrics without a "
            "key; set --metrics-port -1 and scrape the HTTP bridge's /metrics with a key"
        )
    return keys


def _with_session(
    request: router_pb2.RouterGenerateRequest, context: grpc.aio.ServicerContext
) -> router_pb2.RouterGenerateRequest:
    """Take the session key from ``x-session-id`` metadata when the message has none."""
    if not request.session_id:
        for key, value in context.invocation_metadata() or ():
            if key == SESSION_HEADER and isinstance(value, str):
                request.session_id = value
                break
    return request
