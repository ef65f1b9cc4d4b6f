"""POSIX file system backend: ``file:///absolute/path``.

Each item is a file named by its nested name below the base directory.
Values are written to a temporary file in the target directory and renamed
into place, so readers and crashes never see a partial value.

Durability: with ``fsync=True`` (the default) `store` flushes the file and its
directory to stable storage before it returns, as borgstore does. With
``fsync=False`` a stored value survives a daemon crash but may be lost with
the rest of the page cache if the machine loses power.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

from ..errors import (
    BackendAlreadyExists,
    BackendDoesNotExist,
    BackendError,
    BackendURLInvalid,
    DirectoryNotEmpty,
    NoSpaceLeft,
    ObjectAlreadyExists,
    ObjectNotFound,
    PermissionDenied,
)
from ..names import TMP_SUFFIX
from ._base import (
    COPY_CHUNK_SIZE,
    Backend,
    ItemInfo,
    SpaceInfo,
    StagedValue,
    ValueReader,
    check_read_range,
    validate_backend_name,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def get_file_backend(url: str) -> PosixFS | None:
    """Return a `PosixFS` for a ``file://`` URL, or None for other schemes."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    if parts.netloc not in ("", "localhost"):
        raise BackendURLInvalid(f"invalid file URL {url!r}: the host must be empty, as in file:///abs/path")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise BackendURLInvalid(f"invalid file URL {url!r}: the path must be absolute, as in file:///abs/path")
    return PosixFS(path)


def temp_name_for(path: str) -> str:
    """Return a fresh temporary file name beside *path* (see `names.TMP_NAME_EXTRA`)."""
    return f"{path}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def call_making_parent(path: str, function: Callable[[], T]) -> T:
    """Return ``function()``, which creates *path* or renames to it, after making missing parent directories.

    The directories are made only when the first call fails because one is missing.
    Nesting directories nearly always exist already, because `Store.create`
    makes them in advance and earlier items made the others. An ``mkdir``
    before every call would cost two system calls: ``mkdir`` fails with
    EEXIST, and a ``stat`` then checks that a directory is in the way. ENOTDIR
    leads to `os.makedirs` as well, so that a file in the way of a directory
    raises what it raised before this function tried the call first.
    """
    try:
        return function()
    except (FileNotFoundError, NotADirectoryError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return function()


def create_temp_file(target: str) -> tuple[str, int]:
    """Create a temporary file beside *target* and missing parent directories, and return its path and descriptor."""
    temp_path = temp_name_for(target)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    return temp_path, call_making_parent(target, lambda: os.open(temp_path, flags, 0o666))


_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ELOOP})
"""Errors of a stat that mean no item, because the entry is gone or a symbolic link leads nowhere."""


def open_value(name: str, path: str) -> tuple[int, os.stat_result]:
    """Open the value of item *name* at *path* for reading; return the descriptor and its status.

    Raises `ObjectNotFound` for anything but a regular file. The open does
    not block: without O_NONBLOCK, opening a FIFO waits for a writer, and
    a mount would hang with it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(name, f"item not found: {name!r} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def is_file(path: str) -> bool:
    """Return whether *path* is a regular file, following symbolic links, as `Path.is_file` does."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            return False
        raise


def translate_os_errors(name: str) -> OSErrorTranslation:
    """Return a context manager that turns an `OSError` about *name* into the matching `BackendError`."""
    return OSErrorTranslation(name)


class OSErrorTranslation:
    """The context manager of `translate_os_errors`.

    A class rather than a generator-based context manager, because a mount
    enters several per file and the generator machinery costs a microsecond each.
    """

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, error: BaseException | None, *traceback: object) -> None:
        if isinstance(error, OSError):
            raise backend_error_for(error, self._name) from error


def backend_error_for(err: OSError, name: str) -> BackendError:
    """Return the `BackendError` that describes *err*, an error about *name*."""
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return ObjectNotFound(name)
    if err.errno == errno.EEXIST:
        return ObjectAlreadyExists(name)
    if err.errno == errno.ENOTEMPTY:
        return DirectoryNotEmpty(name)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceLeft(f"no space left for {name!r}: {err.strerror}")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"permission denied for {name!r}: {err.strerror}")
    return BackendError(f"{err.strerror or err} on {name!r}")


def rename_noreplace(source: str, target: str) -> None:
    """Rename *source* to *target* atomically unless *target* exists (`FileExistsError`)."""
    result = _libc.renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
    if result == 0:
        return
    code = ctypes.get_errno()
    if code not in (errno.EINVAL, errno.ENOSYS):
        raise OSError(code, os.strerror(code), source, None, target)
    # The file system cannot rename without replacing: a hard link fails
    # atomically if the target exists, and the unlink then drops the source.
    os.link(source, target)
    os.unlink(source)


def fsync_directory(path: str) -> None:
    """Flush the directory entries of *path* to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file_data(source_fd: int, target_fd: int) -> int:
    """Copy a whole file between descriptors inside the kernel, keeping its holes; return its size in bytes.

    Only the data segments (``SEEK_DATA`` to ``SEEK_HOLE``) are copied and the
    target is extended to the full size, so a sparse file stays sparse: a
    1 TiB file with a few written blocks costs those blocks, not 1 TiB.
    """
    size = os.fstat(source_fd).st_size
    os.ftruncate(target_fd, size)
    for start, end in data_segments(source_fd, size):
        copy_range(source_fd, target_fd, start, end)
    return size


def data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` byte ranges of *fd* that hold data; all of it where holes are not reported."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                return
            if err.errno != errno.EINVAL:
                raise
            yield offset, size  # the file system does not report holes
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def copy_range(source_fd: int, target_fd: int, start: int, end: int) -> None:
    """Copy bytes *start* to *end* between descriptors at the same offsets."""
    offset = start
    while offset < end:
        try:
            copied = os.copy_file_range(source_fd, target_fd, end - offset, offset, offset)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            copied = 0
        if copied == 0:
            break
        offset += copied
    while offset < end:
        chunk = os.pread(source_fd, min(COPY_CHUNK_SIZE, end - offset), offset)
        if not chunk:
            break
        offset += os.pwrite(target_fd, chunk, offset)


class PosixStagedValue(StagedValue):
    """A temporary file beside the target, written at offsets and renamed into place.

    The size is counted here instead of read with ``fstat``, because only
    this object writes to the temporary file that ``O_EXCL`` created.
    """

    def __init__(self, backend: PosixFS, target: str, copy_from: tuple[str, str] | None) -> None:
        """*copy_from* is the name and path of the item whose value the staged one starts with."""
        self._backend = backend
        self._temp_path, fd = create_temp_file(target)
        self._fd: int | None = fd
        self._size = 0
        self._renamed = False  # the temporary file became the item
        try:
            if copy_from is not None:
                source_fd, _ = open_value(*copy_from)
                try:
                    self._size = copy_file_data(source_fd, fd)
                finally:
                    os.close(source_fd)
        except BaseException:
            self.discard()
            raise

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"staged value {self._temp_path} was already committed or discarded")
        return self._fd

    @property
    def size(self) -> int:
        self._open_fd()
        return self._size

    def write(self, offset: int, data: bytes) -> int:
        with translate_os_errors(self._temp_path):
            written = os.pwrite(self._open_fd(), data, offset)
        if written:
            self._size = max(self._size, offset + written)
        return written

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self._open_fd(), size, offset)

    def truncate(self, size: int) -> None:
        with translate_os_errors(self._temp_path):
            os.ftruncate(self._open_fd(), size)
        self._size = size

    def commit(self, name: str, *, mtime_ns: int | None = None, durable: bool = False) -> ItemInfo:
        fd = self._open_fd()
        target = self._backend.path_of(name)
        temp_path = self._temp_path
        try:
            with translate_os_errors(name):
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                else:
                    mtime_ns = os.fstat(fd).st_mtime_ns  # set by the kernel at the last write
                if durable:
                    os.fsync(fd)
                # The target's directory differs from the temporary file's when the item was renamed meanwhile.
                call_making_parent(target, lambda: os.replace(temp_path, target))
                self._renamed = True
                if durable:
                    fsync_directory(os.path.dirname(target))
        finally:
            self.discard()
        return ItemInfo(name.rpartition("/")[2], True, self._size, False, mtime_ns)

    def discard(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if not self._renamed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp_path)


class PosixReader(ValueReader):
    """An item held open by an ``O_RDONLY`` descriptor and read with ``pread``.

    The descriptor keeps the file's inode, so reads return the value of open
    time after the item is renamed, replaced or deleted. Values never change
    in place, because `store` and staged values write a new file and rename it.
    """

    def __init__(self, name: str, path: str) -> None:
        self._name = name
        with translate_os_errors(name):
            self._fd, st = open_value(name, path)
        super().__init__(st.st_size, st.st_mtime_ns)
        # The descriptor is closed by the call that ends the last use: `close`, or
        # the last read that ran while `close` was called. Closing it under a
        # running pread could let a new file reuse the number for that read.
        self._lock = threading.Lock()
        self._reads = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"PosixReader({self._name!r}, fd={self._fd})"

    def read(self, offset: int, size: int) -> bytes:
        check_read_range(offset, size)
        with self._lock:
            if self._closed:
                raise ValueError(f"reader of {self._name!r} is closed")
            self._reads += 1
        try:
            with translate_os_errors(self._name):
                return read_exactly(self._fd, size, offset)
        finally:
            with self._lock:
                self._reads -= 1
                last = self._closed and self._reads == 0
            if last:
                os.close(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = self._reads == 0
        if idle:
            os.close(self._fd)


class PosixFS(Backend):
    """Backend on a local (or locally mounted) POSIX file system.

    Safe for use from several threads: every call works on its own file
    descriptors and relies on the kernel's atomic rename.
    """

    precreate_dirs = True

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        super().__init__()
        self.base = Path(path)
        self._base_text = str(self.base)
        if not self.base.is_absolute():
            raise BackendURLInvalid(f"the base path of a file backend must be absolute: {str(self.base)!r}")
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"PosixFS({str(self.base)!r})"

    def path_of(self, name: str, *, base_allowed: bool = False) -> str:
        """Return the file system path of backend name *name*, after validating it.

        A string, because on a mount's hot paths `Path` objects cost about as
        much to build and convert as the system calls that use them.
        """
        validate_backend_name(name, base_allowed=base_allowed)
        return f"{self._base_text}/{name}" if name else self._base_text

    # Lifecycle

    def create(self) -> None:
        self._check_closed("create it")
        if self.base.exists() and (not self.base.is_dir() or any(self.base.iterdir())):
            raise BackendAlreadyExists(f"cannot create a store at {str(self.base)!r}: it exists and is not empty")
        with translate_os_errors(str(self.base)):
            self.base.mkdir(parents=True, exist_ok=True)
        logger.info("created store directory %s", self.base)

    def destroy(self) -> None:
        self._check_closed("destroy it")
        if not self.base.is_dir():
            raise BackendDoesNotExist(f"no store at {str(self.base)!r}")
        with translate_os_errors(str(self.base)):
            shutil.rmtree(self.base)
        logger.info("destroyed store directory %s", self.base)

    def open(self) -> None:
        self._check_closed("open it")
        if not self.base.is_dir():
            raise BackendDoesNotExist(f"no store at {str(self.base)!r}: create it first")
        self.opened = True

    def close(self) -> None:
        self.opened = False

    # Directories

    def mkdir(self, name: str) -> None:
        self._check_open()
        path = self.path_of(name)
        with translate_os_errors(name):
            os.makedirs(path, exist_ok=True)

    def rmdir(self, name: str) -> None:
        self._check_open()
        path = self.path_of(name)
        with translate_os_errors(name):
            os.rmdir(path)

    def list(self, name: str) -> Iterator[ItemInfo]:
        self._check_open()
        path = self.path_of(name, base_allowed=True)
        with translate_os_errors(name):
            found = [entry for entry in os.listdir(path) if not entry.endswith(TMP_SUFFIX)]
        found.sort()
        # The directory is read here, so that a missing one raises at the call. The
        # stat of each entry waits until the caller gets to it: a mount replies with
        # the first entries of a large namespace while the rest are still unread.
        return self._stat_each(name, path, found)

    @staticmethod
    def _stat_each(name: str, path: str, found: list[str]) -> Iterator[ItemInfo]:
        # A mount lists whole namespaces, so the cost per entry is kept low. Each stat is
        # relative to the open directory (no path walk), and `_make` skips argument parsing.
        make = ItemInfo._make
        try:
            directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # the directory was removed since it was read, and every entry with it
        except OSError as error:
            raise backend_error_for(error, name) from error
        try:
            for entry in found:
                try:
                    st = os.stat(entry, dir_fd=directory)
                except OSError as error:
                    if error.errno in _GONE_ERRNOS:
                        continue  # removed since the directory was read, or a link to nothing
                    raise backend_error_for(error, f"{name}/{entry}" if name else entry) from error
                if stat.S_ISREG(st.st_mode):
                    yield make((entry, True, st.st_size, False, st.st_mtime_ns))
                elif stat.S_ISDIR(st.st_mode):
                    yield make((entry, True, 0, True, st.st_mtime_ns))
        finally:
            os.close(directory)

    def list_kinds(self, name: str) -> list[tuple[str, bool]]:
        self._check_open()
        path = self.path_of(name, base_allowed=True)
        # The entry types come with the directory read (d_type): no stat per entry.
        with translate_os_errors(name), os.scandir(path) as entries:
            return [
                (entry.name, entry.is_dir(follow_symlinks=False))
                for entry in entries
                if not entry.name.endswith(TMP_SUFFIX)
            ]

    # Items

    def info(self, name: str) -> ItemInfo:
        # The mount's hottest call (one per lookup), so it makes a single stat.
        self._check_open()
        path = self.path_of(name, base_allowed=True)
        base_name = name.rpartition("/")[2] if name else self.base.name
        try:
            st = os.stat(path)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return ItemInfo(base_name, False, 0, False)
            raise backend_error_for(err, name) from err  # ELOOP too: a link loop is a broken store
        if stat.S_ISREG(st.st_mode):
            return ItemInfo(base_name, True, st.st_size, False, st.st_mtime_ns)
        if stat.S_ISDIR(st.st_mode):
            return ItemInfo(base_name, True, 0, True, st.st_mtime_ns)
        return ItemInfo(base_name, False, 0, False)  # a FIFO, socket or device is not an item

    def load(self, name: str, *, size: int | None = None, offset: int = 0) -> bytes:
        self._check_open()
        path = self.path_of(name)
        with translate_os_errors(name):
            fd, st = open_value(name, path)
            try:
                if offset < 0 or size is None:
                    length = st.st_size
                    if offset < 0:
                        offset = max(0, length + offset)
                    if size is None:
                        size = max(0, length - offset)
                return read_exactly(fd, size, offset)
            finally:
                os.close(fd)

    def open_reader(self, name: str) -> ValueReader:
        self._check_open()
        return PosixReader(name, self.path_of(name))

    def store(self, name: str, value: bytes | BinaryIO) -> None:
        self._check_open()
        target = self.path_of(name)
        with translate_os_errors(name):
            temp_path, fd = create_temp_file(target)
            try:
                with os.fdopen(fd, "wb", closefd=False) as file:
                    if isinstance(value, bytes | bytearray | memoryview):
                        file.write(value)
                    else:
                        shutil.copyfileobj(value, file, COPY_CHUNK_SIZE)
                if self.fsync:
                    os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(temp_path, target)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_path)
                raise
            if self.fsync:
                fsync_directory(os.path.dirname(target))

    def delete(self, name: str) -> None:
        self._check_open()
        path = self.path_of(name)
        with translate_os_errors(name):
            os.unlink(path)

    def move(self, curr_name: str, new_name: str, *, replace: bool = True) -> None:
        self._check_open()
        source = self.path_of(curr_name)
        target = self.path_of(new_name)
        with translate_os_errors(curr_name):
            if not is_file(source):
                raise ObjectNotFound(curr_name)
        rename = os.replace if replace else rename_noreplace
        with translate_os_errors(new_name):
            call_making_parent(target, lambda: rename(source, target))

    def set_mtime(self, name: str, mtime_ns: int) -> None:
        self._check_open()
        path = self.path_of(name)
        with translate_os_errors(name):
            os.utime(path, ns=(mtime_ns, mtime_ns))

    def stage(self, name: str, *, copy_from: str | None = None) -> StagedValue:
        self._check_open()
        target = self.path_of(name)
        source = (copy_from, self.path_of(copy_from)) if copy_from is not None else None
        with translate_os_errors(copy_from or name):
            return PosixStagedValue(self, target, source)

    def space(self) -> SpaceInfo:
        self._check_open()
        with translate_os_errors(str(self.base)):
            st = os.statvfs(self.base)
        return SpaceInfo(st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize)


def read_exactly(fd: int, size: int, offset: int) -> bytes:
    """Read *size* bytes at *offset*, fewer only at the end of the file."""
    first = os.pread(fd, size, offset)
    if len(first) == size or not first:
        return first
    chunks = [first]
    done = len(first)
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)
