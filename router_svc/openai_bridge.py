"""The OpenAI-compatible HTTP bridge, served by the router process beside its gRPC API.

It translates each HTTP call into the same :meth:`Pipeline.start` the gRPC API calls,
and renders the :class:`Generation` it returns; nothing about generation lives here. aiohttp rather than an ASGI stack: it
runs inside the stage's own event loop without taking over signals, and with
``handler_cancellation`` a client that disconnects cancels its handler, which
cancels every internal call of the request (the engines abort their work).

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``. A
streamed response reports an error that happens after the first chunk as an
``error`` event before ``[DONE]``; errors before it get their HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from router_svc.affinity import SESSION_HEADER
from router_svc.openai_api import ChatCompletionRequest, CompletionRequest
from router_svc.pipeline import Generation, Pipeline
from router_svc.tools import ParserChoice, ToolPlan, ToolStream
from services.auth import ApiKeys
from services.errors import StageError
from services.pb import common_pb2, router_pb2

log = logging.getLogger(__name__)

#: Content codings aiohttp decodes (any other would reach the JSON parser still encoded).
_CODINGS = frozenset({"", "identity", "gzip", "deflate"})

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        code: str | None = None,
        param: str | None = None,
        kind: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.code = code
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        if kind is None and status == HTTPStatus.NOT_FOUND:
            self.kind = "not_found_error"

    @classmethod
    def from_stage(cls, error: StageError) -> ApiError:
        """The answer to a mesh error: everything comes from its kind (services.errors)."""
        return cls(
            error.http_status, str(error), error.openai_code, error.param, error.openai_type, error.retry_after
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {} if self.retry_after is None else {hdrs.RETRY_AFTER: str(max(1, round(self.retry_after)))}
        if self.status == HTTPStatus.UNAUTHORIZED:
            headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
        return web.json_response(self.body(), status=int(self.status), headers=headers)


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "json_invalid":
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {first['msg']}") from None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"{where}: {message}" if where else message, param=where or None
        ) from None


def _usage(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _token_entry(entry: common_pb2.TokenLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode())}


def _chat_logprobs(positions: list[common_pb2.PositionLogprobs]) -> dict[str, Any]:
    return {
        "content": [
            {**_token_entry(p.chosen), "top_logprobs": [_token_entry(t) for t in p.top]} for p in positions
        ]
    }


class _CompletionLogprobs:
    """The legacy completions ``logprobs`` object; text offsets run across deltas."""

    def __init__(self) -> None:
        self.offset = 0

    def render(self, positions: list[common_pb2.PositionLogprobs]) -> dict[str, Any]:
        tokens, offsets = [], []
        for p in positions:
            tokens.append(p.chosen.token)
            offsets.append(self.offset)
            self.offset += len(p.chosen.token)
        return {
            "tokens": tokens,
            "token_logprobs": [p.chosen.logprob for p in positions],
            "top_logprobs": [{t.token: t.logprob for t in p.top} for p in positions],
            "text_offset": offsets,
        }


class HttpBridge:
    """aiohttp application and runner for the OpenAI-compatible API."""

    def __init__(
        self,
        pipeline: Pipeline,
        max_body_mib: int,
        keys: ApiKeys | None = None,
        open_metrics: bool = True,
        parsers: ParserChoice | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._parsers = parsers or ParserChoice("hermes", {})
        self._max_body = max_body_mib * 1024 * 1024
        self._keys = keys or ApiKeys(())
        #: Paths served without a key: health always (load balancers), metrics unless asked.
        self._open_paths = {"/health", "/metrics"} if open_metrics else {"/health"}
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body, middlewares=[self._errors, self._authorized])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # the bound port has no public accessor
        sockets = server.sockets if isinstance(server, asyncio.Server) else []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        log.info("OpenAI-compatible HTTP on %s:%d", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every failure as OpenAI's error body with the right status."""
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except StageError as exc:
            return ApiError.from_stage(exc).response()
        except web.HTTPRequestEntityTooLarge:
            return ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body is larger than {self._max_body} bytes"
            ).response()
        except web.HTTPException as exc:
            return ApiError(HTTPStatus(exc.status), exc.reason).response()
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the router log").response()

    @web.middleware
    async def _authorized(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The API key, checked before the body is read (401 with OpenAI's body)."""
        if request.path not in self._open_paths:
            self._keys.check(request.headers.get(hdrs.AUTHORIZATION))
        return await handler(request)

    async def _body(self, request: web.Request, model: type[BaseModel]) -> Any:
        coding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
        if coding not in _CODINGS:
            raise ApiError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Encoding {coding!r} is not supported; send {', '.join(sorted(_CODINGS - {''}))}",
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
        return _parse(model, raw)

    # -- endpoints ------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        """200 when a tokenizer and a decode member are reachable, else 503 saying what is missing."""
        if missing := self._pipeline.missing_roles():
            return ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"no {' or '.join(missing)} member").response()
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        cards = await self._pipeline.catalogue.cards()
        return web.json_response({"object": "list", "data": [self._card(c) for c in cards]})

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for card in await self._pipeline.catalogue.cards():
            if card.name == name:
                return web.json_response(self._card(card))
        raise ApiError(HTTPStatus.NOT_FOUND, f"model {name!r} is not served here", "model_not_found")

    @staticmethod
    def _card(card: router_pb2.ModelCard) -> dict[str, Any]:
        return {
            "id": card.name, "object": "model", "created": 0, "owned_by": "stagemesh",
            "max_model_len": card.max_model_len,
        }

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        plan = None
        if body.tools or body.tool_choice is not None:
            parser = self._parsers.for_model(await self._pipeline.catalogue.resolve(body.model))
            plan = ToolPlan.build(body.tools or [], body.tool_choice, body.parallel_tool_calls, parser)
        call = _to_grpc(functools.partial(body.to_grpc, plan))
        return await self._serve(request, body, [call], chat=True, plan=plan)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body: CompletionRequest = await self._body(request, CompletionRequest)
        prompts = body.prompts()
        self._pipeline.limits.check_batch(len(prompts))  # before a message is built per prompt
        calls = [_to_grpc(functools.partial(body.to_grpc, prompt)) for prompt in prompts]
        return await self._serve(request, body, calls, chat=False)

    # -- generation -----------------------------------------------------------

    async def _serve(
        self,
        request: web.Request,
        body: ChatCompletionRequest | CompletionRequest,
        calls: list[router_pb2.RouterGenerateRequest],
        chat: bool,
        plan: ToolPlan | None = None,
    ) -> web.StreamResponse:
        """Start the body's generation (completions may batch several prompts) and answer."""
        session = request.headers.get(SESSION_HEADER, "")
        if not session.isprintable() or session != session.encode(errors="replace").decode():
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the {SESSION_HEADER} header must be printable UTF-8 text")
        for call in calls:
            call.session_id = session
        async with self._pipeline.start(calls, self._pipeline.deadline()) as generation:
            response_id = ("chatcmpl-" if chat else "cmpl-") + generation.request_id
            created = int(time.time())
            if body.stream:
                return await self._stream(request, generation, response_id, created, chat, body.include_usage, plan)
            return await self._whole(generation, response_id, created, chat, plan)

    async def _whole(
        self, generation: Generation, response_id: str, created: int, chat: bool, plan: ToolPlan | None
    ) -> web.Response:
        result = await generation.result()
        wants_logprobs = any(c.logprobs for c in result.completions)
        out = []
        for completion in result.completions:
            positions = list(completion.logprobs)
            choice: dict[str, Any] = {
                "index": completion.index,
                "finish_reason": _FINISH.get(completion.finish_reason),
                "stop_reason": completion.stop_reason or None,
            }
            if chat:
                choice["message"] = {"role": "assistant", "content": completion.text}
                if plan is not None:
                    found = plan.extract(completion.text)
                    choice["message"] = {
                        "role": "assistant",
                        "content": found.content,
                        "tool_calls": [call.render() for call in found.calls],
                    }
                    choice["finish_reason"] = plan.finish_reason(bool(found.calls), choice["finish_reason"])
                choice["logprobs"] = _chat_logprobs(positions) if wants_logprobs else None
            else:
                choice["text"] = completion.text
                choice["logprobs"] = _CompletionLogprobs().render(positions) if wants_logprobs else None
            if completion.token_ids:
                choice["token_ids"] = list(completion.token_ids)
            out.append(choice)
        return web.json_response({
            "id": response_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": result.model,
            "choices": out,
            "usage": _usage(result.usage),
        })

    async def _stream(
        self,
        request: web.Request,
        generation: Generation,
        response_id: str,
        created: int,
        chat: bool,
        include_usage: bool,
        plan: ToolPlan | None,
    ) -> web.StreamResponse:
        """Server-sent events; the first delta is awaited before the headers, so errors
        that stop a request from starting (no worker, bad sampling) keep their status."""
        envelope = {
            "id": response_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": generation.model,
        }
        offsets: dict[int, _CompletionLogprobs] = {}
        started: set[int] = set()
        tool_streams: dict[int, ToolStream] = {}

        def chunk(choices: list[dict[str, Any]], usage: common_pb2.Usage | None = None) -> bytes:
            event: dict[str, Any] = {**envelope, "choices": choices}
            if include_usage:
                event["usage"] = _usage(usage) if usage is not None else None
            return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"

        def render(delta: router_pb2.RouterGenerateResponse) -> bytes:
            choice: dict[str, Any] = {"index": delta.index}
            finish = _FINISH.get(delta.finish_reason)
            if chat and plan is not None:
                tools = tool_streams.setdefault(delta.index, plan.stream())
                fields = tools.feed(delta.text) + (tools.finish() if delta.finish_reason else [])
                choice["delta"] = _merged(fields)
                if finish is not None:
                    finish = plan.finish_reason(tools.calls > 0, finish)
                elif not fields and not delta.logprobs and not delta.token_ids:
                    return b""  # held back: part of a call, or of its opening tag
            elif chat:
                choice["delta"] = {"content": delta.text}
            if chat:
                if delta.index not in started:
                    started.add(delta.index)
                    choice["delta"]["role"] = "assistant"
                choice["logprobs"] = _chat_logprobs(list(delta.logprobs)) if delta.logprobs else None
            else:
                choice["text"] = delta.text
                renderer = offsets.setdefault(delta.index, _CompletionLogprobs())
                choice["logprobs"] = renderer.render(list(delta.logprobs)) if delta.logprobs else None
            if delta.token_ids:
                choice["token_ids"] = list(delta.token_ids)
            choice["finish_reason"] = finish
            if delta.finish_reason:
                choice["stop_reason"] = delta.stop_reason or None
            return chunk([choice])

        async with contextlib.aclosing(aiter(generation)) as stream:
            first = await anext(stream)
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            try:
                delta: router_pb2.RouterGenerateResponse | None = first
                while delta is not None:
                    if delta.HasField("usage"):
                        if include_usage:
                            await response.write(chunk([], delta.usage))
                    elif event := render(delta):
                        await response.write(event)
                    delta = await anext(stream, None)
            except StageError as exc:
                error = ApiError.from_stage(exc)
                log.warning("stream %s failed after it started: %s", response_id, error)
                await response.write(b"data: " + json.dumps(error.body()).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response


def _merged(fields: list[dict[str, Any]]) -> dict[str, Any]:
    """One chat delta from a tool stream's pieces: content joined, calls in order."""
    delta: dict[str, Any] = {}
    for field in fields:
        if "content" in field:
            delta["content"] = delta.get("content", "") + field["content"]
        delta.setdefault("tool_calls", []).extend(field.get("tool_calls", []))
    if not delta.get("tool_calls"):
        delta.pop("tool_calls", None)
    return delta


def _to_grpc(build: Callable[[], router_pb2.RouterGenerateRequest]) -> router_pb2.RouterGenerateRequest:
    """Build the gRPC request; values protobuf refuses (negative ids, out-of-range ints) are 400s."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid value: {exc}") from None
