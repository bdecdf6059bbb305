"""KV transfer handles: vLLM's kv_transfer_params as the mesh's typed handle and back, and
the mesh's own handles only: signing and checking.

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
The codec (:func:`handle_from_params`, :func:`params_from_handle`) sits here rather than
in either engine role: a prefill engine issues handles, a decode engine reads them, and
both must agree on the one encoding.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

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
                "the KV transfer handle is not signed; this mesh collects only handles its "
                "prefill engines issued"
            )
        if not hmac.compare_digest(handle.signature, self._mac(handle)):
            raise PermissionDenied(
                "the KV transfer handle's signature does not hold: it was changed after it "
                "was issued, or issued under another mesh key"
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
            return (
                f"prefill member {member.instance_id} serves KV at {member.nixl_address}, "
                f"not {address}"
            )
    return f"no current prefill member is {handle.prefill_instance_id or '(unnamed)'}"


#: kv_transfer_params keys with a typed home in KvTransferHandle; others travel in extra_json.
_TYPED_KEYS = {
    "remote_engine_id",
    "remote_block_ids",
    "remote_host",
    "remote_port",
    "remote_request_id",
    "tp_size",
    "do_remote_prefill",
    "do_remote_decode",
}


def handle_from_params(
    params: dict[str, Any], num_tokens: int, instance_id: str, expires_at: float
) -> common_pb2.KvTransferHandle:
    """vLLM's kv_transfer_params from a prefill, as the mesh's typed handle.

    vLLM lists block ids per KV-cache group. With one group (every model without
    hybrid attention) they become the typed ``remote_block_ids``; several groups
    travel whole in ``extra_json``, which :func:`params_from_handle` prefers.
    """
    groups = params.get("remote_block_ids") or []
    if groups and not isinstance(groups[0], list):
        groups = [groups]  # older vLLM: one flat list
    # Keys outside the allowlist are not issued: a decode engine would refuse them.
    extra = {k: v for k, v in params.items() if k not in _TYPED_KEYS and k in EXTRA_KEYS}
    if len(groups) > 1:
        extra["remote_block_ids"] = groups
    block_ids = groups[0] if len(groups) == 1 else []
    return common_pb2.KvTransferHandle(
        remote_engine_id=str(params.get("remote_engine_id", "")),
        remote_block_ids=[int(b) for b in block_ids],
        remote_host=str(params.get("remote_host", "")),
        remote_port=int(params.get("remote_port") or 0),
        remote_request_id=str(params.get("remote_request_id", "")),
        num_tokens=num_tokens,
        tp_size=int(params.get("tp_size") or 1),
        prefill_instance_id=instance_id,
        expires_at=expires_at,
        extra_json=json.dumps(extra, separators=(",", ":")),
    )


def params_from_handle(handle: common_pb2.KvTransferHandle) -> dict[str, Any]:
    """The kv_transfer_params a decode request needs to pull the handle's KV."""
    if not handle.remote_engine_id or not handle.remote_host or not handle.remote_port:
        raise InvalidRequest("the KV transfer handle lacks the prefill engine's id or address")
    try:
        params: dict[str, Any] = (
            allowed_extra(json.loads(handle.extra_json)) if handle.extra_json else {}
        )
    except (json.JSONDecodeError, AttributeError, TypeError):
        raise InvalidRequest("the KV transfer handle's extra_json is not a JSON object") from None
    params.setdefault("remote_block_ids", [list(handle.remote_block_ids)])
    params.update(
        do_remote_prefill=True,
        do_remote_decode=False,
        remote_engine_id=handle.remote_engine_id,
        remote_host=handle.remote_host,
        remote_port=handle.remote_port,
        remote_request_id=handle.remote_request_id,
        tp_size=handle.tp_size or 1,
    )
    return params
