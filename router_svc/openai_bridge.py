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
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from router_svc.adapters import AdapterControl
from router_svc.affinity import SESSION_HEADER
from router_svc.http_errors import ApiError
from router_svc.http_guard import ConnectionCap, Connections, RequestGuard
from router_svc.openai_api import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
)
from router_svc.pipeline import Generation, Pipeline
from router_svc.response_store import ResponseStore, Stored
from router_svc.responses import (
    ResponseEvents,
    ResponsesRequest,
    answer_messages,
    finish,
    new_id,
    output_items,
    skeleton,
)
from router_svc.tools import Extracted, ParserChoice, ToolPlan, ToolStream
from services import exposition
from services.auth import ApiKeys, Caller
from services.errors import StageError
from services.pb import common_pb2, router_pb2
from services.vocabulary import check_token_ids

log = logging.getLogger(__name__)

#: Seconds between sweeps of expired stored responses.
_SWEEP_SECONDS = 30.0
#: Content codings aiohttp decodes (any other would reach the JSON parser still encoded).
_CODINGS = frozenset({"", "identity", "gzip", "deflate"})

#: The request's :class:`Caller`, set by the API-key middleware.
CALLER = web.RequestKey("caller", Caller)

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
}


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "json_invalid":
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {first['msg']}"
            ) from None
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
            {**_token_entry(p.chosen), "top_logprobs": [_token_entry(t) for t in p.top]}
            for p in positions
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
        responses: ResponseStore | None = None,
        adapters: AdapterControl | None = None,
        guard: RequestGuard | None = None,
        connections: Connections | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._guard = guard or RequestGuard("127.0.0.1", (), ())
        self._connections = connections or Connections()
        self._adapters = adapters
        self._parsers = parsers or ParserChoice("hermes", {})
        self._responses = responses or ResponseStore(1000, 3600.0)
        #: Background responses generating now (cancelled when the bridge stops).
        self._background: set[asyncio.Task[None]] = set()
        self._max_body = max_body_mib * 1024 * 1024
        self._keys = keys or ApiKeys(())
        #: Paths served without a key: health always (load balancers), metrics unless asked.
        self._open_paths = {"/health", "/metrics"} if open_metrics else {"/health"}
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self._max_body,
            middlewares=[
                self._errors,
                self._guard.middleware,
                self._authorized,
                self._guard.json_bodies,
            ],
        )
        self._guard.install(app)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/responses", self._create_response)
        app.router.add_get("/v1/responses/{id}", self._retrieve_response)
        app.router.add_delete("/v1/responses/{id}", self._delete_response)
        app.router.add_post("/v1/responses/{id}/cancel", self._cancel_response)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        if self._adapters is not None:
            app.router.add_post("/v1/load_lora_adapter", self._load_adapter)
            app.router.add_post("/v1/unload_lora_adapter", self._unload_adapter)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
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
            self._responses.sweep()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(self._background)
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
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request body is larger than {self._max_body} bytes",
            ).response()
        except web.HTTPException as exc:
            return ApiError(HTTPStatus(exc.status), exc.reason).response()
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return ApiError(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the router log"
            ).response()

    @web.middleware
    async def _authorized(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The API key, checked before the body is read (401 with OpenAI's body); the
        caller it names is kept on the request."""
        if request.path not in self._open_paths:
            request[CALLER] = self._keys.check(request.headers.get(hdrs.AUTHORIZATION))
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
            return ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, f"no {' or '.join(missing)} member"
            ).response()
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(exposition.registry()),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def _models(self, request: web.Request) -> web.Response:
        cards = await self._pipeline.catalogue.cards()
        return web.json_response({"object": "list", "data": [self._card(c) for c in cards]})

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for card in await self._pipeline.catalogue.cards():
            if card.name == name:
                return web.json_response(self._card(card))
        raise ApiError(
            HTTPStatus.NOT_FOUND, f"model {name!r} is not served here", "model_not_found"
        )

    @staticmethod
    def _card(card: router_pb2.ModelCard) -> dict[str, Any]:
        """vLLM's model card: an adapter names its base model as ``parent``; a base model
        has no parent. ``root`` is the name: where an adapter lives on the engines' hosts
        is not the callers' business."""
        return {
            "id": card.name,
            "object": "model",
            "created": 0,
            "owned_by": "stagemesh",
            "root": card.name,
            "parent": card.parent or None,
            "max_model_len": card.max_model_len,
        }

    async def _load_adapter(self, request: web.Request) -> web.Response:
        """vLLM's /v1/load_lora_adapter: on every engine of the base model (behind the API key)."""
        request[CALLER].require_admin("loading an adapter")
        body: LoadLoraAdapterRequest = await self._body(request, LoadLoraAdapterRequest)
        assert self._adapters is not None
        await self._adapters.load(body.lora_name, body.lora_path, body.base_model)
        return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def _unload_adapter(self, request: web.Request) -> web.Response:
        """vLLM's /v1/unload_lora_adapter: from every engine that has it."""
        request[CALLER].require_admin("unloading an adapter")
        body: UnloadLoraAdapterRequest = await self._body(request, UnloadLoraAdapterRequest)
        assert self._adapters is not None
        await self._adapters.unload(body.lora_name)
        return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        plan = await self._plan(body)
        call = _to_grpc(functools.partial(body.to_grpc, plan))
        return await self._serve(request, body, [call], chat=True, plan=plan)

    async def _plan(self, body: ChatCompletionRequest) -> ToolPlan | None:
        """The request's tool plan, with the parser of the model it resolves to."""
        if not body.tools and body.tool_choice is None:
            return None
        catalogue = self._pipeline.catalogue
        model = await catalogue.resolve(body.model)
        parser = self._parsers.for_model(model, catalogue.base(model))
        return ToolPlan.build(body.tools or [], body.tool_choice, body.parallel_tool_calls, parser)

    # -- the Responses API ------------------------------------------------------

    async def _create_response(self, request: web.Request) -> web.StreamResponse:
        body: ResponsesRequest = await self._body(request, ResponsesRequest)
        owner = _caller(request)
        if not isinstance(body.input, str):  # before the items become messages
            self._pipeline.limits.check_items(len(body.input), "input")
        try:
            chat, conversation = body.to_chat(
                self._responses.history(body.previous_response_id, owner)
            )
        except ValidationError as exc:  # what the chat form of the request refuses
            raise ApiError(
                HTTPStatus.BAD_REQUEST, exc.errors()[0]["msg"].removeprefix("Value error, ")
            ) from None
        plan = await self._plan(chat)
        call = _to_grpc(functools.partial(chat.to_grpc, plan))
        response_id = new_id("resp")
        if body.store:  # too large to keep: refused before any work is done
            self._responses.fits(
                Stored(skeleton(body, response_id, body.model, "queued"), conversation, 0.0, owner)
            )
        if body.background:
            return await self._start_in_background(
                body, response_id, call, conversation, plan, owner
            )
        async with self._pipeline.start([call], self._pipeline.deadline(), owner) as generation:
            response = skeleton(body, response_id, generation.model, "in_progress")
            if body.stream:
                stream, items = await self._response_events(
                    request, generation, ResponseEvents(response), plan
                )
            else:
                result = await generation.result()
                items, reason = _response_output(result.completions[0], plan)
                finish(response, items, reason, result.usage)
        if body.store and response["status"] in ("completed", "incomplete"):
            entry = Stored(response, conversation + answer_messages(items), time.monotonic(), owner)
            try:
                self._responses.put(entry)
            except StageError as exc:  # its output made it too large: answered, not kept
                log.warning("response %s is not stored: %s", response_id, exc)
        return stream if body.stream else web.json_response(response)

    async def _start_in_background(
        self,
        body: ResponsesRequest,
        response_id: str,
        call: router_pb2.RouterGenerateRequest,
        conversation: list[ChatMessage],
        plan: ToolPlan | None,
        owner: str,
    ) -> web.Response:
        """Start a background response and answer once the mesh has checked, admitted and
        tokenized it: a request the mesh refuses gets its status now and is not stored."""
        entry = Stored(
            skeleton(body, response_id, body.model, "queued"), conversation, time.monotonic(), owner
        )
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._generate_in_background(entry, call, plan, started), name=response_id
        )
        task.add_done_callback(lambda _: started.cancel())  # a no-op once it has started
        try:
            entry.response["model"] = await started
            entry.task = task
            self._responses.put(entry)
        except BaseException:
            task.cancel()
            raise
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return web.json_response(entry.response)

    async def _generate_in_background(
        self,
        entry: Stored,
        call: router_pb2.RouterGenerateRequest,
        plan: ToolPlan | None,
        started: asyncio.Future[str],
    ) -> None:
        response = entry.response
        try:
            async with self._pipeline.start(
                [call], self._pipeline.deadline(), entry.owner
            ) as generation:
                started.set_result(generation.model)
                response["status"] = "in_progress"
                result = await generation.result()
            items, reason = _response_output(result.completions[0], plan)
            finish(response, items, reason, result.usage)
            entry.conversation = entry.conversation + answer_messages(items)
        except asyncio.CancelledError:
            response["status"] = "cancelled"  # the engines aborted the work with the calls
        except StageError as exc:
            if not started.done():  # refused before it started: the request's answer
                started.set_exception(exc)
                return
            _failed(response, exc)
        finally:
            entry.task = None
        self._responses.update(entry)  # its output counts now

    async def _response_events(
        self,
        request: web.Request,
        generation: Generation,
        events: ResponseEvents,
        plan: ToolPlan | None,
    ) -> tuple[web.StreamResponse, list[dict[str, Any]]]:
        """The response as the SDK's server-sent events; the first delta is awaited before
        the headers, so a request that cannot start keeps its status."""
        tools = plan.stream() if plan is not None else None
        async with contextlib.aclosing(aiter(generation)) as deltas:
            first = await anext(deltas)
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            out = events.start()
            reason = "stop"
            try:
                delta: router_pb2.RouterGenerateResponse | None = first
                while delta is not None:
                    if delta.HasField("usage"):
                        out += events.completed(reason, delta.usage)
                    else:
                        fields = tools.feed(delta.text) if tools else [{"content": delta.text}]
                        if delta.finish_reason:
                            fields += tools.finish() if tools else []
                            reason = _FINISH.get(delta.finish_reason, "stop")
                        out += events.feed(fields)
                    for event in out:
                        await response.write(_event_bytes(event))
                    out = []
                    delta = await anext(deltas, None)
            except StageError as exc:
                log.warning("response %s failed after it started: %s", events.response["id"], exc)
                _failed(events.response, exc)
                await response.write(
                    _event_bytes({"type": "response.failed", "response": events.response})
                )
            await response.write_eof()
        return response, events.items

    async def _retrieve_response(self, request: web.Request) -> web.Response:
        return web.json_response(
            self._responses.get(request.match_info["id"], _caller(request)).response
        )

    async def _delete_response(self, request: web.Request) -> web.Response:
        response_id = request.match_info["id"]
        self._responses.delete(response_id, _caller(request))
        return web.json_response({"id": response_id, "object": "response", "deleted": True})

    async def _cancel_response(self, request: web.Request) -> web.Response:
        """Cancel a background response (OpenAI cancels only those); it ends ``cancelled``."""
        entry = self._responses.get(request.match_info["id"], _caller(request))
        if not entry.response["background"]:
            raise ApiError(HTTPStatus.BAD_REQUEST, "only background responses can be cancelled")
        if (task := entry.task) is not None:
            task.cancel()
            await asyncio.wait([task])
        return web.json_response(entry.response)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body: CompletionRequest = await self._body(request, CompletionRequest)
        prompts = body.prompts()
        self._pipeline.limits.check_batch(len(prompts))  # before a message is built per prompt
        calls = [_to_grpc(functools.partial(body.to_grpc, prompt)) for prompt in prompts]
        echo = None
        if body.echo:  # the prompt's text, once per prompt (ids are decoded as the output is)
            decoder = await self._pipeline.catalogue.decoder(
                await self._pipeline.catalogue.resolve(body.model)
            )
            echo = [
                p if isinstance(p, str) else decoder.decode(p, body.skip_special_tokens)
                for p in prompts
            ]
        return await self._serve(request, body, calls, chat=False, echo=echo)

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: ids (and their strings) of a prompt or a conversation."""
        body: TokenizeRequest = await self._body(request, TokenizeRequest)
        catalogue = self._pipeline.catalogue
        model = await catalogue.resolve(body.model)
        message = body.to_grpc(catalogue.base(model))
        self._pipeline.limits.check_chat(message.chat)
        reply = await catalogue.tokenizer(
            message.model, lambda client: client.tokenize_request(message)
        )
        info = await catalogue.info(model)
        return web.json_response(
            {
                "count": len(reply.token_ids),
                "max_model_len": catalogue.max_model_len(model, info),
                "tokens": list(reply.token_ids),
                "token_strs": list(reply.token_strings) if body.return_token_strs else None,
            }
        )

    async def _detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: the text of ids, decoded in the router as generated text is."""
        body: DetokenizeRequest = await self._body(request, DetokenizeRequest)
        catalogue = self._pipeline.catalogue
        model = await catalogue.resolve(body.model)
        info = await catalogue.info(model)
        check_token_ids(body.tokens, info.vocab_size, "tokens")
        return web.json_response({"prompt": (await catalogue.decoder(model)).decode(body.tokens)})

    # -- generation -----------------------------------------------------------

    async def _serve(
        self,
        request: web.Request,
        body: ChatCompletionRequest | CompletionRequest,
        calls: list[router_pb2.RouterGenerateRequest],
        chat: bool,
        plan: ToolPlan | None = None,
        echo: list[str] | None = None,
    ) -> web.StreamResponse:
        """Start the body's generation (completions may batch several prompts) and answer."""
        session = request.headers.get(SESSION_HEADER, "")
        if not session.isprintable() or session != session.encode(errors="replace").decode():
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"the {SESSION_HEADER} header must be printable UTF-8 text"
            )
        for call in calls:
            call.session_id = session
        async with self._pipeline.start(
            calls, self._pipeline.deadline(), _caller(request)
        ) as generation:
            response_id = ("chatcmpl-" if chat else "cmpl-") + generation.request_id
            created = int(time.time())
            # Echoed prompt text per output: outputs run prompt-major, n per prompt.
            echoes = [text for text in echo for _ in range(body.n)] if echo else None
            if body.stream:
                return await self._stream(
                    request,
                    generation,
                    response_id,
                    created,
                    chat,
                    body.include_usage,
                    plan,
                    echoes,
                )
            return await self._whole(generation, response_id, created, chat, plan, echoes)

    async def _whole(
        self,
        generation: Generation,
        response_id: str,
        created: int,
        chat: bool,
        plan: ToolPlan | None,
        echoes: list[str] | None,
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
                    choice["finish_reason"] = plan.finish_reason(
                        bool(found.calls), choice["finish_reason"]
                    )
                choice["logprobs"] = _chat_logprobs(positions) if wants_logprobs else None
            else:
                choice["text"] = (echoes[completion.index] if echoes else "") + completion.text
                choice["logprobs"] = (
                    _CompletionLogprobs().render(positions) if wants_logprobs else None
                )
            if completion.token_ids:
                choice["token_ids"] = list(completion.token_ids)
            if completion.prompt_logprobs and not chat:
                choice["prompt_logprobs"] = _prompt_logprobs(completion.prompt_logprobs)
            out.append(choice)
        body: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": result.model,
            "choices": out,
            "usage": _usage(result.usage),
        }
        if (
            chat and result.completions and result.completions[0].prompt_logprobs
        ):  # vLLM's place for it
            body["prompt_logprobs"] = _prompt_logprobs(result.completions[0].prompt_logprobs)
        return web.json_response(body)

    async def _stream(
        self,
        request: web.Request,
        generation: Generation,
        response_id: str,
        created: int,
        chat: bool,
        include_usage: bool,
        plan: ToolPlan | None,
        echoes: list[str] | None,
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
                choice["logprobs"] = (
                    _chat_logprobs(list(delta.logprobs)) if delta.logprobs else None
                )
            else:
                first_of_choice = delta.index not in started
                started.add(delta.index)
                choice["text"] = (
                    echoes[delta.index] if echoes and first_of_choice else ""
                ) + delta.text
                renderer = offsets.setdefault(delta.index, _CompletionLogprobs())
                choice["logprobs"] = (
                    renderer.render(list(delta.logprobs)) if delta.logprobs else None
                )
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


def _prompt_logprobs(
    positions: Sequence[common_pb2.PositionLogprobs],
) -> list[dict[str, Any] | None]:
    """vLLM's prompt_logprobs: None for the first token, then per position every token
    it reports (the prompt's own and the top ones) keyed by id."""
    rendered: list[dict[str, Any] | None] = [None]
    for position in positions:
        entries = {e.token_id: e for e in (position.chosen, *position.top)}
        rendered.append(
            {
                str(token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.token}
                for token_id, e in entries.items()
            }
        )
    return rendered


def _response_output(
    completion: router_pb2.Completion, plan: ToolPlan | None
) -> tuple[list[dict[str, Any]], str]:
    """A finished completion's Responses output items and finish reason."""
    found = plan.extract(completion.text) if plan is not None else Extracted(completion.text, [])
    return output_items(found), _FINISH.get(completion.finish_reason, "stop")


def _failed(response: dict[str, Any], exc: StageError) -> None:
    """Mark a Responses object failed, with OpenAI's code for the mesh error."""
    error = ApiError.from_stage(exc)
    response["status"] = "failed"
    response["error"] = {"code": error.code or error.kind, "message": str(error)}


def _event_bytes(event: dict[str, Any]) -> bytes:
    return (
        f"event: {event['type']}\ndata: ".encode()
        + json.dumps(event, ensure_ascii=False).encode()
        + b"\n\n"
    )


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


def _to_grpc(
    build: Callable[[], router_pb2.RouterGenerateRequest],
) -> router_pb2.RouterGenerateRequest:
    """Build the gRPC request; values protobuf refuses (negative ids, out-of-range ints) are 400s."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid value: {exc}") from None


def _caller(request: web.Request) -> str:
    """The id of the API key the request came with (audit, tenancy, ownership)."""
    return request[CALLER].key_id
