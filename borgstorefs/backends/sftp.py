"""SFTP backend: ``sftp://[user@]host[:port]/absolute/path[?option=value&...]``.

Two transports carry the SFTP packets. ``ssh`` (the default when an ``ssh``
program is on PATH) starts one OpenSSH client process per session, ``ssh -s
HOST sftp``, so that encryption runs in C in another process (see
`sftp_ssh`). ``paramiko`` runs SSH in this process with paramiko, one SSH
connection for all sessions (see `sftp_connect`).

Works against any SFTP version 3 server; OpenSSH's server is needed for the
``posix-rename@openssh.com`` extension, without which values cannot replace
each other atomically. The URL is percent-decoded. A missing user or port,
host aliases, IdentityFile and UserKnownHostsFile come from the ssh client
configuration: the file ``BORGSTOREFS_SSH_CONFIG`` names, or else
``~/.ssh/config``, read at each connect. The ``ssh`` transport lets ssh read
it, ProxyJump included. The ``paramiko`` transport reads it with paramiko,
expands ``~`` through ``os.path.expanduser`` and rejects ProxyJump and
ProxyCommand.

Authentication uses ssh-agent and key files only. The ``ssh`` transport
also uses any other method that ssh completes without a prompt, because it
runs ssh with BatchMode. The server's host key must
be in a known_hosts file. An unknown key raises `HostKeyUnknown` and a
changed key raises `HostKeyChanged`. Both messages name the host, the key's
SHA256 fingerprint and the command that trusts it. No key is ever added to
known_hosts automatically.

URL options, all optional: ``timeout`` (seconds, `DEFAULT_TIMEOUT`),
``keepalive`` (seconds, `DEFAULT_KEEPALIVE`), ``attempts`` (tries per
operation, `DEFAULT_ATTEMPTS`), ``sessions`` (concurrent SFTP sessions,
`DEFAULT_SESSIONS`), ``fsync`` (``1`` or ``0``: whether `store` flushes
each value on the server with ``fsync@openssh.com``; default ``1``) and
``transport`` (``ssh`` or ``paramiko``; default ``ssh`` if an ``ssh``
program is on PATH, else ``paramiko``). The ``ssh`` transport rounds
``timeout`` up and ``keepalive`` to whole seconds for ssh's
ConnectTimeout and ServerAliveInterval.

Lost connections: every wait for the server ends after *timeout* seconds,
and an operation that lost its connection is repeated on a new one up to
*attempts* tries in total, with 0.5, 1, 2, 4 ... s between them, before
`BackendUnavailable` is raised. A try waits at most a few timeouts (TCP
connect, SSH banner, authentication, then each reply), so an operation
gives up after roughly ``attempts * 4 * timeout`` plus the delays. Values are
always uploaded to a fresh temporary name and renamed into place, so a
repeated `store` never exposes a partial value; a stream that cannot seek
back is not repeated.
"""

from __future__ import annotations

import logging
import posixpath
import threading
from collections.abc import Iterable, Iterator
from typing import BinaryIO
from urllib.parse import parse_qsl, unquote, urlsplit

from paramiko.message import Message
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_EXTENDED,
    CMD_MKDIR,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_RMDIR,
    CMD_SETSTAT,
    CMD_STAT,
    SFTP_FAILURE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
)

from ..errors import (
    BackendAlreadyExists,
    BackendDoesNotExist,
    BackendError,
    BackendURLInvalid,
    DirectoryNotEmpty,
    ObjectAlreadyExists,
    ObjectNotFound,
)
from ..names import TMP_SUFFIX
from ._base import Backend, ItemInfo, SpaceInfo, StagedValue, ValueReader, validate_backend_name
from .sftp_connect import ParamikoConnection, connect, resolve_target
from .sftp_files import (
    is_directory,
    item_info,
    mtime_seconds,
    read_file,
    status_error,
    stream_position,
    temp_name_for,
    write_value,
)
from .sftp_reader import SFTPReader
from .sftp_session import (
    Attributes,
    Connection,
    Reply,
    Retrier,
    RetryPolicy,
    SessionPool,
    SFTPSession,
    SFTPStatusError,
    attributes,
    is_connection_lost,
    parse_attributes,
    reconnecting,
)
from .sftp_ssh import (
    SSHConnection,
    cipher_options,
    destination_options,
    sftp_command,
    ssh_available,
    ssh_settings,
    ssh_target,
)
from .sftp_staged import SFTPStagedValue

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
"""Seconds to wait for a TCP connect, the SSH handshake or any reply before the connection counts as lost.

OpenSSH's sftp-server handles a request with one or a few system calls, so
a healthy server replies in milliseconds. 30 s leaves room for a busy disk.
"""

DEFAULT_KEEPALIVE = 15.0
"""Seconds of idle time after which an SSH keepalive goes out.

Firewalls and NAT routers often drop idle TCP state after a few minutes. A
keepalive every 15 s keeps that state, and a dead peer shows up as a failed send.
"""

DEFAULT_ATTEMPTS = 5
"""Tries per operation, the first included; with the delays 0.5+1+2+4 s this rides out an sshd restart."""

DEFAULT_SESSIONS = 4
"""Concurrent SFTP sessions per backend: enough that one big transfer leaves sessions free for small requests."""

RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 4.0

URL_OPTIONS = ("timeout", "keepalive", "attempts", "sessions", "fsync", "transport")

TRANSPORTS = ("ssh", "paramiko")
"""Values of the ``transport`` option: an OpenSSH client process per session, or paramiko in this process."""


def default_transport() -> str:
    """Return ``ssh`` if an ``ssh`` program is on PATH, else ``paramiko``."""
    return "ssh" if ssh_available() else "paramiko"


def get_sftp_backend(url: str) -> SFTPBackend | None:
    """Return an `SFTPBackend` for an ``sftp://`` URL, or None for other schemes.

    Raises `BackendURLInvalid` for a malformed URL.
    """
    parts = urlsplit(url)
    if parts.scheme != "sftp":
        return None
    try:
        port = parts.port
    except ValueError:
        raise BackendURLInvalid(f"invalid SFTP URL {url!r}: the port must be a number from 1 to 65535") from None
    if parts.password is not None:
        raise BackendURLInvalid("invalid SFTP URL: passwords are not supported, use a key file or ssh-agent instead")
    if not parts.hostname:
        raise BackendURLInvalid(f"invalid SFTP URL {url!r}: a host is needed, as in sftp://host/abs/path")
    path = unquote(parts.path)
    if not path.startswith("/") or path.rstrip("/") == "":
        raise BackendURLInvalid(
            f"invalid SFTP URL {url!r}: the path must be absolute and not '/', as in sftp://host/abs/path"
        )
    options = parse_url_options(url, parts.query)
    return SFTPBackend(
        unquote(parts.hostname),
        path,
        user=unquote(parts.username) if parts.username else None,
        port=port,
        **options,  # type: ignore[arg-type]
    )


def parse_url_options(url: str, query: str) -> dict[str, float | int | bool | str]:
    """Return the backend options of a URL query; `BackendURLInvalid` for unknown or bad ones."""
    options: dict[str, float | int | bool | str] = {}
    for key, text in parse_qsl(query, keep_blank_values=True):
        if key not in URL_OPTIONS:
            raise BackendURLInvalid(f"invalid SFTP URL {url!r}: unknown option {key!r}, use {', '.join(URL_OPTIONS)}")
        try:
            if key == "fsync":
                if text not in ("0", "1"):
                    raise ValueError(text)
                options[key] = text == "1"
            elif key == "transport":
                if text not in TRANSPORTS:
                    raise ValueError(text)
                options[key] = text
            elif key in ("attempts", "sessions"):
                options[key] = int(text)
            else:
                options[key] = float(text)
        except ValueError:
            raise BackendURLInvalid(f"invalid SFTP URL {url!r}: bad value {text!r} for option {key!r}") from None
    return options


class SFTPBackend(Backend):
    """Backend on an SFTP server, with a pool of sessions.

    With *transport* ``ssh`` each session is an ssh process of its own; with
    ``paramiko`` the sessions share one SSH connection in this process. None
    selects `default_transport`.

    Thread-safe: each call borrows a session of its own from the pool. Up to
    *sessions* calls run at once, so a long transfer does not hold up a
    listing, and further calls wait for a free session.
    """

    precreate_dirs = True
    mtime_resolution_ns = 1_000_000_000  # SFTP version 3 carries whole seconds

    def __init__(
        self,
        host: str,
        path: str,
        *,
        user: str | None = None,
        port: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        keepalive: float = DEFAULT_KEEPALIVE,
        attempts: int = DEFAULT_ATTEMPTS,
        sessions: int = DEFAULT_SESSIONS,
        fsync: bool = True,
        transport: str | None = None,
    ) -> None:
        super().__init__()
        if not path.startswith("/"):
            raise BackendURLInvalid(f"the base path of an SFTP backend must be absolute: {path!r}")
        if timeout <= 0 or keepalive <= 0 or attempts < 1 or sessions < 1:
            raise BackendURLInvalid(
                f"invalid SFTP backend options: timeout={timeout} and keepalive={keepalive} must be > 0, "
                f"attempts={attempts} and sessions={sessions} must be >= 1"
            )
        if transport is None:
            transport = default_transport()
        if transport not in TRANSPORTS:
            raise BackendURLInvalid(f"invalid SFTP transport {transport!r}: use {' or '.join(TRANSPORTS)}")
        if host.startswith("-"):
            raise BackendURLInvalid(f"invalid SFTP host {host!r}: a host name cannot start with '-'")
        self.transport = transport
        self.host = host
        self.user = user
        self.port = port
        self.base = path.rstrip("/") or "/"
        self.timeout = timeout
        self.keepalive = keepalive
        self.fsync = fsync
        where = f"{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"
        self._label = where
        self._pool = SessionPool(self._connect, sessions, where)
        self._retrier = Retrier(RetryPolicy(attempts, RETRY_FIRST_DELAY, RETRY_MAX_DELAY), where)
        self._orphans: list[str] = []
        self._orphans_lock = threading.Lock()
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"SFTPBackend({self._label}:{self.base})"

    def _connect(self) -> Connection:
        # The ssh config is read at every connect, so a changed
        # BORGSTOREFS_SSH_CONFIG (or HOME, for paramiko) applies to the next connection.
        if self.transport == "ssh":
            settings = ssh_settings(destination_options(self.host, self.user, self.port), self.host, self.timeout)
            target = ssh_target(settings, self.host, self.user)
        else:
            target = resolve_target(self.host, self.user, self.port)
        self._pool.label = target.label
        self._retrier.label = target.label
        if self.transport == "ssh":
            ciphers = cipher_options(settings, self.host, self.user, self.port, self.timeout)
            command = sftp_command(
                self.host, self.user, self.port, timeout=self.timeout, keepalive=self.keepalive, extra_options=ciphers
            )
            return SSHConnection(target, command, self.timeout)
        return ParamikoConnection(connect(target, self.timeout, self.keepalive), self.timeout, target.label)

    def path_of(self, name: str, *, base_allowed: bool = False) -> str:
        """Return the server path of backend name *name*, after validating it."""
        validate_backend_name(name, base_allowed=base_allowed)
        return f"{self.base}/{name}" if name else self.base

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # Lifecycle

    def create(self) -> None:
        self._check_closed("create it")
        try:
            self._create()
        finally:
            self._pool.close()
        logger.info("created store directory %s on %s", self.base, self._pool.label)

    @reconnecting
    def _create(self) -> None:
        with self._pool.session() as session:
            existing = self._stat(session, self.base)
            if existing is not None and (not is_directory(existing) or session.listdir(self.base)):
                raise BackendAlreadyExists(
                    f"cannot create a store at {self.base!r} on {self._pool.label}: it exists and is not empty"
                )
            if existing is None:
                self._makedirs(session, self.base)

    def destroy(self) -> None:
        self._check_closed("destroy it")
        try:
            self._destroy()
        finally:
            self._pool.close()
        logger.info("destroyed store directory %s on %s", self.base, self._pool.label)

    @reconnecting
    def _destroy(self) -> None:
        with self._pool.session() as session:
            existing = self._stat(session, self.base)
            if existing is None or not is_directory(existing):
                if self._retrier.retried and existing is None:
                    # An earlier try removed it before the connection broke.
                    logger.info("destroy: %s was already gone after a reconnect", self.base)
                    return
                raise BackendDoesNotExist(f"no store at {self.base!r} on {self._pool.label}")
            self._remove_tree(session, self.base)
            self._rmdir_path(session, self.base, self.base)

    def _remove_tree(self, session: SFTPSession, path: str) -> None:
        """Remove everything below directory *path*, with requests pipelined."""
        entries = session.listdir(path)
        files = [f"{path}/{entry.name}" for entry in entries if not is_directory(entry)]
        directories = [f"{path}/{entry.name}" for entry in entries if is_directory(entry)]
        for file, result in zip(files, session.run_all((CMD_REMOVE, file) for file in files), strict=True):
            if isinstance(result, SFTPStatusError) and result.code != SFTP_NO_SUCH_FILE:
                raise status_error(result, self._name_of(file))
        # Most directories of a store are empty nesting directories, so try
        # removing each at once and descend only into those where that fails.
        results = session.run_all((CMD_RMDIR, directory) for directory in directories)
        for directory, result in zip(directories, results, strict=True):
            if isinstance(result, SFTPStatusError) and result.code != SFTP_NO_SUCH_FILE:
                self._remove_tree(session, directory)
                self._rmdir_path(session, directory, directory)

    def open(self) -> None:
        self._check_closed("open it")
        try:
            self._open()
        except BaseException:
            self._pool.close()
            raise
        self.opened = True
        logger.debug("opened %r", self)

    @reconnecting
    def _open(self) -> None:
        with self._pool.session() as session:
            existing = self._stat(session, self.base)
        if existing is None or not is_directory(existing):
            raise BackendDoesNotExist(f"no store at {self.base!r} on {self._pool.label}: create it first")

    def close(self) -> None:
        self.opened = False
        self._pool.close()

    # Directories

    @reconnecting
    def mkdir(self, name: str) -> None:
        self._check_open()
        path = self.path_of(name)
        with self._pool.session() as session:
            self._makedirs(session, path)

    @reconnecting
    def mkdirs(self, names: Iterable[str]) -> None:
        """Create many directories and their missing parents, with the requests pipelined.

        Does what calling `mkdir` for each name does, but does not wait a
        round trip per directory: creating borgstore's 65,536 nesting
        directories of a level-2 namespace takes seconds instead of minutes.
        """
        self._check_open()
        paths = [self.path_of(name) for name in names]
        requests: list[str] = []
        planned: set[str] = set()
        for path in paths:
            # Parents go first, once each. The server runs a session's
            # requests in order, so a parent exists before its children.
            for parent in reversed(self._parents_below_base(path)):
                if parent not in planned:
                    planned.add(parent)
                    requests.append(parent)
            requests.append(path)
        with self._pool.session() as session:
            results = session.run_all((CMD_MKDIR, path, attributes()) for path in requests)
            failed = [path for path, result in zip(requests, results, strict=True) if result is not None]
            # OpenSSH returns a plain failure for an existing directory. Anything
            # else that failed gets the slower checks of `_makedirs`.
            checks = session.run_all((CMD_STAT, path) for path in failed)
            for path, check in zip(failed, checks, strict=True):
                if not isinstance(check, Message) or not is_directory(parse_attributes(check)):
                    self._makedirs(session, path)

    def _parents_below_base(self, path: str) -> list[str]:
        """Return the parent directories of *path* inside the base, nearest first."""
        parents = []
        parent = posixpath.dirname(path)
        while parent.startswith(self.base + "/"):
            parents.append(parent)
            parent = posixpath.dirname(parent)
        return parents

    def _makedirs(self, session: SFTPSession, path: str) -> None:
        """Create directory *path* and missing parents with one request when the parent exists."""
        try:
            session.request(CMD_MKDIR, path, attributes())
            return
        except SFTPStatusError as err:
            if err.code == SFTP_NO_SUCH_FILE and path != "/":
                self._makedirs(session, posixpath.dirname(path))
                self._mkdir_existing_ok(session, path)
                return
            existing = self._stat(session, path)
            if existing is not None and is_directory(existing):
                return  # OpenSSH reports an existing directory as a plain failure
            raise status_error(err, self._name_of(path)) from None

    def _mkdir_existing_ok(self, session: SFTPSession, path: str) -> None:
        try:
            session.request(CMD_MKDIR, path, attributes())
        except SFTPStatusError as err:
            existing = self._stat(session, path)
            if existing is None or not is_directory(existing):
                raise status_error(err, self._name_of(path)) from None

    @reconnecting
    def rmdir(self, name: str) -> None:
        self._check_open()
        path = self.path_of(name)
        with self._pool.session() as session:
            try:
                self._rmdir_path(session, path, name)
            except ObjectNotFound:
                if not self._retrier.retried:
                    raise
                # An earlier try removed it before the connection broke.
                logger.info("rmdir(%r): the directory was already gone after a reconnect", name)

    def _rmdir_path(self, session: SFTPSession, path: str, name: str) -> None:
        try:
            session.request(CMD_RMDIR, path)
        except SFTPStatusError as err:
            if err.code == SFTP_FAILURE:
                existing = self._stat(session, path)
                if existing is None:
                    raise ObjectNotFound(name) from None
                if is_directory(existing) and session.listdir(path):
                    raise DirectoryNotEmpty(name) from None
            raise status_error(err, name) from None

    @reconnecting
    def list(self, name: str) -> Iterator[ItemInfo]:
        self._check_open()
        path = self.path_of(name, base_allowed=True)
        with self._pool.session() as session:
            try:
                entries = session.listdir(path)
            except SFTPStatusError as err:
                raise status_error(err, name) from None
        infos = [item_info(entry) for entry in entries if not entry.name.endswith(TMP_SUFFIX)]
        infos.sort()
        return iter(infos)

    # Items

    @reconnecting
    def info(self, name: str) -> ItemInfo:
        self._check_open()
        path = self.path_of(name, base_allowed=True)
        with self._pool.session() as session:
            existing = self._stat(session, path)
        if existing is None:
            return ItemInfo(posixpath.basename(path), False, 0, False)
        return item_info(existing._replace(name=posixpath.basename(path)))

    def _stat(self, session: SFTPSession, path: str) -> Attributes | None:
        """Return the attributes of *path* (following symlinks), or None if it does not exist."""
        try:
            return parse_attributes(session.expect(CMD_ATTRS, CMD_STAT, path))
        except SFTPStatusError as err:
            if err.code == SFTP_NO_SUCH_FILE:
                return None
            raise status_error(err, self._name_of(path)) from None

    @reconnecting
    def load(self, name: str, *, size: int | None = None, offset: int = 0) -> bytes:
        self._check_open()
        path = self.path_of(name)
        with self._pool.session() as session:
            try:
                return read_file(session, path, offset, size)
            except SFTPStatusError as err:
                raise status_error(err, name) from None

    def open_reader(self, name: str) -> ValueReader:
        """Open item *name* with a handle on the server; see `SFTPReader` for lost connections."""
        self._check_open()
        return SFTPReader(self, name, self.path_of(name))

    def store(self, name: str, value: bytes | BinaryIO) -> None:
        self._check_open()
        path = self.path_of(name)
        start: int | None = None
        if not isinstance(value, bytes | bytearray | memoryview):
            start = stream_position(value)
            if start is None:
                logger.debug("store(%r): the stream cannot seek, so a lost connection will not be retried", name)
        retry = isinstance(value, bytes | bytearray | memoryview) or start is not None
        self._retrier.call(f"store({name!r})", lambda: self._store_once(name, path, value, start), retry=retry)

    def _store_once(self, name: str, path: str, value: bytes | BinaryIO, start: int | None) -> None:
        if start is not None and self._retrier.retried:
            value.seek(start)  # type: ignore[union-attr]
        with self._pool.session() as session:
            self._remove_orphans(session)
            temp_path = temp_name_for(path)
            try:
                handle = self._create_exclusive(session, temp_path)
            except SFTPStatusError as err:
                raise status_error(err, name) from None
            try:
                write_value(session, handle, value)
                if self.fsync:
                    self._fsync(session, handle)
                session.close_handle(handle)
                handle = b""
                self._rename_into_place(session, temp_path, path)
            except BaseException as err:
                self._forget_temp(session, temp_path, handle, err)
                if isinstance(err, SFTPStatusError):
                    raise status_error(err, name) from None
                raise
        logger.debug("stored %s on %s", path, self._pool.label)

    def _create_exclusive(self, session: SFTPSession, path: str) -> bytes:
        """Create and open the new file *path* for writing, making missing parent directories."""
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_READ | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
        try:
            return session.open_file(path, flags)
        except SFTPStatusError as err:
            if err.code != SFTP_NO_SUCH_FILE:
                raise
        self._makedirs(session, posixpath.dirname(path))
        return session.open_file(path, flags)

    def _rename_into_place(self, session: SFTPSession, source: str, target: str) -> None:
        """Rename *source* to *target*, replacing it atomically, making missing parent directories."""
        self._check_posix_rename(session)
        self._finish_rename(session, source, target, self._send_rename(session, source, target))

    def _check_posix_rename(self, session: SFTPSession) -> None:
        if not session.supports("posix-rename@openssh.com"):
            raise BackendError(
                f"SFTP server {self._pool.label} lacks the posix-rename@openssh.com extension, "
                "which replacing values atomically needs: use an OpenSSH server"
            )

    def _send_rename(self, session: SFTPSession, source: str, target: str) -> Reply:
        """Send the rename of `_rename_into_place` without waiting. `_finish_rename` collects the reply."""
        return session.send(CMD_EXTENDED, "posix-rename@openssh.com", source, target)

    def _finish_rename(self, session: SFTPSession, source: str, target: str, reply: Reply) -> None:
        """Wait for the rename *reply*. If the target's directory was missing, make it and rename again."""
        try:
            session.wait(reply)
        except SFTPStatusError as err:
            if err.code != SFTP_NO_SUCH_FILE or self._stat(session, source) is None:
                raise
            self._makedirs(session, posixpath.dirname(target))
            session.request(CMD_EXTENDED, "posix-rename@openssh.com", source, target)

    def _fsync(self, session: SFTPSession, handle: bytes) -> None:
        reply = self._send_fsync(session, handle)
        if reply is not None:
            session.wait(reply)

    def _send_fsync(self, session: SFTPSession, handle: bytes) -> Reply | None:
        """Send a flush of *handle* to stable storage, or warn once and return None if the server cannot."""
        if session.supports("fsync@openssh.com"):
            return session.send(CMD_EXTENDED, "fsync@openssh.com", handle)
        self._warn_once("fsync", "SFTP server %s lacks fsync@openssh.com: values are not flushed", self._label)
        return None

    def _forget_temp(self, session: SFTPSession, temp_path: str, handle: bytes, error: BaseException) -> None:
        """Remove the temporary file of a failed store, or remember it if the connection broke."""
        if not session.alive or is_connection_lost(error):
            logger.debug("cannot remove %s after %r yet; the next store will try again", temp_path, error)
            with self._orphans_lock:
                self._orphans.append(temp_path)
            return
        try:
            if handle:
                session.close_handle(handle)
            session.request(CMD_REMOVE, temp_path)
        except Exception as cleanup_error:
            logger.debug(
                "cannot remove %s after %r (%s); the next store will try again", temp_path, error, cleanup_error
            )
            with self._orphans_lock:
                self._orphans.append(temp_path)

    def _remove_orphans(self, session: SFTPSession) -> None:
        """Remove temporary files that earlier tries left behind when their connection broke."""
        with self._orphans_lock:
            orphans, self._orphans = self._orphans, []
        if not orphans:
            return
        try:
            results = session.run_all((CMD_REMOVE, path) for path in orphans)
        except BaseException:
            with self._orphans_lock:
                self._orphans.extend(orphans)
            raise
        for path, result in zip(orphans, results, strict=True):
            if isinstance(result, SFTPStatusError) and result.code != SFTP_NO_SUCH_FILE:
                logger.warning("cannot remove temporary file %s on %s: %s", path, self._pool.label, result.text)

    @reconnecting
    def delete(self, name: str) -> None:
        self._check_open()
        path = self.path_of(name)
        with self._pool.session() as session:
            try:
                session.request(CMD_REMOVE, path)
            except SFTPStatusError as err:
                if err.code == SFTP_NO_SUCH_FILE and self._retrier.retried:
                    # An earlier try deleted it before the connection broke.
                    logger.info("delete(%r): the item was already gone after a reconnect", name)
                    return
                raise status_error(err, name) from None

    @reconnecting
    def move(self, curr_name: str, new_name: str, *, replace: bool = True) -> None:
        self._check_open()
        source = self.path_of(curr_name)
        target = self.path_of(new_name)
        with self._pool.session() as session:
            try:
                if replace:
                    self._rename_into_place(session, source, target)
                else:
                    self._rename_noreplace(session, source, target)
            except SFTPStatusError as err:
                moved = self._stat(session, source) is None and self._stat(session, target) is not None
                if self._retrier.retried and moved:
                    # An earlier try moved it before the connection broke.
                    logger.info("move(%r, %r): the item was already moved after a reconnect", curr_name, new_name)
                    return
                if err.code == SFTP_NO_SUCH_FILE:
                    raise ObjectNotFound(curr_name) from None
                raise status_error(err, curr_name) from None

    def _rename_noreplace(self, session: SFTPSession, source: str, target: str) -> None:
        # SSH_FXP_RENAME must fail if the target exists (SFTP version 3
        # draft, section 6.5). OpenSSH's sftp-server renames a regular file
        # with link() and unlink(), so the refusal is atomic.
        # NOTE: on file systems without hard links OpenSSH falls back to
        # stat() then rename(), which can replace a target created between them.
        try:
            session.request(CMD_RENAME, source, target)
        except SFTPStatusError as err:
            if err.code == SFTP_NO_SUCH_FILE and self._stat(session, source) is not None:
                self._makedirs(session, posixpath.dirname(target))
                session.request(CMD_RENAME, source, target)
                return
            if err.code == SFTP_FAILURE and self._stat(session, target) is not None:
                if self._retrier.retried and self._stat(session, source) is None:
                    # An earlier try moved it before the connection broke.
                    logger.info("move of %s: already moved after a reconnect", source)
                    return
                raise ObjectAlreadyExists(self._name_of(target)) from None
            raise

    @reconnecting
    def set_mtime(self, name: str, mtime_ns: int) -> None:
        self._check_open()
        path = self.path_of(name)
        with self._pool.session() as session:
            try:
                session.request(CMD_SETSTAT, path, attributes(mtime=mtime_seconds(mtime_ns)))
            except SFTPStatusError as err:
                raise status_error(err, name) from None

    def stage(self, name: str, *, copy_from: str | None = None) -> StagedValue:
        self._check_open()
        target = self.path_of(name)
        source = self.path_of(copy_from) if copy_from is not None else None
        return SFTPStagedValue(self, target, source, copy_from)

    @reconnecting
    def space(self) -> SpaceInfo | None:
        self._check_open()
        with self._pool.session() as session:
            if not session.supports("statvfs@openssh.com"):
                self._warn_once("statvfs", "SFTP server %s lacks statvfs@openssh.com: no capacity", self._label)
                return None
            try:
                reply = session.extended("statvfs@openssh.com", self.base)
            except SFTPStatusError as err:
                raise status_error(err, self.base) from None
        # The reply is struct statvfs as 11 uint64: bsize, frsize, blocks, bfree, bavail, then file counts and flags.
        reply.get_int64()
        fragment_size = reply.get_int64()
        blocks, free, available = reply.get_int64(), reply.get_int64(), reply.get_int64()
        return SpaceInfo(blocks * fragment_size, free * fragment_size, available * fragment_size)

    def _name_of(self, path: str) -> str:
        """Return the backend name of server *path* for messages (the path itself if outside the base)."""
        prefix = self.base + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path
