"""OpenAI's Responses API on top of chat completions: bodies, the response store, and
rendering (whole, and as the SDK's stream events).

A response request is turned into the chat request it means (``instructions`` as a
system message, input items as messages, flat function tools as chat tools, ``text.format``
as ``response_format``), so tool calls, constraints and sampling behave exactly as on
``/v1/chat/completions``. What the Responses API adds is state: ``previous_response_id``
continues a stored conversation. The router keeps recent responses in memory, bounded
in number, age and bytes (``--responses-max``, ``--responses-ttl``,
``--responses-max-mib``, and ``--responses-key-mib`` for each API key); ``store: false``
keeps nothing (:mod:`router_svc.response_store`). Bodies are checked before anything
is stored: ``metadata`` has OpenAI's limits (16 keys of at most 64 characters, values of
at most 512), ``input`` at most ``--max-messages`` items.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from router_svc.openai_api import (
    ApiBody,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCallBody,
    ToolCallBody,
)
from router_svc.tools import Extracted, ToolCall
from services.errors import InvalidRequest
from services.pb import common_pb2

#: OpenAI's limits on a response's metadata.
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


class TextFormat(ApiBody):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = ""
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(ApiBody):
    format: TextFormat = Field(default_factory=lambda: TextFormat.model_validate({}))


class ResponsesRequest(ApiBody):
    """POST /v1/responses."""

    model: str = ""
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    store: bool = True
    background: bool = False
    text: TextOptions = Field(default_factory=TextOptions)
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("metadata")
    @classmethod
    def _openai_metadata_limits(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if len(metadata) > METADATA_KEYS:
            raise ValueError(f"metadata may have at most {METADATA_KEYS} keys, got {len(metadata)}")
        for key, value in metadata.items():
            if len(key) > METADATA_KEY_CHARS:
                raise ValueError(f"metadata keys may have at most {METADATA_KEY_CHARS} characters")
            if len(value) > METADATA_VALUE_CHARS:
                raise ValueError(
                    f"metadata values may have at most {METADATA_VALUE_CHARS} characters"
                )
        return metadata

    @model_validator(mode="after")
    def _background_is_stored(self) -> ResponsesRequest:
        if self.background and not self.store:
            raise ValueError("background responses must be stored (store: true)")
        if self.background and self.stream:
            raise ValueError("background responses are not streamed; retrieve them by id")
        return self

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """Flat Responses tools in chat's nested form; only function tools are served."""
        if not self.tools:
            return None
        converted = []
        for position, tool in enumerate(self.tools):
            if tool.get("type") != "function":
                raise InvalidRequest(
                    f"tools[{position}]: only function tools are supported", "tools"
                )
            function = {
                key: tool[key]
                for key in ("name", "description", "parameters", "strict")
                if key in tool
            }
            converted.append({"type": "function", "function": function})
        return converted

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if isinstance(choice, dict):
            return {"type": "function", "function": {"name": choice.get("name")}}
        return choice

    def to_chat(
        self, history: list[ChatMessage]
    ) -> tuple[ChatCompletionRequest, list[ChatMessage]]:
        """The chat request this response request means, and the conversation (history
        and input, without the instructions) to store with its answer."""
        conversation = [*history, *input_messages(self.input)]
        system = (
            [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        )
        fmt = self.text.format
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [m.model_dump(exclude_none=True) for m in system + conversation],
            "parallel_tool_calls": self.parallel_tool_calls,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_output_tokens,
            "tools": self.chat_tools(),
            "tool_choice": self.chat_tool_choice(),
            "user": self.user,
        }
        if fmt.type == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": fmt.name,
                    "schema": fmt.schema_,
                    "strict": fmt.strict,
                },
            }
        elif fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        return ChatCompletionRequest.model_validate(body), conversation


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in (
                "input_text",
                "output_text",
                "text",
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(
                    f"{where}: content parts of type {kind!r} are not supported", "input"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise InvalidRequest(f"{where}: content must be text or a list of text parts", "input")


def input_messages(items: str | list[dict[str, Any]]) -> list[ChatMessage]:
    """Responses input items as chat messages: function calls join the assistant turn
    they belong to, and their outputs become tool messages."""
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    messages: list[ChatMessage] = []
    for position, item in enumerate(items):
        where = f"input[{position}]"
        kind = item.get("type", "message")
        if kind == "message":
            content = _text(item.get("content"), where)
            messages.append(ChatMessage(role=str(item.get("role", "user")), content=content))
        elif kind == "function_call":
            call = ToolCallBody(
                id=str(item.get("call_id", "")),
                function=FunctionCallBody(
                    name=str(item.get("name", "")), arguments=str(item.get("arguments", ""))
                ),
            )
            if not messages or messages[-1].role != "assistant":  # calls join their assistant turn
                messages.append(ChatMessage(role="assistant"))
            messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
        elif kind == "function_call_output":
            output = _text(item.get("output", ""), where)
            messages.append(
                ChatMessage(role="tool", tool_call_id=str(item.get("call_id", "")), content=output)
            )
        else:
            raise InvalidRequest(
                f"{where}: input items of type {kind!r} are not supported", "input"
            )
    if not messages:
        raise InvalidRequest("input is empty", "input")
    return messages


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
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
    return {
        "type": "function_call",
        "id": new_id("fc"),
        "call_id": call.id or new_id("call"),
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


def output_items(found: Extracted) -> list[dict[str, Any]]:
    items = [message_item(found.content)] if found.content else []
    return items + [call_item(call) for call in found.calls]


def usage(counts: common_pb2.Usage) -> dict[str, Any]:
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
