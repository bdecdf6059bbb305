"""The mesh's etcd client: a session that fails over between endpoints.

The embedded server for development lives in :mod:`services.etcd_server`.
"""

from __future__ import annotations

import asyncio
import logging

import aetcd
import grpc
from aetcd import rpc, watcher

from services import credentials
from services.credentials import Tls

log = logging.getLogger(__name__)


class _TlsClient(aetcd.Client):
    """aetcd over TLS with a client certificate.

    aetcd 1.0 dials plaintext only (its TLS pull request, martyanov/aetcd#18, is still
    open), so this takes its connect's steps over a secure channel. etcd is checked by
    the host name it is dialled at: its address is configuration, known when its
    certificate is made.
    """

    def __init__(self, tls: Tls, host: str, port: int, timeout: float) -> None:
        super().__init__(host=host, port=port, timeout=timeout)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}", self._tls.channel_credentials(), options=list(self._options.items())
        )
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


class EtcdSession:
    """An aetcd client bound to one of several endpoints, replaced on failure.

    aetcd talks to one host; this class adds what a stage needs on top: TLS with the
    process's certificate when it has one, try the endpoints in turn, and :meth:`reset` after an error so the next call starts a
    fresh channel on the next endpoint (an etcd member that restarted or died).
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
                tls = credentials.current().tls
                client = (
                    aetcd.Client(host=host, port=port, timeout=self._timeout) if tls is None
                    else _TlsClient(tls, host, port, self._timeout)
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
