"""Trying a call on the members of one role in turn: the router's one failover loop.

A :class:`Failover` belongs to one call (a tokenize, a decode stream's opening). It
hands out candidates least loaded first, minus those already tried. When a member
fails with an error whose kind says another member may do better
(``StageError.retry_elsewhere``: unreachable, draining, engine dead), the member is
set aside for a few seconds for every request (``Workers.mark_down``) and excluded
from this call, and the call moves on, up to ``attempts`` members. Any other kind is
the caller's answer and is raised as it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from router_svc.workers import Peer, Workers
from services.errors import StageError, from_rpc_error
from services.membership import role_name

T = TypeVar("T")

#: Members one call is tried on at most.
ATTEMPTS = 3


class Failover:
    """Candidates for one call, and what to do when one of them fails."""

    def __init__(
        self, workers: Workers, role: int, model: str, wait: float, attempts: int = ATTEMPTS
    ) -> None:
        self.workers = workers
        self.role = role
        self._model = model
        self._wait = wait
        self._attempts = attempts
        self._tried: frozenset[str] = frozenset()

    async def candidates(self) -> list[Peer]:
        """Usable members not yet tried, least loaded first (waits for one; else UNAVAILABLE)."""
        return await self.workers.wait_candidates(self.role, self._model, self._wait, self._tried)

    def usable(self) -> list[Peer]:
        """Usable members not yet tried, least loaded first, without waiting (may be empty)."""
        return self.workers.candidates(self.role, self._model, self._tried)

    def error(self, peer: Peer, error: grpc.aio.AioRpcError) -> StageError:
        """A member's gRPC failure as the kind it stands for, naming the member."""
        return from_rpc_error(error, f"{role_name(self.role)} {peer.member.instance_id}")

    def retry(self, peer: Peer, error: StageError) -> bool:
        """Record ``peer``'s failure; True when the call should go on to another member."""
        if not error.retry_elsewhere:
            return False
        self.workers.mark_down(peer)
        self._tried |= {peer.key}
        return len(self._tried) < self._attempts

    async def call(self, fn: Callable[[Peer], Awaitable[T]]) -> T:
        """A unary call on the least-loaded member, counted in flight, moved on as above."""
        while True:
            peer = (await self.candidates())[0]
            async with self.workers.using(peer):
                try:
                    return await fn(peer)
                except grpc.aio.AioRpcError as rpc_error:
                    error = self.error(peer, rpc_error)
            if not self.retry(peer, error):
                raise error
