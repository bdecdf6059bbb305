"""Registering a stage's servicer on a grpc.aio server, one place for all stages.

Instead of the generated ``add_*Servicer_to_server`` functions we build the method
handlers from the service descriptor, which lets every stage share three behaviours:

- a request that fails to parse (e.g. a string field with invalid UTF-8) is answered
  with INVALID_ARGUMENT instead of grpc's generic INTERNAL;
- :class:`~services.errors.StageError` subclasses become their gRPC status, with the
  kind's name in the trailing metadata, and any other exception becomes INTERNAL with
  the details in the log, not on the wire;
- every call is counted and timed in Prometheus by method and status code;
- a stage may ``authorize`` each call from its context before the handler runs (under
  mutual TLS, the caller certificate's role for that method: :meth:`MeshCredentials.check_peer_role
  <services.credentials.MeshCredentials.check_peer_role>`), once per call, not per message.

Only the RPCs a servicer defines as ``async`` methods are registered; the rest answer
UNIMPLEMENTED, as grpc does for unknown methods.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory
from prometheus_client import Counter, Histogram

from services.errors import InvalidRequest, StageError

log = logging.getLogger(__name__)

RPC_CALLS = Counter(
    "stagemesh_grpc_calls_total",
    "gRPC calls handled, by method and status code",
    ["method", "code"],
)
RPC_SECONDS = Histogram(
    "stagemesh_grpc_call_seconds",
    "Time from the start to the end of a handled gRPC call",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


class _Malformed:
    """Stands in for a request that could not be parsed, so the handler can reject it."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.detail = f"malformed {type_name}: {error}"


def _tolerant_deserializer(cls: type[message.Message]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except message.DecodeError as exc:
            return _Malformed(cls.DESCRIPTOR.full_name, exc)

    return deserialize


def _check(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidRequest(request.detail)
    return request


async def _fail(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    """Abort the call with the status ``exc`` stands for (always raises)."""
    if isinstance(exc, StageError):
        await context.abort(exc.code, str(exc), trailing_metadata=exc.trailing_metadata())
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the stage log")


def _code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


#: Checks a call (its full method name and context) before its handler runs; raises a
#: StageError to refuse it.
Authorize = Callable[[str, grpc.aio.ServicerContext], None]


@contextlib.asynccontextmanager
async def _guarded(method_name: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Map the handler's exceptions to statuses and record the call's metrics."""
    start = time.perf_counter()
    try:
        yield
    except (grpc.aio.AbortError, GeneratorExit):
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to a status by _fail
        await _fail(context, method_name, exc)
    finally:
        RPC_CALLS.labels(method_name, _code_of(context)).inc()
        RPC_SECONDS.labels(method_name).observe(time.perf_counter() - start)


def _wrap_unary(
    method_name: str, impl: Callable[..., Any], authorize: Authorize | None
) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _guarded(method_name, context):
            if authorize is not None:
                authorize(method_name, context)
            return await impl(_check(request), context)

    return handler


def _wrap_stream(
    method_name: str, impl: Callable[..., Any], authorize: Authorize | None
) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _guarded(method_name, context):
            if authorize is not None:
                authorize(method_name, context)
            async for item in impl(_check(request), context):
                yield item

    return handler


def register_service(
    server: grpc.aio.Server,
    service: descriptor.ServiceDescriptor,
    servicer: object,
    authorize: Authorize | None = None,
) -> list[str]:
    """Add ``servicer``'s async methods for ``service`` to ``server``; returns their names.
    ``authorize`` checks each call's context first (none: every call is taken)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name, None)
        if impl is None or not (
            inspect.iscoroutinefunction(impl) or inspect.isasyncgenfunction(impl)
        ):
            continue
        if method.client_streaming:
            # The mesh has none: its streams go one way (see docs/design.md, "Streams go
            # one way"), so the half-close rules of client streams never arise.
            raise TypeError(f"{service.full_name}/{method.name}: client streaming is unsupported")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        full_name = f"{service.full_name}/{method.name}"
        kwargs = {
            "request_deserializer": _tolerant_deserializer(request_cls),
            "response_serializer": response_cls.SerializeToString,
        }
        if method.server_streaming:
            wrapped = _wrap_stream(full_name, impl, authorize)
            factory = grpc.unary_stream_rpc_method_handler
        else:
            wrapped = _wrap_unary(full_name, impl, authorize)
            factory = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(wrapped, **kwargs)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    return sorted(handlers)
