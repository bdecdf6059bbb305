"""OpenAI request bodies, and their translation into the router's gRPC request.

Only what the mesh can honour is accepted: fields it cannot serve (suffix, best_of,
echo with logprobs, structural tags, streamed prompt_logprobs) are refused with 400
rather than ignored, so a client never believes it got something it did not. The
README lists every field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from router_svc.tools import ToolChoice, ToolRequest
from services.pb import common_pb2, router_pb2, tokenizer_pb2


class ApiBody(BaseModel):
    """Every request body: unknown fields ignored, as OpenAI's own server does."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(ApiBody):
    """``stream_options``: whether a stream ends with a usage chunk."""

    include_usage: bool = False


class JsonSchemaFormat(ApiBody):
    """``response_format.json_schema``: the schema the output must match."""

    name: str = ""
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(ApiBody):
    """OpenAI's ``response_format``: the output as text, any JSON object, or a schema's."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.schema_ is None
        ):
            raise ValueError("response_format json_schema needs json_schema.schema")
        return self


class StructuredOutputsBody(ApiBody):
    """vLLM's ``structured_outputs`` extension: exactly one constraint."""

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredOutputsBody:
        given = [
            v
            for v in (self.json_, self.regex, self.choice, self.grammar, self.json_object)
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError("set exactly one of json, regex, choice, grammar and json_object")
        return self

    def to_grpc(self) -> common_pb2.StructuredOutputs:
        out = common_pb2.StructuredOutputs(disable_any_whitespace=self.disable_any_whitespace)
        if self.json_ is not None:
            out.json_schema = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
        elif self.regex is not None:
            out.regex = self.regex
        elif self.choice is not None:
            out.choice.options.extend(self.choice)
        elif self.grammar is not None:
            out.grammar = self.grammar
        else:
            out.json_object = bool(self.json_object)
        return out


class _Sampling(ApiBody):
    """Fields both endpoints share (OpenAI's, then vLLM's extensions)."""

    model: str = ""
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions.
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    cache_salt: str = ""
    bad_words: list[str] = Field(default_factory=list)
    allowed_token_ids: list[int] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None

    @model_validator(mode="after")
    def _one_format(self) -> _Sampling:
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not streamed; ask without stream")
        formatted = self.response_format is not None and self.response_format.type != "text"
        if self.structured_outputs is not None and formatted:
            raise ValueError("set response_format or structured_outputs, not both")
        return self

    def constraint(self) -> common_pb2.StructuredOutputs | None:
        """The output constraint the body asks for, if any."""
        if self.structured_outputs is not None:
            return self.structured_outputs.to_grpc()
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return common_pb2.StructuredOutputs(json_object=True)
        assert fmt.json_schema is not None and fmt.json_schema.schema_ is not None
        return common_pb2.StructuredOutputs(json_schema=json.dumps(fmt.json_schema.schema_))

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        """OpenAI's keys are token ids written as strings; the contract's are integers."""
        for key in bias or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) < 2**31):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:32]!r}")
        return bias

    def token_bias(self) -> dict[int, float]:
        return {int(token): bias for token, bias in (self.logit_bias or {}).items()}

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling(
        self, max_tokens: int | None, logprobs: int | None
    ) -> common_pb2.SamplingParams:
        sampling = common_pb2.SamplingParams(
            stop=self.stops(),
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self.token_bias(),
            bad_words=self.bad_words,
            cache_salt=self.cache_salt,
            allowed_token_ids=self.allowed_token_ids or [],
        )
        if (constraint := self.constraint()) is not None:
            sampling.structured_outputs.CopyFrom(constraint)
        optional: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logprobs": logprobs,
            "prompt_logprobs": self.prompt_logprobs,
        }
        for name, value in optional.items():
            if value is not None:
                setattr(sampling, name, value)
        return sampling

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(ApiBody):
    """A text part of a message's content (the only kind a text model takes)."""

    type: Literal["text"]
    text: str


class FunctionCallBody(ApiBody):
    """The function an assistant message called, as the history sends it back."""

    name: str
    arguments: str = ""


class ToolCallBody(ApiBody):
    """One of an assistant message's ``tool_calls`` in a history."""

    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallBody


class ChatMessage(ApiBody):
    """One message of a conversation, as the template renders it."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None

    def to_grpc(self) -> tokenizer_pb2.ChatMessage:
        return tokenizer_pb2.ChatMessage(
            role=self.role,
            content=self.text(),
            name=self.name or "",
            tool_call_id=self.tool_call_id or "",
            tool_calls=[
                tokenizer_pb2.ToolCall(
                    id=c.id, name=c.function.name, arguments=c.function.arguments
                )
                for c in self.tool_calls or []
            ],
        )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _refuse_chat_unsupported(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.structured_outputs is not None and isinstance(self.tool_choice, dict):
            # vLLM's rule: its own constraint field and a forced function are two
            # constraints; response_format, OpenAI's field, gives way to the tool choice.
            raise ValueError("set structured_outputs or a named tool_choice, not both")
        return self

    def tool_request(self) -> ToolRequest | None:
        """What the request says about tools, for the pipeline to plan (None: nothing)."""
        if not self.tools and self.tool_choice is None:
            return None
        return ToolRequest(self.tools or [], self.tool_choice, self.parallel_tool_calls)

    def to_grpc(self) -> router_pb2.RouterGenerateRequest:
        """The gRPC request; the pipeline adds the tools (:meth:`tool_request`)."""
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return router_pb2.RouterGenerateRequest(
            model=self.model,
            chat=tokenizer_pb2.ChatInput(
                messages=[m.to_grpc() for m in self.messages],
                add_generation_prompt=self.add_generation_prompt,
                continue_final_message=self.continue_final_message,
            ),
            sampling=self.to_sampling(self.max_completion_tokens or self.max_tokens, logprobs),
            n=self.n,
            return_token_ids=self.return_token_ids,
        )


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    # Token ids first and strictly: pydantic's default ("smart") union validated a
    # 7,000-id prompt against every member, 15 ms per request; left to right it is 0.6.
    prompt: Annotated[
        list[StrictInt] | str | list[str] | list[list[StrictInt]], Field(union_mode="left_to_right")
    ]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _refuse_completion_unsupported(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError(
                "echo with logprobs is not supported (it needs the prompt's log-probabilities)"
            )
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a string, a list of strings, ids, or lists of ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def to_grpc(self, prompt: str | list[int]) -> router_pb2.RouterGenerateRequest:
        request = router_pb2.RouterGenerateRequest(
            model=self.model,
            sampling=self.to_sampling(
                self.max_tokens if self.max_tokens is not None else 16, self.logprobs
            ),
            n=self.n,
            return_token_ids=self.return_token_ids,
        )
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        return request
