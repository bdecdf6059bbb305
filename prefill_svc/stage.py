"""The prefill stage: what differs from the shared engine stage."""

from __future__ import annotations

from typing import ClassVar

from services.engine.service import EngineStage
from services.pb import common_pb2


class PrefillStage(EngineStage):
    """The prefill role of the shared engine stage."""

    role: ClassVar[common_pb2.Role] = common_pb2.ROLE_PREFILL
    kv_role: ClassVar[str] = "kv_producer"
