"""Settings of the tokenizer stage."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.config import StageConfig, setting


@dataclasses.dataclass
class TokenizerConfig(StageConfig):
    """stagemesh tokenizer stage: text <-> token ids over gRPC."""

    port: int = setting(50052, "gRPC port (0 picks a free one)")
    model: list[str] = setting(
        [], "models to serve, comma-separated NAME=PATH or PATH (default: the bundled model)"
    )

    ROLE: ClassVar[str] = "tokenizer"
