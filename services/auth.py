"""API keys: who may call the mesh's public APIs.

The router's HTTP bridge and its gRPC API take the same keys (``--api-key``, several
comma-separated, or ``--api-key-file`` with one per line; env ``STAGEMESH_API_KEY``).
Clients send ``Authorization: Bearer KEY``: as an HTTP header, or as gRPC metadata
(``authorization``), which is what OpenAI's SDKs and grpcurl's ``-H`` send. Without
keys configured every call is served, as before; with them, a call without a key or
with a wrong one is :class:`~services.errors.Unauthenticated` (401 with OpenAI's body,
or ``UNAUTHENTICATED``), decided before the request is read or anything is allocated.

Keys are compared in constant time, and only a digest-based id of a key (:meth:`ApiKeys.key_id`)
is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

from services.errors import Unauthenticated

#: The metadata key (lower case, as gRPC requires) and HTTP header clients send.
AUTHORIZATION = "authorization"
_SCHEME = "bearer "


class ApiKeys:
    """The keys a public API accepts; empty means the API is open."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in dict.fromkeys(k.strip() for k in keys) if k]

    @classmethod
    def from_settings(cls, keys: str, key_file: str) -> ApiKeys:
        """Keys from ``--api-key`` (comma-separated) and ``--api-key-file`` (one per line,
        ``#`` comments); a key file that cannot be read ends the stage with a message."""
        found = keys.split(",")
        if key_file:
            try:
                lines = Path(key_file).read_text().splitlines()
            except OSError as exc:
                raise SystemExit(f"--api-key-file: cannot read {key_file}: {exc.strerror}") from None
            found += [line for line in lines if not line.lstrip().startswith("#")]
        return cls(found)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Accept an ``Authorization`` value that carries one of the keys; raise
        :class:`Unauthenticated` otherwise. Every key is compared, in constant time."""
        if not self._keys:
            return
        if not authorization or not authorization.lower().startswith(_SCHEME):
            raise Unauthenticated("no API key: send the header 'Authorization: Bearer <key>'")
        presented = authorization[len(_SCHEME):].strip().encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(key, presented)
        if not matched:
            raise Unauthenticated("the API key is not valid")

    def check_metadata(self, metadata: Mapping[str, str]) -> None:
        """:meth:`check` for a gRPC call's metadata (see :class:`services.credentials.CallGuard`)."""
        self.check(metadata.get(AUTHORIZATION))

    @staticmethod
    def key_id(authorization: str | None) -> str:
        """A short, non-reversible name for the key a caller sent (for logs and audit)."""
        if not authorization:
            return ""
        return hashlib.sha256(authorization[len(_SCHEME):].strip().encode()).hexdigest()[:12]
