"""Settings of the prefill stage: importable without vLLM, so `--help` and a bad flag
answer at once instead of after the engine stack loads."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.config import setting
from services.engine.config import EngineConfig


@dataclasses.dataclass
class PrefillConfig(EngineConfig):
    """stagemesh prefill stage: a vLLM engine behind gRPC, KV handed over NIXL."""

    port: int = setting(50053, "gRPC port (0 picks a free one)")

    ROLE: ClassVar[str] = "prefill"
