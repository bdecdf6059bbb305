"""API keys: who may call the mesh's public APIs, and what each key may do.

The router's HTTP bridge and its gRPC API take the same keys. Clients send
``Authorization: Bearer KEY``: as an HTTP header, or as gRPC metadata
(``authorization``), which is what OpenAI's SDKs and grpcurl's ``-H`` send. A call
without a key or with a wrong one is :class:`~services.errors.Unauthenticated` (401 with
OpenAI's body, or ``UNAUTHENTICATED``), decided before the request is read or anything
is allocated.

Keys have scopes. ``inference`` (generation, models, tokenize, the Responses API) is what
every key has; ``admin`` adds what changes the mesh for everyone (loading and unloading
adapters). Keys come from:

- ``--api-key`` (comma-separated; env ``STAGEMESH_API_KEY``): inference keys;
- ``--admin-key`` (comma-separated; env ``STAGEMESH_ADMIN_KEY``): admin keys;
- ``--api-key-file``: one key per line, ``#`` comments; a line ``KEY admin`` is an
  admin key.

A mesh with no keys at all is open, admin included; the router then refuses to bind
anything but loopback unless told ``--allow-open`` (:func:`open_api_refusal`). A key
setting that is given but holds no key (``--api-key " "``, a key file that is empty or
all comments) ends the stage at start: it means a mistake, never "no authentication".

Keys are compared in constant time. Only a key's id (:func:`key_id`, an HMAC of the key
under the mesh's secret, so ids cannot be checked against guessed keys offline) is ever
logged, audited or sent to the guard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from services import credentials
from services.errors import PermissionDenied, Unauthenticated

#: The metadata key (lower case, as gRPC requires) and HTTP header clients send.
AUTHORIZATION = "authorization"
_SCHEME = "bearer "
#: The scopes a key line may name.
SCOPES = ("inference", "admin")
#: What key ids and tenant salts are HMACs under when the mesh has no key: random per
#: process, so ids still cannot be matched against guessed keys.
_PROCESS_SECRET = os.urandom(32)


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a call came from: its key's id (empty on an open API) and whether it may administer."""

    key_id: str = ""
    admin: bool = True

    def require_admin(self, what: str) -> None:
        """Raise :class:`PermissionDenied` unless this caller's key has the admin scope."""
        if not self.admin:
            raise PermissionDenied(
                f"{what} needs an admin key (--admin-key, or 'KEY admin' in --api-key-file)"
            )


def _secret() -> bytes:
    return credentials.current().mesh_key or _PROCESS_SECRET


def key_id(authorization: str | None) -> str:
    """A short, non-reversible name for the key a caller sent (for logs, audit, ownership)."""
    if not authorization or not authorization.lower().startswith(_SCHEME):
        return ""
    key = authorization[len(_SCHEME) :].strip().encode()
    return hmac.new(_secret(), b"stagemesh/v1/key-id:" + key, hashlib.sha256).hexdigest()[:16]


def tenant_salt(caller_id: str) -> str:
    """The prefix-cache salt of a key's tenant: derived from its id under the mesh's
    secret, so it is the same on every router of the mesh and reveals neither."""
    return hmac.new(
        _secret(), b"stagemesh/v1/cache-salt:" + caller_id.encode(), hashlib.sha256
    ).hexdigest()[:32]


def _key_line(line: str, where: str) -> tuple[str, bool]:
    """A key file line: ``KEY`` or ``KEY SCOPE...``; the key and whether it is admin."""
    key, *scopes = line.split()
    if unknown := [s for s in scopes if s not in SCOPES]:
        raise SystemExit(f"{where}: unknown scope {unknown[0]!r} (scopes: {', '.join(SCOPES)})")
    return key, "admin" in scopes


class ApiKeys:
    """The keys a public API accepts, with their scopes; empty means the API is open."""

    def __init__(self, keys: Iterable[str], admin_keys: Iterable[str] = ()) -> None:
        admin = {k.strip().encode() for k in admin_keys if k.strip()}
        plain = [k.strip().encode() for k in keys if k.strip()]
        #: Every key (admin keys have inference too) and whether it is admin.
        self._keys = {key: key in admin for key in [*plain, *admin]}

    @classmethod
    def from_settings(cls, keys: str, key_file: str, admin_keys: str = "") -> ApiKeys:
        """Keys from ``--api-key``, ``--admin-key`` (comma-separated) and ``--api-key-file``.
        A setting that is given but holds no key, or a key file that cannot be read,
        ends the stage with one line."""
        found = [k for k in keys.split(",") if k.strip()]
        admins = [k for k in admin_keys.split(",") if k.strip()]
        for flag, raw, parsed in (("--api-key", keys, found), ("--admin-key", admin_keys, admins)):
            if raw and not parsed:
                raise SystemExit(
                    f"{flag} is set but holds no key (blank); give a key, or leave it unset"
                )
        if key_file:
            try:
                text = Path(key_file).read_text()
            except OSError as exc:
                raise SystemExit(
                    f"--api-key-file: cannot read {key_file}: {exc.strerror}"
                ) from None
            lines = [
                line
                for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            ]
            if not lines:
                raise SystemExit(
                    f"--api-key-file {key_file} holds no key (empty, or only comments)"
                )
            for number, line in enumerate(lines, 1):
                key, admin = _key_line(line, f"--api-key-file {key_file}, key {number}")
                (admins if admin else found).append(key)
        return cls(found, admins)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> Caller:
        """The caller an ``Authorization`` value names, when it carries one of the keys;
        raise :class:`Unauthenticated` otherwise. Every key is compared, in constant time."""
        if not self._keys:
            return Caller()  # an open API has one tenant, its operator
        if not authorization or not authorization.lower().startswith(_SCHEME):
            raise Unauthenticated("no API key: send the header 'Authorization: Bearer <key>'")
        presented = authorization[len(_SCHEME) :].strip().encode()
        matched, admin = False, False
        for key, is_admin in self._keys.items():
            same = hmac.compare_digest(key, presented)
            matched |= same
            admin |= same and is_admin
        if not matched:
            raise Unauthenticated("the API key is not valid")
        return Caller(key_id(authorization), admin)

    def check_metadata(self, metadata: Mapping[str, str]) -> None:
        """:meth:`check` for a gRPC call's metadata (see
        :class:`services.credentials.CallGuard`)."""
        self.check(metadata.get(AUTHORIZATION))

    @staticmethod
    def key_id(authorization: str | None) -> str:
        """:func:`key_id`, where a caller holds the class."""
        return key_id(authorization)


def is_loopback(host: str) -> bool:
    """Whether a bind address serves this host only (``localhost`` counts)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_api_refusal(keys: ApiKeys, hosts: Iterable[str], allow_open: bool) -> str:
    """Why a public API must not start (empty: it may): no key, a bind address other
    hosts reach, and no ``--allow-open``."""
    if keys or allow_open:
        return ""
    wide = [host or "0.0.0.0" for host in hosts if not is_loopback(host or "0.0.0.0")]
    if not wide:
        return ""
    return (
        f"refusing to serve an API without keys on {wide[0]}: set --api-key or --api-key-file, "
        "bind --host 127.0.0.1, or pass --allow-open (STAGEMESH_ALLOW_OPEN=true) to serve it "
        "open on purpose"
    )
