"""The disk tier's files: one file per block, laid out so that a crash never leaves a
half-written block that could be served, and moved to and from the pool by NIXL.

Layout of ``--disk-dir``::

    lock                          flock()ed by the store using the directory (its pid inside)
    store-id                      the store's place on the shard ring, kept across restarts
    <layout digest>/layout        the KV layout's name (model:dtype:device:block size)
    <layout digest>/<name>.blk    a block: a 4 KiB header, then its bytes
    <layout digest>/<name>.tmp    a block being written: never served, removed at start

A block is written to ``.tmp`` (space claimed with ``posix_fallocate`` first, so a full
disk is an error before any byte moves), ``fsync``ed, then renamed to ``.blk``: a crash
leaves either the whole block or a ``.tmp``. The header carries the CRC-32 of the
payload, checked after every read, so a block damaged on disk is dropped, never served.
The directory itself names a block, so a restart rebuilds the index from file names and
sizes alone, without reading any block.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import struct
import time
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.kv.hashing import from_wire, to_wire
from services.kv.nixl import TransferError, transfer

log = logging.getLogger(__name__)

Key = tuple[str, int]

HEADER_BYTES = 4096  # keeps the payload page-aligned in the file
MAGIC = b"SMKVBLK1"
#: magic, payload bytes, chain name (16 bytes), CRC-32 of the payload.
_HEADER = struct.Struct("<8sQ16sI")
#: Less free space than this (beside the store's own blocks) is a full disk at start.
MIN_FREE_BYTES = 16 << 20
#: Longest a batch of block moves may take before it counts as failed.
MOVE_TIMEOUT = 60.0


class DiskSetupError(Exception):
    """The disk directory cannot be used (missing, read-only, full, or taken)."""


@dataclasses.dataclass(frozen=True)
class BlockFile:
    """A complete block found on disk."""

    key: Key
    file_bytes: int
    mtime: float


@dataclasses.dataclass
class MoveStats:
    """Bytes moved each way and the seconds it took (the disk's measured speed)."""

    read_bytes: int = 0
    read_seconds: float = 0.0
    write_bytes: int = 0
    write_seconds: float = 0.0


class BlockDirectory:
    """``--disk-dir``: checked, locked, and named block by block."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DiskSetupError(
                f"--disk-dir {root} does not exist or is not a directory: create it first "
                "(the store never creates it, so a typo cannot fill another disk)"
            )
        try:
            self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DiskSetupError(f"--disk-dir {root} is not writable: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            raise DiskSetupError(
                f"--disk-dir {root} is used by another KV store (pid {holder or '?'}): "
                "give each store a directory of its own"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self.store_id = self._store_id()
        self._layouts: dict[str, Path] = {}

    def _store_id(self) -> str:
        path = self.root / "store-id"
        if not path.exists():
            _write_atomically(path, f"kvstore-{uuid.uuid4().hex[:12]}\n".encode())
        return path.read_text().strip()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def folder(self, layout: str) -> Path:
        """The layout's folder (made on first use)."""
        folder = self._layouts.get(layout)
        if folder is None:
            folder = self.root / hashlib.sha256(layout.encode()).hexdigest()[:16]
            if not (folder / "layout").exists():
                folder.mkdir(exist_ok=True)
                _write_atomically(folder / "layout", layout.encode())
            self._layouts[layout] = folder
        return folder

    def path(self, key: Key, suffix: str = ".blk") -> Path:
        return self.folder(key[0]) / f"{to_wire(key[1]).hex()}{suffix}"

    def scan(self) -> list[BlockFile]:
        """Every complete block, least recently written first; half-written ones are removed."""
        found: list[BlockFile] = []
        for folder in self.root.iterdir():
            if not (folder / "layout").is_file():
                continue
            layout = (folder / "layout").read_text()
            self._layouts[layout] = folder
            for entry in os.scandir(folder):
                name, _, suffix = entry.name.partition(".")
                if suffix == "tmp":
                    os.unlink(entry.path)
                    continue
                if suffix != "blk":
                    continue
                stat = entry.stat()
                try:
                    chain_hash = from_wire(bytes.fromhex(name))
                except ValueError:
                    continue
                found.append(BlockFile((layout, chain_hash), stat.st_size, stat.st_mtime))
        found.sort(key=lambda block: block.mtime)
        return found

    def remove(self, key: Key) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        os.close(self._lock_fd)


class FileMover:
    """Moves blocks between the pool's slots and their files with NIXL's POSIX backend.

    An agent of its own (POSIX only) registers the same pool memory the store's UCX
    agent serves, and moves whole batches in one transfer. Every call runs on the disk
    tier's one I/O thread.
    """

    def __init__(self, api: Any, name: str, pool: np.ndarray, directory: BlockDirectory) -> None:
        self._agent = api.nixl_agent(name, api.nixl_agent_config(backends=["POSIX"]))
        self._name = name
        self._pool = pool
        self._base = int(pool.ctypes.data)
        self._registration = self._agent.register_memory(
            [(self._base, pool.nbytes, 0, "pool")], "DRAM"
        )
        self.directory = directory
        self.stats = MoveStats()

    def _slot(self, slot: int, slot_bytes: int) -> memoryview:
        return self._pool[slot * slot_bytes : (slot + 1) * slot_bytes].data

    def write(self, items: Sequence[tuple[Key, int]], slot_bytes: int) -> tuple[list[Key], bool]:
        """Write ``(key, slot)`` blocks to their files. Returns the keys written and
        whether the disk was full (the blocks from the first that found no room on)."""
        started = time.perf_counter()
        opened: list[tuple[Key, int]] = []
        written: set[Key] = set()
        full = False
        try:
            for key, slot in items:
                fd = self._create(key, slot, slot_bytes)
                if fd is None:
                    full = True
                    break
                opened.append((key, fd))
            slots = [slot for _, slot in items[: len(opened)]]
            written = self._move("WRITE", opened, slots, slot_bytes)
            for _, fd in opened:
                os.fsync(fd)
            for key, _ in opened:
                if key in written:
                    os.rename(self.directory.path(key, ".tmp"), self.directory.path(key))
            _fsync_dirs({self.directory.folder(key[0]) for key in written})
        finally:
            for key, fd in opened:
                os.close(fd)
                if key not in written:
                    _unlink(self.directory.path(key, ".tmp"))
        self.stats.write_bytes += len(written) * slot_bytes
        self.stats.write_seconds += time.perf_counter() - started
        return [key for key, _ in opened if key in written], full

    def _create(self, key: Key, slot: int, slot_bytes: int) -> int | None:
        """Open a block's temporary file with its space claimed and its header written;
        None when the disk has no room for it."""
        tmp = self.directory.path(key, ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, HEADER_BYTES + slot_bytes)
        except OSError as exc:
            os.close(fd)
            _unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return None
            raise
        checksum = zlib.crc32(self._slot(slot, slot_bytes))
        os.pwrite(fd, _HEADER.pack(MAGIC, slot_bytes, to_wire(key[1]), checksum), 0)
        return fd

    def read(
        self, items: Sequence[tuple[Key, int]], slot_bytes: int
    ) -> tuple[list[Key], list[Key], list[Key]]:
        """Read ``(key, slot)`` blocks into their slots, checking each one's checksum.
        Returns the keys read whole, those damaged, and those whose file is gone."""
        started = time.perf_counter()
        opened: list[tuple[Key, int]] = []
        slots: list[int] = []
        checksums: list[int] = []
        bad: list[Key] = []
        missing: list[Key] = []
        try:
            for key, slot in items:
                try:
                    fd = os.open(self.directory.path(key), os.O_RDONLY)
                except FileNotFoundError:
                    missing.append(key)
                    continue
                checksum = _check_header(fd, key, slot_bytes)
                if checksum is None:
                    os.close(fd)
                    bad.append(key)
                    continue
                opened.append((key, fd))
                slots.append(slot)
                checksums.append(checksum)
            moved = self._move("READ", opened, slots, slot_bytes)
        finally:
            for _, fd in opened:
                os.close(fd)
        good: list[Key] = []
        for (key, _), slot, checksum in zip(opened, slots, checksums):
            if key in moved and zlib.crc32(self._slot(slot, slot_bytes)) == checksum:
                good.append(key)
            else:
                bad.append(key)
        self.stats.read_bytes += len(good) * slot_bytes
        self.stats.read_seconds += time.perf_counter() - started
        return good, bad, missing

    def _move(
        self, op: str, files: list[tuple[Key, int]], slots: list[int], slot_bytes: int
    ) -> set[Key]:
        """One NIXL transfer between the slots and the files' payloads; the keys moved
        (none when the transfer failed)."""
        if not files:
            return set()
        file_descs = [(HEADER_BYTES, slot_bytes, fd) for _, fd in files]
        registration = self._agent.register_memory(
            [(offset, length, fd, "") for offset, length, fd in file_descs], "FILE"
        )
        local = [(self._base + slot * slot_bytes, slot_bytes, 0) for slot in slots]
        try:
            transfer(self._agent, op, local, file_descs, self._name, MOVE_TIMEOUT, b"", "FILE")
        except TransferError as exc:
            log.warning("disk tier: NIXL %s of %d blocks failed: %s", op, len(files), exc)
            return set()
        finally:
            self._agent.deregister_memory(registration)
        return {key for key, _ in files}

    def close(self) -> None:
        self._agent.deregister_memory(self._registration)


def _check_header(fd: int, key: Key, slot_bytes: int) -> int | None:
    """The payload's checksum from a block file's header; None when the header or the
    file's size does not describe this block."""
    raw = os.pread(fd, _HEADER.size, 0)
    if len(raw) != _HEADER.size or os.fstat(fd).st_size != HEADER_BYTES + slot_bytes:
        return None
    magic, payload, name, checksum = _HEADER.unpack(raw)
    if magic != MAGIC or payload != slot_bytes or name != to_wire(key[1]):
        return None
    return int(checksum)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.rename(tmp, path)


def _fsync_dirs(folders: set[Path]) -> None:
    """Make renames durable: a directory's entries reach the disk with its own fsync."""
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
