"""Membership in etcd: a stage keeps its Member record alive under a lease; other
stages watch the member prefix to know who is in the mesh.

Layout: ``/stagemesh/v1/members/<role>/<instance_id>`` holds a serialized
:class:`~services.pb.common_pb2.Member`, sealed in a signed record
(:mod:`services.records`), attached to a lease of a few seconds that the stage keeps
alive. Watchers ignore (log once, and count) records that a holder of the mesh key did
not write under that key and lease. A crashed stage's key vanishes when its lease expires. When etcd
loses the lease (an etcd restart with lost data, or a partition longer than the TTL),
:class:`Registration` notices on its next keep-alive and registers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import aetcd.exceptions

from services import credentials
from services.aio import cancel_and_wait
from services.etcd import ROOT, EtcdSession
from services.pb import common_pb2
from services.records import REJECTED, RecordRejected, RecordSigner, kind_of

log = logging.getLogger(__name__)

MEMBERS_PREFIX = ROOT + "members/"


def role_name(role: int) -> str:
    """``ROLE_TOKENIZER`` -> ``tokenizer``: the form used in keys, flags and logs."""
    return common_pb2.Role.Name(role).removeprefix("ROLE_").lower()


def member_key(member: common_pb2.Member) -> str:
    """The etcd key of a member's record: by role, then instance id."""
    return f"{MEMBERS_PREFIX}{role_name(member.role)}/{member.instance_id}"


def role_prefix(role: int | None = None) -> str:
    """The key prefix of one role's members, or of all members."""
    return MEMBERS_PREFIX if role is None else f"{MEMBERS_PREFIX}{role_name(role)}/"


class Registration:
    """Keeps one Member record registered in etcd for the life of a stage.

    :meth:`start` waits until the first registration succeeds (retrying while etcd is
    unreachable); a background task then refreshes the lease every ``ttl / 3`` seconds
    and re-registers whenever etcd no longer knows the lease.
    """

    def __init__(
        self,
        session: EtcdSession,
        member: common_pb2.Member,
        ttl: int,
        retry_seconds: float = 0.5,
        extra: Mapping[str, bytes] | None = None,
        signer: RecordSigner | None = None,
    ) -> None:
        self._session = session
        self._member = member
        #: Seals every value written (this process's mesh key unless given).
        self._signer = signer or credentials.current().records
        #: Other keys that live and die with the member (the KV store's shard entry).
        self._extra = dict(extra or {})
        self._ttl = ttl
        self._retry = retry_seconds
        self._lease_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()

    @property
    def key(self) -> str:
        return member_key(self._member)

    async def start(self) -> None:
        """Register, retrying until etcd answers, then keep the lease alive in the background."""
        await _retrying(self._register, self._session, self._retry, "etcd registration")
        self._task = asyncio.create_task(self._keep_alive(), name="etcd-keepalive")

    async def update(self, member: common_pb2.Member) -> None:
        """Replace the registered record (same key), e.g. when a load figure or epoch changes."""
        self._member = member
        if self._lease_id is not None:
            client = await self._session.client()
            await self._put(client, self.key, member.SerializeToString(), self._lease_id)

    async def close(self) -> None:
        """Stop keeping alive and revoke the lease, so the member disappears at once."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._lease_id is not None:
            try:
                client = await self._session.client()
                await asyncio.wait_for(client.revoke_lease(self._lease_id), timeout=2.0)
                log.info("deregistered %s", self.key)
            except Exception as exc:  # noqa: BLE001 - etcd down: the lease expires on its own
                log.warning(
                    "could not revoke lease (%s); key expires in %ss", _describe(exc), self._ttl
                )
            self._lease_id = None
        self.registered.clear()

    async def _register(self) -> None:
        client = await self._session.client()
        lease = await client.lease(self._ttl)
        await self._put(client, self.key, self._member.SerializeToString(), lease.id)
        for key, value in self._extra.items():
            await self._put(client, key, value, lease.id)
        self._lease_id = lease.id
        self.registered.set()
        log.info("registered %s (lease %x, ttl %ss)", self.key, lease.id, self._ttl)

    async def _put(self, client: aetcd.Client, key: str, payload: bytes, lease: int) -> None:
        await client.put(key.encode(), self._signer.seal(key, payload, lease), lease=lease)

    async def _keep_alive(self) -> None:
        """Refresh the lease every ttl/3; register again only when etcd lost it.

        A slow answer is not a broken connection: on a busy host (engines saturating
        every core) a keep-alive can take seconds. It gets the whole TTL to answer and
        the channel is kept; only connection errors replace it. If the lease did run
        out meanwhile, the next answer says so (TTL 0) and the stage registers again.
        """
        interval = max(self._ttl / 3, 0.2)
        slow = 0
        while True:
            await asyncio.sleep(interval)
            try:
                client = await self._session.client()
                reply = None
                if self._lease_id is not None:
                    reply = await asyncio.wait_for(
                        client.refresh_lease(self._lease_id), timeout=max(self._ttl, 1)
                    )
                if reply is None or reply.TTL <= 0:
                    # etcd forgot the lease (restart without data, or it expired while
                    # we could not reach etcd): the key is gone too. Register anew.
                    log.warning("lease %s lost; registering again", self._lease_id)
                    self.registered.clear()
                    await self._register()
                elif not self.registered.is_set():
                    log.info("etcd keep-alive recovered; lease %x still valid", self._lease_id)
                    self.registered.set()
                slow = 0
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aetcd.exceptions.ConnectionTimeoutError):
                if slow % 10 == 0:
                    log.warning("etcd did not answer a keep-alive within %ss; retrying", self._ttl)
                slow += 1
            except Exception as exc:  # noqa: BLE001 - any failure means reconnect, and keep trying
                if self.registered.is_set():
                    log.warning("etcd keep-alive failed (%s); reconnecting", _describe(exc))
                self.registered.clear()
                await self._session.reset()


M = TypeVar("M")


class MemberWatcher(Generic[M]):
    """A live mirror of the records under a prefix, kept current by an etcd watch.

    It lists the prefix, then watches from the next revision. On any error (etcd
    restarted, endpoint died, revision compacted) it reconnects and lists again, so
    the mirror converges to etcd's state whatever happened in between. ``on_change`` is
    called with (key, record-or-None) for every addition, update and removal. Records
    are Member messages unless ``parse`` reads another kind (the KV store's shard map).
    A value that is not a record a holder of the mesh key sealed under its key and
    lease (:mod:`services.records`) counts as absent: it is logged once per key and
    counted in ``stagemesh_etcd_records_rejected_total``.
    """

    def __init__(
        self,
        session: EtcdSession,
        prefix: str = MEMBERS_PREFIX,
        on_change: Callable[[str, M | None], None] | None = None,
        retry_seconds: float = 0.5,
        parse: Callable[[bytes], M] = common_pb2.Member.FromString,
        signer: RecordSigner | None = None,
    ) -> None:
        self._session = session
        self._prefix = prefix
        self._on_change = on_change
        self._retry = retry_seconds
        self._reader = RecordReader(parse, signer)
        self.members: dict[str, M] = {}
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch {self._prefix}")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def wait_for(self, predicate: Callable[[dict[str, M]], bool], timeout: float) -> None:
        """Wait until ``predicate(members)`` holds; raises TimeoutError after ``timeout``."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.members)), timeout)

    async def _run(self) -> None:
        # _sync_and_watch only ever ends by raising, so this retries for the watcher's life.
        await _retrying(
            self._sync_and_watch, self._session, self._retry, f"watch of {self._prefix}"
        )

    async def _sync_and_watch(self) -> None:
        client = await self._session.client()
        listing = await client.get_prefix(self._prefix.encode())
        current = self._reader.read_all(listing)
        for key in set(self.members) - set(current):
            await self._apply(key, None)
        for key, member in current.items():
            if self.members.get(key) != member:
                await self._apply(key, member)
        watch = await client.watch_prefix(
            self._prefix.encode(), start_revision=listing.header.revision + 1
        )
        try:
            async for event in watch:
                key = event.kv.key.decode(errors="replace")
                if event.kind == "PUT":
                    await self._apply(key, self._reader.read(key, event.kv.value, event.kv.lease))
                else:
                    self._reader.forget(key)
                    await self._apply(key, None)
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()
        raise ConnectionError("watch stream ended")

    async def _apply(self, key: str, member: M | None) -> None:
        async with self._changed:
            if member is None:
                if self.members.pop(key, None) is None:
                    return
            else:
                self.members[key] = member
            self._changed.notify_all()
        if self._on_change is not None:
            self._on_change(key, member)


class RecordReader(Generic[M]):
    """Opens the sealed records found in etcd, and keeps account of those it refuses.

    A refused key is logged once (again only if the reason changes) and every refused
    value is counted, so a process writing bad records cannot flood the log. The set of
    logged keys is bounded: past :data:`LOGGED_KEYS_MAX` keys, refusals are only counted.
    """

    LOGGED_KEYS_MAX = 4096

    def __init__(self, parse: Callable[[bytes], M], signer: RecordSigner | None = None) -> None:
        self._parse = parse
        self._signer = signer
        self._refused: dict[str, str] = {}

    def read(self, key: str, value: bytes, lease: int) -> M | None:
        """The record under ``key``, or None (as if absent) when it must be ignored: one
        bad value, written by hand, by another version or by an outsider, must neither
        count nor freeze the view."""
        signer = (
            self._signer or credentials.current().records
        )  # the process's identity, as installed
        try:
            payload = signer.open(key, value, lease)
            try:
                record = self._parse(payload)
            except Exception as exc:  # noqa: BLE001 - any parser's failure means "not a record"
                raise RecordRejected(
                    "malformed", f"its payload does not parse ({type(exc).__name__})"
                ) from None
        except RecordRejected as rejected:
            REJECTED.labels(kind_of(key), rejected.reason).inc()
            if (
                self._refused.get(key) != rejected.reason
                and len(self._refused) < self.LOGGED_KEYS_MAX
            ):
                self._refused[key] = rejected.reason
                log.warning("ignoring the etcd record %s: %s", key, rejected)
            return None
        self._refused.pop(key, None)
        return record

    def read_all(self, listing: Iterable[Any]) -> dict[str, M]:
        """The records of an etcd listing that are accepted, by key."""
        found: dict[str, M] = {}
        for kv in listing:
            key = kv.key.decode(errors="replace")
            record = self.read(key, kv.value, kv.lease)
            if record is not None:
                found[key] = record
        return found

    @property
    def refused(self) -> Mapping[str, str]:
        """The keys refused now (up to :data:`LOGGED_KEYS_MAX`), with the reason."""
        return dict(self._refused)

    def forget(self, key: str) -> None:
        """``key`` was deleted: log its next refusal again."""
        self._refused.pop(key, None)


async def _retrying(
    action: Callable[[], Awaitable[None]], session: EtcdSession, pause: float, what: str
) -> None:
    """Run ``action`` until it returns, on a fresh etcd connection after each failure.

    The failure is logged once, then about every 20 attempts: waiting for etcd is
    normal while it starts or restarts, and should not flood the log.
    """
    failures = 0
    while True:
        try:
            await action()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a retry loop: every failure is logged and retried
            if failures % 20 == 0:
                log.warning("%s failed (%s); retrying", what, _describe(exc))
            failures += 1
            await session.reset()
            await asyncio.sleep(pause)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
