"""KV-event log and vLLM event decoding, and the KV handle round trip: logic without I/O."""

from __future__ import annotations

import asyncio

import pytest

from services.engine.vllm_events import apply_vllm_event
from services.errors import InvalidRequest
from services.kv.events import KvEventLog
from services.kv.handles import handle_from_params, params_from_handle


def test_events_decode_by_name_or_position_ignoring_new_fields() -> None:
    log = KvEventLog(block_size=2)
    # Current vLLM: tagged maps, with fields we do not know.
    apply_vllm_event(
        log,
        {
            "type": "BlockStored",
            "block_hashes": [b"a", b"b"],
            "parent_block_hash": None,
            "token_ids": [1, 2, 3, 4],
            "block_size": 2,
            "medium": "CPU",
            "future": 1,
        },
    )
    # Older vLLM: tagged arrays; trailing fields appended by newer versions are ignored.
    apply_vllm_event(log, ["BlockStored", [7], b"b", [5, 6], 2, None, "GPU", None, "extra", 42])
    apply_vllm_event(log, ["BlockRemoved", [b"a"], "GPU", 0, "LOCAL"])
    apply_vllm_event(log, {"type": "SomethingNew", "x": 1})  # unknown kinds are skipped
    snapshot = log.snapshot()
    assert snapshot.sequence == 3
    held = {
        bytes(block.block_hashes[0]): (bytes(block.parent_block_hash), list(block.token_ids))
        for block in snapshot.blocks
    }
    assert held == {b"b": (b"a", [3, 4]), (7).to_bytes(16, "big", signed=True): (b"b", [5, 6])}
    apply_vllm_event(log, {"type": "AllBlocksCleared"})
    assert log.num_blocks == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_resume_replays_the_window_and_a_slow_subscriber_is_told_to_resync() -> None:
    log = KvEventLog(block_size=1, replay_window=4, queue_limit=2)
    for i in range(6):
        log.stored([bytes([i])], b"", [i])
    replay = log.subscribe(log.epoch, 3)
    first = await anext(replay)
    assert [e.sequence for e in first.events] == [4, 5, 6]
    await replay.aclose()
    too_old = log.subscribe(log.epoch, 1)  # sequence 2 fell out of the window
    assert (await anext(too_old)).resync_required
    await too_old.aclose()

    slow = log.subscribe(log.epoch, 6)
    pending = asyncio.ensure_future(anext(slow))
    await asyncio.sleep(0)  # subscribed, waiting for live events
    for i in range(6, 10):  # more than its queue holds before it reads
        log.stored([bytes([i])], b"", [i])
    got = await pending
    rest = [reply async for reply in slow]
    assert [e.sequence for e in got.events] == [7, 8]
    assert rest[-1].resync_required


def test_handle_round_trip_keeps_unknown_fields() -> None:
    params = {
        "do_remote_prefill": False,
        "do_remote_decode": True,
        "remote_block_ids": [[3, 4, 5]],
        "remote_engine_id": "eng",
        "remote_request_id": "req-1",
        "remote_host": "10.0.0.2",
        "remote_port": 5600,
        "tp_size": 1,
        "dcp_size": 1,
        "transfer_mode": "pull",
    }
    handle = handle_from_params(params, num_tokens=300, instance_id="prefill-1", expires_at=9.0)
    assert list(handle.remote_block_ids) == [3, 4, 5] and handle.prefill_instance_id == "prefill-1"
    back = params_from_handle(handle)
    assert back["do_remote_prefill"] is True and back["do_remote_decode"] is False
    assert back["remote_block_ids"] == [[3, 4, 5]]
    assert back["dcp_size"] == 1 and back["transfer_mode"] == "pull"
    assert {
        k: back[k] for k in ("remote_engine_id", "remote_host", "remote_port", "remote_request_id")
    } == {
        "remote_engine_id": "eng",
        "remote_host": "10.0.0.2",
        "remote_port": 5600,
        "remote_request_id": "req-1",
    }


def test_multi_group_handles_travel_whole_and_bad_handles_are_rejected() -> None:
    params = {
        "remote_block_ids": [[1, 2], [9]],
        "remote_engine_id": "e",
        "remote_host": "h",
        "remote_port": 1,
    }
    handle = handle_from_params(params, 10, "p", 0.0)
    assert list(handle.remote_block_ids) == []
    assert params_from_handle(handle)["remote_block_ids"] == [[1, 2], [9]]
    handle.remote_host = ""
    with pytest.raises(InvalidRequest, match="prefill engine's id or address"):
        params_from_handle(handle)
