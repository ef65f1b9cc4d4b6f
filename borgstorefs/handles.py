"""Open files: read-ahead windows per handle and staged writes per inode.

Reading a file without uncommitted writes goes through a `ValueReader`
(`Store.open_reader`) that the inode's `FileState` opens when a handle is opened
and shares between its handles. On backends that keep the item open, the
handles read the value of open time even after the file is removed, purged or
replaced by a rename, as POSIX descriptors do. A store without ``open_reader``
gets partial loads (`Store.load` with offset and size) instead, which fail with
ESTALE once the value is gone.

Each handle keeps one window of the value in memory; a read
that continues where the previous one ended doubles the next window, from
`READ_WINDOW_MIN` up to `READ_WINDOW_MAX`, so a sequential reader of a large
file makes few round trips and most kernel read requests are answered from
memory without a thread hand-off. A read elsewhere loads only what it asks for.

Writing goes to a `FileState` shared by every handle of the inode. Writes are
collected in a memory buffer of up to `WRITE_BUFFER_MAX` bytes (contiguous
writes only) and then written to a `StagedItem`, which the backend keeps in a
temporary object. The staged value starts as a copy of the stored value, made
by the backend without passing through memory, unless the file is new or was
truncated to zero. `commit` makes it the stored value in one atomic step, so
the store never shows a partial value. While a file is dirty (written and not
yet committed), every read and ``stat`` of it sees the staged data.

No pyfuse3 here: the file system model drives these classes and the adapter
turns their results into replies.
"""

from __future__ import annotations

import errno
import logging
import mmap
import time
from collections.abc import Callable
from typing import NamedTuple, NewType

import trio

from .errnos import FSError
from .errors import ObjectNotFound
from .inodes import Node, NodeKind
from .store import ItemInfo, StagedItem, Store, ValueReader
from .workers import QuickLock, StoreRunner

__all__ = [
    "READ_WINDOW_MAX",
    "READ_WINDOW_MIN",
    "WRITE_BUFFER_MAX",
    "FileHandle",
    "FileHandleNo",
    "FileState",
    "KernelPages",
]

logger = logging.getLogger(__name__)

FileHandleNo = NewType("FileHandleNo", int)
"""The number the kernel passes back for an open file (``fh``)."""

READ_WINDOW_MIN = 128 * 1024
"""First read-ahead window in bytes: the kernel's own read-ahead unit."""

READ_WINDOW_MAX = 8 * 1024 * 1024
"""Largest read-ahead window in bytes, held once per open handle that reads sequentially."""

WRITE_BUFFER_MAX = 8 * 1024 * 1024
"""Bytes of contiguous writes collected in memory before they go to the staged value."""


QUICK_READ_MAX = 128 * 1024
"""Loads up to this many bytes count as quick store calls (see `StoreRunner.run_quick`)."""

QUICK_COMMIT_MAX = 128 * 1024
"""Commits of values up to this many bytes, none of them staged yet, count as quick store calls."""

DIRECT_WRITE_MIN = 256 * 1024
"""Writes of at least this many bytes go to the staged value at once instead of the buffer."""

PAGE_SIZE = mmap.PAGESIZE
"""Unit of the kernel's page cache in bytes."""


class KernelPages(NamedTuple):
    """Calls into the kernel's page cache of files, given by the FUSE adapter.

    Both block and may raise `OSError`, so they run in worker threads.
    """

    store: Callable[[int, int, bytes], None]
    """Store ``(inode, offset, data)`` as cached pages of the file."""
    invalidate: Callable[[int], None]
    """Drop the cached pages of an inode."""


class FileState:
    """The shared state of one open file inode: staged writes and what readers must see.

    ``dirty`` means the file has changes that are not in the store yet; then
    ``size`` (bytes) and ``mtime_ns`` describe the staged value. ``unlinked``
    means the name is gone (removed, or replaced by a rename), so the changes
    are dropped instead of committed.

    With *spawn* (a nursery's ``start_soon``), writes to the staged value run
    behind: `write` returns once the data is handed to a worker thread, so the
    kernel sends the next request while the previous one is written. At most
    one such write is in flight.

    A failed write (behind or not) drops the file's changes. Its error is
    raised again by every later `write`, `read`, `truncate` and `commit` until
    the last handle is released, because a program that retries the rest of a
    short write must not commit a value with a hole in it. ``close`` reports
    the error too. Methods that touch the staged value take the state's lock, because
    a `StagedItem` is not thread-safe.

    The stored value is read through one `ValueReader` for all handles (see
    `prepare_read`), which a commit replaces and `close_reader` closes. Its own
    lock is taken after ``lock`` where both are held, never before.
    """

    def __init__(
        self,
        store: Store,
        runner: StoreRunner,
        node: Node,
        *,
        new: bool = False,
        spawn: Callable[..., object] | None = None,
    ) -> None:
        self.node = node
        self._store = store
        self._runner = runner
        self._spawn = spawn
        self.lock = QuickLock()
        self.handles = 0
        self.writers = 0  # handles open for writing
        self.unlinked = False
        self.version = 0
        self._staged: StagedItem | None = None
        self._start_empty = new
        self._buffer = bytearray()
        self._buffer_offset = 0
        self._in_flight: trio.Event | None = None
        self._failure: BaseException | None = None
        self._reader: _SharedReader | None = None
        self._reader_lock = QuickLock()
        self._can_open_reader = callable(getattr(store, "open_reader", None))
        self.explicit_mtime = False
        self.dirty = new
        # Set by an O_TRUNC open of a stored file; any later change clears it.
        self.truncated_by_open = False
        self.size = 0 if new else node.size
        self.mtime_ns = time.time_ns() if new else node.mtime_ns

    @property
    def commit_on_flush(self) -> bool:
        """Whether a ``close`` should store the changes now rather than at the last close.

        A file opened with ``O_TRUNC`` and not yet written keeps its stored
        value until data arrives or the last handle closes. ``dd``, shells and
        ``tar`` duplicate their descriptor and close the first one right away;
        storing the empty value then would lose the old one to a crash.
        """
        return self.failed or (self.dirty and not self.truncated_by_open)

    def __repr__(self) -> str:
        return f"FileState({self.node!r}, dirty={self.dirty}, size={self.size})"

    @property
    def keeps_value(self) -> bool:
        """Whether reads go through a `ValueReader`, which keeps the value after a rename over it or a purge."""
        return self._can_open_reader

    @property
    def failed(self) -> bool:
        """Whether a write or commit failed; the changes are gone and later writes raise its error."""
        return self._failure is not None

    # Changes

    async def write(self, offset: int, data: bytes) -> int:
        """Write *data* at *offset* (a gap past the end reads as zeros); return its length."""
        async with self.lock:
            await self._settle()
            try:
                await self._write_locked(offset, data)
            except Exception as error:
                await self._fail(error)
                raise
        return len(data)

    async def _write_locked(self, offset: int, data: bytes) -> None:
        self._touch()
        buffer_end = self._buffer_offset + len(self._buffer)
        if self._buffer and offset == buffer_end:
            self._buffer += data  # amortized growth; slice assignment would copy the buffer each time
        elif self._buffer and self._buffer_offset <= offset < buffer_end:
            start = offset - self._buffer_offset
            self._buffer[start : start + len(data)] = data
        elif len(data) >= DIRECT_WRITE_MIN:
            # Large writes gain nothing from collecting: one hand-off each, no extra copy.
            await self._flush_buffer_behind()
            await self._run_behind(self._write_at, offset, data)
        else:
            await self._flush_buffer_behind()
            self._buffer_offset = offset
            self._buffer = bytearray(data)
        self.size = max(self.size, offset + len(data))
        if len(self._buffer) >= WRITE_BUFFER_MAX:
            await self._flush_buffer_behind()

    async def truncate(self, size: int) -> None:
        """Cut the file to *size* bytes or extend it with zeros."""
        async with self.lock:
            await self._settle()
            self._touch()
            try:
                await self._truncate_locked(size)
            except Exception as error:
                await self._fail(error)
                raise

    async def _truncate_locked(self, size: int) -> None:
        await self._wait_in_flight()
        if size == 0:
            staged, self._staged = self._staged, None
            self._buffer = bytearray()
            self._start_empty = True
            if staged is not None:
                await self._runner.run(staged.discard)
        else:
            await self._runner.run(self._truncate_staged, size)
        self.size = size

    def set_mtime(self, mtime_ns: int) -> None:
        """Set the modification time that the next commit stores (unless a later write changes it)."""
        self.mtime_ns = mtime_ns
        self.explicit_mtime = True

    def _touch(self) -> None:
        self.dirty = True
        self.truncated_by_open = False
        self.explicit_mtime = False
        self.mtime_ns = time.time_ns()
        self.version += 1
        self.node.cache_version = None

    # Writes behind

    async def _flush_buffer_behind(self) -> None:
        if not self._buffer:
            return
        # The worker gets the buffer itself; a new one takes the next writes, so no copy is needed.
        buffer, offset = self._buffer, self._buffer_offset
        self._buffer = bytearray()
        await self._run_behind(self._write_at, offset, buffer)

    async def _run_behind(self, function: Callable[..., None], *args: object) -> None:
        await self._wait_in_flight()
        if self._spawn is None:
            await self._runner.run(function, *args)
            return
        done = trio.Event()
        self._in_flight = done
        self._spawn(self._background_write, function, args, done)

    async def _background_write(
        self, function: Callable[..., None], args: tuple[object, ...], done: trio.Event
    ) -> None:
        try:
            await self._runner.run(function, *args)
        except Exception as error:
            logger.warning("writing to %r failed, its changes are dropped: %r", self.node.store_name, error)
            self._failure = error
        finally:
            done.set()

    async def _wait_in_flight(self) -> None:
        in_flight = self._in_flight
        if in_flight is not None:
            await in_flight.wait()
            self._in_flight = None

    async def _settle(self) -> None:
        """Wait for the write in flight; raise the error of a failed write (see the class docstring)."""
        await self._wait_in_flight()
        if self._failure is not None:
            if self.dirty:
                await self._discard_locked()
            raise self._failure

    async def _fail(self, error: Exception) -> None:
        self._failure = error
        await self._wait_in_flight()
        await self._discard_locked()

    # Reads of a dirty file

    async def read(self, offset: int, size: int) -> bytes:
        """Return up to *size* bytes from *offset* of the staged value (the file must be dirty)."""
        async with self.lock:
            await self._settle()
            return await self._runner.run(self._read_staged, offset, size)

    # Reads of the stored value

    async def prepare_read(self, mtime_resolution_ns: int = 1) -> None:
        """Open the stored value for a new handle, or keep the reader of earlier handles.

        The earlier reader is kept if it still matches the node's size and
        mtime (compared in units of *mtime_resolution_ns*, the store's
        granularity). Otherwise another client changed the value, and every
        handle of the inode moves on to the current one. `ObjectNotFound` if
        the item is gone.
        """
        if not self._can_open_reader:
            return
        async with self._reader_lock:
            current = self._reader
            if current is not None and (not self.node.attached or current.matches(self.node, mtime_resolution_ns)):
                return
            if current is not None:
                self.version += 1  # the handles' read-ahead windows hold the old value
            await self._retire_reader_locked()
            self._reader = await self._open_reader_locked()

    async def load(self, offset: int, size: int) -> bytes:
        """Return up to *size* bytes from *offset* of the stored value, through the shared reader."""
        node = self.node
        run = self._runner.run_quick if size <= QUICK_READ_MAX else self._runner.run
        if not self._can_open_reader:
            deleted = node.kind == NodeKind.TRASH_FILE
            return await run(self._store.load, node.store_name, size=size, offset=offset, deleted=deleted)
        shared = await self._current_reader()
        shared.users += 1
        try:
            return await run(shared.reader.read, offset, size)
        finally:
            shared.users -= 1
            if shared.retired and shared.users == 0:
                await self._close_reader(shared)

    async def _current_reader(self) -> _SharedReader:
        current = self._reader
        if current is not None:
            return current  # set and cleared only under the lock, read here in the same thread
        async with self._reader_lock:
            if self._reader is None:
                if self.handles == 0:
                    # A read-ahead that outlived the last handle: a new reader would never be closed.
                    raise FSError(errno.EBADF, f"{self.node!r} has no open handle left")
                # The first read after a commit replaced the value.
                self._reader = await self._open_reader_locked()
            return self._reader

    async def _open_reader_locked(self) -> _SharedReader:
        node = self.node
        if not node.attached:
            # Its name leads to another value now, or to none.
            raise FSError(errno.ESTALE, f"{node!r} was replaced or purged while open")
        deleted = node.kind == NodeKind.TRASH_FILE
        reader: ValueReader = await self._runner.run_quick(
            self._store.open_reader,  # type: ignore[attr-defined]  # checked by _can_open_reader
            node.store_name,
            deleted=deleted,
        )
        return _SharedReader(reader)

    async def _retire_reader(self) -> None:
        async with self._reader_lock:
            await self._retire_reader_locked()

    async def _retire_reader_locked(self) -> None:
        shared, self._reader = self._reader, None
        if shared is None:
            return
        shared.retired = True
        if shared.users == 0:
            await self._close_reader(shared)

    async def _close_reader(self, shared: _SharedReader) -> None:
        # Shielded, because a cancelled request must not leave a descriptor or remote handle open.
        with trio.CancelScope(shield=True):
            try:
                await self._runner.run(shared.reader.close)
            except Exception as error:
                logger.warning("closing the reader of %r failed: %r", self.node.store_name, error)

    async def close_reader(self) -> None:
        """Close the shared reader after the last handle is released; reads still running finish first."""
        await self._retire_reader()

    # Commit

    async def commit(self, *, durable: bool = False) -> None:
        """Store the changes as the item's value, atomically; nothing happens if the file is clean.

        The commit writes to the node's name at this moment, so a file renamed
        while open lands under its new name. After a failed commit the stored
        value is unchanged, the changes are dropped and the error propagates.
        """
        async with self.lock:
            await self._settle()
            if not self.dirty:
                return
            if self.unlinked:
                await self._discard_locked()
                return
            mtime_ns = self.mtime_ns if self.explicit_mtime else None
            name = self.node.store_name
            # A small value that is still in the buffer takes a few system calls to store on a local disk.
            quick = not durable and self._staged is None and self.size <= QUICK_COMMIT_MAX
            run = self._runner.run_quick if quick else self._runner.run
            try:
                info = await run(self._commit_staged, name, mtime_ns, durable)
            except BaseException as error:
                if isinstance(error, Exception):
                    self._failure = error
                self._reset_clean()
                self.node.fetched = 0.0  # the stored attributes are unknown now
                raise
            self._reset_clean()
            await self._retire_reader()  # the next clean read opens the committed value
            self.node.size, self.node.mtime_ns, self.node.fetched = info.size, info.mtime_ns or 0, time.monotonic()
            logger.debug("committed %r: %d bytes%s", name, info.size, " (durable)" if durable else "")

    async def discard(self) -> None:
        """Drop uncommitted changes; the stored value, if any, stays as it is."""
        async with self.lock:
            await self._wait_in_flight()
            self._failure = None
            await self._discard_locked()

    async def _discard_locked(self) -> None:
        staged = self._staged
        self._reset_clean()
        if staged is not None:
            await self._runner.run(staged.discard)

    def _reset_clean(self) -> None:
        self._staged = None
        self._buffer = bytearray()
        self._start_empty = False
        self.dirty = False
        self.truncated_by_open = False
        self.explicit_mtime = False
        self.version += 1
        self.node.cache_version = None

    # Worker-thread parts; the caller holds the lock and no write is in flight.

    def _ensure_staged(self) -> StagedItem:
        if self._staged is None:
            self._staged = self._store.stage(self.node.store_name, copy_existing=not self._start_empty)
            self._start_empty = False
        return self._staged

    def _write_at(self, offset: int, data: bytes | bytearray) -> None:
        self._ensure_staged().write(offset, data)  # type: ignore[arg-type]  # any bytes-like object

    def _write_buffer(self) -> None:
        staged = self._ensure_staged()
        if self._buffer:
            staged.write(self._buffer_offset, self._buffer)  # type: ignore[arg-type]
            self._buffer = bytearray()

    def _truncate_staged(self, size: int) -> None:
        self._write_buffer()
        self._ensure_staged().truncate(size)

    def _read_staged(self, offset: int, size: int) -> bytes:
        self._write_buffer()
        return self._ensure_staged().read(offset, size)

    def _commit_staged(self, name: str, mtime_ns: int | None, durable: bool) -> ItemInfo:
        try:
            self._write_buffer()
            staged = self._ensure_staged()
            if staged.size != self.size:
                # A truncate that extended, or writes that assumed a stale size.
                staged.truncate(self.size)
        except BaseException:
            if self._staged is not None:
                self._staged.discard()
            raise
        info = staged.commit(name, mtime_ns=mtime_ns, durable=durable)
        # Backends that have the stored size and mtime return them. Asking the others costs one more request.
        return info if info is not None else self._store.info(name)


class _SharedReader:
    """The reader of one inode's stored value; closed once it is retired and no read uses it."""

    __slots__ = ("reader", "retired", "users")

    def __init__(self, reader: ValueReader) -> None:
        self.reader = reader
        self.users = 0
        self.retired = False

    def matches(self, node: Node, mtime_resolution_ns: int) -> bool:
        """Return whether the value opened is still the one the node describes."""
        if self.reader.size != node.size:
            return False
        mtime_ns = self.reader.mtime_ns
        if mtime_ns is None:
            return True
        return mtime_ns // mtime_resolution_ns == node.mtime_ns // mtime_resolution_ns


class _Prefetch:
    """A window being loaded ahead of the reader by a background task."""

    def __init__(self, offset: int, size: int, version: int) -> None:
        self.offset = offset
        self.size = size
        self.version = version
        self.done = trio.Event()
        self.data: bytes | None = None

    def covers(self, offset: int, version: int) -> bool:
        return version == self.version and self.offset <= offset < self.offset + self.size


class FileHandle:
    """One open file: its flags, and the read-ahead window of a reader.

    Reads of a dirty file go to the shared `FileState`; reads of a clean file
    load from the store through the window. Once a sequential reader is past
    the middle of a full window, the next window is loaded in the background
    (with *spawn*), so the store's latency overlaps with the kernel consuming
    the current one. A lock keeps the kernel's parallel read requests on one
    handle from loading the same window twice.
    """

    def __init__(
        self,
        number: FileHandleNo,
        state: FileState,
        store: Store,
        runner: StoreRunner,
        *,
        writable: bool,
        append: bool,
        spawn: Callable[..., object] | None = None,
        read_around: int = 0,
        kernel_pages: KernelPages | None = None,
    ) -> None:
        self.number = number
        self.state = state
        self.writable = writable
        self.append = append
        self._store = store
        self._runner = runner
        self._spawn = spawn
        self._read_around = read_around if spawn is not None and kernel_pages is not None else 0
        self._kernel_pages = kernel_pages
        self._lock = QuickLock()
        self._window = b""
        self._window_offset = 0
        self._window_version = -1
        self._window_complete = False  # the window reaches the end of the value
        self._next_offset = 0
        self._window_size = 0
        self._prefetch: _Prefetch | None = None

    def __repr__(self) -> str:
        return f"FileHandle({self.number}, {self.state.node!r})"

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """Return up to *size* bytes from *offset*; fewer only at the end of the file."""
        state = self.state
        node = state.node
        if not node.attached and not state.keeps_value:
            raise FSError(errno.ESTALE, f"{node!r} was replaced or purged while open")
        if state.dirty:
            return await state.read(offset, size)
        async with self._lock:
            data = self._from_window(offset, size)
            if data is None:
                await self._load_window(offset, size)
                # A write or commit during the load changes the version. The window still
                # contains the value as it was when this read began, so it is served.
                data = self._from_window(offset, size, any_version=True)
                assert data is not None
            self._next_offset = offset + len(data)
            self._maybe_prefetch(offset + len(data))
            return data

    def _from_window(self, offset: int, size: int, *, any_version: bool = False) -> memoryview | None:
        if self._window_version != self.state.version and not any_version:
            return None
        start = offset - self._window_offset
        end = start + size
        if start < 0 or (end > len(self._window) and not (self._window_complete and start <= len(self._window))):
            return None
        return memoryview(self._window)[start:end]

    async def _load_window(self, offset: int, size: int) -> None:
        version = self.state.version
        prefetch = self._prefetch
        if prefetch is not None and prefetch.covers(offset, version):
            await prefetch.done.wait()
            self._prefetch = None
            if prefetch.data is not None and offset + size <= prefetch.offset + len(prefetch.data):
                self._set_window(prefetch.offset, prefetch.data, prefetch.size, version)
                return
        if offset == self._next_offset:
            self._window_size = min(max(self._window_size * 2, READ_WINDOW_MIN), READ_WINDOW_MAX)
            requested = max(self._window_size, size)
        else:
            self._window_size = 0
            if size < self._read_around:
                await self._load_around(offset, size, version)
                return
            requested = size
        data = await self._load(offset, requested)
        self._set_window(offset, data, requested, version)

    async def _load_around(self, offset: int, size: int, version: int) -> None:
        """Load the aligned block of `read_around` bytes around a small read at a new place.

        Over a network a round trip costs more than the bytes of the block, and a
        random reader tends to come back near where it read before. The rest of
        the block goes to the kernel's page cache, so those later reads never
        reach the daemon.
        """
        start = offset - offset % self._read_around
        requested = max(self._read_around, offset + size - start)
        data = await self._load(start, requested)
        self._set_window(start, data, requested, version)
        assert self._spawn is not None
        self._spawn(self._push_around, start, data, offset, size, version)

    async def _push_around(self, start: int, data: bytes, offset: int, size: int, version: int) -> None:
        state = self.state
        ino = state.node.ino
        # The kernel holds the pages of the pending read locked until it has the reply, so
        # they are left out, and the rest is pushed from a worker thread after the reply.
        read_start = offset - offset % PAGE_SIZE
        read_end = -(-(offset + size) // PAGE_SIZE) * PAGE_SIZE
        end = min(start + len(data), state.size)  # data past the kernel's file size would extend the file
        parts = [(start, data[: read_start - start]), (read_end, data[read_end - start : end - start])]

        pages = self._kernel_pages
        assert pages is not None

        def unchanged() -> bool:
            return not state.dirty and state.writers == 0 and state.version == version

        def push() -> None:
            for part_offset, part in parts:
                if part and unchanged():
                    pages.store(ino, part_offset, part)
            if not unchanged():
                # A write that began during the push may have been overtaken by
                # older pages: drop them, so that the next read goes to the daemon.
                pages.invalidate(ino)

        try:
            await self._runner.run(push)
        except OSError as error:
            # Only the cache is lost: the kernel requests those pages again when they are read.
            logger.debug("storing pages of %r in the page cache failed: %s", state.node.store_name, error)

    def _set_window(self, offset: int, data: bytes, requested: int, version: int) -> None:
        self._window = data
        self._window_offset = offset
        self._window_version = version
        self._window_complete = len(data) < requested

    async def _load(self, offset: int, size: int) -> bytes:
        node = self.state.node
        try:
            return await self.state.load(offset, size)
        except ObjectNotFound:
            if not node.attached:
                raise FSError(errno.ESTALE, f"{node!r} was replaced or purged while open") from None
            raise

    def _maybe_prefetch(self, position: int) -> None:
        window_end = self._window_offset + len(self._window)
        if (
            self._spawn is None
            or self._prefetch is not None
            or self._window_complete
            or self._window_size < READ_WINDOW_MAX
            or position < self._window_offset + len(self._window) // 2
        ):
            return
        prefetch = _Prefetch(window_end, READ_WINDOW_MAX, self._window_version)
        self._prefetch = prefetch
        self._spawn(self._run_prefetch, prefetch)

    async def _run_prefetch(self, prefetch: _Prefetch) -> None:
        try:
            prefetch.data = await self._load(prefetch.offset, prefetch.size)
        except Exception as error:
            # The reader loads the window itself when it gets there, and reports the error then.
            logger.debug("read-ahead of %r at %d failed: %r", self.state.node.store_name, prefetch.offset, error)
        finally:
            prefetch.done.set()
