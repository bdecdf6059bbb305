"""An open decode stream: its messages, read until a finish, and the checks on them.

:class:`Decoding` is what :meth:`router_svc.dispatch.Dispatcher.decoding` yields once a
decode engine's first message has arrived; the pipeline reads the rest through
:meth:`Decoding.replies`. A stream that breaks or ends early is an error of a kind the
pipeline can act on (migrate the sequence, or give up), never a short answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn

import grpc

from router_svc.workers import Peer
from services.errors import Unavailable, from_rpc_error
from services.pb import common_pb2, engine_pb2


@dataclass
class Decoding:
    """An open decode stream whose first message has arrived."""

    peer: Peer
    call: grpc.aio.UnaryStreamCall
    first: engine_pb2.GenerateResponse
    #: Prompt tokens the remote prefill found cached (disaggregated only).
    prefill_cached: int
    disaggregated: bool
    #: The prefill worker's instance id (disaggregated only).
    prefill_instance: str = ""

    def workers(self) -> list[str]:
        """``role:instance`` of each worker this stream used."""
        found = [f"decode:{self.peer.member.instance_id}"]
        if self.prefill_instance:
            found.append(f"prefill:{self.prefill_instance}")
        return found

    def cached_tokens(self, last: engine_pb2.GenerateResponse) -> int:
        """Prompt tokens found cached: by the prefill worker when there was one, else as the
        decode engine reports with its finish (0 when a stop string ended it earlier)."""
        return self.prefill_cached if self.disaggregated else last.usage.cached_tokens

    async def replies(self) -> AsyncIterator[engine_pb2.GenerateResponse]:
        """The stream's messages, the first included, up to the one with a finish reason."""
        where = f"decode {self.peer.member.instance_id}"
        reply = self.first
        while True:
            yield reply
            if reply.finish_reason:
                return
            try:
                message = await self.call.read()
            except grpc.aio.AioRpcError as error:
                raise from_rpc_error(error, where) from None
            except asyncio.CancelledError:
                _raise_unless_cancelled(where)
            if message is grpc.aio.EOF:
                raise Unavailable(f"{where}: the stream ended without a finish reason")
            assert isinstance(message, engine_pb2.GenerateResponse)
            reply = checked_reply(message, where)


async def first_reply(call: grpc.aio.UnaryStreamCall, peer: Peer) -> engine_pb2.GenerateResponse:
    """The decode stream's first message; a stream that ends or fails first is an error."""
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, f"decode {peer.member.instance_id}") from None
    except asyncio.CancelledError:
        _raise_unless_cancelled(f"decode {peer.member.instance_id}")
    if first is grpc.aio.EOF:
        raise Unavailable(f"decode {peer.member.instance_id} ended the stream without output")
    assert isinstance(first, engine_pb2.GenerateResponse)
    return checked_reply(first, f"decode {peer.member.instance_id}")


def _raise_unless_cancelled(where: str) -> NoReturn:
    """Re-raise a cancellation meant for this task; one that came from the call (its
    channel was closed under it) is the member failing, not the caller leaving."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise  # noqa: PLE0704 - called from the except clause that caught it
    raise Unavailable(f"{where}: the call was cancelled (the channel to the member closed)")


#: Engine finishes that are not an answer: the engine gave up on the sequence (it is
#: shutting down, or failed), so the caller must not take the text for a whole one.
_GAVE_UP = {common_pb2.FINISH_REASON_ABORT: "aborted", common_pb2.FINISH_REASON_ERROR: "failed"}


def checked_reply(reply: engine_pb2.GenerateResponse, where: str) -> engine_pb2.GenerateResponse:
    """The reply, unless the engine ended the sequence without finishing it."""
    if reply.finish_reason in _GAVE_UP:
        raise Unavailable(
            f"{where}: the engine {_GAVE_UP[reply.finish_reason]} the sequence before it finished"
        )
    return reply
