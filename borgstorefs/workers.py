"""Running store calls from the trio loop: worker threads bounded by a `CapacityLimiter`, and a lock.

Every await that yields to trio's scheduler costs a round trip through it,
about as much as a small read from a local store. The quick paths here
therefore do not yield when they need not.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import trio

if TYPE_CHECKING:
    import outcome  # a dependency of trio

__all__ = ["DEFAULT_QUICK_WAIT_US", "DEFAULT_THREADS", "QuickLock", "StoreRunner"]

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_THREADS = 8
"""Store calls that may run at once, enough to overlap a few network round trips (SFTP)
and local disk waits. More threads mostly wait on the GIL or on the backend's own locks."""

DEFAULT_QUICK_WAIT_US = 2000
"""Maximum time the trio thread blocks for a quick call in a worker thread, in µs (``-o quick_wait=USEC``).

It covers the three round trips of a small SFTP commit over loopback: about
1.6 ms, measured in the ``-d`` log of an rsync on a loaded 2-core VM. A
request that arrives meanwhile waits at most this long.

With round trips longer than this, as to a distant server, quick calls
would block the full time and then wait through trio all the same. So
`StoreRunner.run_quick` blocks only after a quick call that ended in time.
"""


class StoreRunner:
    """Runs blocking calls in worker threads, at most *threads* at a time.

    Quick calls (`run_quick`) run in the trio thread instead when
    *inline_quick* is set, as it is for local stores. Otherwise the trio
    thread blocks for up to *quick_wait_us* µs for a quick call's result
    while `may_block` returns True (see `run_quick`).

    A call that waits for a slow backend occupies one thread and one token, so
    other requests keep being served while fewer than *threads* calls block.
    A thread cannot be cancelled: a cancelled caller waits for its call to end
    (``abandon_on_cancel=False``), so no store call outlives the daemon's loop.
    """

    def __init__(
        self, threads: int = DEFAULT_THREADS, *, inline_quick: bool = False, quick_wait_us: int = DEFAULT_QUICK_WAIT_US
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        if quick_wait_us < 0:
            raise ValueError(f"invalid quick_wait_us {quick_wait_us}: must be at least 0")
        self.limiter = trio.CapacityLimiter(threads)
        self.inline_quick = inline_quick
        self.quick_wait = quick_wait_us / 1e6
        self.may_block: Callable[[], bool] = _never
        """Whether blocking the trio thread now would delay no other request (the daemon sets the request loop's)."""
        self._last_quick_in_time = True  # the previous quick call ended within quick_wait

    async def run_quick(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Return ``function(*args, **kwargs)`` for a quick call: metadata or a small read.

        With ``inline_quick`` the call runs in the trio thread. On a local
        file system it takes a few microseconds, less than a hand-off to a
        worker thread (about 90 µs, measured with ``os.stat`` on a loaded
        2-core machine). It blocks every other request while the disk is slow.

        Otherwise the call runs in a worker thread. While `may_block` returns
        True, the trio thread blocks for up to ``quick_wait_us`` for its
        result. A result that arrives in time then skips trio's thread
        hand-off, a wake-up through trio's wakeup socket and two passes
        through its scheduler. A slower call goes on as with `run`, so a
        stalled server blocks the loop for at most that time. After a quick
        call that took longer, the next one does not block.
        """
        if self.inline_quick:
            # No checkpoint: the request loop yields before it reads the next request anyway.
            return function(*args, **kwargs)
        block = 0.0
        if self.quick_wait and self._last_quick_in_time and self.may_block():
            block = self.quick_wait
        start = time.monotonic()
        try:
            return await self._run(function, args, kwargs, block)
        finally:
            self._last_quick_in_time = time.monotonic() - start <= self.quick_wait

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Return ``function(*args, **kwargs)``, called in a worker thread.

        This is `trio.to_thread.run_sync` without what the store calls never
        use: `trio.from_thread` support, a copy of the context variables and
        a checkpoint after the limiter. A call of a function that returns at
        once took 72 µs instead of 110 µs, with trio 0.35 on an idle 2-core
        VM. Most of what remains is the wake-up of two threads.
        """
        return await self._run(function, args, kwargs, 0.0)

    async def _run(
        self, function: Callable[..., T], args: tuple[object, ...], kwargs: dict[str, object], block: float
    ) -> T:
        """Call *function* in a worker thread, blocking the trio thread for up to *block* seconds first."""
        await trio.lowlevel.checkpoint_if_cancelled()
        call = functools.partial(function, *args, **kwargs) if kwargs else functools.partial(function, *args)
        borrower = object()  # a token per call, as to_thread takes one, so one task may run several calls
        try:
            self.limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await self.limiter.acquire_on_behalf_of(borrower)
        try:
            return await _call_in_thread(call, block)
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


async def _call_in_thread(call: Callable[[], T], block: float = 0.0) -> T:
    """Run *call* in a thread of trio's thread cache and wait for it, also when cancelled.

    With *block* > 0, the trio thread first blocks for up to *block* seconds.
    A result that arrives by then is handed over directly, under *guard*,
    without trio's wakeup socket and scheduler. Later, the worker reschedules
    the task through trio.
    """
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    guard = threading.Lock()
    # Released once the result is in *results*. A plain lock waits in C, and an Event would build a Condition.
    done = threading.Lock()
    done.acquire()
    results: list[outcome.Outcome[T]] = []
    blocking = block > 0  # guarded by *guard*

    def deliver(result: outcome.Outcome[T]) -> None:
        with guard:
            if blocking:
                results.append(result)
                done.release()
                return
        # The run cannot end first while the task waits, but trio's own hand-off allows for it too.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(call, deliver)
    if blocking:
        done.acquire(timeout=block)
        with guard:
            blocking = False
        if results:
            # No checkpoint, as with an inline call: the request loop yields before it reads the next request.
            return results[0].unwrap()
    # A thread cannot be stopped, so a cancellation takes effect at the caller's next checkpoint.
    return await trio.lowlevel.wait_task_rescheduled(lambda _raise_cancel: trio.lowlevel.Abort.FAILED)  # type: ignore[no-any-return]


def _never() -> bool:
    return False


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
