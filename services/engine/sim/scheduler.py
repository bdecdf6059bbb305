"""The simulated engine's scheduler: continuous batching in vLLM v1's shape.

Each step has a token budget (``max_num_batched_tokens``). Running sequences go first,
one token each when decoding and a chunk of their prompt when prefilling (chunked
prefill); waiting ones are admitted in arrival order while a slot (``max_num_seqs``),
budget and KV blocks last, their cached prefix taken from the cache instead of
computed. When a running sequence needs a block and none is free, the most recently
admitted sequence is preempted: its blocks are freed and it waits at the head of the
queue to be computed again (vLLM's recompute preemption). The step then lasts what the
timing profile says, and every sequence whose prompt is complete gets one token.

A decode that collects a prompt's KV from a prefill engine (P/D) holds the prompt's
blocks while the transfer time passes, outside the batch, as vLLM's
WAITING_FOR_REMOTE_KVS requests do. A prefill-only request (the prefill side of P/D)
ends when its prompt is computed and keeps its blocks until they are released.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from services.engine.sim.cache import BlockPool
from services.engine.sim.outputs import SimCompletion, SimLogprob, SimOutput
from services.engine.sim.requests import SimRequest, SimSequence
from services.engine.sim.timing import TimingProfile
from services.engine.sim.tokens import TokenSource
from services.errors import Unavailable
from services.kv.hashing import chain_hashes

#: A step that starts later than this after its predecessor was due starts a new schedule
#: (the loop was busy elsewhere: that time is not made up).
_LATE_SECONDS = 0.005


class Scheduler:
    """One simulated engine's batch loop over a :class:`BlockPool`."""

    def __init__(
        self,
        pool: BlockPool,
        profile: TimingProfile,
        tokens: TokenSource,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        speedup: float = 1.0,
        kv_params: dict[str, Any] | None = None,
        lease_seconds: float = 30.0,
    ) -> None:
        self.pool = pool
        self.profile = profile
        self.speedup = speedup
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._tokens = tokens
        self._kv_params = kv_params or {}
        self._lease_seconds = lease_seconds
        self.waiting: collections.deque[SimSequence] = collections.deque()
        self.running: list[SimSequence] = []
        self.loading: list[SimSequence] = []
        #: Prefill-only requests' blocks held for a decode engine: id -> (expiry, blocks).
        self.held: dict[str, tuple[float, list[int]]] = {}
        self._by_id: dict[str, SimSequence] = {}
        self._wake = asyncio.Event()
        self.tokens_out = 0
        self.preemptions = 0

    def add(self, request: SimRequest) -> asyncio.Queue[SimOutput | BaseException | None]:
        """Queue a request; its outputs (then None) arrive on the returned queue."""
        outputs: asyncio.Queue[SimOutput | BaseException | None] = asyncio.Queue()
        sequence = SimSequence(request, outputs, self.pool.block_size)
        self._by_id[request.request_id] = sequence
        self.waiting.append(sequence)
        self._wake.set()
        return outputs

    def abort(self, request_id: str) -> bool:
        """End a queued or running request now, freeing its blocks."""
        sequence = self._by_id.get(request_id)
        if sequence is None:
            return False
        for queue in (self.waiting, self.running, self.loading):
            if sequence in queue:
                queue.remove(sequence)
        self._finish(
            sequence, SimOutput([SimCompletion([], "abort", None)], True, sequence.cached_tokens)
        )
        return True

    def release(self, request_ids: list[str]) -> list[str]:
        """Free the blocks prefill-only requests hold (their KV was collected, or will not be)."""
        released = [r for r in request_ids if r in self.held]
        for request_id in released:
            self.pool.free(self.held.pop(request_id)[1])
        if released:
            self._wake.set()
        return released

    async def run(self) -> None:
        """Step for as long as the engine lives."""
        loop = asyncio.get_running_loop()
        #: When the previous step was due to end. Steps follow that schedule rather than
        #: the moment a sleep returned: the event loop's timers wake up to a millisecond
        #: late, and at accelerator pace (steps of a few ms) that would add up.
        due = 0.0
        while True:
            self._expire_leases()
            now = loop.time()
            scheduled, prefill_tokens, decoding = self._schedule(now)
            if not scheduled:
                due = 0.0
                await self._idle(now)
                continue
            step = self.profile.step_seconds(
                prefill_tokens, decoding, self._decode_occupancy(scheduled), self.speedup
            )
            due = (due if now - due < _LATE_SECONDS else now) + step
            await asyncio.sleep(max(0.0, due - loop.time()))
            self._apply(scheduled)

    def _decode_occupancy(self, scheduled: list[tuple[SimSequence, int]]) -> float:
        """The tokens of the sequences that emit a token this step over the cache's
        capacity in tokens (the mocker's "active KV tokens" share)."""
        active = sum(s.length for s, n in scheduled if s.computed + n >= s.length)
        return active / (self.pool.num_blocks * self.pool.block_size)

    async def _idle(self, now: float) -> None:
        """Wait for a request, a finished transfer or a freed block."""
        self._wake.clear()
        timeout = min((s.ready_at for s in self.loading), default=now + 1.0) - now
        try:
            await asyncio.wait_for(self._wake.wait(), max(timeout, 0.0))
        except TimeoutError:
            pass

    def _schedule(self, now: float) -> tuple[list[tuple[SimSequence, int]], int, int]:
        """This step's sequences with the tokens each computes, the uncached prompt tokens
        among them, and how many decode."""
        for sequence in [s for s in self.loading if s.ready_at <= now]:
            self.loading.remove(sequence)
            self._cache_full_blocks(sequence)
            self.running.append(sequence)
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[SimSequence, int]] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            count = min(sequence.length - sequence.computed, budget)
            if self._reserve(sequence, sequence.computed + count):
                scheduled.append((sequence, count))
                budget -= count
                index += 1
                continue
            preempted = True
            victim = self.running.pop()
            self._preempt(victim)
            if victim is sequence:
                break
        if not preempted:
            budget = self._admit(scheduled, budget, now)
        prefill = sum(n for s, n in scheduled if n > 1 or s.computed == 0)
        decoding = sum(1 for s, n in scheduled if not (n > 1 or s.computed == 0))
        return scheduled, prefill, decoding

    def _admit(self, scheduled: list[tuple[SimSequence, int]], budget: int, now: float) -> int:
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            sequence = self.waiting[0]
            if not sequence.blocks and not self._take_cached_prefix(sequence):
                break
            if sequence.request.transfer_seconds and sequence.first_admission:
                if not self._reserve(sequence, len(sequence.request.prompt)):
                    self._unreserve(sequence)
                    break
                self.waiting.popleft()
                sequence.first_admission = False
                sequence.computed = len(sequence.request.prompt) - 1
                sequence.ready_at = now + sequence.request.transfer_seconds
                self.loading.append(sequence)
                continue
            count = min(sequence.length - sequence.computed, budget)
            if not self._reserve(sequence, sequence.computed + count):
                self._unreserve(sequence)  # waiting holds no blocks, as in vLLM
                break
            self.waiting.popleft()
            sequence.first_admission = False
            self.running.append(sequence)
            scheduled.append((sequence, count))
            budget -= count
        return budget

    def _take_cached_prefix(self, sequence: SimSequence) -> bool:
        """Reference the sequence's cached leading blocks, when the blocks for its first
        chunk would fit beside them; False (nothing taken) when they would not. At least
        the last token is always computed, so a fully cached prompt recomputes it."""
        size = self.pool.block_size
        usable = sequence.hashes[: (sequence.length - 1) // size]
        if sequence.request.transfer_seconds and sequence.first_admission:
            usable = []  # its KV comes from the prefill engine
        count = self.pool.cached_prefix(usable)
        if not self.pool.can_take(usable[:count], 1):
            return False
        sequence.blocks = self.pool.touch(usable[:count])
        sequence.cached_blocks = count
        sequence.computed = count * size
        if sequence.first_admission:
            sequence.cached_tokens = count * size
            self.pool.record_query(len(sequence.request.prompt), count * size)
        return True

    def _reserve(self, sequence: SimSequence, tokens: int) -> bool:
        """Blocks for ``tokens`` tokens of the sequence; False when the pool is short."""
        missing = -(-tokens // self.pool.block_size) - len(sequence.blocks)
        if missing <= 0:
            return True
        blocks = self.pool.allocate(missing)
        if blocks is None:
            return False
        sequence.blocks += blocks
        return True

    def _unreserve(self, sequence: SimSequence) -> None:
        self.pool.free(sequence.blocks)
        sequence.blocks = []
        sequence.cached_blocks = 0
        sequence.computed = 0

    def _preempt(self, sequence: SimSequence) -> None:
        self._unreserve(sequence)
        self.preemptions += 1
        self.waiting.appendleft(sequence)

    def _apply(self, scheduled: list[tuple[SimSequence, int]]) -> None:
        """The step's results: computed tokens, newly full blocks cached, one token each."""
        for sequence, count in scheduled:
            if sequence.done:
                continue  # aborted during the step
            sequence.computed += count
            self._cache_full_blocks(sequence)
            if sequence.computed < sequence.length:
                continue  # a chunked prefill goes on next step
            if sequence.request.prefill_only:
                self._hold(sequence)
            else:
                self._emit(sequence)

    def _cache_full_blocks(self, sequence: SimSequence) -> None:
        size = self.pool.block_size
        full = min(sequence.computed // size, len(sequence.blocks))
        first = sequence.cached_blocks
        if full <= first:
            return
        while len(sequence.hashes) < full:
            parent = sequence.hashes[-1] if sequence.hashes else sequence.root
            start = len(sequence.hashes) * size
            sequence.hashes += chain_hashes(sequence.token_slice(start, start + size), size, parent)
        self.pool.cache(
            sequence.blocks[first:full],
            sequence.hashes[first:full],
            sequence.hashes[first - 1] if first else None,
            sequence.token_slice(first * size, full * size),
            sequence.request.salt if not first else "",
            sequence.request.adapter if not first else "",
        )
        sequence.cached_blocks = full

    def _emit(self, sequence: SimSequence) -> None:
        request = sequence.request
        if request.fail_after is not None and len(sequence.tokens) >= request.fail_after:
            self._fail(sequence)
            return
        position = sequence.length
        token_id = self._tokens.next_id(sequence.recent(), position, request.seed)
        sequence.tokens.append(token_id)
        self.tokens_out += 1
        reason, stop = self._finish_reason(sequence, token_id)
        logprobs = None
        if request.logprobs is not None:
            logprobs = [self._position_logprobs(position, token_id, request.logprobs)]
        output = SimOutput(
            [SimCompletion([token_id], reason, stop, logprobs)],
            reason is not None,
            sequence.cached_tokens,
        )
        if reason is None:
            sequence.outputs.put_nowait(output)
        else:
            self.running.remove(sequence)
            self._finish(sequence, output)

    def _finish_reason(self, sequence: SimSequence, token_id: int) -> tuple[str | None, int | None]:
        request = sequence.request
        generated = len(sequence.tokens)
        if generated >= request.min_tokens:
            if token_id in request.stop_ids:
                return "stop", token_id
            if token_id == request.eos_id and not request.ignore_eos:
                return "stop", None
        if generated >= request.max_tokens:
            return "length", None
        return None, None

    def _position_logprobs(self, position: int, token_id: int, top: int) -> dict[int, SimLogprob]:
        """The chosen id ranked first, then ``top`` neighbours with lower log-probabilities."""
        chosen = self._tokens.logprob(position, token_id) / 8.0
        ranked = {token_id: SimLogprob(chosen, 1)}
        for rank in range(2, top + 1):
            ranked[(token_id + rank) % self._tokens.vocab_size] = SimLogprob(chosen - rank, rank)
        return ranked

    def _hold(self, sequence: SimSequence) -> None:
        """End a prefill-only request, keeping its blocks for the decode engine's pull."""
        self.running.remove(sequence)
        request = sequence.request
        self.held[request.request_id] = (time.monotonic() + self._lease_seconds, sequence.blocks)
        params = dict(
            self._kv_params,
            remote_block_ids=[list(sequence.blocks)],
            remote_request_id=request.request_id,
        )
        sequence.blocks = []
        output = SimOutput(
            [SimCompletion([], "length", None)],
            True,
            sequence.cached_tokens,
            kv_transfer_params=params,
        )
        self._finish(sequence, output)

    def _fail(self, sequence: SimSequence) -> None:
        self.running.remove(sequence)
        self._finish(sequence, Unavailable("simulated engine failure (--sim-fail-rate)"))

    def _finish(self, sequence: SimSequence, last: SimOutput | BaseException) -> None:
        sequence.done = True
        self._by_id.pop(sequence.request.request_id, None)
        self.pool.free(sequence.blocks)
        sequence.blocks = []
        sequence.outputs.put_nowait(last)
        sequence.outputs.put_nowait(None)
        self._wake.set()

    def _expire_leases(self) -> None:
        now = time.monotonic()
        expired = [r for r, (expiry, _) in self.held.items() if expiry < now]
        if expired:
            self.release(expired)
