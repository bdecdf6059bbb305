"""The tokenizer stage's gRPC service: Tokenize, GetModelInfo, GetDecoder.

Ids become text in the router, with the decoder GetDecoder exports (docs/design.md,
"Where detokenization runs"), so this stage has no decode call of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import grpc
from google.protobuf import descriptor

from services.errors import InvalidRequest, Unavailable
from services.model import ModelSpec, resolve_model
from services.pb import common_pb2, tokenizer_pb2
from services.server import Stage
from tokenizer_svc.config import TokenizerConfig
from tokenizer_svc.models import ModelTokenizer

#: Texts longer than this are encoded on a worker thread so a huge prompt does not
#: stall every other call on the event loop; short ones are cheaper inline.
_INLINE_ENCODE_CHARS = 8192
#: GetDecoder's chunk size: a large vocabulary's JSON (~10 MB) exceeds one message.
_DECODER_CHUNK_BYTES = 1 << 20


class TokenizerServicer:
    """Serves every configured model's tokenizer; the first model is the default.

    It exists before the tokenizers load (the server is up, NOT_SERVING, while they
    do); calls in that window get UNAVAILABLE.
    """

    def __init__(self) -> None:
        self._tokenizers: dict[str, ModelTokenizer] = {}
        self._default = ""

    @property
    def model_names(self) -> list[str]:
        return list(self._tokenizers)

    def load(self, tokenizers: list[ModelTokenizer]) -> None:
        self._tokenizers = {t.name: t for t in tokenizers}
        self._default = tokenizers[0].name

    def model(self, name: str) -> ModelTokenizer:
        """The tokenizer for ``name`` (empty: the default); INVALID_ARGUMENT if unknown."""
        if not self._tokenizers:
            raise Unavailable("the tokenizer stage is still loading its models")
        tokenizer = self._tokenizers.get(name or self._default)
        if tokenizer is None:
            raise InvalidRequest(
                f"unknown model {name!r}; this stage serves {', '.join(self._tokenizers)}"
            )
        return tokenizer

    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.TokenizeResponse:
        """Encode plain text, or render chat messages through the chat template and encode."""
        tokenizer = self.model(request.model)
        kind = request.WhichOneof("input")
        if kind == "chat":
            prompt = tokenizer.render_chat(request.chat)
            add_special = False  # the template already placed the special tokens
        elif kind == "text":
            prompt = request.text
            add_special = (
                request.add_special_tokens if request.HasField("add_special_tokens") else True
            )
        else:
            raise InvalidRequest("set either text or chat")
        if len(prompt) > _INLINE_ENCODE_CHARS:
            ids = await asyncio.to_thread(tokenizer.encode, prompt, add_special)
        else:
            ids = tokenizer.encode(prompt, add_special)
        response = tokenizer_pb2.TokenizeResponse(token_ids=ids, model=tokenizer.name)
        if kind == "chat":
            response.prompt_text = prompt
        if request.return_token_strings:
            response.token_strings.extend(tokenizer.token_strings(ids))
        return response

    async def GetModelInfo(
        self, request: tokenizer_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.ModelInfo:
        """Vocabulary size, EOS ids, context length and template facts of a model."""
        return self.model(request.model).info(list(self._tokenizers))

    async def GetDecoder(
        self, request: tokenizer_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tokenizer_pb2.DecoderChunk]:
        """The model's fast tokenizer as JSON, in chunks under gRPC's 4 MiB message limit."""
        serialized = self.model(request.model).decoder_json
        for offset in range(0, len(serialized), _DECODER_CHUNK_BYTES):
            yield tokenizer_pb2.DecoderChunk(
                data=serialized[offset : offset + _DECODER_CHUNK_BYTES]
            )


def _model(spec: str, home: Path) -> ModelSpec:
    """The model ``spec`` names; a bad path ends the stage with one line before it serves."""
    try:
        return resolve_model(spec, home)
    except FileNotFoundError as exc:
        raise SystemExit(f"--model {spec}: {exc}" if spec else str(exc)) from None


class TokenizerStage(Stage):
    """The tokenizer stage: loads each configured model's tokenizer, then serves them."""

    role: ClassVar[common_pb2.Role] = common_pb2.ROLE_TOKENIZER

    def __init__(self, config: TokenizerConfig) -> None:
        self._config = config
        self._servicer = TokenizerServicer()
        self._specs = [_model(spec, Path(config.home)) for spec in (config.model or [""])]

    def services(self) -> list[tuple[descriptor.ServiceDescriptor, object]]:
        return [(tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"], self._servicer)]

    async def start(self) -> None:
        tokenizers = await asyncio.to_thread(lambda: [ModelTokenizer(spec) for spec in self._specs])
        self._servicer.load(tokenizers)

    def describe(self, member: common_pb2.Member) -> None:
        member.models.extend(self._servicer.model_names)
