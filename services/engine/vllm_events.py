"""Bridge vLLM's KV-event publisher (ZMQ + msgpack, in the engine core process) into
the stage's :class:`~services.kv.events.KvEventLog`.

vLLM sends multipart messages ``(topic, sequence, payload)``; the payload is an
``EventBatch`` ``[timestamp, events, data_parallel_rank]``. Events are msgspec
structs tagged with their type: as maps (``{"type": "BlockStored", ...}``) in current
vLLM, as arrays (``["BlockStored", block_hashes, ...]``) in older ones. We read the
fields we need by name or by position and ignore whatever newer versions append.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from services.aio import cancel_and_wait
from services.kv.events import KvEventLog

log = logging.getLogger(__name__)

# Field positions in the array form, after the leading type tag.
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
)
_REMOVED_FIELDS = ("block_hashes",)


def block_hash_bytes(value: bytes | int | None) -> bytes:
    """vLLM's external block hash (bytes, or an int in some versions) as bytes."""
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    return int(value).to_bytes(16, "big", signed=True)


def _fields(event: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The event's type tag and the named fields, from either encoding."""
    if isinstance(event, dict):
        return str(event.get("type", "")), {name: event.get(name) for name in names}
    if isinstance(event, (list, tuple)) and event:
        values = list(event[1:]) + [None] * len(names)
        return str(event[0]), dict(zip(names, values))
    return "", {}


def _first_block_salt(fields: dict[str, Any]) -> str:
    """The cache_salt in a chain's first block's extra keys. vLLM publishes them untagged,
    in order: the LoRA name (when set), (multimodal id, offset) pairs, the salt, then
    prompt-embedding digests; the salt is the first plain string after the LoRA name."""
    extra = fields.get("extra_keys")
    if (
        fields.get("parent_block_hash") is not None
        or not isinstance(extra, list | tuple)
        or not extra
    ):
        return ""
    if not isinstance(extra[0], list | tuple):
        return ""
    keys = list(extra[0])[1 if fields.get("lora_name") else 0 :]
    return next((key for key in keys if isinstance(key, str)), "")


def apply_vllm_event(log_: KvEventLog, event: Any) -> None:
    """Apply one decoded vLLM KV event to the log; unknown event types are skipped."""
    kind, _ = _fields(event, ())
    if kind == "BlockStored":
        _, fields = _fields(event, _STORED_FIELDS)
        log_.stored(
            [block_hash_bytes(h) for h in fields["block_hashes"] or []],
            block_hash_bytes(fields["parent_block_hash"]),
            [int(t) for t in fields["token_ids"] or []],
            _first_block_salt(fields),
            str(fields.get("lora_name") or ""),
        )
    elif kind == "BlockRemoved":
        _, fields = _fields(event, _REMOVED_FIELDS)
        log_.removed([block_hash_bytes(h) for h in fields["block_hashes"] or []])
    elif kind == "AllBlocksCleared":
        log_.cleared()


class ZmqKvEventBridge:
    """Subscribes to vLLM's publisher and feeds every event into a KvEventLog."""

    def __init__(self, endpoint: str, topic: str, events: KvEventLog) -> None:
        self._endpoint = endpoint
        self._topic = topic.encode()
        self._events = events
        self._context = zmq.asyncio.Context()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kv-event-bridge")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._context.destroy(linger=0)

    async def _run(self) -> None:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, self._topic)
        socket.connect(self._endpoint)
        decoder = msgspec.msgpack.Decoder()
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) < 3:
                    continue
                try:
                    batch = decoder.decode(frames[2])
                    events = (
                        batch[1] if isinstance(batch, (list, tuple)) else batch.get("events", [])
                    )
                    for event in events:
                        apply_vllm_event(self._events, event)
                except Exception:  # one bad batch must not stop the stream
                    log.exception("could not decode a KV event batch")
        finally:
            socket.close(linger=0)
