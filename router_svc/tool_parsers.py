"""Tool-call parsers: how a model's generated text becomes OpenAI's ``tool_calls``.

``--tool-call-parser`` names the format of a model's calls when ``tool_choice`` is
``auto`` (:mod:`router_svc.tools` plans the other choices): ``hermes``
(``<tool_call>{json}</tool_call>``: Qwen, Hermes, and any model whose template the
tokenizer stage fills in) or ``llama3_json`` (a bare JSON object, optionally after
``<|python_tag|>``).

Parsing a whole text (:meth:`ToolParser.extract`) follows vLLM's parsers exactly (the
tests compare them on the same texts). Streaming (:class:`ToolStream`) sends text as
content until a call starts, holds back what might be the start of one, and sends each
call as one delta when it is complete: the SDK joins deltas, so a call in one piece has
the shape it expects.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from services.config import SettingError
from services.detokenizer import partial_marker_length


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    def render(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's ``tool_calls`` entry (with ``index`` in a streamed delta)."""
        entry: dict[str, Any] = {
            "id": self.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return entry if index is None else {"index": index, **entry}


@dataclass(frozen=True)
class Extracted:
    """What a finished text holds: content (None when only calls) and the calls."""

    content: str | None
    calls: list[ToolCall]


class ToolParser:
    """A model family's tool-call format."""

    name: str
    #: Where a call may begin; text before it is content.
    start: str

    def extract(self, text: str) -> Extracted:
        raise NotImplementedError

    def stream(self) -> ToolStream:
        raise NotImplementedError


def parse_call(obj: Any, *keys: str) -> ToolCall:
    """A call from a parsed object: KeyError/TypeError when it is not one."""
    arguments = next((obj[key] for key in keys if key in obj), None)
    if arguments is None:
        raise KeyError(keys[-1])
    return ToolCall(str(obj["name"]), json.dumps(arguments, ensure_ascii=False))


class HermesParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated."""

    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"
    _calls = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def extract(self, text: str) -> Extracted:
        if self.start not in text:
            return Extracted(text, [])
        try:
            calls = [
                parse_call(json.loads(closed or open_), "arguments")
                for closed, open_ in self._calls.findall(text)
            ]
        except (ValueError, KeyError, TypeError):  # one malformed call: the text is content
            return Extracted(text, [])
        return Extracted(text[: text.find(self.start)] or None, calls)

    def stream(self) -> ToolStream:
        return _HermesStream(self)


class Llama3JsonParser(ToolParser):
    """A JSON object ``{"name", "arguments" | "parameters"}``, or several separated by
    ``;``, optionally after ``<|python_tag|>``."""

    name = "llama3_json"
    start = "<|python_tag|>"
    _decoder = json.JSONDecoder()

    def extract(self, text: str) -> Extracted:
        if self.start not in text and "{" not in text:
            return Extracted(text, [])
        calls: list[ToolCall] = []
        end = -1
        for match in re.finditer(r"\{", text):
            if match.start() <= end:  # inside an object already read
                continue
            try:
                obj, length = self._decoder.raw_decode(text[match.start() :])
                end = match.start() + length
                calls.append(parse_call(obj, "arguments", "parameters"))
            except (ValueError, KeyError, TypeError):
                return Extracted(text, [])
        return Extracted(None, calls) if calls else Extracted(text, [])

    def stream(self) -> ToolStream:
        return _Llama3Stream(self)


PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesParser, Llama3JsonParser)
}


class ParserChoice:
    """Which parser reads each model's tool calls (``--tool-call-parser[s]``)."""

    def __init__(self, default: str, per_model: dict[str, str]) -> None:
        named = [("--tool-call-parser", default)]
        named += [(f"--tool-call-parsers {model}", name) for model, name in per_model.items()]
        for setting, name in named:
            if name not in PARSERS:
                raise SettingError(
                    f"{setting}: no tool-call parser {name!r}; choose one of {', '.join(PARSERS)}"
                )
        self._default = PARSERS[default]()
        self._per_model = {model: PARSERS[name]() for model, name in per_model.items()}

    def for_model(self, model: str, base: str = "") -> ToolParser:
        """The parser configured for ``model``, else for its base model (a LoRA adapter
        writes as its parent unless configured apart), else the default."""
        return self._per_model.get(model) or self._per_model.get(base, self._default)


class ToolStream:
    """One streamed choice's text in, delta fields out (``content`` or ``tool_calls``)."""

    def __init__(self) -> None:
        self.calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def finish(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _calls_delta(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        if not calls:
            return []
        first, self.calls = self.calls, self.calls + len(calls)
        return [{"tool_calls": [call.render(first + i) for i, call in enumerate(calls)]}]


def content_fields(text: str) -> list[dict[str, Any]]:
    """Text as a stream's delta field; none for no text (an empty delta says nothing)."""
    return [{"content": text}] if text else []


class _HermesStream(ToolStream):
    def __init__(self, parser: HermesParser) -> None:
        super().__init__()
        self._parser = parser
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        out: list[dict[str, Any]] = []
        start, end = self._parser.start, self._parser.end
        while True:
            if self._in_call:
                at = self._buffer.find(end)
                if at < 0:
                    return out
                out += self._close(self._buffer[:at])
                self._buffer = self._buffer[at + len(end) :].lstrip()  # between calls: not content
                self._in_call = False
                continue
            at = self._buffer.find(start)
            if at < 0:
                keep = partial_marker_length(self._buffer, (start,))
                sendable, self._buffer = (
                    self._buffer[: len(self._buffer) - keep],
                    self._buffer[len(self._buffer) - keep :],
                )
                return out + content_fields(sendable)
            out += content_fields(self._buffer[:at])
            self._buffer = self._buffer[at + len(start) :]
            self._in_call = True

    def finish(self) -> list[dict[str, Any]]:
        rest, self._buffer = self._buffer, ""
        if self._in_call and rest.strip():
            return self._close(rest)  # the model stopped before closing the call
        return content_fields(rest)

    def _close(self, body: str) -> list[dict[str, Any]]:
        try:
            call = parse_call(json.loads(body), "arguments")
        except (ValueError, KeyError, TypeError):
            return content_fields(f"{self._parser.start}{body}{self._parser.end}")
        return self._calls_delta([call])


class _Llama3Stream(ToolStream):
    """Text that opens with ``{`` or the python tag is held and parsed whole at the end;
    any other text is content as it comes (as vLLM streams it)."""

    def __init__(self, parser: Llama3JsonParser) -> None:
        super().__init__()
        self._parser = parser
        self._buffer = ""
        self._mode: Literal["undecided", "json", "content"] = "undecided"

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._mode == "content":
            return content_fields(text)
        self._buffer += text
        if self._mode == "undecided":
            head = self._buffer.lstrip()
            if head.startswith(("{", self._parser.start)):
                self._mode = "json"
            elif head and not self._parser.start.startswith(head):
                self._mode = "content"
                rest, self._buffer = self._buffer, ""
                return content_fields(rest)
        return []

    def finish(self) -> list[dict[str, Any]]:
        rest, self._buffer = self._buffer, ""
        if self._mode != "json":
            return content_fields(rest)
        found = self._parser.extract(rest)
        return content_fields(found.content or "") + self._calls_delta(found.calls)
