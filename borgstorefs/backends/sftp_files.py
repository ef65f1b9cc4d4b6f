"""Helpers of the SFTP backend on paths, attributes and open files, shared with staged values."""

from __future__ import annotations

import logging
import secrets
import stat
from typing import BinaryIO

from paramiko.sftp import (
    CMD_EXTENDED,
    SFTP_FLAG_READ,
    SFTP_NO_SUCH_FILE,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    int64,
)

from ..errors import BackendError, ObjectNotFound, PermissionDenied
from ..names import TMP_SUFFIX
from ._base import COPY_CHUNK_SIZE, ItemInfo
from .sftp_session import Attributes, LocalReadError, SFTPSession, SFTPStatusError

logger = logging.getLogger(__name__)

MTIME_MAX_SECONDS = 2**32 - 1
"""SFTP version 3 sends times as unsigned 32-bit seconds (until the year 2106)."""


def temp_name_for(path: str) -> str:
    """Return a fresh temporary file name beside *path* (see `names.TMP_NAME_EXTRA`)."""
    return f"{path}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def status_error(err: SFTPStatusError, name: str) -> BackendError:
    """Return the `BackendError` that describes the server's reply *err* about *name*."""
    if err.code == SFTP_NO_SUCH_FILE:
        return ObjectNotFound(name)
    if err.code == SFTP_PERMISSION_DENIED:
        return PermissionDenied(f"permission denied for {name!r}: {err.text}")
    if err.code == SFTP_OP_UNSUPPORTED:
        return BackendError(f"the SFTP server does not support the operation on {name!r}: {err.text}")
    # NOTE: OpenSSH reports most failures, full disks included, as plain
    # SSH_FX_FAILURE, so NoSpaceLeft cannot be distinguished here.
    return BackendError(f"SFTP request on {name!r} failed: {err.text}")


def is_directory(entry: Attributes) -> bool:
    """Return whether the attributes describe a directory."""
    return entry.mode is not None and stat.S_ISDIR(entry.mode)


def item_info(entry: Attributes) -> ItemInfo:
    """Return the `ItemInfo` of a directory entry or stat result."""
    directory = is_directory(entry)
    mtime_ns = entry.mtime * 1_000_000_000 if entry.mtime is not None else None
    return ItemInfo(entry.name, True, 0 if directory else entry.size or 0, directory, mtime_ns)


def mtime_seconds(mtime_ns: int) -> int:
    """Return *mtime_ns* as whole seconds for SFTP; `ValueError` outside 1970 to 2106."""
    seconds = mtime_ns // 1_000_000_000
    if not 0 <= seconds <= MTIME_MAX_SECONDS:
        raise ValueError(f"mtime {mtime_ns} ns is outside what SFTP can store (0 to {MTIME_MAX_SECONDS} seconds)")
    return seconds


def stream_position(value: BinaryIO) -> int | None:
    """Return the position of a seekable stream, or None if it cannot seek back."""
    try:
        if value.seekable():
            return value.tell()
    except (AttributeError, OSError, ValueError):
        pass
    return None


def read_file(session: SFTPSession, path: str, offset: int, size: int | None) -> bytes:
    """Return *size* bytes (all if None) from *offset* of *path*; a negative *offset* counts from the end."""
    handle = session.open_file(path, SFTP_FLAG_READ)
    try:
        if offset < 0 or size is None:
            length = session.stat_handle(handle).size or 0
            if offset < 0:
                offset = max(0, length + offset)
            if size is None:
                size = max(0, length - offset)
        return session.read_range(handle, offset, size) if size else b""
    finally:
        if session.alive:
            session.close_handle(handle, wait=False)


def write_value(session: SFTPSession, handle: bytes, value: bytes | BinaryIO) -> None:
    """Write *value* (bytes, or a stream read in chunks) to the new file *handle*."""
    writer = session.writer(handle)
    if isinstance(value, bytes | bytearray | memoryview):
        writer.write(0, value)
    else:
        offset = 0
        while True:
            try:
                chunk = value.read(COPY_CHUNK_SIZE)
            except Exception as err:
                raise LocalReadError(err) from err
            if not chunk:
                break
            writer.write(offset, chunk)
            offset += len(chunk)
    writer.finish()


def open_source(session: SFTPSession, path: str, name: str | None) -> bytes:
    """Open file *path* for reading; `ObjectNotFound` names *name* if it is missing."""
    try:
        return session.open_file(path, SFTP_FLAG_READ)
    except SFTPStatusError as err:
        raise status_error(err, name or path) from None


def copy_file(session: SFTPSession, source_handle: bytes, target_handle: bytes) -> int:
    """Copy the whole file open as *source_handle* into *target_handle* and return its size.

    Uses the server-side ``copy-data`` extension (OpenSSH 9.2 has it)
    where the server announces it, so the value does not cross the network.
    """
    size = session.stat_handle(source_handle).size or 0
    if session.supports("copy-data"):
        session.request(CMD_EXTENDED, "copy-data", source_handle, int64(0), int64(0), target_handle, int64(0))
        return size
    writer = session.writer(target_handle)
    for offset in range(0, size, COPY_CHUNK_SIZE):
        writer.write(offset, session.read_range(source_handle, offset, COPY_CHUNK_SIZE))
    writer.finish()
    return size
