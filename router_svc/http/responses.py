"""The Responses API's handlers: create (whole, streamed or in the background),
retrieve, delete and cancel.

A response request becomes the chat request it means
(:mod:`router_svc.http.responses_protocol`) and starts the pipeline once, as a chat
request does, with the request's session key. Its output is rendered as items and
events (:mod:`router_svc.http.response_events`), and kept with its conversation
(:mod:`router_svc.http.response_store`) for ``previous_response_id``. Without an
``X-Session-Id``, a chain's session key is its first response's id, so every turn of a
chain marks and finds its blocks in the KV store and returns to its engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from router_svc.generation import Generation
from router_svc.http import incoming, sse
from router_svc.http.choices import FINISH
from router_svc.http.errors import ApiError
from router_svc.http.protocol import ChatCompletionRequest, ChatMessage
from router_svc.http.response_events import (
    ResponseEvents,
    answer_messages,
    finish,
    mark_failed,
    new_id,
    output_items,
    skeleton,
)
from router_svc.http.response_store import ResponseStore, Stored
from router_svc.http.responses_protocol import ResponsesRequest
from router_svc.pipeline import Pipeline
from router_svc.tool_parsers import Extracted, ToolStream
from router_svc.tools import ToolPlan
from services.errors import StageError
from services.pb import router_pb2

log = logging.getLogger(__name__)


class ResponseRenderer:
    """A streamed response: the SDK's named events, from the plan's tool stream."""

    def __init__(self, generation: Generation, events: ResponseEvents) -> None:
        self.events = events
        self._tools: ToolStream | None = generation.plan.stream() if generation.plan else None
        self._reason = "stop"

    def opening(self) -> bytes:
        """``response.created`` and ``response.in_progress``."""
        return _events(self.events.start())

    def delta(self, delta: router_pb2.RouterGenerateResponse) -> bytes:
        """Output items opened, filled and closed; the usage message completes it."""
        if delta.HasField("usage"):
            return _events(self.events.completed(self._reason, delta.usage))
        tools = self._tools
        fields = tools.feed(delta.text) if tools else [{"content": delta.text}]
        if delta.finish_reason:
            fields += tools.finish() if tools else []
            self._reason = FINISH.get(delta.finish_reason, "stop")
        return _events(self.events.feed(fields))

    def failed(self, error: ApiError) -> bytes:
        """``response.failed``, the response marked with the error."""
        mark_failed(self.events.response, error)
        return sse.named({"type": "response.failed", "response": self.events.response})

    def closing(self) -> bytes:
        """The Responses API sends no ``[DONE]``."""
        return b""


def _events(events: list[dict[str, Any]]) -> bytes:
    return b"".join(sse.named(event) for event in events)


def _output(
    completion: router_pb2.Completion, plan: ToolPlan | None
) -> tuple[list[dict[str, Any]], str]:
    """A finished completion's output items and finish reason."""
    found = plan.extract(completion.text) if plan is not None else Extracted(completion.text, [])
    return output_items(found), FINISH.get(completion.finish_reason, "stop")


class Responses:
    """The endpoints' handlers, over the pipeline and the store."""

    def __init__(self, pipeline: Pipeline, store: ResponseStore) -> None:
        self._pipeline = pipeline
        self.store = store
        #: Background responses generating now (cancelled when the API stops).
        self.background: set[asyncio.Task[None]] = set()

    async def create(self, request: web.Request) -> web.StreamResponse:
        """Create a response: whole, streamed, or started in the background."""
        body = await incoming.read_body(request, ResponsesRequest)
        owner = incoming.caller(request)
        previous = self.store.continued(body.previous_response_id, owner)
        chat, conversation = self._as_chat(body, previous)
        call = incoming.built(chat.to_grpc)
        response_id = new_id("resp")
        entry = Stored(skeleton(body, response_id, body.model, "queued"), conversation, 0, owner)
        entry.chain = previous.chain if previous else response_id
        if body.store:  # too large to keep: refused before any work is done
            self.store.fits(entry)
        starting = incoming.generate(
            self._pipeline, request, [call], chat.tool_request(), session=entry.chain
        )
        if body.background:
            return await self._in_background(entry, starting)
        async with starting as generation:
            response = entry.response
            response.update(model=generation.model, status="in_progress")
            if body.stream:
                renderer = ResponseRenderer(generation, ResponseEvents(response))
                answer = await sse.stream(request, generation, renderer)
                items = renderer.events.items
            else:
                result = await generation.result()
                items, reason = _output(result.completions[0], generation.plan)
                finish(response, items, reason, result.usage)
                answer = web.json_response(response)
        if body.store and response["status"] in ("completed", "incomplete"):
            entry.conversation = conversation + answer_messages(items)
            entry.stored_at = time.monotonic()
            try:
                self.store.put(entry)
            except StageError as exc:  # its output made it too large: answered, not kept
                log.warning("response %s is not stored: %s", response_id, exc)
        return answer

    def _as_chat(
        self, body: ResponsesRequest, previous: Stored | None
    ) -> tuple[ChatCompletionRequest, list[ChatMessage]]:
        """The chat request a response request means, with the stored conversation it
        continues; and that conversation with the new input."""
        if not isinstance(body.input, str):  # before the items become messages
            self._pipeline.limits.check_items(len(body.input), "input")
        try:
            return body.to_chat(previous.conversation if previous else [])
        except ValidationError as exc:  # what the chat form of the request refuses
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                exc.errors()[0]["msg"].removeprefix("Value error, "),
            ) from None

    async def _in_background(self, entry: Stored, starting: incoming.Starting) -> web.Response:
        """Start a background response and answer once the mesh has checked, admitted and
        tokenized it: a request the mesh refuses gets its status now and is not stored."""
        entry.stored_at = time.monotonic()
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._generate(entry, starting, started), name=entry.response["id"]
        )
        task.add_done_callback(lambda _: started.cancel())  # a no-op once it has started
        try:
            entry.response["model"] = await started
            entry.task = task
            self.store.put(entry)
        except BaseException:
            task.cancel()
            raise
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return web.json_response(entry.response)

    async def _generate(
        self, entry: Stored, starting: incoming.Starting, started: asyncio.Future[str]
    ) -> None:
        """A background response's generation; its entry gets the output (or the
        failure, or ``cancelled``) and is counted again in the store."""
        response = entry.response
        try:
            async with starting as generation:
                started.set_result(generation.model)
                response["status"] = "in_progress"
                result = await generation.result()
                items, reason = _output(result.completions[0], generation.plan)
            finish(response, items, reason, result.usage)
            entry.conversation = entry.conversation + answer_messages(items)
        except asyncio.CancelledError:
            response["status"] = "cancelled"  # the engines aborted the work with the calls
        except StageError as exc:
            if not started.done():  # refused before it started: the request's answer
                started.set_exception(exc)
                return
            mark_failed(response, ApiError.from_stage(exc))
        finally:
            entry.task = None
        self.store.update(entry)  # its output counts now

    async def retrieve(self, request: web.Request) -> web.Response:
        """A stored response, for the key that created it."""
        entry = self.store.get(request.match_info["id"], incoming.caller(request))
        return web.json_response(entry.response)

    async def delete(self, request: web.Request) -> web.Response:
        """Forget a stored response (a background one is cancelled)."""
        response_id = request.match_info["id"]
        self.store.delete(response_id, incoming.caller(request))
        return web.json_response({"id": response_id, "object": "response", "deleted": True})

    async def cancel(self, request: web.Request) -> web.Response:
        """Cancel a background response (OpenAI cancels only those); it ends ``cancelled``."""
        entry = self.store.get(request.match_info["id"], incoming.caller(request))
        if not entry.response["background"]:
            raise ApiError(HTTPStatus.BAD_REQUEST, "only background responses can be cancelled")
        if (task := entry.task) is not None:
            task.cancel()
            await asyncio.wait([task])
        return web.json_response(entry.response)
