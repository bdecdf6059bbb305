"""What a decode engine does: collect a prompt's KV from a prefill engine, then decode.

A ``Generate`` with a KV handle pulls the prompt's blocks over NIXL from the prefill
engine the handle names. The handle is taken on trust only as far as the mesh allows
(:mod:`services.kv.handles`): its signature must hold under the mesh key, its lease
must not have run out, and it must name a current prefill member at the address that
member registered, which :class:`PrefillMembers` follows in etcd. The stream itself
(and ``Generate`` without a handle) is :class:`~services.engine.service.EngineServicer`'s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.engine.backend import EngineBackend
from services.engine.service import EngineServicer
from services.errors import InvalidRequest, KvNotCollected, PermissionDenied
from services.etcd import EtcdSession
from services.kv.handles import HandleSigner, issuer_mismatch, params_from_handle
from services.membership import MemberWatcher, role_prefix
from services.pb import common_pb2, engine_pb2


class PrefillMembers:
    """The mesh's prefill members, followed in etcd: a decode engine pulls KV only from
    the one a handle names, at the address that member registered
    (:func:`services.kv.handles.issuer_mismatch`)."""

    #: How long a handle naming an unknown member waits for the member's record: a
    #: prefill engine that registered a moment ago may not have reached the watch yet,
    #: and one whose lease ran out on a starved host registers again within seconds.
    GRACE_SECONDS = 5.0

    def __init__(self, etcd_endpoints: list[tuple[str, int]]) -> None:
        self._session = EtcdSession(etcd_endpoints)
        self._watcher: MemberWatcher[common_pb2.Member] = MemberWatcher(
            self._session, role_prefix(common_pb2.ROLE_PREFILL)
        )

    def start(self) -> None:
        """Start following the prefill members."""
        self._watcher.start()

    async def close(self) -> None:
        """Stop following them and close the etcd session."""
        await self._watcher.close()
        await self._session.close()

    async def check(self, handle: common_pb2.KvTransferHandle) -> None:
        """Return when a current prefill member issued ``handle``; PermissionDenied otherwise.

        Only a member id not seen yet is waited for, and never past the handle's expiry:
        a known member at another address is a forgery, refused at once."""
        deadline = time.monotonic() + self.GRACE_SECONDS
        if handle.expires_at:
            deadline = min(deadline, time.monotonic() + handle.expires_at - time.time())
        while reason := issuer_mismatch(handle, members := self._watcher.members.values()):
            known = any(m.instance_id == handle.prefill_instance_id for m in members)
            if known or time.monotonic() >= deadline:
                raise PermissionDenied(
                    f"the KV handle names no prefill engine of this mesh: {reason}"
                )
            await asyncio.sleep(0.05)


class DecodeServicer(EngineServicer):
    """EngineService on a decode member: ``Generate`` also takes a KV handle."""

    def __init__(
        self, runner: EngineBackend, signer: HandleSigner, issuers: PrefillMembers
    ) -> None:
        super().__init__(runner)
        self._signer = signer
        self._issuers = issuers

    async def kv_params(self, request: engine_pb2.GenerateRequest) -> dict[str, Any]:
        """The kv_transfer_params that pull ``request``'s KV, once its handle is proven
        to be the mesh's, still held, and for this prompt."""
        handle = request.kv_handle
        self._signer.check(handle)  # before anything else is read from it
        if handle.expires_at and handle.expires_at < time.time():
            raise KvNotCollected(
                f"KV transfer handle {handle.remote_request_id!r} expired "
                f"{time.time() - handle.expires_at:.1f}s ago; prefill again"
            )
        await self._issuers.check(handle)
        if handle.num_tokens and handle.num_tokens != len(request.prompt_token_ids):
            raise InvalidRequest(
                f"the KV handle covers {handle.num_tokens} prompt tokens, "
                f"the request has {len(request.prompt_token_ids)}"
            )
        return params_from_handle(handle)
