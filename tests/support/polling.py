"""One way for a test to wait for something: poll a check until it passes.

A fixed sleep is too short on a loaded CI host and wastes time everywhere else; a
hand-written deadline loop is the same few lines each time, each with its own way of
reporting what it was waiting for. A check here is a function that asserts what should
become true (and may return a value for the test to use); :func:`eventually` runs it
until it passes, and after ``timeout`` seconds its last assertion fails the test, so
the report says what was still wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = 30.0, interval: float = 0.2
) -> T:
    """What ``check`` returns the first time it returns without an AssertionError; its
    last AssertionError once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(interval)


def eventually_sync(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.2) -> T:
    """:func:`eventually` for a check that does not await (the test is not async)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(interval)
