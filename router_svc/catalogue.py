"""The models the mesh serves, as the router knows them.

Base models' names come from the tokenizer members' records; each model's facts
(vocabulary, EOS ids, context length) and its decoder are fetched from a tokenizer
member once, on the model's first request, and kept for the router's lifetime. A
model's context length is the shortest any engine serving it accepts, so a prompt the
router lets through fits wherever it is sent.

LoRA adapters are models too: each engine's record lists the adapters it has loaded,
with their base model (``parent``). An adapter is served while an engine lists it; it
is tokenized and detokenized as its parent, and its requests go only to the engines
that list it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from router_svc.failover import Failover
from router_svc.workers import Peer, Workers
from services.aio import fetch_once
from services.clients import TokenizerClient
from services.detokenizer import TokenDecoder
from services.errors import ModelNotFound, Unavailable
from services.membership import role_name
from services.pb import common_pb2, router_pb2, tokenizer_pb2

T = TypeVar("T")


class Catalogue:
    """Model names, facts and decoders; and calls to the tokenizer members that have them."""

    def __init__(self, workers: Workers, worker_wait: float) -> None:
        self._workers = workers
        self._wait = worker_wait
        self._infos: dict[str, asyncio.Future[tokenizer_pb2.ModelInfo]] = {}
        self._decoders: dict[str, asyncio.Future[TokenDecoder]] = {}
        #: Called with a name no member serves, before it is refused: a wanted LoRA
        #: adapter gets loaded (router_svc.adapters.AdapterControl.ensure).
        self.ensure: Callable[[str], Awaitable[None]] | None = None

    async def tokenizer(self, model: str, call: Callable[[TokenizerClient], Awaitable[T]]) -> T:
        """A unary call on the least-loaded tokenizer member of base model ``model``,
        failing over between members."""

        async def on(peer: Peer) -> T:
            assert isinstance(peer.client, TokenizerClient)
            return await call(peer.client)

        return await Failover(self._workers, common_pb2.ROLE_TOKENIZER, model, self._wait).call(on)

    def _bases(self) -> list[str]:
        """Every model a tokenizer member serves, in the order members list them."""
        return list(
            dict.fromkeys(
                m
                for p in self._workers.candidates(common_pb2.ROLE_TOKENIZER)
                for m in p.member.models
            )
        )

    def adapters(self) -> dict[str, common_pb2.Adapter]:
        """Every LoRA adapter an engine member lists now, by name."""
        found: dict[str, common_pb2.Adapter] = {}
        for peer in self._workers.engines():
            for adapter in peer.member.adapters:
                found.setdefault(adapter.name, adapter)
        return found

    def base(self, name: str) -> str:
        """The base model of ``name``: its parent for an adapter, else ``name`` itself (a
        base model's name wins over an adapter an engine was started with under it)."""
        adapter = self.adapters().get(name)
        return adapter.parent if adapter is not None and name not in self._bases() else name

    def _names(self) -> list[str]:
        """Base models, then the adapters of those base models."""
        bases = self._bases()
        return bases + [
            name for name, a in self.adapters().items() if a.parent in bases and name not in bases
        ]

    async def resolve(self, name: str) -> str:
        """The model a request names (empty: the mesh's default); NOT_FOUND when none serves it."""
        tokenizer = await self._workers.pick(common_pb2.ROLE_TOKENIZER, "", self._wait)
        if not name:
            if not tokenizer.member.models:
                raise Unavailable("the tokenizer member lists no models")
            return tokenizer.member.models[0]
        served = self._names()
        if name not in served and self.ensure is not None:
            await self.ensure(name)
            served = self._names()
        if name not in served:
            raise ModelNotFound(
                f"model {name!r} is not served here; models: {', '.join(sorted(served)) or 'none'}"
            )
        return name

    async def info(self, model: str) -> tokenizer_pb2.ModelInfo:
        """The model's facts (an adapter's are its parent's), from a tokenizer member on
        the base model's first request."""
        base = self.base(model)
        return await fetch_once(
            self._infos, base, lambda: self.tokenizer(base, lambda c: c.model_info(base))
        )

    async def decoder(self, model: str) -> TokenDecoder:
        """The model's decoder (an adapter's is its parent's), fetched once per base model."""
        base = self.base(model)
        return await fetch_once(
            self._decoders, base, lambda: self.tokenizer(base, lambda c: c.decoder(base))
        )

    def max_model_len(self, model: str, info: tokenizer_pb2.ModelInfo) -> int:
        """The shortest context any engine serving ``model`` accepts (the tokenizer's if
        none says)."""
        lengths = [
            p.member.max_model_len
            for p in self._workers.peers.values()
            if p.member.max_model_len and p.serves(model)
        ]
        return min(lengths, default=info.max_model_len)

    async def cards(self) -> list[router_pb2.ModelCard]:
        """Every model a tokenizer serves and every adapter of one, with its context
        length and engine members (an adapter's card names its parent)."""
        cards = []
        adapters = self.adapters()
        for name in self._names():
            card = router_pb2.ModelCard(name=name)
            if name in adapters:
                # Its parent, never its directory: where adapters live on the engines'
                # hosts is not the callers' business (card.source stays empty).
                card.parent = adapters[name].parent
            card.max_model_len = self.max_model_len(name, await self.info(name))
            for peer in self._workers.engines(name):
                role = role_name(peer.role)
                card.members_by_role[role] = card.members_by_role.get(role, 0) + 1
            cards.append(card)
        return cards
