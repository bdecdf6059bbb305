"""Settings of the decode stage: importable without vLLM, so `--help` and a bad flag
answer at once instead of after the engine stack loads."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.config import setting
from services.engine.config import EngineConfig


@dataclasses.dataclass
class DecodeConfig(EngineConfig):
    """stagemesh decode stage: a vLLM engine behind gRPC, KV handed over NIXL."""

    port: int = setting(50054, "gRPC port (0 picks a free one)")

    ROLE: ClassVar[str] = "decode"
