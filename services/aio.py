"""Small asyncio helpers shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def fetch_once(
    cache: dict[str, asyncio.Future[T]], key: str, fetch: Callable[[], Awaitable[T]]
) -> T:
    """``fetch()``'s result for ``key``, fetched once per key for the cache's lifetime.

    Concurrent first callers share one fetch (a burst of first requests for a model
    would otherwise each download and rebuild its decoder); a caller cancelled while
    waiting leaves the fetch running for the others; a failed fetch is forgotten, so
    the next caller tries again.
    """
    future = cache.get(key)
    if future is None:
        future = cache[key] = asyncio.ensure_future(fetch())

        def forget_failure(done: asyncio.Future[T]) -> None:
            if (done.cancelled() or done.exception() is not None) and cache.get(key) is done:
                del cache[key]

        future.add_done_callback(forget_failure)
    return await asyncio.shield(future)


async def merge(streams: list[AsyncIterator[T]]) -> AsyncGenerator[T, None]:
    """Interleave several async iterators as their items come; the first error ends all.

    Closing the merged iterator (or cancelling its consumer) cancels every source,
    which closes each and runs its cleanup.
    """
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[bool, object]] = asyncio.Queue()

    async def drain(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((True, item))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((False, exc))
            return
        await queue.put((False, None))

    tasks = [asyncio.create_task(drain(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            ok, value = await queue.get()
            if ok:
                yield value  # type: ignore[misc]
            elif value is None:
                running -= 1
            else:
                raise value  # type: ignore[misc]
    finally:
        for task in tasks:
            await cancel_and_wait(task)
