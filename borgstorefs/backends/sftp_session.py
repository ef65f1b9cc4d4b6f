"""SFTP sessions for the SFTP backend: pipelined requests, a session pool, and retries.

`SFTPSession` speaks SFTP version 3 over one SSH channel. It builds on
paramiko's `SFTPClient` for packet framing and request numbering, but sends
its own requests so that many can be in flight at once. Reads and writes
keep a window of requests outstanding instead of waiting one round trip per
request. It relies on `SFTPClient._async_request`, `_read_response` and
`BaseSFTP._read_all`, which paramiko 3.4 to 5.1 have unchanged.

A session reads and writes its packets through a *channel*: a paramiko
`Channel` of an SSH connection made in this process, or an `SSHChannel`
(see `sftp_ssh`) over the pipes of an OpenSSH client process.

`SessionPool` hands each thread a session of its own (a session is not safe
for concurrent requests), opens sessions through a `Connection`, and
reconnects when that connection is lost. `Retrier` repeats an operation on
a fresh connection when `is_connection_lost` reports that the error was the
network's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Concatenate, NamedTuple, ParamSpec, Protocol, TypeVar

import paramiko
from paramiko.message import Message
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_INIT,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_STATUS,
    CMD_VERSION,
    CMD_WRITE,
    SFTP_CONNECTION_LOST,
    SFTP_EOF,
    SFTP_NO_CONNECTION,
    SFTP_OK,
    SFTPError,
    int64,
)

from ..errors import BackendError, BackendUnavailable

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

SFTP_VERSION = 3

DEFAULT_REQUEST_SIZE = 32 * 1024
"""Data bytes per read or write request when the server does not state its limits.

The SFTP version 3 draft (section 6.4) lets servers refuse larger requests.
"""

MAX_REQUEST_SIZE = 256 * 1024
"""Upper bound for the request size that ``limits@openssh.com`` may raise it to.

OpenSSH's sftp-server accepts 255 KiB of data per read (its reply limit);
larger requests would not cut the number of packets further.
"""

MAX_PACKET_LENGTH = 16 * 1024 * 1024 - 1
"""Longest SFTP packet accepted, in bytes; paramiko treats longer ones as garbage too.

OpenSSH's sftp-server sends packets of at most 256 KiB (``SFTP_MAX_MSG_LENGTH`` in sftp-common.h).
"""

PIPELINE_BYTES = 8 * 1024 * 1024
"""Bytes of read or write requests in flight per session.

8 MiB keeps a 1 Gbit/s link with 60 ms round trips busy (bandwidth-delay
product 7.5 MB), and it is the receive window each channel opens with.
"""

CHANNEL_PACKET_SIZE = 256 * 1024
"""Largest SSH packet the server may send on a channel: fewer, bigger packets cost less Python time per byte."""

# SFTP version 3 attribute flags (draft-ietf-secsh-filexfer-02, section 5).
ATTR_SIZE = 0x1
ATTR_UIDGID = 0x2
ATTR_PERMISSIONS = 0x4
ATTR_ACMODTIME = 0x8
ATTR_EXTENDED = 0x80000000


class SFTPStatusError(OSError):
    """The server replied to a request with an SSH_FXP_STATUS other than OK.

    ``code`` is the SFTP status code (``paramiko.sftp.SFTP_*``) and ``text``
    the server's message.
    """

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"SFTP status {code}: {text}")
        self.code = code
        self.text = text


class Attributes(NamedTuple):
    """The attributes of a file as SFTP version 3 reports them; missing fields are None."""

    name: str
    size: int | None
    mode: int | None
    mtime: int | None
    """Seconds since the epoch: version 3 has no finer times."""


_UINT32 = struct.Struct(">I")
_UINT64 = struct.Struct(">Q")
_TIMES = struct.Struct(">II")


def parse_attributes(message: Message, name: str = "") -> Attributes:
    """Read the SFTP version 3 ATTRS structure that ends *message*."""
    return _parse(_attributes_at, message.get_remainder(), name)


def parse_names(message: Message) -> list[Attributes]:
    """Read the entries of an SSH_FXP_NAME reply from *message* (after its type and request id).

    Parses the raw bytes, because reading field by field through `Message`
    took a quarter of the client's CPU time in a listing of 100,000 keys.
    """
    return _parse(_names_at, message.get_remainder(), "")


def _parse(parser: Callable[[bytes, int, str], tuple[T, int]], data: bytes, name: str) -> T:
    try:
        return parser(data, 0, name)[0]
    except struct.error as err:  # a field ends past the reply
        raise SFTPError(f"SFTP reply of {len(data)} bytes is cut short: {err}") from None


def _names_at(data: bytes, position: int, _name: str) -> tuple[list[Attributes], int]:
    (count,) = _UINT32.unpack_from(data, position)
    position += 4
    names = []
    for _ in range(count):
        (length,) = _UINT32.unpack_from(data, position)
        end = position + 4 + length
        name = data[position + 4 : end].decode("utf-8")
        (length,) = _UINT32.unpack_from(data, end)  # the "ls -l" line, meant for humans
        entry, position = _attributes_at(data, end + 4 + length, name)
        names.append(entry)
    return names, position


def _attributes_at(data: bytes, position: int, name: str) -> tuple[Attributes, int]:
    (flags,) = _UINT32.unpack_from(data, position)
    position += 4
    size = mode = mtime = None
    if flags & ATTR_SIZE:
        (size,) = _UINT64.unpack_from(data, position)
        position += 8
    if flags & ATTR_UIDGID:
        position += 8
    if flags & ATTR_PERMISSIONS:
        (mode,) = _UINT32.unpack_from(data, position)
        position += 4
    if flags & ATTR_ACMODTIME:
        _, mtime = _TIMES.unpack_from(data, position)  # atime, then mtime
        position += 8
    if flags & ATTR_EXTENDED:
        (count,) = _UINT32.unpack_from(data, position)
        position += 4
        for _ in range(2 * count):  # type and data of each extension
            (length,) = _UINT32.unpack_from(data, position)
            position += 4 + length
    if position > len(data):
        raise struct.error(f"attributes end at byte {position}")
    return Attributes(name, size, mode, mtime), position


def attributes(*, size: int | None = None, mtime: int | None = None) -> paramiko.SFTPAttributes:
    """Return an attribute set to send, with only *size* and/or *mtime* (seconds, also used as atime)."""
    attrs = paramiko.SFTPAttributes()
    if size is not None:
        attrs.st_size = size
    if mtime is not None:
        attrs.st_atime = mtime
        attrs.st_mtime = mtime
    return attrs


class Reply:
    """One outstanding request; paramiko stores the response here when it arrives."""

    __slots__ = ("__weakref__", "kind", "message")

    def __init__(self) -> None:
        self.kind: int | None = None
        self.message: Message | None = None

    # Called by SFTPClient._read_response for responses it does not wait for itself.
    def _async_response(self, kind: int, message: Message, number: int) -> None:
        self.kind = kind
        self.message = message


class SessionChannel(Protocol):
    """A byte stream to an SFTP server process other than a paramiko `Channel`.

    ``recv`` returns b"" or raises an `OSError` when the stream ends and
    raises `TimeoutError` when the server sends nothing for the session's
    timeout.
    """

    @property
    def alive(self) -> bool: ...

    def send(self, data: bytes) -> int: ...

    def recv(self, size: int) -> bytes: ...

    def close(self) -> None: ...

    def get_name(self) -> str:
        """Return a name for paramiko's log lines."""
        ...


class Connection(Protocol):
    """A way to the server that `SessionPool` opens sessions through, such as one SSH connection.

    When one session breaks with a lost connection, the pool closes the
    connection with every session it opened, and the next session needs a
    new connection.
    """

    def is_active(self) -> bool:
        """Return whether new sessions may still be opened through this connection."""
        ...

    def open_session(self, generation: int) -> SFTPSession:
        """Open a new session tagged with *generation*.

        A failure of the server or the network raises an error that
        `is_connection_lost` recognizes. Raises `paramiko.ChannelException`
        if only this session was refused and the connection still works.
        """
        ...

    def close(self) -> None:
        """Close the connection; sessions opened through it may stop working."""
        ...


class SFTPSession(paramiko.SFTPClient):
    """One SFTP session (one SSH channel and one server process); use from one thread at a time.

    *channel* is a paramiko `Channel` with the ``sftp`` subsystem started, or
    any `SessionChannel`, such as `sftp_ssh.SSHChannel`. Failed requests raise `SFTPStatusError`.
    A lost connection raises the paramiko, socket or pipe error, which
    `is_connection_lost` recognizes.
    """

    def __init__(self, channel: paramiko.Channel | SessionChannel, generation: int) -> None:
        self.extensions: dict[str, bytes] = {}
        super().__init__(channel)
        self.generation = generation
        self.read_size = DEFAULT_REQUEST_SIZE
        self.write_size = DEFAULT_REQUEST_SIZE
        self._deferred: list[Reply] = []
        self.readers = 0
        """Readers that keep a file handle in this session (see `SessionPool.pin`)."""
        if "limits@openssh.com" in self.extensions:
            self._apply_limits()

    def _send_version(self) -> int:
        # Overrides paramiko's handshake to keep the extension list of the
        # server's VERSION packet, which paramiko discards.
        init = Message()
        init.add_int(SFTP_VERSION)
        self._send_packet(CMD_INIT, init)
        kind, data = self._read_packet()
        if kind != CMD_VERSION:
            raise SFTPError(f"expected an SFTP VERSION packet, got type {kind}")
        message = Message(data)
        version = message.get_int()
        while message.get_remainder():
            name = message.get_text()
            self.extensions[name] = message.get_binary()
        return version

    def _read_packet(self) -> tuple[int, bytes]:
        # Overrides paramiko's, which copies every packet once more to cut off
        # the type byte: about a tenth of this process's CPU time in a
        # profile of a 256 MiB load.
        size, kind = struct.unpack(">IB", self._read_all(5))
        if not 1 <= size <= MAX_PACKET_LENGTH:
            raise SFTPError(f"invalid SFTP packet length {size}")
        return kind, self._read_all(size - 1)

    def _apply_limits(self) -> None:
        reply = self.extended("limits@openssh.com")
        reply.get_int64()  # maximum packet length
        read_limit = reply.get_int64()
        write_limit = reply.get_int64()
        if read_limit:
            self.read_size = min(read_limit, MAX_REQUEST_SIZE)
        if write_limit:
            self.write_size = min(write_limit, MAX_REQUEST_SIZE)

    @property
    def alive(self) -> bool:
        """Whether the channel and its SSH connection are still open."""
        channel = self.sock
        if isinstance(channel, paramiko.Channel):
            transport = channel.get_transport()
            return not channel.closed and transport is not None and transport.is_active()
        return bool(channel.alive)

    def supports(self, extension: str) -> bool:
        """Return whether the server announced the SFTP *extension* (such as ``fsync@openssh.com``)."""
        return extension in self.extensions

    # Requests

    def send(self, kind: int, *args: Any) -> Reply:
        """Send a request without waiting; pass the returned `Reply` to `wait`."""
        if self._deferred:
            self._deferred = [reply for reply in self._deferred if reply.kind is None]
        reply = Reply()
        self._async_request(reply, kind, *args)
        return reply

    def wait(self, reply: Reply) -> tuple[int, Message | None]:
        """Wait for *reply* and return its packet type and message.

        A STATUS reply returns ``(CMD_STATUS, None)`` if it is OK and raises
        `SFTPStatusError` otherwise.
        """
        while reply.kind is None:
            self._read_response()
        assert reply.message is not None
        if reply.kind == CMD_STATUS:
            code = reply.message.get_int()
            if code != SFTP_OK:
                raise SFTPStatusError(code, reply.message.get_text())
            return CMD_STATUS, None
        return reply.kind, reply.message

    def request(self, kind: int, *args: Any) -> tuple[int, Message | None]:
        """Send a request and wait for its reply (see `wait`)."""
        return self.wait(self.send(kind, *args))

    def wait_all(self, replies: Iterable[Reply]) -> SFTPStatusError | None:
        """Wait for every reply of *replies* in order and return the first failure, or None if all are OK.

        Replies after a failure are still collected, so that none is left
        in flight when the caller goes on with the session.
        """
        first_error: SFTPStatusError | None = None
        for reply in replies:
            try:
                self.wait(reply)
            except SFTPStatusError as err:
                first_error = first_error or err
        return first_error

    def expect(self, expected: int, kind: int, *args: Any) -> Message:
        """Send a request and return the message of its reply, which must be of type *expected*."""
        reply_kind, message = self.request(kind, *args)
        if reply_kind != expected or message is None:
            raise SFTPError(f"expected SFTP reply type {expected} to request type {kind}, got {reply_kind}")
        return message

    def extended(self, name: str, *args: Any) -> Message:
        """Send the extended request *name* and return its EXTENDED_REPLY message."""
        return self.expect(CMD_EXTENDED_REPLY, CMD_EXTENDED, name, *args)

    def run_all(self, requests: Iterable[tuple[Any, ...]], window: int = 64) -> list[Message | SFTPStatusError | None]:
        """Send *requests* (``(kind, *args)`` tuples) with up to *window* in flight.

        Returns one entry per request, in order: the reply's message, None
        for an OK status, or the `SFTPStatusError` of a failed request.
        """
        results: list[Message | SFTPStatusError | None] = []
        pending: deque[Reply] = deque()

        def collect() -> None:
            try:
                results.append(self.wait(pending.popleft())[1])
            except SFTPStatusError as err:
                results.append(err)

        for kind, *args in requests:
            pending.append(self.send(kind, *args))
            if len(pending) >= window:
                collect()
        while pending:
            collect()
        return results

    # Files

    def open_file(self, path: str, flags: int, attrs: paramiko.SFTPAttributes | None = None) -> bytes:
        """Open *path* with SFTP open *flags* (``SFTP_FLAG_*``) and return the handle."""
        message = self.expect(CMD_HANDLE, CMD_OPEN, path, flags, attrs or paramiko.SFTPAttributes())
        return message.get_binary()

    def close_handle(self, handle: bytes, *, wait: bool = True) -> None:
        """Close *handle*; with ``wait=False`` the reply is collected with a later request.

        Only handles opened for reading should skip the wait: closing a
        written file can report a write error of the server's file system.
        """
        reply = self.send(CMD_CLOSE, handle)
        if wait:
            self.wait(reply)
        else:
            self._deferred.append(reply)

    def stat_handle(self, handle: bytes) -> Attributes:
        """Return the attributes of the open file *handle*."""
        return parse_attributes(self.expect(CMD_ATTRS, CMD_FSTAT, handle))

    def read_range(self, handle: bytes, offset: int, size: int) -> bytes:
        """Read *size* bytes from *offset*, fewer only at the end of the file, with requests pipelined."""
        chunks: list[bytes] = []
        pending: deque[tuple[int, int, Reply]] = deque()
        window = max(1, PIPELINE_BYTES // self.read_size)
        next_offset, end = offset, offset + size
        at_end = False
        while pending or (next_offset < end and not at_end):
            while not at_end and next_offset < end and len(pending) < window:
                length = min(self.read_size, end - next_offset)
                pending.append((next_offset, length, self.send(CMD_READ, handle, int64(next_offset), length)))
                next_offset += length
            chunk_offset, length, reply = pending.popleft()
            if at_end:
                self._wait_quietly(reply)
                continue
            data = self._read_reply(reply)
            if len(data) < length:
                # A short read before the end: the rest follows one request at a time.
                data += self._read_sequentially(handle, chunk_offset + len(data), length - len(data))
                at_end = len(data) < length
            chunks.append(data)
        return b"".join(chunks)

    def _read_reply(self, reply: Reply) -> bytes:
        try:
            kind, message = self.wait(reply)
        except SFTPStatusError as err:
            if err.code == SFTP_EOF:
                return b""
            raise
        if kind != CMD_DATA or message is None:
            raise SFTPError(f"expected SFTP DATA in reply to READ, got type {kind}")
        return message.get_binary()

    def _wait_quietly(self, reply: Reply) -> None:
        # A request past the end of the file or directory after an earlier one found it.
        with contextlib.suppress(SFTPStatusError):
            self.wait(reply)

    def _read_sequentially(self, handle: bytes, offset: int, size: int) -> bytes:
        parts: list[bytes] = []
        while size > 0:
            data = self._read_reply(self.send(CMD_READ, handle, int64(offset), min(size, self.read_size)))
            if not data:
                break
            parts.append(data)
            offset += len(data)
            size -= len(data)
        return b"".join(parts)

    def writer(self, handle: bytes) -> PipelinedWriter:
        """Return a writer that sends WRITE requests to *handle* with a window in flight."""
        return PipelinedWriter(self, handle)

    def listdir(self, path: str) -> list[Attributes]:
        """Return every entry of directory *path* except ``.`` and ``..``, unsorted."""
        handle = self.expect(CMD_HANDLE, CMD_OPENDIR, path).get_binary()
        entries: list[Attributes] = []
        try:
            # Two READDIR requests in flight: a small directory then costs one
            # round trip after OPENDIR, the second reply being its EOF.
            pending = deque([self.send(CMD_READDIR, handle), self.send(CMD_READDIR, handle)])
            at_end = False
            while pending:
                reply = pending.popleft()
                if at_end:
                    self._wait_quietly(reply)
                    continue
                names = self._readdir_reply(reply)
                if names is None:
                    at_end = True
                    continue
                entries.extend(entry for entry in names if entry.name not in (".", ".."))
                pending.append(self.send(CMD_READDIR, handle))
        finally:
            if self.alive:
                self.close_handle(handle, wait=False)
        return entries

    def _readdir_reply(self, reply: Reply) -> list[Attributes] | None:
        try:
            kind, message = self.wait(reply)
        except SFTPStatusError as err:
            if err.code == SFTP_EOF:
                return None
            raise
        if kind != CMD_NAME or message is None:
            raise SFTPError(f"expected SFTP NAME in reply to READDIR, got type {kind}")
        return parse_names(message)


class PipelinedWriter:
    """Sends WRITE requests for one handle with up to `PIPELINE_BYTES` unacknowledged.

    `finish` waits for every reply; only then has the server accepted all data.
    """

    def __init__(self, session: SFTPSession, handle: bytes) -> None:
        self._session = session
        self._handle = handle
        self._pending: deque[Reply] = deque()
        self._window = max(1, PIPELINE_BYTES // session.write_size)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Queue *data* to be written at *offset*; may wait for older replies to keep the window."""
        view = memoryview(data)
        step = self._session.write_size
        for start in range(0, len(view), step):
            piece = bytes(view[start : start + step])
            self._pending.append(self._session.send(CMD_WRITE, self._handle, int64(offset + start), piece))
            if len(self._pending) >= self._window:
                self._session.wait(self._pending.popleft())

    def detach(self) -> list[Reply]:
        """Return the writes not acknowledged yet and stop tracking them; the caller must wait for each.

        Lets a caller send further requests, such as the close of the handle,
        before it waits for the writes, so that all share one round trip.
        """
        pending = list(self._pending)
        self._pending.clear()
        return pending

    def finish(self) -> None:
        """Wait until the server has acknowledged every write; raise the first error."""
        error = self._session.wait_all(self.detach())
        if error is not None:
            raise error


# Lost connections


def is_connection_lost(error: BaseException) -> bool:
    """Return whether *error* means the connection or the session broke, so a fresh one may succeed.

    Server replies (`SFTPStatusError`), our own `BackendError`s, refused
    authentication and host keys are final. Timeouts, resets, EOF, SSH
    protocol errors and other socket errors are not.
    """
    if isinstance(error, SFTPStatusError):
        return error.code in (SFTP_NO_CONNECTION, SFTP_CONNECTION_LOST)
    if isinstance(error, BackendError | paramiko.AuthenticationException | paramiko.BadHostKeyException):
        return False
    return isinstance(error, OSError | EOFError | paramiko.SSHException | SFTPError | struct.error)


class LocalReadError(Exception):
    """Reading the caller's value failed; carries the original error, which is never retried."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class SessionGone(ConnectionError):
    """A pinned session was closed: its connection was lost or the pool was closed.

    The server dropped the file handles of that session with it. As an
    `OSError` it counts as a lost connection, so the `Retrier` repeats the call.
    """


class SessionPool:
    """Up to *size* SFTP sessions through one `Connection`, each used by one thread at a time.

    *connect* opens a new connection. A lost connection is closed with all
    its sessions, and the next session needs a new connection; *label*
    (``user@host:port``) names the server in log messages. Thread-safe.

    A file handle is valid only in the session (the server process) that
    opened it. A reader that keeps a handle therefore *pins* its session
    (`pin`) and borrows exactly that one for each request
    (``session(pinned=...)``), waiting while another thread uses it. Between
    requests the session serves other callers too.
    """

    def __init__(self, connect: Callable[[], Connection], size: int, label: str) -> None:
        if size < 1:
            raise ValueError(f"an SFTP session pool needs at least one session, not {size}")
        self._connect = connect
        self.label = label
        self._size = size
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._idle: list[SFTPSession] = []
        self._open = 0  # sessions of the current connection, idle, lent or being opened
        self._client: Connection | None = None
        self._generation = 0
        self._announced = -1  # the last generation whose first session was logged as connected

    @contextmanager
    def session(self, pinned: SFTPSession | None = None, *, spread: bool = False) -> Iterator[SFTPSession]:
        """Lend a session to the calling thread; it goes back to the pool unless it broke.

        Idle sessions with the fewest pinned readers go first. With *pinned*,
        lend that session, or raise `SessionGone` if it was closed. With
        *spread*, open a new session rather than lend one that readers pinned,
        while the pool has room.
        """
        session = self._take_pinned(pinned) if pinned is not None else self._take(spread)
        try:
            yield session
        except BaseException as err:
            # A server's reply leaves the session usable. Anything else may
            # have left replies in flight, so the session is dropped.
            if isinstance(err, SFTPStatusError | BackendError) and session.alive:
                self._give_back(session)
            else:
                self._drop(session, err)
            raise
        self._give_back(session)

    def pin(self, session: SFTPSession) -> None:
        """Count a reader that keeps a handle in *session*, so that `session` with ``spread`` avoids it."""
        with self._lock:
            session.readers += 1

    def unpin(self, session: SFTPSession) -> None:
        """Undo one `pin` of *session*."""
        with self._lock:
            session.readers -= 1

    def _take(self, spread: bool) -> SFTPSession:
        with self._lock:
            while True:
                session = self._pop_idle(spread)
                if session is not None:
                    return session
                if self._open < self._size:
                    client = self._connected_client()
                    generation = self._generation
                    self._open += 1
                    break
                self._changed.wait()
        try:
            session = client.open_session(generation)
        except BaseException as err:
            self._forget(generation)
            if is_connection_lost(err) and not isinstance(err, paramiko.ChannelException):
                self._connection_failed(generation, err)  # the connection itself does not respond
            raise
        self._announce(generation)
        return session

    def _take_pinned(self, pinned: SFTPSession) -> SFTPSession:
        with self._lock:
            while pinned not in self._idle:
                if pinned.generation != self._generation or not pinned.alive:
                    raise SessionGone(f"the SFTP session to {self.label} that held the file handle was closed")
                self._changed.wait()
            self._idle.remove(pinned)
            if not pinned.alive:
                self._retire_locked(pinned)
                raise SessionGone(f"the SFTP session to {self.label} that held the file handle was closed")
            return pinned

    def _pop_idle(self, spread: bool) -> SFTPSession | None:
        # Called with self._lock held.
        for session in [session for session in self._idle if not session.alive]:
            self._idle.remove(session)
            self._retire_locked(session)
        if not self._idle:
            return None
        # The most recently returned session with the fewest readers, so that
        # other calls keep out of the way of readers where they can.
        session = min(reversed(self._idle), key=lambda idle: idle.readers)
        if spread and session.readers and self._open < self._size:
            return None  # a new session spreads the readers' requests over more server processes
        self._idle.remove(session)
        return session

    def _retire_locked(self, session: SFTPSession) -> None:
        # Called with self._lock held, for a dead session that no thread uses.
        session.close()
        if session.generation == self._generation:
            self._open -= 1
            self._changed.notify_all()

    def _forget(self, generation: int) -> None:
        """Stop counting a session of *generation* that closed or never opened."""
        with self._lock:
            if generation == self._generation:
                self._open -= 1
                self._changed.notify_all()

    def _connected_client(self) -> Connection:
        # Called with self._lock held, so that concurrent threads wait for one connection.
        if self._client is not None and self._client.is_active():
            return self._client
        # No idle session or live connection is left to close here, except
        # a paramiko connection that died without a session noticing.
        self._close_all(self._discard_client())
        self._client = self._connect()
        return self._client

    def _announce(self, generation: int) -> None:
        """Log the first session of *generation* that opened: only then is the server known to respond."""
        with self._lock:
            if generation <= self._announced:
                return
            first = self._announced < 0
            self._announced = generation
        logger.info("%s %s", "connected to" if first else "reconnected to", self.label)

    def _give_back(self, session: SFTPSession) -> None:
        with self._lock:
            if session.generation == self._generation:
                self._idle.append(session)
                self._changed.notify_all()
                return
        session.close()

    def _drop(self, session: SFTPSession, error: BaseException) -> None:
        """Close a broken *session*, and its connection too if that is dead or silent."""
        connection_dead = not session.alive or isinstance(error, TimeoutError)
        try:
            session.close()
        except Exception as err:  # closing a broken channel may fail in many ways
            logger.debug("closing a broken SFTP session to %s failed: %s", self.label, err)
        self._forget(session.generation)
        if connection_dead:
            self._connection_failed(session.generation, error)

    def _connection_failed(self, generation: int, error: BaseException) -> None:
        with self._lock:
            if generation != self._generation or self._client is None:
                return
            reason = str(error) or type(error).__name__
            if generation <= self._announced:
                logger.warning("lost the connection to %s: %s", self.label, reason)
            else:
                logger.warning("cannot connect to %s: %s", self.label, reason)
            discarded = self._discard_client()
        self._close_all(discarded)

    def _discard_client(self) -> list[SFTPSession | Connection]:
        """Start a new generation and return the idle sessions and the connection to close.

        Called with self._lock held. Sessions lent out now are closed when
        they come back. The caller closes the returned objects after
        releasing the lock, because closing an ssh session may wait for
        its process to exit.
        """
        self._generation += 1
        self._open = 0
        discarded: list[SFTPSession | Connection] = [*self._idle]
        self._idle.clear()
        if self._client is not None:
            discarded.append(self._client)
            self._client = None
        self._changed.notify_all()
        return discarded

    def _close_all(self, discarded: list[SFTPSession | Connection]) -> None:
        for item in discarded:
            try:
                item.close()
            except Exception as err:  # closing a broken channel may fail in many ways
                logger.debug("closing a discarded SFTP session or connection to %s failed: %s", self.label, err)

    def close(self) -> None:
        """Close the connection and every idle session; sessions in use close when they come back."""
        with self._lock:
            discarded = self._discard_client()
        self._close_all(discarded)


# Retries


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to repeat an operation after a lost connection."""

    attempts: int
    """Tries in total, the first included."""

    first_delay: float
    """Seconds before the second try; each further delay doubles, up to `max_delay`."""

    max_delay: float

    def delay(self, attempt: int) -> float:
        """Return the seconds to wait after failed try number *attempt* (1-based)."""
        return min(self.first_delay * 2 ** (attempt - 1), self.max_delay)


class Retrier:
    """Runs operations with retries on a lost connection; nested calls do not retry again.

    While an operation runs, `retried` is true if an earlier try of it lost
    the connection, so that the earlier try may have taken effect.
    """

    def __init__(self, policy: RetryPolicy, label: str) -> None:
        self.policy = policy
        self.label = label
        self._local = threading.local()

    @property
    def retried(self) -> bool:
        """Whether the operation running in this thread is a repeat after a lost connection."""
        return getattr(self._local, "attempt", 1) > 1

    def call(self, description: str, function: Callable[[], T], *, retry: bool = True) -> T:
        """Return ``function()``, repeating it after a lost connection; then raise `BackendUnavailable`.

        With ``retry=False`` a lost connection raises `BackendUnavailable` at once.
        """
        if getattr(self._local, "active", False):
            return function()
        attempts = self.policy.attempts if retry else 1
        self._local.active = True
        try:
            for attempt in range(1, attempts + 1):
                self._local.attempt = attempt
                try:
                    return function()
                except LocalReadError as err:
                    raise err.error from None
                except Exception as err:
                    if not is_connection_lost(err):
                        raise
                    self._give_up_or_wait(description, attempt, attempts, err)
        finally:
            self._local.active = False
            self._local.attempt = 1
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _give_up_or_wait(self, description: str, attempt: int, attempts: int, error: Exception) -> None:
        reason = str(error) or type(error).__name__
        if attempt >= attempts:
            logger.error("%s on %s failed after %d attempts: %s", description, self.label, attempts, reason)
            raise BackendUnavailable(
                f"SFTP server {self.label} is unavailable: {description} failed after "
                f"{attempts} attempt{'s' if attempts > 1 else ''}, last error: {reason}"
            ) from error
        delay = self.policy.delay(attempt)
        logger.warning(
            "%s on %s lost the connection (%s); retrying in %.1f s, attempt %d/%d",
            description,
            self.label,
            reason,
            delay,
            attempt + 1,
            attempts,
        )
        time.sleep(delay)


class HasRetrier(Protocol):
    _retrier: Retrier


S = TypeVar("S", bound=HasRetrier)


def reconnecting(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """Decorate a method so that it runs through its object's `Retrier` (``self._retrier``)."""

    @functools.wraps(method)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._retrier.call(method.__name__.lstrip("_"), lambda: method(self, *args, **kwargs))

    return wrapper
