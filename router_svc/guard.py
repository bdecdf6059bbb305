"""The guard hook: an outside service that sees each request before inference (and,
optionally, each result as it completes) and allows, denies or rewrites it.

Shaped like Envoy's ext_authz HTTP service: the router POSTs a JSON check to
``--guard-url`` and acts on the answer. The contract (docs/deploy.md, "Audit log and
guard", has an example):

request  ``{"phase": "input" | "output", "request_id", "api_key_id", "model",
           "request": <RouterGenerateRequest as proto3 JSON>,
           "outputs": [text, ...]  (output phase only)}``
answer   ``{"decision": "allow"}``
         ``{"decision": "deny", "status": 400 | 403 | 429, "message": "..."}``
         ``{"decision": "rewrite", "request": <RouterGenerateRequest>}``  (input phase)

A denial reaches the client as its status (400, 429, or 403 for any other) with the
guard's message in OpenAI's error body, or as the matching gRPC status. A rewritten
request replaces the original and is checked like one (limits, model). The output
phase runs when a request's outputs are complete: a denied result is never returned
whole, but a streamed one has already been seen, so it ends with the error instead of
its final message. When the guard fails (unreachable, timeout, a malformed answer),
``--guard-fail`` decides: ``closed`` refuses the request (503), ``open`` lets it through;
both are counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from google.protobuf import json_format
from prometheus_client import Counter, Histogram

from services.errors import InvalidRequest, Overloaded, PermissionDenied, StageError, Unavailable
from services.pb import router_pb2

log = logging.getLogger(__name__)

GUARD_SECONDS = Histogram(
    "stagemesh_router_guard_seconds",
    "Time the guard took to answer, by phase",
    ["phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
GUARD_DECISIONS = Counter(
    "stagemesh_router_guard_decisions_total",
    "The guard's decisions by phase (allow, deny, rewrite; fail_open and fail_closed when it "
    "failed)",
    ["phase", "decision"],
)

FAIL_POLICIES = ("open", "closed")


class GuardError(Exception):
    """The guard could not be asked, or its answer made no sense."""


def denial(status: int, message: str) -> StageError:
    """The error a denial becomes: 400, 429, or 403 for any other status."""
    text = f"refused by the guard: {message or 'no reason given'}"
    if status == 400:
        return InvalidRequest(text)
    if status == 429:
        return Overloaded(text)
    return PermissionDenied(text)


class Guard:
    """A client of the guard service; without a URL every check allows at once."""

    def __init__(
        self, url: str, fail: str = "closed", timeout: float = 2.0, output: bool = False
    ) -> None:
        if fail not in FAIL_POLICIES:
            raise SystemExit(f"--guard-fail must be open or closed, not {fail!r}")
        self.url = url
        self.fail_open = fail == "open"
        self.output = bool(url) and output
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def __bool__(self) -> bool:
        return bool(self.url)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _ask(self, phase: str, check: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        started = time.perf_counter()
        try:
            async with self._session.post(self.url, json={"phase": phase, **check}) as reply:
                if reply.status != 200:
                    raise GuardError(f"the guard answered HTTP {reply.status}")
                answer = await reply.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise GuardError(
                f"the guard at {self.url} failed: {exc or type(exc).__name__}"
            ) from exc
        finally:
            GUARD_SECONDS.labels(phase).observe(time.perf_counter() - started)
        if not isinstance(answer, dict) or answer.get("decision") not in (
            "allow",
            "deny",
            "rewrite",
        ):
            raise GuardError(f"the guard's answer has no valid decision: {str(answer)[:200]}")
        return answer

    async def check_input(
        self, request: router_pb2.RouterGenerateRequest, request_id: str, key_id: str
    ) -> router_pb2.RouterGenerateRequest:
        """The request to run: ``request``, or the guard's rewrite of it; raises on a denial."""
        if not self:
            return request
        answer = await self._decide("input", request, request_id, key_id, request.model)
        if answer is None or answer["decision"] == "allow":
            return request
        try:
            rewritten = json_format.ParseDict(
                answer.get("request", {}), router_pb2.RouterGenerateRequest()
            )
        except json_format.ParseError as exc:
            return self._failed(
                "input", GuardError(f"the guard's rewrite is not a request: {exc}"), request
            )
        rewritten.request_id = request.request_id
        return rewritten

    async def check_output(
        self,
        request: router_pb2.RouterGenerateRequest,
        request_id: str,
        key_id: str,
        model: str,
        outputs: Sequence[str],
    ) -> None:
        """Raise when the guard denies a completed result (with the output phase on)."""
        if self.output:
            await self._decide("output", request, request_id, key_id, model, outputs=list(outputs))

    async def _decide(
        self,
        phase: str,
        request: router_pb2.RouterGenerateRequest,
        request_id: str,
        key_id: str,
        model: str,
        **extra: Any,
    ) -> dict[str, Any] | None:
        """The guard's answer about ``request``, counted: a denial raises its error; None
        when the guard failed and the policy is open."""
        check = {
            "request_id": request_id,
            "api_key_id": key_id,
            "model": model,
            "request": json_format.MessageToDict(request, preserving_proto_field_name=True),
            **extra,
        }
        try:
            answer = await self._ask(phase, check)
        except GuardError as error:
            return self._failed(phase, error, None)
        GUARD_DECISIONS.labels(phase, answer["decision"]).inc()
        if answer["decision"] == "deny":
            raise denial(int(answer.get("status", 403)), str(answer.get("message", "")))
        return answer

    def _failed(self, phase: str, error: GuardError, fallback: Any) -> Any:
        """Apply ``--guard-fail``: return ``fallback`` (open) or refuse (closed)."""
        GUARD_DECISIONS.labels(phase, "fail_open" if self.fail_open else "fail_closed").inc()
        log.warning("%s (guard-fail %s)", error, "open" if self.fail_open else "closed")
        if self.fail_open:
            return fallback
        raise Unavailable(
            f"the request guard is unavailable, and the mesh refuses unguarded requests: {error}"
        )
