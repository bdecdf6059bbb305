"""The decode stage: the shared engine stage with the decode role's servicer."""

from __future__ import annotations

from typing import ClassVar

from decode_svc.handlers import DecodeServicer, PrefillMembers
from services.engine.backend import EngineBackend
from services.engine.service import EngineServicer, EngineStage
from services.kv.handles import HandleSigner
from services.pb import common_pb2


class DecodeStage(EngineStage):
    """An engine that pulls prompts' KV over NIXL and generates (``kv_consumer``)."""

    role: ClassVar[common_pb2.Role] = common_pb2.ROLE_DECODE
    kv_role: ClassVar[str] = "kv_consumer"

    def make_servicer(self, runner: EngineBackend) -> EngineServicer:
        """Decode handlers that collect only handles the mesh's prefill members issued."""
        self._issuers = PrefillMembers(self._config.etcd_endpoints)
        signer = HandleSigner(self._config.credentials().mesh_key)
        return DecodeServicer(runner, signer, self._issuers)

    async def start(self) -> None:
        """Follow the prefill members before the engine takes calls."""
        self._issuers.start()
        await super().start()

    async def stop(self) -> None:
        """Stop the engine, then the prefill members' watch."""
        await super().stop()
        await self._issuers.close()
