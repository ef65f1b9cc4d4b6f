"""Staged values of the SFTP backend: a temporary file on the server, written at offsets."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from paramiko.sftp import CMD_REMOVE, CMD_SETSTAT, SFTP_FAILURE, SFTP_FLAG_READ, SFTP_FLAG_WRITE, SFTP_NO_SUCH_FILE

from ..errors import BackendError
from ._base import COPY_CHUNK_SIZE, StagedValue
from .sftp_files import copy_file, mtime_seconds, open_source, read_file, status_error, temp_name_for
from .sftp_session import SFTPSession, SFTPStatusError, attributes

if TYPE_CHECKING:
    from .sftp import SFTPBackend

logger = logging.getLogger(__name__)

STAGE_BUFFER_SIZE = COPY_CHUNK_SIZE
"""Bytes of consecutive writes a staged value collects before it sends them in one pipelined burst."""


class SFTPStagedValue(StagedValue):
    """A temporary file beside the target on the server, written at offsets and renamed at `commit`.

    Consecutive writes collect in a local buffer of up to `STAGE_BUFFER_SIZE`
    bytes and go out as one pipelined burst, so memory stays bounded and no
    session is held between calls. Every call is retried on a new connection
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
        try:
            self._retrier.call(f"stage({backend._name_of(target)!r})", lambda: self._create(source, source_name))
        except BaseException:
            self.discard()
            raise

    def _create(self, source: str | None, source_name: str | None) -> None:
        backend = self._backend
        with backend._pool.session() as session:
            source_handle = open_source(session, source, source_name) if source is not None else None
            try:
                handle = self._create_temp(session)
                try:
                    if source_handle is not None:
                        self._size = copy_file(session, source_handle, handle)
                finally:
                    session.close_handle(handle)
            finally:
                if source_handle is not None and session.alive:
                    session.close_handle(source_handle, wait=False)

    def _create_temp(self, session: SFTPSession) -> bytes:
        try:
            return self._backend._create_exclusive(session, self._temp_path)
        except SFTPStatusError as err:
            if err.code == SFTP_FAILURE and self._retrier.retried:
                # An earlier try created it before the connection broke.
                return session.open_file(self._temp_path, SFTP_FLAG_WRITE | SFTP_FLAG_READ)
            raise status_error(err, self._backend._name_of(self._target)) from None

    def _check_usable(self) -> None:
        if not self._open:
            raise ValueError(f"staged value {self._temp_path} was already committed or discarded")

    @property
    def size(self) -> int:
        return self._size

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
            handle = self._open_temp(session, SFTP_FLAG_WRITE)
            try:
                writer = session.writer(handle)
                writer.write(self._buffer_offset, self._buffer)
                writer.finish()
            finally:
                session.close_handle(handle)

    def _open_temp(self, session: SFTPSession, flags: int) -> bytes:
        try:
            return session.open_file(self._temp_path, flags)
        except SFTPStatusError as err:
            raise status_error(err, self._temp_path) from None

    def read(self, offset: int, size: int) -> bytes:
        self._check_usable()
        self._flush()
        return self._retrier.call(f"read({self._temp_path!r})", lambda: self._read_once(offset, size))

    def _read_once(self, offset: int, size: int) -> bytes:
        with self._backend._pool.session() as session:
            try:
                return read_file(session, self._temp_path, offset, size)
            except SFTPStatusError as err:
                raise status_error(err, self._temp_path) from None

    def truncate(self, size: int) -> None:
        self._check_usable()
        self._flush()
        self._retrier.call(f"truncate({self._temp_path!r})", lambda: self._setstat(attributes(size=size)))
        self._size = size

    def _setstat(self, attrs: object) -> None:
        with self._backend._pool.session() as session:
            try:
                session.request(CMD_SETSTAT, self._temp_path, attrs)
            except SFTPStatusError as err:
                raise status_error(err, self._temp_path) from None

    def commit(self, name: str, *, mtime_ns: int | None = None, durable: bool = False) -> None:
        self._check_usable()
        target = self._backend.path_of(name)
        try:
            self._flush()
            if mtime_ns is not None:
                seconds = mtime_seconds(mtime_ns)
                self._retrier.call(f"commit({name!r})", lambda: self._setstat(attributes(mtime=seconds)))
            self._retrier.call(f"commit({name!r})", lambda: self._commit_once(name, target, durable))
        finally:
            self.discard()

    def _commit_once(self, name: str, target: str, durable: bool) -> None:
        backend = self._backend
        with backend._pool.session() as session:
            try:
                if durable:
                    handle = self._open_temp(session, SFTP_FLAG_WRITE)
                    try:
                        backend._fsync(session, handle)
                    finally:
                        session.close_handle(handle)
                # NOTE: SFTP has no request that flushes a directory, so with
                # durable=True the rename itself may still be lost in a crash.
                backend._rename_into_place(session, self._temp_path, target)
            except SFTPStatusError as err:
                renamed = err.code == SFTP_NO_SUCH_FILE and backend._stat(session, target) is not None
                if self._retrier.retried and renamed:
                    # An earlier try renamed it before the connection broke.
                    logger.info("commit(%r): the value was already in place after a reconnect", name)
                    return
                raise status_error(err, name) from None
        self._open = False  # the temporary name became the item

    def discard(self) -> None:
        self._buffer = bytearray()
        if not self._open:
            return
        self._open = False
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
