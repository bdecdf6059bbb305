"""The prefill stage: what differs from the shared engine stage."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.config import setting
from services.engine.config import EngineConfig
from services.engine.service import EngineStage
from services.pb import common_pb2


@dataclasses.dataclass
class PrefillConfig(EngineConfig):
    """stagemesh prefill stage: a vLLM engine behind gRPC, KV handed over NIXL."""

    port: int = setting(50053, "gRPC port (0 picks a free one)")

    ROLE: ClassVar[str] = "prefill"


class PrefillStage(EngineStage):
    """The prefill role of the shared engine stage."""

    role: ClassVar[common_pb2.Role] = common_pb2.ROLE_PREFILL
    kv_role: ClassVar[str] = "kv_producer"
