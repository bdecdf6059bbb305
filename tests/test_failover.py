"""The router's failover and migration logic (pure logic over member records; no stage is called):
members whose failure says another may do better are set aside and the call moves on,
at most three members; any other failure is the answer; in-flight counts return to zero."""

from __future__ import annotations

import grpc
import pytest

from router_svc.decoding import checked_reply
from router_svc.failover import ATTEMPTS, Failover
from router_svc.pipeline import continuation
from router_svc.prepare import Prompt
from router_svc.workers import Peer, Workers
from services.errors import KIND_KEY, InvalidRequest, StageDead, Unavailable
from services.etcd import EtcdSession
from services.pb import common_pb2, engine_pb2, tokenizer_pb2


def workers_with(count: int) -> Workers:
    workers = Workers(EtcdSession([("127.0.0.1", 1)]), control_timeout=1.0, load_interval=1.0)
    for i in range(count):
        member = common_pb2.Member(
            instance_id=f"t{i}", role=common_pb2.ROLE_TOKENIZER, models=["m"]
        )
        workers.peers[f"t{i}"] = Peer(f"t{i}", member, client=None)  # type: ignore[arg-type]
    return workers


def rpc_error(code: grpc.StatusCode, kind: str = "") -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata((KIND_KEY, kind)) if kind else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="boom")


async def test_moves_on_while_the_kind_says_so_then_gives_up() -> None:
    workers = workers_with(5)
    tried: list[str] = []

    async def call(peer: Peer) -> str:
        tried.append(peer.key)
        assert peer.in_flight == 1
        raise rpc_error(grpc.StatusCode.INTERNAL, StageDead.kind())

    with pytest.raises(StageDead, match="tokenizer t"):
        await Failover(workers, common_pb2.ROLE_TOKENIZER, "m", wait=0.1).call(call)
    assert len(tried) == len(set(tried)) == ATTEMPTS
    assert all(workers.peers[key].down_until > 0 for key in tried)  # set aside for every request
    assert len(workers.candidates(common_pb2.ROLE_TOKENIZER, "m")) == 5 - ATTEMPTS
    assert all(p.in_flight == 0 for p in workers.peers.values())


async def test_a_refused_connection_moves_on_and_a_bad_request_does_not() -> None:
    workers = workers_with(3)
    tried: list[str] = []

    async def refused_once(peer: Peer) -> str:
        tried.append(peer.key)
        if len(tried) == 1:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE)  # grpc's own status: no kind
        return peer.key

    answer = await Failover(workers, common_pb2.ROLE_TOKENIZER, "m", wait=0.1).call(refused_once)
    assert answer == tried[1] != tried[0]

    async def bad(peer: Peer) -> str:
        raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest.kind())

    with pytest.raises(InvalidRequest):
        await Failover(workers, common_pb2.ROLE_TOKENIZER, "m", wait=0.1).call(bad)
    assert (
        len(workers.candidates(common_pb2.ROLE_TOKENIZER, "m")) == 2
    )  # only the refusing one is aside


async def test_no_member_left_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="no tokenizer member"):
        await Failover(workers_with(0), common_pb2.ROLE_TOKENIZER, "m", wait=0.1).candidates()


def test_an_engine_that_gave_up_is_never_an_answer() -> None:
    """An ABORT or ERROR finish (the engine shutting down or failing) becomes an error the
    caller sees (5xx, an SSE error event, a gRPC status), never a normal ending."""
    for finish in (common_pb2.FINISH_REASON_ABORT, common_pb2.FINISH_REASON_ERROR):
        with pytest.raises(Unavailable, match="decode d1: the engine .* the sequence"):
            checked_reply(
                engine_pb2.GenerateResponse(token_ids=[5], finish_reason=finish), "decode d1"
            )
    for finish in (
        common_pb2.FINISH_REASON_UNSPECIFIED,
        common_pb2.FINISH_REASON_STOP,
        common_pb2.FINISH_REASON_LENGTH,
    ):
        reply = engine_pb2.GenerateResponse(token_ids=[5], finish_reason=finish)
        assert checked_reply(reply, "decode d1") is reply


def test_a_continuation_carries_on_where_the_stream_broke() -> None:
    prompt = Prompt("m", [1, 2, 3], tokenizer_pb2.ModelInfo(), arrived=0.0)
    sampling = common_pb2.SamplingParams(max_tokens=10, min_tokens=4, temperature=0, stop=["x"])
    assert continuation(prompt, sampling, []).prompt is prompt
    attempt = continuation(prompt, sampling, [7, 8, 9])
    assert attempt.prompt.token_ids == [1, 2, 3, 7, 8, 9] and prompt.token_ids == [1, 2, 3]
    assert (attempt.sampling.max_tokens, attempt.sampling.min_tokens) == (7, 1)
    assert list(attempt.sampling.stop) == ["x"] and attempt.sampling.HasField("temperature")
    unbounded = continuation(prompt, common_pb2.SamplingParams(), [7] * 5).sampling
    assert not unbounded.HasField("max_tokens")  # still "up to the context length"
