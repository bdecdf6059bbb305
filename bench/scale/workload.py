"""The scale lab's workloads, deterministic from a seed.

- :class:`TenantWorkload`: llm-d's multi-tenant shared-prefix workload (its published
  routing benchmark, run with inference-perf's ``shared_prefix`` data: 150 groups, a
  6,000-token system prompt per group, 1,200-token questions, 1,000 output tokens with
  ``ignore_eos``, Poisson load in 50 s stages from 3 to 60 QPS), scaled to the host:
  fewer tenants and a QPS ramp of a few steps.
- :class:`PdMix`: prompts with no shared prefix in a prefill-heavy or a decode-heavy shape,
  for disaggregated against aggregated serving.
- :func:`stream_prompts`: short prompts with long outputs for the token path.

Prompts are token ids by default: OpenAI's ``/v1/completions`` takes a list of ids as
``prompt`` (Dynamo's frontend accepts it, checked with 1.6.1, and reports the exact
``prompt_tokens``), so lengths are exact and no tokenizer runs in the client or costs the
server. ``text=True`` renders each id as a word instead (about one token each for BPE
vocabularies; lengths are then approximate).

Request bodies are serialized once, before a run, so the client's loop only sends bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

#: Ids drawn for prompts: above the bundled model's special tokens, below its vocabulary
#: size (49,152 for SmolLM2), so any server's tokenizer knows them.
ID_RANGE = (1_000, 49_000)
#: Words for text prompts (one id picks one word; most are one BPE token with their space).
_WORDS = (
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
)


@dataclass(frozen=True)
class Request:
    """One request of a workload: its body, already serialized, and what it asks for."""

    #: ``completions`` or ``chat/completions`` (relative to the API root).
    path: str
    body: bytes
    prompt_tokens: int
    max_tokens: int
    #: The tenant whose prefix the prompt starts with (-1: none).
    tenant: int = -1


def token_ids(seed: object, count: int) -> list[int]:
    """``count`` prompt ids, a function of ``seed`` alone (str, int or tuple of them)."""
    rng = random.Random(repr(seed))
    low, high = ID_RANGE
    return [rng.randrange(low, high) for _ in range(count)]


def render(ids: list[int]) -> str:
    """Text with about one token per id (for servers or paths that take only text)."""
    return "".join(" " + _WORDS[i % len(_WORDS)] for i in ids)


def completion_body(model: str, ids: list[int], max_tokens: int, text: bool) -> bytes:
    """A streamed ``/v1/completions`` body that generates exactly ``max_tokens`` tokens
    (``ignore_eos``, as llm-d's benchmark sets it) and reports usage in its last event."""
    body = {
        "model": model,
        "prompt": render(ids) if text else ids,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def chat_body(model: str, ids: list[int], max_tokens: int) -> bytes:
    """The same request through ``/v1/chat/completions`` (text only, one user message)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": render(ids)}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def poisson_arrivals(rate: float, duration: float, seed: object) -> list[float]:
    """Send times (seconds from the step's start) of a Poisson process at ``rate`` per second."""
    rng = random.Random(repr(("arrivals", seed)))
    times, now = [], rng.expovariate(rate)
    while now < duration:
        times.append(now)
        now += rng.expovariate(rate)
    return times


@dataclass(frozen=True)
class TenantWorkload:
    """Tenants each with a shared prefix of ``prefix_tokens``, every request that prefix
    plus a fresh query of ``query_tokens``, sent at Poisson arrivals over a QPS ramp.

    ``round`` names a fresh set of prefixes: give each deployment of a comparison its own,
    so a cache warmed by one run cannot help the next on a shared engine pool."""

    tenants: int = 48
    prefix_tokens: int = 6_000
    query_tokens: int = 1_200
    output_tokens: int = 1_000
    qps: tuple[float, ...] = (2.0, 3.0)
    step_seconds: float = 50.0
    seed: int = 0
    text: bool = False
    round: int = 0
    _prefixes: dict[int, list[int]] = field(default_factory=dict, compare=False, repr=False)

    def prefix(self, tenant: int) -> list[int]:
        if tenant not in self._prefixes:
            self._prefixes[tenant] = token_ids(
                ("prefix", self.seed, self.round, tenant), self.prefix_tokens
            )
        return self._prefixes[tenant]

    def request(self, model: str, step: int, index: int) -> Request:
        """The ``index``-th request of ``step``: a tenant drawn uniformly, its prefix, a query."""
        rng = random.Random(repr(("tenant", self.seed, self.round, step, index)))
        tenant = rng.randrange(self.tenants)
        ids = self.prefix(tenant) + token_ids(
            ("query", self.seed, self.round, step, index), self.query_tokens
        )
        return Request(
            "completions",
            completion_body(model, ids, self.output_tokens, self.text),
            len(ids),
            self.output_tokens,
            tenant,
        )

    def steps(self, model: str) -> Iterator[tuple[float, list[tuple[float, Request]]]]:
        """Per QPS step: the rate and its schedule of (send time, request)."""
        for step, rate in enumerate(self.qps):
            arrivals = poisson_arrivals(rate, self.step_seconds, (self.seed, self.round, step))
            yield rate, [(at, self.request(model, step, i)) for i, at in enumerate(arrivals)]


#: P/D mixes: (prompt tokens, output tokens). Prefill-heavy is the shape disaggregation
#: helps (long prompts would stall decode steps); decode-heavy the one it does not.
PD_MIXES: dict[str, tuple[int, int]] = {
    "prefill-heavy": (4_096, 64),
    "decode-heavy": (256, 1_024),
}


@dataclass(frozen=True)
class PdMix:
    """Unique prompts (no shared prefix, so no cache helps) of one P/D mix's shape."""

    mix: str = "prefill-heavy"
    qps: tuple[float, ...] = (2.0,)
    step_seconds: float = 50.0
    seed: int = 0
    text: bool = False

    def steps(self, model: str) -> Iterator[tuple[float, list[tuple[float, Request]]]]:
        prompt, output = PD_MIXES[self.mix]
        for step, rate in enumerate(self.qps):
            schedule = []
            for i, at in enumerate(
                poisson_arrivals(rate, self.step_seconds, (self.mix, self.seed, step))
            ):
                ids = token_ids((self.mix, self.seed, step, i), prompt)
                schedule.append(
                    (
                        at,
                        Request(
                            "completions",
                            completion_body(model, ids, output, self.text),
                            prompt,
                            output,
                        ),
                    )
                )
            yield rate, schedule


def stream_prompts(
    model: str, count: int, prompt_tokens: int, output_tokens: int, seed: int, chat: bool = False
) -> list[Request]:
    """``count`` distinct short prompts with long outputs, for closed-loop token-path runs."""
    requests = []
    for i in range(count):
        ids = token_ids(("stream", seed, i), prompt_tokens)
        if chat:
            requests.append(
                Request(
                    "chat/completions",
                    chat_body(model, ids, output_tokens),
                    prompt_tokens,
                    output_tokens,
                )
            )
        else:
            requests.append(
                Request(
                    "completions",
                    completion_body(model, ids, output_tokens, False),
                    prompt_tokens,
                    output_tokens,
                )
            )
    return requests
