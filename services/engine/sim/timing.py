"""Step times of a simulated engine: named profiles and a profile file format.

A profile gives the time of one scheduler step from what the step computes: the prompt
tokens prefilled in it (uncached ones only; cached blocks cost nothing) and the
sequences it decodes, whose cost grows with the KV cache's occupancy (attention reads
every cached token). Each profile names its source. ``--sim-speedup`` divides every
step time, as the mocker's ``speedup_ratio`` does.

The file format (``--sim-profile PATH``) is JSON::

    {"name": "h100-llama-8b", "source": "measured with ...",
     "prefill_ms": [a, b, c],        # a*N^2 + b*N + c for N uncached tokens in the step
     "decode_ms": [a, b, c],         # a*p^2 + b*p + c for KV occupancy p in [0, 1]
     "kv_bytes_per_token": 131072,   # for P/D transfer times (0 or absent: the model's)
     "transfer_gbps": 25.0}          # KV transfer bandwidth, GB/s
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class TimingProfile:
    """One accelerator-and-model pair's step-time model."""

    name: str
    source: str
    #: Quadratic in the step's uncached prompt tokens N, milliseconds (highest power first).
    prefill_ms: tuple[float, float, float]
    #: Quadratic in the KV cache's occupancy p in [0, 1], milliseconds.
    decode_ms: tuple[float, float, float]
    #: Bytes of KV per token moved in a P/D handoff (0: the served model's, from its config).
    kv_bytes_per_token: int = 0
    transfer_gbps: float = 25.0

    def step_seconds(
        self, prefill_tokens: int, decoding: int, occupancy: float, speedup: float
    ) -> float:
        """Seconds one step takes: a prefill part for its uncached prompt tokens plus a
        decode part when it decodes any sequence (a mixed step pays both, as a chunked
        prefill batched with decodes does). ``occupancy`` is the decoding sequences'
        tokens over the cache's capacity in tokens, and the decode part is at least 1 ms:
        both as Dynamo's mocker computes them, so the two compare like with like."""
        ms = 0.0
        if prefill_tokens:
            a, b, c = self.prefill_ms
            ms += a * prefill_tokens * prefill_tokens + b * prefill_tokens + c
        if decoding:
            a, b, c = self.decode_ms
            p = min(occupancy, 1.0)
            ms += max(a * p * p + b * p + c, 1.0)
        return ms / 1000.0 / speedup

    def prefill_seconds_per_token(self, chunk_tokens: int, speedup: float) -> float:
        """Seconds per prompt token of a prefill step computing ``chunk_tokens`` uncached
        tokens (the step's token budget: a long prompt is computed in such chunks). What
        an engine with this profile reports as its prefill cost, as a vLLM engine reports
        the one it measures, so the router weighs the KV store the same way at width."""
        if chunk_tokens <= 0:
            return 0.0
        return self.step_seconds(chunk_tokens, 0, 0.0, speedup) / chunk_tokens

    def transfer_seconds(self, tokens: int, bytes_per_token: int, speedup: float) -> float:
        """Seconds to move ``tokens`` tokens of KV from a prefill engine to a decode engine
        (``bytes_per_token`` where the profile names none)."""
        size = self.kv_bytes_per_token or bytes_per_token
        return tokens * size / (self.transfer_gbps * 1e9) / speedup


PROFILES: dict[str, TimingProfile] = {
    profile.name: profile
    for profile in (
        TimingProfile(
            "dynamo-default",
            "NVIDIA Dynamo's mocker default timing model (lib/mocker, ai-dynamo 1.6): prefill "
            "ms = 4.21e-7*N^2 + 0.01518*N + 16.5 for N uncached tokens, decode ms = "
            "-25.74*p^2 + 54.01*p + 5.74 for KV occupancy p",
            prefill_ms=(4.21e-7, 0.01518, 16.5),
            decode_ms=(-25.74, 54.01, 5.74),
        ),
        TimingProfile(
            "pace-10ms",
            "a fixed 10 ms decode step whatever the batch (an accelerator's pace at moderate "
            "batch; the token-path measurements of issues #27/#28) and a 10 ms prefill step: "
            "isolates the mesh's own per-token cost from the engine's",
            prefill_ms=(0.0, 0.0, 10.0),
            decode_ms=(0.0, 0.0, 10.0),
        ),
    )
}


def load_profile(name_or_path: str) -> TimingProfile:
    """A named profile, or one read from a JSON file; SystemExit names what is wrong."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise SystemExit(
            f"--sim-profile {name_or_path!r} is neither a profile ({', '.join(PROFILES)}) nor a "
            "file"
        )
    try:
        data = json.loads(path.read_text())
        return TimingProfile(
            name=str(data.get("name", path.stem)),
            source=str(data.get("source", str(path))),
            prefill_ms=_quadratic(data["prefill_ms"]),
            decode_ms=_quadratic(data["decode_ms"]),
            kv_bytes_per_token=int(data.get("kv_bytes_per_token", 0)),
            transfer_gbps=float(data.get("transfer_gbps", 25.0)),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(
            f"--sim-profile {path}: not a timing profile ({type(exc).__name__}: {exc})"
        ) from None


def _quadratic(value: object) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError("a quadratic is a list of three numbers [a, b, c]")
    a, b, c = (float(v) for v in value)
    return a, b, c
