"""The HTTP API's model and administration endpoints, in vLLM's shapes: the models
served (``/v1/models``), tokenization (``/tokenize``, ``/detokenize``), LoRA adapters
(``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, admin keys only), and the
router's own health and metrics.

Nothing here generates: each endpoint parses its body, asks the pipeline (or the
adapter control) once, and renders the answer.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, model_validator

from router_svc.adapters import AdapterControl
from router_svc.http import incoming
from router_svc.http.errors import ApiError
from router_svc.http.protocol import ApiBody, ChatMessage
from router_svc.pipeline import Pipeline
from services import exposition
from services.pb import router_pb2, tokenizer_pb2


class TokenizeRequest(ApiBody):
    """POST /tokenize (vLLM's shape): a prompt, or chat messages through the template."""

    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("set either prompt or messages")
        return self

    def to_grpc(self) -> tokenizer_pb2.TokenizeRequest:
        """The tokenizer's request (the pipeline resolves the model)."""
        request = tokenizer_pb2.TokenizeRequest(
            model=self.model,
            add_special_tokens=self.add_special_tokens,
            return_token_strings=self.return_token_strs,
        )
        if self.prompt is not None:
            request.text = self.prompt
        else:
            request.chat.CopyFrom(
                tokenizer_pb2.ChatInput(
                    messages=[m.to_grpc() for m in self.messages or []],
                    add_generation_prompt=self.add_generation_prompt,
                    continue_final_message=self.continue_final_message,
                    tools_json=json.dumps(self.tools) if self.tools else "",
                )
            )
        return request


class DetokenizeRequest(ApiBody):
    """POST /detokenize (vLLM's shape)."""

    model: str = ""
    tokens: list[int] = Field(max_length=1_000_000)


class LoadLoraAdapterRequest(ApiBody):
    """POST /v1/load_lora_adapter (vLLM's shape), plus the base model in a mesh of several."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)
    base_model: str = ""


class UnloadLoraAdapterRequest(ApiBody):
    """POST /v1/unload_lora_adapter (vLLM's shape)."""

    lora_name: str = Field(min_length=1, max_length=256)


def card(model: router_pb2.ModelCard) -> dict[str, Any]:
    """vLLM's model card: an adapter names its base model as ``parent``; a base model
    has no parent. ``root`` is the name: where an adapter lives on the engines' hosts
    is not the callers' business."""
    return {
        "id": model.name,
        "object": "model",
        "created": 0,
        "owned_by": "stagemesh",
        "root": model.name,
        "parent": model.parent or None,
        "max_model_len": model.max_model_len,
    }


class Admin:
    """The endpoints' handlers."""

    def __init__(self, pipeline: Pipeline, adapters: AdapterControl | None) -> None:
        self._pipeline = pipeline
        self._adapters = adapters

    async def health(self, request: web.Request) -> web.Response:
        """200 when a tokenizer and a decode member are reachable, else 503 saying what
        is missing (load balancers read it without a key)."""
        if missing := self._pipeline.missing_roles():
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"no {' or '.join(missing)} member")
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        """The router's Prometheus metrics (every ``--workers`` process's, summed)."""
        return web.Response(
            body=generate_latest(exposition.registry()),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def models(self, request: web.Request) -> web.Response:
        """Every model served: base models, then their adapters."""
        cards = await self._pipeline.catalogue.cards()
        return web.json_response({"object": "list", "data": [card(c) for c in cards]})

    async def model(self, request: web.Request) -> web.Response:
        """One model's card; 404 for a name not served."""
        name = request.match_info["model"]
        for served in await self._pipeline.catalogue.cards():
            if served.name == name:
                return web.json_response(card(served))
        raise ApiError(
            HTTPStatus.NOT_FOUND, f"model {name!r} is not served here", "model_not_found"
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: ids (and their strings) of a prompt or a conversation."""
        body = await incoming.read_body(request, TokenizeRequest)
        reply, max_model_len = await self._pipeline.tokenize(body.to_grpc())
        return web.json_response(
            {
                "count": len(reply.token_ids),
                "max_model_len": max_model_len,
                "tokens": list(reply.token_ids),
                "token_strs": list(reply.token_strings) if body.return_token_strs else None,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: the text of ids, decoded in the router as generated text is."""
        body = await incoming.read_body(request, DetokenizeRequest)
        return web.json_response(
            {"prompt": await self._pipeline.detokenize(body.model, body.tokens)}
        )

    async def load_adapter(self, request: web.Request) -> web.Response:
        """vLLM's /v1/load_lora_adapter: on every engine of the base model."""
        request[incoming.CALLER].require_admin("loading an adapter")
        body = await incoming.read_body(request, LoadLoraAdapterRequest)
        assert self._adapters is not None  # the route exists only with adapter control
        await self._adapters.load(body.lora_name, body.lora_path, body.base_model)
        return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_adapter(self, request: web.Request) -> web.Response:
        """vLLM's /v1/unload_lora_adapter: from every engine that has it."""
        request[incoming.CALLER].require_admin("unloading an adapter")
        body = await incoming.read_body(request, UnloadLoraAdapterRequest)
        assert self._adapters is not None  # the route exists only with adapter control
        await self._adapters.unload(body.lora_name)
        return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
