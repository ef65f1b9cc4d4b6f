"""Staged values of the SFTP backend: a temporary file on the server, written at offsets."""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING

from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_FSETSTAT,
    CMD_REMOVE,
    CMD_SETSTAT,
    CMD_STAT,
    SFTP_FAILURE,
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
)

from ..errors import BackendError
from ._base import COPY_CHUNK_SIZE, ItemInfo, StagedValue, check_read_range
from .sftp_files import copy_file, item_info, mtime_seconds, open_source, read_file, status_error, temp_name_for
from .sftp_session import Attributes, Reply, SFTPSession, SFTPStatusError, attributes, parse_attributes

if TYPE_CHECKING:
    from .sftp import SFTPBackend

logger = logging.getLogger(__name__)

STAGE_BUFFER_SIZE = COPY_CHUNK_SIZE
"""Bytes of consecutive writes a staged value collects before it sends them in one pipelined burst."""


class SFTPStagedValue(StagedValue):
    """A temporary file beside the target on the server, written at offsets and renamed at `commit`.

    Consecutive writes collect in a local buffer of up to `STAGE_BUFFER_SIZE`
    bytes and go out as one pipelined burst, so memory stays bounded and no
    session is held between calls. A new value (one not copied from an item)
    creates its temporary file only when the buffer must go out: when it is
    full, when a write does not continue it, or at `commit`. Until then reads
    and truncates work on the buffer and `discard` sends nothing, so a small
    value costs three round trips at `commit`: the create, the writes with
    the close, and the rename. Every call is retried on a new connection
    like a backend call, because writing the same bytes at the same offset
    again is harmless.
    """

    def __init__(self, backend: SFTPBackend, target: str, source: str | None, source_name: str | None) -> None:
        self._backend = backend
        self._retrier = backend._retrier
        self._target = target
        self._temp_path = temp_name_for(target)
        self._buffer = bytearray()
        self._buffer_offset = 0
        self._size = 0
        self._open = True
        self._created = False  # the server confirmed that the temporary file exists
        self._create_sent = False  # a create went out, so the file may exist even if its reply was lost
        self._renamed = False
        self._size_unsent = False  # a truncate changed the size while the value was only in the buffer
        if source is None:
            return
        try:
            self._retrier.call(f"stage({backend._name_of(target)!r})", lambda: self._create_copy(source, source_name))
        except BaseException:
            self.discard()
            raise

    def _create_copy(self, source: str, source_name: str | None) -> None:
        with self._backend._pool.session() as session:
            source_handle = open_source(session, source, source_name)
            try:
                handle = self._create_temp(session)
                try:
                    self._size = copy_file(session, source_handle, handle)
                finally:
                    session.close_handle(handle)
            finally:
                if session.alive:
                    session.close_handle(source_handle, wait=False)

    def _create_temp(self, session: SFTPSession) -> bytes:
        self._create_sent = True
        try:
            handle = self._backend._create_exclusive(session, self._temp_path)
        except SFTPStatusError as err:
            if err.code != SFTP_FAILURE or not self._retrier.retried:
                raise status_error(err, self._backend._name_of(self._target)) from None
            # An earlier try created it before the connection broke.
            handle = session.open_file(self._temp_path, SFTP_FLAG_WRITE | SFTP_FLAG_READ)
        self._created = True
        return handle

    def _check_usable(self) -> None:
        if not self._open:
            raise ValueError(f"staged value {self._temp_path} was already committed or discarded")

    @property
    def size(self) -> int:
        return self._size

    @property
    def _buffer_end(self) -> int:
        return self._buffer_offset + len(self._buffer) if self._buffer else 0

    def write(self, offset: int, data: bytes) -> int:
        self._check_usable()
        if self._buffer and (
            offset != self._buffer_offset + len(self._buffer) or len(self._buffer) + len(data) > STAGE_BUFFER_SIZE
        ):
            self._flush()
        if not self._buffer:
            self._buffer_offset = offset
        self._buffer += data
        self._size = max(self._size, offset + len(data))
        if len(self._buffer) >= STAGE_BUFFER_SIZE:
            self._flush()
        return len(data)

    def _flush(self) -> None:
        if not self._buffer:
            return
        self._retrier.call(f"write({self._temp_path!r})", self._flush_once)
        self._buffer = bytearray()

    def _flush_once(self) -> None:
        with self._backend._pool.session() as session:
            try:
                self._write_out(session)
            except SFTPStatusError as err:
                raise status_error(err, self._temp_path) from None

    def _write_out(self, session: SFTPSession, *, mtime: int | None = None, durable: bool = False) -> None:
        """Open or create the temporary file and send the buffer, *mtime*, an fsync and the close.

        Everything after the open is pipelined, so the whole costs two round
        trips. Raises the first `SFTPStatusError` once every reply is in, or
        the `BackendError` of a failed create at once.
        """
        handle = session.open_file(self._temp_path, SFTP_FLAG_WRITE) if self._created else self._create_temp(session)
        try:
            replies = self._send_changes(session, handle, mtime, durable)
        except SFTPStatusError:
            # The writer waits for earlier writes, and so can raise, only with more than
            # PIPELINE_BYTES in flight. The handle must be closed all the same.
            session.close_handle(handle)
            raise
        replies.append(session.send(CMD_CLOSE, handle))
        error = session.wait_all(replies)
        if error is not None:
            raise error
        self._size_unsent = False

    def _send_changes(self, session: SFTPSession, handle: bytes, mtime: int | None, durable: bool) -> list[Reply]:
        replies: list[Reply] = []
        if self._buffer:
            writer = session.writer(handle)
            writer.write(self._buffer_offset, self._buffer)
            replies.extend(writer.detach())
        if self._size_unsent and self._size > self._buffer_end:
            replies.append(session.send(CMD_FSETSTAT, handle, attributes(size=self._size)))
        if mtime is not None:
            replies.append(session.send(CMD_FSETSTAT, handle, attributes(mtime=mtime)))
        if durable:
            fsync = self._backend._send_fsync(session, handle)
            if fsync is not None:
                replies.append(fsync)
        return replies

    def read(self, offset: int, size: int) -> bytes:
        self._check_usable()
        if not self._created:
            return self._read_buffer(offset, size)
        self._flush()
        return self._retrier.call(f"read({self._temp_path!r})", lambda: self._read_once(offset, size))

    def _read_buffer(self, offset: int, size: int) -> bytes:
        """Return *size* bytes at *offset* of a value that is only in the buffer, zeros where nothing was written."""
        check_read_range(offset, size)
        end = min(offset + size, self._size)
        if offset >= end:
            return b""
        value = bytearray(end - offset)
        start, stop = max(offset, self._buffer_offset), min(end, self._buffer_end)
        if start < stop:
            buffered = self._buffer[start - self._buffer_offset : stop - self._buffer_offset]
            value[start - offset : stop - offset] = buffered
        return bytes(value)

    def _read_once(self, offset: int, size: int) -> bytes:
        with self._backend._pool.session() as session:
            try:
                return read_file(session, self._temp_path, offset, size)
            except SFTPStatusError as err:
                raise status_error(err, self._temp_path) from None

    def truncate(self, size: int) -> None:
        self._check_usable()
        if size < 0:
            raise ValueError(f"invalid size {size} to truncate staged value {self._temp_path}: must be at least 0")
        if not self._created:
            if size < self._buffer_end:
                del self._buffer[max(0, size - self._buffer_offset) :]
            self._size = size
            # `_send_changes` sets this size on the server if it is past the buffer's end.
            self._size_unsent = True
            return
        self._flush()
        self._retrier.call(f"truncate({self._temp_path!r})", lambda: self._setstat(attributes(size=size)))
        self._size = size

    def _setstat(self, attrs: object) -> None:
        with self._backend._pool.session() as session:
            try:
                session.request(CMD_SETSTAT, self._temp_path, attrs)
            except SFTPStatusError as err:
                raise status_error(err, self._temp_path) from None

    def commit(self, name: str, *, mtime_ns: int | None = None, durable: bool = False) -> ItemInfo:
        """Put the value in place as *name* and return its `ItemInfo` as `SFTPBackend.info` would.

        The rename goes out only after the server has acknowledged every
        write, the mtime and the close, so that a failed write (a full disk)
        never replaces the old value with a partial one.
        """
        self._check_usable()
        target = self._backend.path_of(name)
        try:
            mtime = mtime_seconds(mtime_ns) if mtime_ns is not None else None
            return self._retrier.call(f"commit({name!r})", lambda: self._commit_once(name, target, mtime, durable))
        finally:
            self.discard()

    def _commit_once(self, name: str, target: str, mtime: int | None, durable: bool) -> ItemInfo:
        backend = self._backend
        with backend._pool.session() as session:
            backend._check_posix_rename(session)
            try:
                self._finish_temp(session, mtime, durable)
                # NOTE: SFTP has no request that flushes a directory, so with
                # durable=True the rename itself may still be lost in a crash.
                stored = self._rename_temp(session, target)
            except SFTPStatusError as err:
                earlier = self._stored_by_earlier_try(session, err, target)
                if earlier is None:
                    raise status_error(err, name) from None
                logger.info("commit(%r): the value was already in place after a reconnect", name)
                stored = earlier
        self._renamed = True
        return item_info(stored._replace(name=posixpath.basename(target)))

    def _finish_temp(self, session: SFTPSession, mtime: int | None, durable: bool) -> None:
        """Bring the temporary file to its final value, mtime and durability, all acknowledged."""
        if self._buffer or not self._created or durable:
            self._write_out(session, mtime=mtime, durable=durable)
            self._buffer = bytearray()
        elif mtime is not None:
            session.request(CMD_SETSTAT, self._temp_path, attributes(mtime=mtime))

    def _rename_temp(self, session: SFTPSession, target: str) -> Attributes:
        """Rename the temporary file to *target* and return its attributes, both in one round trip."""
        backend = self._backend
        stat_reply = session.send(CMD_STAT, self._temp_path)
        rename_reply = backend._send_rename(session, self._temp_path, target)
        try:
            kind, message = session.wait(stat_reply)
        except SFTPStatusError:
            # The rename then fails too, or else the stat of the target below reports the attributes.
            kind, message = None, None
        backend._finish_rename(session, self._temp_path, target, rename_reply)
        if kind == CMD_ATTRS and message is not None:
            return parse_attributes(message)
        stored = backend._stat(session, target)
        # NOTE: a target deleted right after the rename leaves only the local size to report.
        return stored if stored is not None else Attributes("", self._size, None, None)

    def _stored_by_earlier_try(self, session: SFTPSession, err: SFTPStatusError, target: str) -> Attributes | None:
        """Return the target's attributes if an earlier try renamed the value before the connection broke."""
        if err.code != SFTP_NO_SUCH_FILE or not self._retrier.retried:
            return None
        return self._backend._stat(session, target)

    def discard(self) -> None:
        self._buffer = bytearray()
        if not self._open:
            return
        self._open = False
        if not self._create_sent or self._renamed:
            return
        try:
            self._retrier.call(f"discard({self._temp_path!r})", self._remove_temp)
        except BackendError as err:
            # The caller is usually unwinding from another error already; a
            # leftover temporary file is invisible to listings.
            logger.error("cannot remove temporary file %s: %s", self._temp_path, err)

    def _remove_temp(self) -> None:
        with self._backend._pool.session() as session:
            try:
                session.request(CMD_REMOVE, self._temp_path)
            except SFTPStatusError as err:
                if err.code != SFTP_NO_SUCH_FILE:
                    raise status_error(err, self._temp_path) from None
