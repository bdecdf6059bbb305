"""The prefill stage: the shared engine stage with the prefill role's servicer."""

from __future__ import annotations

from typing import ClassVar

from prefill_svc.handlers import PrefillServicer
from services.engine.backend import EngineBackend
from services.engine.service import EngineServicer, EngineStage
from services.kv.handles import HandleSigner
from services.pb import common_pb2


class PrefillStage(EngineStage):
    """An engine that computes prompts and hands their KV over NIXL (``kv_producer``)."""

    role: ClassVar[common_pb2.Role] = common_pb2.ROLE_PREFILL
    kv_role: ClassVar[str] = "kv_producer"

    def make_servicer(self, runner: EngineBackend) -> EngineServicer:
        """Prefill handlers that sign their handles with the mesh key."""
        signer = HandleSigner(self._config.credentials().mesh_key)
        return PrefillServicer(runner, self._config.instance_id, signer)
