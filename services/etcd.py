"""The mesh's etcd client: a session that fails over between endpoints, and etcd's own
authentication for the mesh (:func:`enable_authentication`).

The embedded server for development lives in :mod:`services.operator.etcd_server`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import aetcd
import grpc
from aetcd import rpc, watcher

from services import credentials
from services.credentials import Tls

log = logging.getLogger(__name__)

#: The tree every stagemesh key lives under.
ROOT = "/stagemesh/v1/"
#: What each etcd user may write under it once authentication is on (every user reads
#: the whole tree). ``client`` is the operator's tools: read only.
WRITES: Mapping[str, tuple[str, ...]] = {
    "tokenizer": ("members/tokenizer/",),
    "prefill": ("members/prefill/",),
    "decode": ("members/decode/",),
    "kvstore": ("members/kvstore/", "kvstore/shards/"),
    "router": ("members/router/", "adapters/"),
    "client": (),
}


class _TlsClient(aetcd.Client):
    """aetcd over TLS with a client certificate.

    aetcd 1.0 dials plaintext only (its TLS pull request, martyanov/aetcd#18, is still
    open), so this takes its connect's steps over a secure channel. etcd is checked by
    the host name it is dialled at: its address is configuration, known when its
    certificate is made.
    """

    def __init__(
        self, tls: Tls, host: str, port: int, timeout: float, user: str | None, password: str | None
    ) -> None:
        super().__init__(host=host, port=port, username=user, password=password, timeout=timeout)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}",
            self._tls.channel_credentials(),
            options=list(self._options.items()),
        )
        if self._username is not None and self._password is not None:  # as aetcd's own connect does
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            reply = await rpc.AuthStub(self.channel).Authenticate(request, timeout=self._timeout)
            self.metadata = (("token", reply.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class EtcdSession:
    """An aetcd client bound to one of several endpoints, replaced on failure.

    aetcd talks to one host; this class adds what a stage needs on top: TLS with the
    process's certificate when it has one, its etcd user when etcd has authentication on,
    try the endpoints in turn, and :meth:`reset` after an error so the next call starts a
    fresh channel on the next endpoint (an etcd member that restarted or died), and
    authenticates again.
    """

    def __init__(self, endpoints: list[tuple[str, int]], timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self._endpoints = endpoints
        self._timeout = timeout
        self._next = 0
        self._client: aetcd.Client | None = None
        self._lock = asyncio.Lock()
        #: Clients dropped by reset(), each with the task that will close it.
        self._dropped: dict[aetcd.Client, asyncio.Task[None]] = {}

    async def client(self) -> aetcd.Client:
        """The connected client, connecting to the next endpoint when there is none."""
        async with self._lock:
            if self._client is None:
                host, port = self._endpoints[self._next % len(self._endpoints)]
                self._next += 1
                creds = credentials.current()
                user, password = (
                    (creds.etcd_user, creds.etcd_password) if creds.etcd_user else (None, None)
                )
                client = (
                    aetcd.Client(
                        host=host,
                        port=port,
                        username=user,
                        password=password,
                        timeout=self._timeout,
                    )
                    if creds.tls is None
                    else _TlsClient(creds.tls, host, port, self._timeout, user, password)
                )
                await client.connect()
                self._client = client
            return self._client

    async def reset(self) -> None:
        """Drop the current client after an error; the next :meth:`client` reconnects.

        The dropped client is closed only after the session's call timeout: several
        users share a session (a watcher, a keep-alive, one-off reads), and closing a
        channel at once would cancel the others' calls in flight on it, which then
        surface as a bare CancelledError. By the time it closes, those calls have
        finished or timed out on their own.
        """
        async with self._lock:
            client, self._client = self._client, None
        if client is not None:
            self._dropped[client] = asyncio.create_task(self._close(client, self._timeout))

    async def _close(self, client: aetcd.Client, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        self._dropped.pop(client, None)
        try:
            await client.close()
        except Exception:  # closing a broken channel can fail in many ways
            log.debug("closing etcd client failed", exc_info=True)

    async def close(self) -> None:
        """Close the client and every dropped one still waiting to close, now."""
        async with self._lock:
            client, self._client = self._client, None
        for dropped, task in list(self._dropped.items()):
            task.cancel()
            await self._close(dropped)
        if client is not None:
            await self._close(client)


def _prefix(key: str, kind: int) -> rpc.Permission:
    end = key[:-1] + chr(ord(key[-1]) + 1)  # etcd's range end of a prefix
    return rpc.Permission(permType=kind, key=key.encode(), range_end=end.encode())


async def enable_authentication(
    client: aetcd.Client, passwords: Mapping[str, str], root_password: str
) -> None:
    """Turn etcd's own authentication on, with a user and a role for each role of
    ``passwords`` that reads the mesh's tree and writes only its :data:`WRITES`, and a
    root user. Then a process without a password can neither register, nor delete a
    member, nor write a wanted adapter; and a tokenizer cannot write a decode member's
    key. Through etcd's gRPC API, so no password is ever on a command line."""
    auth = rpc.AuthStub(client.channel)
    await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=root_password))
    await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
    for role, password in passwords.items():
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role))
        grants = [
            _prefix(ROOT, rpc.Permission.READ),
            *(_prefix(ROOT + path, rpc.Permission.READWRITE) for path in WRITES[role]),
        ]
        for grant in grants:
            await auth.RoleGrantPermission(
                rpc.AuthRoleGrantPermissionRequest(name=role, perm=grant)
            )
        await auth.UserAdd(rpc.AuthUserAddRequest(name=role, password=password))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=role, role=role))
    await auth.AuthEnable(rpc.AuthEnableRequest())
