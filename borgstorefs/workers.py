"""Running store calls from the trio loop: worker threads bounded by a `CapacityLimiter`, and a lock.

Every await that yields to trio's scheduler costs a round trip through it,
about as much as a small read from a local store. The quick paths here
therefore do not yield when they need not.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import trio

if TYPE_CHECKING:
    import outcome  # a dependency of trio

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
        """Return ``function(*args, **kwargs)``, called in a worker thread.

        This is `trio.to_thread.run_sync` without what the store calls never
        use: `trio.from_thread` support, a copy of the context variables and
        a checkpoint after the limiter. A call of a function that returns at
        once took 72 µs instead of 110 µs, with trio 0.35 on an idle 2-core
        VM. Most of what remains is the wake-up of two threads.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        call = functools.partial(function, *args, **kwargs) if kwargs else functools.partial(function, *args)
        borrower = object()  # a token per call, as to_thread takes one, so one task may run several calls
        try:
            self.limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await self.limiter.acquire_on_behalf_of(borrower)
        try:
            return await _call_in_thread(call)
        finally:
            self.limiter.release_on_behalf_of(borrower)

    async def feed(
        self, rows: Iterator[T], deliver: Callable[[list[T]], bool], *, first: int = 128, batch: int = 4096
    ) -> None:
        """Pull *rows* in one worker thread and pass them to *deliver*, in the trio thread, in lists.

        The first list contains at most *first* rows, so that the consumer can
        start early. The others contain up to *batch* rows, because each hand-off
        stops the worker until the trio thread takes it. *deliver* returns False
        to end the pull. An exception from *rows* is raised here, and the rows of
        the unfinished list are not delivered.
        """

        def pull() -> None:
            rows_iterator = iter(rows)
            limit = first
            while True:
                chunk = list(itertools.islice(rows_iterator, limit))
                if chunk and not trio.from_thread.run_sync(deliver, chunk):
                    return
                if len(chunk) < limit:
                    return
                limit = batch

        await trio.to_thread.run_sync(pull, limiter=self.limiter)


async def _call_in_thread(call: Callable[[], T]) -> T:
    """Run *call* in a thread of trio's thread cache and wait for it, also when cancelled."""
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()

    def deliver(result: outcome.Outcome[T]) -> None:
        # The run cannot end first while the task waits, but trio's own hand-off allows for it too.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(call, deliver)
    # A thread cannot be stopped, so a cancellation takes effect at the caller's next checkpoint.
    return await trio.lowlevel.wait_task_rescheduled(lambda _raise_cancel: trio.lowlevel.Abort.FAILED)  # type: ignore[no-any-return]


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
