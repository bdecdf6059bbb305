"""What the simulated engine's scheduler holds per request: the request as asked
(:class:`SimRequest`) and its state in the batch (:class:`SimSequence`)."""

from __future__ import annotations

import asyncio
import dataclasses
import random

from services.engine.sim.outputs import SimOutput
from services.engine.sim.tokens import WINDOW
from services.kv.hashing import chain_hashes, chain_root


@dataclasses.dataclass
class SimRequest:
    """What one request asks of the simulated engine (checked by the runner)."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    min_tokens: int = 0
    stop_ids: frozenset[int] = frozenset()
    eos_id: int | None = None
    ignore_eos: bool = False
    seed: int = 0
    logprobs: int | None = None
    salt: str = ""
    adapter: str = ""
    #: The prefill side of P/D: end once the prompt is computed and hold its blocks.
    prefill_only: bool = False
    #: The decode side of P/D: the prompt's KV arrives after this many seconds.
    transfer_seconds: float = 0.0
    #: Fault injection: fail the stream after this many tokens (None: never).
    fail_after: int | None = None
    #: The decode side of P/D: the prefill engine's address and its id for the KV, told
    #: once the KV is in.
    kv_source: tuple[str, str] | None = None


class SimSequence:
    """A request's state in the scheduler."""

    __slots__ = (
        "blocks",
        "cached_blocks",
        "cached_tokens",
        "computed",
        "done",
        "first_admission",
        "hashes",
        "outputs",
        "ready_at",
        "request",
        "root",
        "tokens",
    )

    def __init__(
        self,
        request: SimRequest,
        outputs: asyncio.Queue[SimOutput | BaseException | None],
        block_size: int,
    ) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.blocks: list[int] = []
        self.root = chain_root(request.salt, request.adapter)
        #: Chain hashes of the sequence's full blocks (prompt first, then output).
        self.hashes = chain_hashes(request.prompt, block_size, self.root)
        #: Leading blocks cached in the pool under those hashes.
        self.cached_blocks = 0
        self.computed = 0
        self.cached_tokens = 0
        self.outputs = outputs
        self.ready_at = 0.0
        self.first_admission = True
        self.done = False

    @property
    def length(self) -> int:
        return len(self.request.prompt) + len(self.tokens)

    def recent(self) -> list[int]:
        """The last ids of the sequence, as many as decide the next one (not a copy of
        a prompt of thousands: this runs once per token)."""
        tokens = self.tokens[-WINDOW:]
        missing = WINDOW - len(tokens)
        return self.request.prompt[-missing:] + tokens if missing else tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        """Ids ``start`` to ``end`` of prompt-then-output, copying only those."""
        prompt = self.request.prompt
        if end <= len(prompt):
            return prompt[start:end]
        return prompt[start:] + self.tokens[max(0, start - len(prompt)) : end - len(prompt)]


def fail_after(rate: float, max_tokens: int, rng: random.Random) -> int | None:
    """Fault injection: with probability ``rate``, the token count after which a request fails."""
    if rate <= 0 or rng.random() >= rate:
        return None
    return rng.randrange(max(max_tokens, 1))
