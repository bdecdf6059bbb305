"""etcd's authentication turned on for a mesh, once, by whoever starts it.

The users and roles are :func:`services.etcd.enable_authentication`'s (each role reads the
mesh's tree and writes only its own keys). Two ways to log in, one setup:

- ``stagemesh up`` (no TLS by default): a fresh password per role, each in a 0600 file
  its stages read with ``--etcd-password-file`` (:func:`write_passwords`).
- Deployments (compose's ``etcd-auth`` job, systemd's ``stagemesh-etcd-auth.service``,
  the Helm chart's hook): every stage speaks mutual TLS to etcd, and etcd takes the
  common name of a client's certificate, its role (``stagemesh certs``), as its user
  name. No password is needed or kept: ``stagemesh etcd-auth`` throws them away.

It is idempotent, so a job that runs at every start may call it: an etcd whose
authentication is already on is left as it is.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from pathlib import Path

import grpc
from aetcd import rpc

from services.etcd import WRITES, EtcdSession, enable_authentication


def write_passwords(directory: Path) -> dict[str, Path]:
    """A fresh password per role of :data:`~services.etcd.WRITES`, each in a file of
    ``directory`` only its owner reads; the files by role."""
    files = {role: directory / f"etcd-{role}.password" for role in WRITES}
    for path in files.values():
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(secrets.token_hex(16))
    return files


async def _enable(endpoints: list[tuple[str, int]], passwords: Mapping[str, str]) -> bool:
    session = EtcdSession(endpoints)
    try:
        client = await session.client()
        try:
            status = await rpc.AuthStub(client.channel).AuthStatus(rpc.AuthStatusRequest())
        except grpc.aio.AioRpcError as error:
            # Only a root user may ask once authentication is on: a refusal says it is.
            if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                return False
            raise
        if status.enabled:
            return False
        await enable_authentication(client, passwords, secrets.token_hex(16))
        return True
    finally:
        await session.close()


def enable(endpoints: list[tuple[str, int]], passwords: Mapping[str, str] | None = None) -> bool:
    """Authentication on, with ``passwords`` by role (None: random ones nobody keeps, for
    stages that log in with their certificate); False when it already was on."""
    if passwords is None:
        passwords = {role: secrets.token_hex(16) for role in WRITES}
    return asyncio.run(_enable(endpoints, passwords))
