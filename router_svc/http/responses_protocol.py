"""The Responses API's request body, and the chat request it means.

A response request is turned into the chat request it means (``instructions`` as a
system message, input items as messages, flat function tools as chat tools, ``text.format``
as ``response_format``), so tool calls, constraints and sampling behave exactly as on
``/v1/chat/completions``. What the Responses API adds is state: ``previous_response_id``
continues a stored conversation. The router keeps recent responses in memory, bounded
in number, age and bytes (``--responses-max``, ``--responses-ttl``,
``--responses-max-mib``, and ``--responses-key-mib`` for each API key); ``store: false``
keeps nothing (:mod:`router_svc.http.response_store`). Bodies are checked before anything
is stored: ``metadata`` has OpenAI's limits (16 keys of at most 64 characters, values of
at most 512), ``input`` at most ``--max-messages`` items.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from router_svc.http.protocol import (
    ApiBody,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCallBody,
    ToolCallBody,
)
from services.errors import InvalidRequest

#: OpenAI's limits on a response's metadata.
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


class TextFormat(ApiBody):
    """``text.format``: the Responses API's form of chat's ``response_format``."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = ""
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(ApiBody):
    """``text``: the output's options (its format only, for a text model)."""

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
        """A flat named choice (``{"type": "function", "name"}``) in chat's nested form."""
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
