"""KV transfer handles the mesh issued, and only those: signing and checking.

A handle tells a decode engine where to pull a prompt's KV from: a host, a port, an
engine id and block ids. Taken on trust, anyone who can call a decode engine could
make it read another request's blocks, or any NIXL agent's memory. So a prefill
engine signs each handle it issues with the mesh key (HMAC-SHA256 over the handle's
deterministic encoding, the signature field empty), and a decode engine with the key
set collects only handles whose signature holds. The key is a secret shared by the
mesh's engines (``--mesh-key-file``, or ``STAGEMESH_MESH_KEY``; ``stagemesh up`` makes
one per run). An HMAC rather than public-key signatures: every engine both issues and
checks, so there is nobody the key must be kept from but outsiders.

Fields newer vLLM versions add travel in ``extra_json``; only the ones listed here are
handed to vLLM, so a handle cannot switch on connector behaviour the mesh never chose.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from services.errors import InvalidRequest, PermissionDenied
from services.pb import common_pb2

#: kv_transfer_params keys that ``extra_json`` may carry to vLLM's NixlConnector.
EXTRA_KEYS = frozenset(
    {
        "remote_block_ids",
        "remote_num_tokens",
        "remote_blocks_expiry_time",
        "dcp_size",
        "pp_size",
        "transfer_mode",
    }
)


class HandleSigner:
    """Signs handles, and checks them, under one mesh key (without one: does neither)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def _mac(self, handle: common_pb2.KvTransferHandle) -> bytes:
        unsigned = common_pb2.KvTransferHandle()
        unsigned.CopyFrom(handle)
        unsigned.ClearField("signature")
        return hmac.new(
            self._key, unsigned.SerializeToString(deterministic=True), hashlib.sha256
        ).digest()

    def sign(self, handle: common_pb2.KvTransferHandle) -> None:
        if self._key:
            handle.signature = self._mac(handle)

    def check(self, handle: common_pb2.KvTransferHandle) -> None:
        """PermissionDenied unless a holder of the mesh key issued ``handle`` as it is."""
        if not self._key:
            return
        if not handle.signature:
            raise PermissionDenied(
                "the KV transfer handle is not signed; this mesh collects only handles its prefill engines issued"
            )
        if not hmac.compare_digest(handle.signature, self._mac(handle)):
            raise PermissionDenied(
                "the KV transfer handle's signature does not hold: it was changed after it was issued, "
                "or issued under another mesh key"
            )


def allowed_extra(extra: dict[str, object]) -> dict[str, object]:
    """``extra`` with only the keys vLLM may be given; an unknown key is refused."""
    unknown = sorted(set(extra) - EXTRA_KEYS)
    if unknown:
        raise InvalidRequest(
            f"the KV transfer handle carries keys the mesh does not pass on: {', '.join(unknown)}"
        )
    return extra


def issuer_mismatch(
    handle: common_pb2.KvTransferHandle, prefill_members: Iterable[common_pb2.Member]
) -> str:
    """Why ``handle`` does not name a current prefill member ("" when it does): a member
    with the handle's instance id whose NIXL side channel is the handle's host and port.

    A signature proves a key holder made the handle; this proves it points at a prefill
    engine the mesh knows now, as llm-d's allowlist of pool members does, so even a
    leaked key cannot send a decode engine to read another host's memory.
    """
    address = f"{handle.remote_host}:{handle.remote_port}"
    for member in prefill_members:
        if member.instance_id == handle.prefill_instance_id:
            if member.nixl_address == address:
                return ""
            return f"prefill member {member.instance_id} serves KV at {member.nixl_address}, not {address}"
    return f"no current prefill member is {handle.prefill_instance_id or '(unnamed)'}"
