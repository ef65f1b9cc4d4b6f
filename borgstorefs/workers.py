"""Running store calls from the trio loop: worker threads bounded by a `CapacityLimiter`, and a lock.

Every await that yields to trio's scheduler costs a round trip through it,
about as much as a small read from a local store. The quick paths here
therefore do not yield when they need not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import trio

__all__ = ["DEFAULT_THREADS", "QuickLock", "StoreRunner"]

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_THREADS = 8
"""Store calls that may run at once, enough to overlap a few network round trips (SFTP)
and local disk waits. More threads mostly wait on the GIL or on the backend's own locks."""


class StoreRunner:
    """Runs blocking calls in worker threads, at most *threads* at a time.

    Quick calls (`run_quick`) run in the trio thread instead when
    *inline_quick* is set, as it is for local stores.

    A call that waits for a slow backend occupies one thread and one token, so
    other requests keep being served while fewer than *threads* calls block.
    A thread cannot be cancelled: a cancelled caller waits for its call to end
    (``abandon_on_cancel=False``), so no store call outlives the daemon's loop.
    """

    def __init__(self, threads: int = DEFAULT_THREADS, *, inline_quick: bool = False) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self.limiter = trio.CapacityLimiter(threads)
        self.inline_quick = inline_quick

    async def run_quick(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Return ``function(*args, **kwargs)`` for a quick call: metadata or a small read.

        With ``inline_quick`` the call runs in the trio thread. On a local
        file system it takes a few microseconds, less than a hand-off to a
        worker thread (about 90 µs, measured with ``os.stat`` on a loaded
        2-core machine). It blocks every other request while the disk is slow.
        """
        if self.inline_quick:
            # No checkpoint: the request loop yields before it reads the next request anyway.
            return function(*args, **kwargs)
        return await self.run(function, *args, **kwargs)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Return ``function(*args, **kwargs)``, called in a worker thread."""
        call = functools.partial(function, *args, **kwargs) if kwargs else functools.partial(function, *args)
        return await trio.to_thread.run_sync(call, limiter=self.limiter)


class QuickLock:
    """A fair trio lock, used as ``async with``, that takes a free lock without yielding.

    `trio.Lock` passes through the scheduler on every acquire, even an
    uncontended one; a read from a local store holds two such locks.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()
