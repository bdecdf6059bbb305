"""Records in etcd that prove their writer holds the mesh key.

etcd is the mesh's directory: a member record tells every router and engine where a
stage is, and they then call it with the stage token. Anyone who can write to etcd
(on a local mesh, any local process) could otherwise register an address of their
own and collect the token, prompts and traffic within a second. So every record a
stage writes under ``/stagemesh/v1/`` is a :class:`~services.pb.common_pb2.SignedRecord`:
the record's bytes, the etcd key and lease they were written under, and an
HMAC-SHA256 over all of it. Readers accept a record only when the MAC holds and it
sits under the key and on the lease it names, so a genuine record copied under another
key, or re-attached to another lease, is refused as a replay.

The MAC key is derived from the mesh key under a label of its own, so neither the stage
token (which travels with every internal call) nor a KV handle's MAC can sign a record.
An HMAC, as for KV handles (:mod:`services.kv.handles`): every stage both writes and
reads records, so the key is kept only from outsiders. What it does not protect: a
holder of the mesh key is trusted, and a writer to etcd can still delete records (and
put back a record the mesh once wrote under the same key and lease; see
docs/design.md).

Without a mesh key (a development mesh) records are written unsigned and every record
is accepted, as before signing existed.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time

from prometheus_client import Counter

from services.pb import common_pb2

#: What the record-signing key is an HMAC of, under the mesh key.
_RECORD_KEY_LABEL = b"stagemesh/v1/etcd-record-key"
#: Leads the MAC's input, so the MAC of a record can be no other message's MAC.
_DOMAIN = b"stagemesh/v1/etcd-record\x00"

REJECTED = Counter(
    "stagemesh_etcd_records_rejected_total",
    "etcd records this process ignored: not written by a holder of the mesh key "
    "(unsigned, bad_signature), a signed record replayed under another key or lease "
    "(replayed), or not a record at all (malformed). kind: members, adapters, kvstore.",
    ["kind", "reason"],
)


class RecordRejected(Exception):
    """A record this process must ignore; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class RecordSigner:
    """Seals records under one mesh key, and opens them (without a key: signs nothing,
    accepts everything)."""

    def __init__(self, mesh_key: bytes) -> None:
        self._key = (
            hmac.new(mesh_key, _RECORD_KEY_LABEL, hashlib.sha256).digest() if mesh_key else b""
        )

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def _mac(self, record: common_pb2.SignedRecord) -> bytes:
        key = record.key.encode()
        message = b"".join(
            (
                _DOMAIN,
                struct.pack(">I", len(key)),
                key,
                struct.pack(">qq", record.lease, record.signed_at_ms),
                record.payload,
            )
        )
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def seal(self, key: str, payload: bytes, lease: int = 0) -> bytes:
        """The value to write under etcd ``key`` (with ``lease``, 0 for none)."""
        record = common_pb2.SignedRecord(
            payload=payload, key=key, lease=lease, signed_at_ms=int(time.time() * 1000)
        )
        if self._key:
            record.signature = self._mac(record)
        return record.SerializeToString()

    def open(self, key: str, value: bytes, lease: int) -> bytes:
        """The payload of the value found under ``key`` on ``lease``; RecordRejected
        unless a holder of this mesh key wrote it there."""
        try:
            record = common_pb2.SignedRecord.FromString(value)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: not a record
            raise RecordRejected(
                "malformed", f"not a stagemesh record ({type(exc).__name__})"
            ) from None
        if not self._key:
            return record.payload
        if not record.signature:
            raise RecordRejected(
                "unsigned", "unsigned: its writer did not prove it holds the mesh key"
            )
        if not hmac.compare_digest(record.signature, self._mac(record)):
            raise RecordRejected(
                "bad_signature", "its signature does not hold (another mesh key, or altered)"
            )
        if record.key != key or record.lease != lease:
            raise RecordRejected(
                "replayed",
                f"signed for key {record.key!r} on lease {record.lease:x}, found under {key!r} on "
                f"lease {lease:x}",
            )
        return record.payload


def kind_of(key: str) -> str:
    """The metric label of a record's key: the first name after ``/stagemesh/v1/``."""
    parts = key.split("/")
    return parts[3] if len(parts) > 3 and parts[3] else "other"
