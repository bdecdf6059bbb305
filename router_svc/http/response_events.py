"""The Responses API's output: items, the response object, and the stream's events.

A response's output is a list of items (a message, function calls) that the SDK
expects opened, filled by deltas and closed in order, each event numbered
(``sequence_number``). :class:`ResponseEvents` is that state machine, fed with a tool
stream's delta fields; a whole response gets the same items from
:func:`output_items`. The store keeps the conversation the output adds to
(:func:`answer_messages`), for ``previous_response_id``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from router_svc.http.errors import ApiError
from router_svc.http.protocol import ChatMessage
from router_svc.http.responses_protocol import ResponsesRequest
from router_svc.tool_parsers import Extracted, ToolCall
from services.pb import common_pb2


def new_id(prefix: str) -> str:
    """A fresh id in OpenAI's form (``resp_…``, ``msg_…``, ``fc_…``)."""
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    """An assistant message item (empty while it streams: its part is added then)."""
    return {
        "type": "message",
        "id": new_id("msg"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]
        if status == "completed"
        else [],
    }


def call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    """A function-call item; its ``call_id`` is what the caller's output answers."""
    return {
        "type": "function_call",
        "id": new_id("fc"),
        "call_id": call.id or new_id("call"),
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


def output_items(found: Extracted) -> list[dict[str, Any]]:
    """A finished text's items: its content as a message, then its calls."""
    items = [message_item(found.content)] if found.content else []
    return items + [call_item(call) for call in found.calls]


def usage(counts: common_pb2.Usage) -> dict[str, Any]:
    """The Responses API's usage object (input and output, not prompt and completion)."""
    return {
        "input_tokens": counts.prompt_tokens,
        "input_tokens_details": {"cached_tokens": counts.cached_tokens},
        "output_tokens": counts.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counts.prompt_tokens + counts.completion_tokens,
    }


def skeleton(body: ResponsesRequest, response_id: str, model: str, status: str) -> dict[str, Any]:
    """A response object before (or without) its output."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "previous_response_id": body.previous_response_id,
        "tools": body.tools or [],
        "tool_choice": body.tool_choice or "auto",
        "parallel_tool_calls": body.parallel_tool_calls,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "store": body.store,
        "background": body.background,
        "metadata": body.metadata or {},
        "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)},
    }


def finish(
    response: dict[str, Any], items: list[dict[str, Any]], reason: str, counts: common_pb2.Usage
) -> None:
    """Complete ``response`` with its output (``incomplete`` when max_output_tokens cut it)."""
    response["output"] = items
    response["usage"] = usage(counts)
    if reason == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        response["status"] = "completed"


def answer_messages(items: list[dict[str, Any]]) -> list[ChatMessage]:
    """The assistant turn a response's output adds to its conversation."""
    text = "".join(
        part["text"] for item in items if item["type"] == "message" for part in item["content"]
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in items
        if item["type"] == "function_call"
    ]
    return [
        ChatMessage.model_validate(
            {"role": "assistant", "content": text or None, "tool_calls": calls or None}
        )
    ]


class ResponseEvents:
    """The SDK's stream events for one response, from a tool stream's delta fields:
    each output item is opened, filled by deltas and closed in order."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.items: list[dict[str, Any]] = []
        self._sequence = 0
        self._open: dict[str, Any] | None = None
        #: Streamed tool-call index -> its function_call item.
        self._calls: dict[int, dict[str, Any]] = {}

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=dict(self.response)),
            self._event("response.in_progress", response=dict(self.response)),
        ]

    def feed(self, fields: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for piece in fields:
            if piece.get("content"):
                events += self._text(piece["content"])
            for call in piece.get("tool_calls", []):
                events += self._call(call)
        return events

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.items.index(item)}

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.items.append(item)
        self._open = item
        return events + [
            self._event(
                "response.output_item.added", output_index=len(self.items) - 1, item=dict(item)
            )
        ]

    def _text(self, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != "message":
            events += self._add(message_item("", status="in_progress"))
            assert self._open is not None
            self._open["content"] = [{"type": "output_text", "text": "", "annotations": []}]
            events.append(
                self._event(
                    "response.content_part.added",
                    **self._where(self._open),
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []},
                )
            )
        assert self._open is not None
        self._open["content"][0]["text"] += text
        return events + [
            self._event(
                "response.output_text.delta", **self._where(self._open), content_index=0, delta=text
            )
        ]

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self._calls.get(call["index"])
        function = call.get("function", {})
        if item is None:
            item = call_item(
                ToolCall(function.get("name", ""), "", call.get("id", "")), status="in_progress"
            )
            self._calls[call["index"]] = item
            events += self._add(item)
        piece = function.get("arguments") or ""
        if piece:
            item["arguments"] += piece
            events.append(
                self._event(
                    "response.function_call_arguments.delta", **self._where(item), delta=piece
                )
            )
        return events

    def close(self) -> list[dict[str, Any]]:
        """Close the open item, if any."""
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = "completed"
        where = self._where(item)
        if item["type"] == "message":
            part = item["content"][0]
            events = [
                self._event(
                    "response.output_text.done", **where, content_index=0, text=part["text"]
                ),
                self._event(
                    "response.content_part.done", **where, content_index=0, part=dict(part)
                ),
            ]
        else:
            events = [
                self._event(
                    "response.function_call_arguments.done", **where, arguments=item["arguments"]
                )
            ]
        return events + [
            self._event(
                "response.output_item.done", output_index=where["output_index"], item=dict(item)
            )
        ]

    def completed(self, reason: str, counts: common_pb2.Usage) -> list[dict[str, Any]]:
        events = self.close()
        finish(self.response, self.items, reason, counts)
        kind = (
            "response.completed"
            if self.response["status"] == "completed"
            else "response.incomplete"
        )
        return events + [self._event(kind, response=self.response)]


def mark_failed(response: dict[str, Any], error: ApiError) -> None:
    """Mark a response failed, with OpenAI's code for the error."""
    response["status"] = "failed"
    response["error"] = {"code": error.code or error.kind, "message": str(error)}
