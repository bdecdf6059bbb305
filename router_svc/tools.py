"""Tool calling for the OpenAI HTTP API: what a request's ``tools`` and ``tool_choice`` ask
of the engines, and how the generated text becomes ``tool_calls``.

- ``tool_choice`` a named function: the output is constrained (in the decode engine) to
  the function's parameter schema, and the whole output is its arguments.
- ``required``: constrained to a JSON array of ``{"name", "parameters"}`` objects, one
  alternative per tool (vLLM's shape), so any model calls at least one tool.
- ``auto``: unconstrained; the model's parser (:mod:`router_svc.tool_parsers`) finds the
  calls in the text.
- ``none``: the tools are still shown to the template; nothing is parsed.

A named or required choice replaces any output format the request asked for: the tool
choice governs the turn, as in OpenAI's API and vLLM's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from router_svc.tool_parsers import (
    Extracted,
    ToolCall,
    ToolParser,
    ToolStream,
    content_fields,
    parse_call,
)
from services.errors import InvalidRequest
from services.pb import common_pb2, router_pb2

ToolChoice = Literal["none", "auto", "required"] | dict[str, Any]


class _NamedStream(ToolStream):
    """A named tool_choice: every token is the arguments of the one call."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name
        self._opened = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not self._opened:
            self._opened = True
            self.calls = 1
            return [{"tool_calls": [ToolCall(self._name, text).render(0)]}]
        return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}] if text else []

    def finish(self) -> list[dict[str, Any]]:
        return [] if self._opened else self.feed("")


class _RequiredStream(ToolStream):
    """``required``: the JSON array is held and sent as calls once complete."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        return []

    def finish(self) -> list[dict[str, Any]]:
        found = _required_calls(self._buffer)
        return content_fields(found.content or "") + self._calls_delta(found.calls)


def _required_calls(text: str) -> Extracted:
    try:
        return Extracted(None, [parse_call(item, "parameters") for item in json.loads(text)])
    except (ValueError, KeyError, TypeError):  # cut off by max_tokens: what was written
        return Extracted(text, [])


class _PlainStream(ToolStream):
    def feed(self, text: str) -> list[dict[str, Any]]:
        return content_fields(text)

    def finish(self) -> list[dict[str, Any]]:
        return []


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request says about tools (OpenAI's ``tools``, ``tool_choice`` and
    ``parallel_tool_calls``): the HTTP layer parses it, the pipeline plans it."""

    tools: list[dict[str, Any]]
    choice: ToolChoice | None = None
    parallel: bool = True


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools ask for. The pipeline builds it before any check of
    the request (its constraint is checked with the request's own), and gives it its
    model's parser once the model is resolved (:meth:`read_by`)."""

    tools: list[dict[str, Any]]
    mode: Literal["none", "auto", "required", "named"]
    function: str = ""
    #: Whether ``required`` may make several calls (``parallel_tool_calls``).
    parallel: bool = True
    #: The model's parser (``--tool-call-parser[s]``); ``auto`` reads calls with it.
    parser: ToolParser | None = None

    @classmethod
    def build(cls, asked: ToolRequest) -> ToolPlan | None:
        """The plan, or None when the request has no tools; InvalidRequest for a choice
        that names no tool, or tools without names."""
        tools, choice = asked.tools, asked.choice
        names = []
        for position, tool in enumerate(tools):
            function = tool.get("function") if tool.get("type") == "function" else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequest(f"tools[{position}] must be a function with a name", "tools")
            names.append(function["name"])
        if isinstance(choice, dict):
            name = (
                (choice.get("function") or {}).get("name")
                if choice.get("type") == "function"
                else None
            )
            if name not in names:
                raise InvalidRequest(
                    f"tool_choice names {name!r}, which is not among the tools", "tool_choice"
                )
            return cls(tools, "named", str(name))
        if choice is not None and not tools and choice != "none":
            raise InvalidRequest(f"tool_choice {choice!r} needs tools", "tool_choice")
        if not tools:
            return None
        return cls(tools, choice or "auto", parallel=asked.parallel)

    def read_by(self, parser: ToolParser) -> ToolPlan:
        """The plan with the parser of the model the request resolved to."""
        return replace(self, parser=parser)

    def apply(self, request: router_pb2.RouterGenerateRequest) -> None:
        """Put the plan in the request: the tools for the template and, for a named or
        required choice, the output constraint. That constraint replaces any output
        format the request asked for: the tool choice governs the turn, as OpenAI and
        vLLM have it (the Agents SDK sends ``response_format`` with ``required``)."""
        request.chat.tools_json = json.dumps(self.tools)
        if (constraint := self.constraint()) is not None:
            request.sampling.structured_outputs.CopyFrom(constraint)
        if self.shows_special_tokens:
            request.sampling.skip_special_tokens = False

    def _schema(self, name: str) -> dict[str, Any]:
        function = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        schema = function.get("parameters")
        return schema if isinstance(schema, dict) else {"type": "object", "properties": {}}

    def constraint(self) -> common_pb2.StructuredOutputs | None:
        """The output constraint the engines enforce (named and required only)."""
        if self.mode == "named":
            return common_pb2.StructuredOutputs(json_schema=json.dumps(self._schema(self.function)))
        if self.mode != "required":
            return None
        alternatives = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "parameters": self._schema(name),
                },
                "required": ["name", "parameters"],
            }
            for name in (t["function"]["name"] for t in self.tools)
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
        if not self.parallel:
            schema["maxItems"] = 1
        return common_pb2.StructuredOutputs(json_schema=json.dumps(schema))

    @property
    def shows_special_tokens(self) -> bool:
        """Whether the parser needs the special tokens in the text (its markers may be
        special tokens, e.g. Qwen's ``<tool_call>``), as vLLM's parsers ask."""
        return self.mode == "auto"

    def extract(self, text: str) -> Extracted:
        """The content and calls of a finished choice."""
        if self.mode == "named":
            return Extracted(None, [ToolCall(self.function, text)])
        if self.mode == "required":
            return _required_calls(text)
        if self.mode == "auto":
            return self._parser().extract(text)
        return Extracted(text, [])

    def stream(self) -> ToolStream:
        """The state of one streamed choice."""
        if self.mode == "named":
            return _NamedStream(self.function)
        if self.mode == "required":
            return _RequiredStream()
        if self.mode == "auto":
            return self._parser().stream()
        return _PlainStream()

    def _parser(self) -> ToolParser:
        if self.parser is None:
            raise RuntimeError("the plan is read before its model's parser was given")
        return self.parser

    def finish_reason(self, called: bool, reason: str) -> str:
        """OpenAI's finish reason: ``tool_calls`` when the model chose to call (a named
        choice, which the caller forced, keeps ``stop`` as OpenAI's does)."""
        return (
            "tool_calls"
            if called and reason == "stop" and self.mode in ("auto", "required")
            else reason
        )
