"""The models the mesh serves, as the router knows them.

Names come from the tokenizer members' records; each model's facts (vocabulary,
EOS ids, context length) and its decoder are fetched from a tokenizer member once,
on the model's first request, and kept for the router's lifetime. A model's context
length is the shortest any engine serving it accepts, so a prompt the router lets
through fits wherever it is sent.
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

    async def tokenizer(self, model: str, call: Callable[[TokenizerClient], Awaitable[T]]) -> T:
        """A unary call on the least-loaded tokenizer member, failing over between members."""

        async def on(peer: Peer) -> T:
            assert isinstance(peer.client, TokenizerClient)
            return await call(peer.client)

        return await Failover(self._workers, common_pb2.ROLE_TOKENIZER, model, self._wait).call(on)

    def _names(self) -> list[str]:
        """Every model a tokenizer member serves, in the order members list them."""
        return list(dict.fromkeys(
            m for p in self._workers.candidates(common_pb2.ROLE_TOKENIZER) for m in p.member.models
        ))

    async def resolve(self, name: str) -> str:
        """The model a request names (empty: the mesh's default); NOT_FOUND when none serves it."""
        tokenizer = await self._workers.pick(common_pb2.ROLE_TOKENIZER, "", self._wait)
        if not name:
            if not tokenizer.member.models:
                raise Unavailable("the tokenizer member lists no models")
            return tokenizer.member.models[0]
        served = self._names()
        if name not in served:
            raise ModelNotFound(
                f"model {name!r} is not served here; models: {', '.join(sorted(served)) or 'none'}"
            )
        return name

    async def info(self, model: str) -> tokenizer_pb2.ModelInfo:
        """The model's facts, from a tokenizer member on the model's first request."""
        return await fetch_once(self._infos, model, lambda: self.tokenizer(model, lambda c: c.model_info(model)))

    async def decoder(self, model: str) -> TokenDecoder:
        """The model's decoder, from a tokenizer member on the model's first request."""
        return await fetch_once(self._decoders, model, lambda: self.tokenizer(model, lambda c: c.decoder(model)))

    def max_model_len(self, model: str, info: tokenizer_pb2.ModelInfo) -> int:
        """The shortest context any engine serving ``model`` accepts (the tokenizer's if none say)."""
        lengths = [
            p.member.max_model_len for p in self._workers.peers.values()
            if p.member.max_model_len and p.serves(model)
        ]
        return min(lengths, default=info.max_model_len)

    async def cards(self) -> list[router_pb2.ModelCard]:
        """Every model a tokenizer serves, with its context length and engine members."""
        cards = []
        for name in self._names():
            card = router_pb2.ModelCard(name=name)
            card.max_model_len = self.max_model_len(name, await self.info(name))
            for peer in self._workers.peers.values():
                if peer.role != common_pb2.ROLE_TOKENIZER and name in peer.member.models:
                    role = role_name(peer.role)
                    card.members_by_role[role] = card.members_by_role.get(role, 0) + 1
            cards.append(card)
        return cards
