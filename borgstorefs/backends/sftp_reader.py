"""Readers of the SFTP backend: a remote file handle kept open for reads at offsets."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from paramiko.sftp import SFTP_FLAG_READ

from ..errors import BackendError, ObjectNotFound
from ._base import ValueReader, check_read_range
from .sftp_files import is_directory, status_error
from .sftp_session import Attributes, SessionGone, SFTPSession, SFTPStatusError, is_connection_lost

if TYPE_CHECKING:
    from .sftp import SFTPBackend

logger = logging.getLogger(__name__)


class SFTPReader(ValueReader):
    """An item held open by a handle on the server, in the session that opened it.

    The handle keeps the file open in the server's process, so reads return
    the value of open time after the item is renamed, replaced or deleted.
    Each read borrows the handle's session from the pool for that request
    alone (see `SessionPool.pin`), so a reader costs no session while idle.

    Lost connections: the handle dies with its session. The next read opens
    the item again by name on a new connection and goes on only if the size
    and the modification time (whole seconds) are those of open time.
    Otherwise it raises `BackendError`, also if the item was removed or
    renamed meanwhile. Reads, the reopening included, are retried like
    backend calls.

    NOTE: a value replaced while the connection was down by one of the same
    size within the same second passes that check, and the reader then
    returns parts of the new value.
    """

    def __init__(self, backend: SFTPBackend, name: str, path: str) -> None:
        self._backend = backend
        self._pool = backend._pool
        self._retrier = backend._retrier
        self._name = name
        self._path = path
        # Guards the session and handle, which a reopen replaces, and `_closed`.
        self._lock = threading.Lock()
        self._closed = False
        self._session, self._handle, attrs = self._retrier.call(f"open_reader({name!r})", self._open_handle)
        # SFTP version 3 carries whole seconds, which a reopen compares.
        self._mtime = attrs.mtime
        super().__init__(attrs.size or 0, attrs.mtime * 1_000_000_000 if attrs.mtime is not None else None)
        logger.debug("opened reader of %s on %s", path, self._pool.label)

    def __repr__(self) -> str:
        return f"SFTPReader({self._name!r})"

    def _open_handle(self) -> tuple[SFTPSession, bytes, Attributes]:
        """Open the item in the session with the fewest readers and pin that session."""
        with self._pool.session(spread=True) as session:
            try:
                handle = session.open_file(self._path, SFTP_FLAG_READ)
                try:
                    attrs = session.stat_handle(handle)
                except BaseException:
                    if session.alive:
                        session.close_handle(handle, wait=False)
                    raise
            except SFTPStatusError as err:
                raise status_error(err, self._name) from None
            if is_directory(attrs):
                session.close_handle(handle, wait=False)
                raise ObjectNotFound(self._name, f"item not found: {self._name!r} is a directory")
            self._pool.pin(session)
        return session, handle, attrs

    def read(self, offset: int, size: int) -> bytes:
        check_read_range(offset, size)
        self._check_usable()
        self._backend._check_open()
        if size == 0:
            return b""
        return self._retrier.call(f"read({self._name!r})", lambda: self._read_once(offset, size))

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"reader of {self._name!r} is closed")

    def _read_once(self, offset: int, size: int) -> bytes:
        with self._lock:
            session, handle = self._session, self._handle
        try:
            return self._read_in(session, handle, offset, size)
        except SessionGone:
            pass
        session, handle = self._reopen(session)
        # A second `SessionGone` is a lost connection to the `Retrier`, which repeats this call.
        return self._read_in(session, handle, offset, size)

    def _read_in(self, session: SFTPSession, handle: bytes, offset: int, size: int) -> bytes:
        with self._pool.session(pinned=session) as lent:
            # `close` sends CLOSE in this session too, so this check and the
            # read cannot interleave with it.
            self._check_usable()
            try:
                return lent.read_range(handle, offset, size)
            except SFTPStatusError as err:
                raise status_error(err, self._name) from None

    def _reopen(self, lost: SFTPSession) -> tuple[SFTPSession, bytes]:
        """Open the item again after *lost* closed; raise `BackendError` if the value changed."""
        with self._lock:
            self._check_usable()
            if self._session is not lost:
                return self._session, self._handle  # another thread reopened it already
            try:
                session, handle, attrs = self._open_handle()
            except ObjectNotFound:
                raise BackendError(
                    f"cannot read {self._name!r} after a lost connection: the item was removed or renamed meanwhile"
                ) from None
            if (attrs.size or 0, attrs.mtime) != (self._size, self._mtime):
                self._pool.unpin(session)
                self._close_quietly(session, handle)
                raise BackendError(
                    f"cannot read {self._name!r} after a lost connection: the item was replaced meanwhile"
                )
            self._pool.unpin(lost)
            self._session, self._handle = session, handle
        logger.info("opened %s again on a new SFTP session after a lost connection", self._path)
        return session, handle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            session, handle = self._session, self._handle
            self._pool.unpin(session)
        self._close_quietly(session, handle)

    def _close_quietly(self, session: SFTPSession, handle: bytes) -> None:
        """Send CLOSE for *handle* without waiting for the reply; a lost session took the handle with it."""
        try:
            with self._pool.session(pinned=session) as lent:
                lent.close_handle(handle, wait=False)
        except Exception as err:
            if not is_connection_lost(err):
                raise
            logger.debug("reader of %s: the handle went with its session (%s)", self._path, err)
