"""The backend contract: the operations a `Store` needs from a place that stores files.

A backend maps *nested names* (``data/01/23/0123abcd``, already nested by the
store) to values. It has no notion of namespaces, levels or soft deletion, but
it checks every name again with `validate_backend_name`, so that no caller can
address a path outside its base location.

Thread safety: every backend must accept calls from several threads at once,
because the FUSE daemon runs store calls in a pool of worker threads.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from ..errors import BackendMustBeOpen, BackendMustNotBeOpen, ObjectNotFound

logger = logging.getLogger(__name__)

COPY_CHUNK_SIZE = 4 * 1024 * 1024
"""Bytes per read when a value is streamed; large enough to keep a network pipe full."""


class ItemInfo(NamedTuple):
    """Facts a backend or store reports about one name.

    ``name`` is the last path component (backends) or the key (`Store.list`),
    ``size`` is in bytes and ``mtime_ns`` is the modification time in
    nanoseconds since the epoch, or None where the backend has none.
    """

    name: str
    exists: bool
    size: int
    directory: bool
    mtime_ns: int | None = None


item_name = operator.itemgetter(0)
"""Sort key for `ItemInfo` tuples: the name, their first field, without building a tuple per call."""


class SpaceInfo(NamedTuple):
    """Capacity of a backend, in bytes, as `statvfs` reports it."""

    total: int
    free: int
    available: int


_PLAIN_BACKEND_NAME = re.compile(r"[!-.0-\[\]-~]+(?:/[!-.0-\[\]-~]+)*")
"""Printable ASCII components without whitespace or backslash, joined by single ``/``."""


def validate_backend_name(name: str, *, base_allowed: bool = False) -> None:
    """Raise `TypeError` or `ValueError` unless *name* is a safe relative path.

    Safe means: ASCII without control characters, backslashes or whitespace,
    components separated by single ``/``, and no component that is empty,
    ``.`` or contains ``..``. ``""`` names the base location itself and is
    accepted only with ``base_allowed=True``.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend name must be str, not {type(name).__name__}: {name!r}")
    if name == "":
        if base_allowed:
            return
        raise ValueError("backend name must not be empty")
    if _PLAIN_BACKEND_NAME.fullmatch(name) and ".." not in name and "/./" not in f"/{name}/":
        return  # the common case in one match; the checks below name the problem
    if not name.isascii() or not name.isprintable() or any(c.isspace() for c in name):
        raise ValueError(f"invalid backend name {name!r}: must be printable ASCII without whitespace")
    if "\\" in name:
        raise ValueError(f"invalid backend name {name!r}: must not contain a backslash")
    if ".." in name:
        raise ValueError(f"invalid backend name {name!r}: must not contain '..'")
    if name.startswith("/"):
        raise ValueError(f"invalid backend name {name!r}: must be relative, not start with '/'")
    for part in name.split("/"):
        if part in ("", "."):
            raise ValueError(f"invalid backend name {name!r}: empty or '.' path component")


class StagedValue(ABC):
    """A value being written: random access, invisible to readers until `commit`.

    Created by `Backend.stage`. Exactly one of `commit` or `discard` ends it;
    using it as a context manager discards it unless it was committed. Not
    thread-safe: the owner serializes calls.
    """

    @property
    @abstractmethod
    def size(self) -> int:
        """Current size of the staged value in bytes."""

    @abstractmethod
    def write(self, offset: int, data: bytes) -> int:
        """Write *data* at *offset* (a gap past the end reads as zeros); return the bytes written."""

    @abstractmethod
    def read(self, offset: int, size: int) -> bytes:
        """Return up to *size* bytes from *offset*; fewer at the end."""

    @abstractmethod
    def truncate(self, size: int) -> None:
        """Cut the value to *size* bytes, or extend it with zeros."""

    @abstractmethod
    def commit(self, name: str, *, mtime_ns: int | None = None, durable: bool = False) -> ItemInfo | None:
        """Put the value in place as *name*, replacing an existing item atomically.

        *mtime_ns* sets the modification time. With ``durable=True`` the value
        and the rename are on stable storage before this returns. After a
        commit, successful or not, the staged value cannot be used again.
        Returns the stored item's `ItemInfo` if the backend has its size and
        mtime without another request, or None, and then a caller must ask `Backend.info`.
        """

    @abstractmethod
    def discard(self) -> None:
        """Drop the staged value; nothing of it stays visible. Safe to call twice."""

    def __enter__(self) -> StagedValue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


class SpooledValue(StagedValue):
    """A `StagedValue` kept in a local temporary file and stored whole at `commit`.

    The fallback for backends that cannot write a temporary object at offsets.
    Memory stays bounded because the value lives on the local disk.
    """

    def __init__(self, backend: Backend, initial: BinaryIO | None = None) -> None:
        self._backend = backend
        self._file: BinaryIO | None = tempfile.TemporaryFile(prefix="borgstorefs-", suffix=".tmp")  # noqa: SIM115
        if initial is not None:
            shutil.copyfileobj(initial, self._file, COPY_CHUNK_SIZE)

    def _open_file(self) -> BinaryIO:
        if self._file is None:
            raise ValueError("staged value was already committed or discarded")
        return self._file

    @property
    def size(self) -> int:
        return os.fstat(self._open_file().fileno()).st_size

    def write(self, offset: int, data: bytes) -> int:
        return os.pwrite(self._open_file().fileno(), data, offset)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self._open_file().fileno(), size, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._open_file().fileno(), size)

    def commit(self, name: str, *, mtime_ns: int | None = None, durable: bool = False) -> None:
        spool = self._open_file()
        try:
            spool.seek(0)
            self._backend.store(name, spool)
            if mtime_ns is not None:
                self._backend.set_mtime(name, mtime_ns)
        finally:
            self.discard()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ValueReader(ABC):
    """An item opened for reading: reads at offsets until `close`.

    Created by `Backend.open_reader`. `size` and `mtime_ns` describe the
    value at open time. Backends that keep the item open (`PosixFS` and the
    SFTP backend) go on reading that value after the item is replaced by a
    move or a store, or deleted, as a POSIX file descriptor does; `LoadingReader`
    does not. Thread-safe: `read` may run in several threads at once, and
    `close` may be called while reads run, which finish first.
    """

    def __init__(self, size: int, mtime_ns: int | None) -> None:
        self._size = size
        self._mtime_ns = mtime_ns

    @property
    def size(self) -> int:
        """Size of the value in bytes when it was opened."""
        return self._size

    @property
    def mtime_ns(self) -> int | None:
        """Modification time when it was opened, in nanoseconds since the epoch, or None where unknown."""
        return self._mtime_ns

    @abstractmethod
    def read(self, offset: int, size: int) -> bytes:
        """Return *size* bytes from *offset*; fewer only at the end of the value, none past it.

        Raises `ValueError` for a negative *offset* or *size*, or after `close`.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the open item; safe to call more than once."""

    def __enter__(self) -> ValueReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_read_range(offset: int, size: int) -> None:
    """Raise `ValueError` unless *offset* and *size* of a read are non-negative."""
    if offset < 0 or size < 0:
        raise ValueError(f"read offset and size must be >= 0, not offset={offset}, size={size}")


class LoadingReader(ValueReader):
    """A `ValueReader` that loads from the item's name at each read.

    The default of `Backend.open_reader` for backends that cannot keep an
    item open. It sees the current value at each read: after a replacement
    it reads the new value, and after a delete `read` raises `ObjectNotFound`.
    """

    def __init__(self, backend: Backend, name: str, info: ItemInfo) -> None:
        super().__init__(info.size, info.mtime_ns)
        self._backend = backend
        self._name = name
        self._closed = False

    def read(self, offset: int, size: int) -> bytes:
        check_read_range(offset, size)
        if self._closed:
            raise ValueError(f"reader of {self._name!r} is closed")
        if size == 0:
            return b""
        return self._backend.load(self._name, size=size, offset=offset)

    def close(self) -> None:
        self._closed = True


class Backend(ABC):
    """Abstract base of all backends; subclasses implement the abstract methods.

    Lifecycle: `create` (once, closed), then `open` ... `close` any number of
    times, and `destroy` (closed) to remove everything. Methods other than
    these four raise `BackendMustBeOpen` on a closed backend.
    """

    precreate_dirs: bool = False
    """Whether `Store.create` makes every nesting directory in advance, as borgstore does for file systems."""

    mtime_resolution_ns: int = 1
    """Granularity of the modification times this backend keeps, in nanoseconds."""

    def __init__(self) -> None:
        self.opened = False

    def _check_open(self) -> None:
        if not self.opened:
            raise BackendMustBeOpen(f"backend {self} must be opened first")

    def _check_closed(self, action: str) -> None:
        if self.opened:
            raise BackendMustNotBeOpen(f"backend {self} must be closed to {action}")

    @abstractmethod
    def create(self) -> None:
        """Create the empty base location (and missing parents).

        Raises `BackendAlreadyExists` if it exists and is not empty.
        """

    @abstractmethod
    def destroy(self) -> None:
        """Remove the base location and everything in it; `BackendDoesNotExist` if missing."""

    @abstractmethod
    def open(self) -> None:
        """Start using the backend; `BackendDoesNotExist` if the base location is missing."""

    @abstractmethod
    def close(self) -> None:
        """Stop using the backend and release its resources."""

    def __enter__(self) -> Backend:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abstractmethod
    def mkdir(self, name: str) -> None:
        """Create directory *name* and missing parents; an existing directory is fine."""

    def mkdirs(self, names: Iterable[str]) -> None:
        """Create every directory in *names*, as `mkdir` does; backends may batch the requests."""
        for name in names:
            self.mkdir(name)

    @abstractmethod
    def rmdir(self, name: str) -> None:
        """Remove the empty directory *name*: `DirectoryNotEmpty` or `ObjectNotFound` otherwise."""

    @abstractmethod
    def info(self, name: str) -> ItemInfo:
        """Return what is known of *name*; ``exists=False`` (and nothing else raised) if it is missing."""

    @abstractmethod
    def load(self, name: str, *, size: int | None = None, offset: int = 0) -> bytes:
        """Return *size* bytes (all if None) from *offset* of item *name*.

        A negative *offset* counts from the end. Past the end, the available
        bytes are returned, possibly none. `ObjectNotFound` if missing.
        """

    def open_reader(self, name: str) -> ValueReader:
        """Open item *name* for reads at offsets; `ObjectNotFound` if it is missing or a directory.

        This default returns a `LoadingReader`, which costs one `info` here
        and one `load` per read. Backends that can keep a file open override
        it, so that reads cost less and see the value of open time.
        """
        self._check_open()
        validate_backend_name(name)
        info = self.info(name)
        if not info.exists or info.directory:
            raise ObjectNotFound(name)
        return LoadingReader(self, name, info)

    @abstractmethod
    def store(self, name: str, value: bytes | BinaryIO) -> None:
        """Store *value* (bytes, or a binary file object read to its end) as item *name*.

        Atomic: readers see the old value or the whole new one, never a part.
        Missing parent directories below the base location are created.
        """

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove item *name* for good; `ObjectNotFound` if missing."""

    @abstractmethod
    def move(self, curr_name: str, new_name: str, *, replace: bool = True) -> None:
        """Rename item *curr_name* to *new_name* atomically.

        An existing *new_name* is replaced, or with ``replace=False`` kept and
        `ObjectAlreadyExists` raised. `ObjectNotFound` if *curr_name* is missing.
        """

    @abstractmethod
    def list(self, name: str) -> Iterator[ItemInfo]:
        """Yield the entries of directory *name* (``""`` is the base), sorted by name.

        Not recursive; temporary files (`TMP_SUFFIX`) never appear. Each entry
        carries its size and mtime from the same directory read, so listing
        costs no request per entry. `ObjectNotFound` if the directory is missing.
        """

    def list_kinds(self, name: str) -> list[tuple[str, bool]]:
        """Return ``(name, is_directory)`` of each entry of directory *name*, in no particular order.

        For callers that need no sizes: backends that must ask for each
        entry's size separately override it to skip that.
        """
        return [(entry.name, entry.directory) for entry in self.list(name)]

    def set_mtime(self, name: str, mtime_ns: int) -> None:  # noqa: B027 (optional, not abstract)
        """Set the modification time of item *name*; backends without mtimes ignore it."""

    def stage(self, name: str, *, copy_from: str | None = None) -> StagedValue:
        """Start writing a value that `StagedValue.commit` will put in place as *name*.

        With *copy_from*, the staged value starts as a copy of that item
        (`ObjectNotFound` if it is missing). This default spools to a local
        temporary file; backends that can write at offsets override it.
        """
        self._check_open()
        if copy_from is None:
            return SpooledValue(self)
        with tempfile.TemporaryFile(prefix="borgstorefs-") as source:
            self.copy_to_file(copy_from, source)
            source.seek(0)
            return SpooledValue(self, source)

    def copy_to_file(self, name: str, target: BinaryIO) -> None:
        """Write the value of *name* into *target* in chunks, without holding it in memory."""
        offset = 0
        while chunk := self.load(name, size=COPY_CHUNK_SIZE, offset=offset):
            target.write(chunk)
            offset += len(chunk)
            if len(chunk) < COPY_CHUNK_SIZE:
                break

    def space(self) -> SpaceInfo | None:
        """Return the capacity of the storage below the base location, or None if unknown."""
        return None
