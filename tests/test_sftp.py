"""SFTP backend: URLs, ssh_config, host keys, lost connections and concurrency, against a real sshd."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import paramiko
import pytest

from borgstorefs.backends import Backend, get_backend, sftp_ssh
from borgstorefs.backends.sftp import TRANSPORTS, SFTPBackend
from borgstorefs.backends.sftp_connect import CONFIG_ENV, resolve_target
from borgstorefs.backends.sftp_session import Reply, SFTPSession, SFTPStatusError, is_connection_lost
from borgstorefs.backends.sftp_ssh import SSHChannel, SSHProcessEnded, sftp_command
from borgstorefs.errors import (
    BackendError,
    BackendUnavailable,
    BackendURLInvalid,
    HostKeyChanged,
    HostKeyUnknown,
    PermissionDenied,
)

from .sshd import SSHServer, descendants, generate_key

MiB = 1024 * 1024


def sftp_backend(url: str) -> SFTPBackend:
    backend = get_backend(url)
    assert isinstance(backend, SFTPBackend)
    return backend


def fingerprint(public_key_path: Path) -> str:
    """Return the SHA256 fingerprint of a public key file as ssh-keygen prints it."""
    output = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key_path)], capture_output=True, text=True, check=True
    ).stdout
    return output.split()[1]


@pytest.fixture
def own_sshd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SSHServer]:
    """Return an sshd of this test alone, which it may restart or pause, with the client config set for it."""
    server = SSHServer(tmp_path / "sshd")
    server.start()
    monkeypatch.setenv(CONFIG_ENV, str(server.ssh_config_path))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store_url(sshd: SSHServer, tmp_path: Path) -> str:
    """Return the URL of a store location that does not exist yet, on the session's server."""
    return sshd.url(tmp_path / "store")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Return a fresh HOME with an empty ~/.ssh, and no BORGSTOREFS_SSH_CONFIG or ssh-agent in the environment."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


# URLs


def test_url_parts_percent_decoded(sshd: SSHServer) -> None:
    backend = sftp_backend("sftp://us%65r@example.org:2222/srv/my%20store/x%2Fy")
    assert backend.user == "user"
    assert backend.host == "example.org"
    assert backend.port == 2222
    assert backend.base == "/srv/my store/x/y"


def test_url_without_user_and_port(sshd: SSHServer) -> None:
    backend = sftp_backend("sftp://example.org/srv/store/")
    assert backend.user is None
    assert backend.port is None
    assert backend.base == "/srv/store"


def test_url_options() -> None:
    backend = sftp_backend("sftp://host/store?timeout=2.5&keepalive=7&attempts=2&sessions=3&fsync=0&transport=paramiko")
    assert backend.timeout == 2.5
    assert backend.keepalive == 7
    assert backend.fsync is False
    assert backend._retrier.policy.attempts == 2
    assert backend.transport == "paramiko"


def test_transport_default_ssh_on_path() -> None:
    assert shutil.which("ssh") is not None, "the tests need the Debian package openssh-client"
    assert sftp_backend("sftp://host/store").transport == "ssh"


def test_transport_default_without_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert sftp_backend("sftp://host/store").transport == "paramiko"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sftp://host", "must be absolute"),
        ("sftp://host/", "must be absolute and not '/'"),
        ("sftp:///store", "a host is needed"),
        ("sftp://user:secret@host/store", "passwords are not supported"),
        ("sftp://host:99999/store", "port must be a number"),
        ("sftp://host/store?speed=1", "unknown option 'speed'"),
        ("sftp://host/store?timeout=soon", "bad value 'soon'"),
        ("sftp://host/store?sessions=0", "must be >= 1"),
        ("sftp://host/store?transport=rsh", "bad value 'rsh' for option 'transport'"),
        ("sftp://-oProxyCommand=x/store", "cannot start with '-'"),
    ],
)
def test_url_invalid(url: str, message: str) -> None:
    with pytest.raises(BackendURLInvalid, match=message):
        get_backend(url)


def test_url_password_not_echoed() -> None:
    with pytest.raises(BackendURLInvalid) as caught:
        get_backend("sftp://user:secret@host/store")
    assert "secret" not in str(caught.value)


# ssh_config


def test_config_alias_user_port_identity(home: Path) -> None:
    (home / ".ssh" / "config").write_text(
        "Host backup\n"
        "    HostName 192.0.2.7\n"
        "    Port 2200\n"
        "    User keeper\n"
        "    IdentityFile ~/.ssh/backup_key\n"
        "    UserKnownHostsFile ~/.ssh/backup_hosts\n"
    )
    target = resolve_target("backup", None, None)
    assert target.hostname == "192.0.2.7"
    assert target.port == 2200
    assert target.user == "keeper"
    assert target.identity_files == (str(home / ".ssh" / "backup_key"),)
    assert target.known_hosts_files[0] == str(home / ".ssh" / "backup_hosts")
    assert target.known_hosts_name == "[192.0.2.7]:2200"


def test_url_user_and_port_override_config(home: Path) -> None:
    (home / ".ssh" / "config").write_text("Host backup\n    Port 2200\n    User keeper\n")
    target = resolve_target("backup", "other", 2300)
    assert target.user == "other"
    assert target.port == 2300


def test_config_defaults_without_file(home: Path) -> None:
    target = resolve_target("plain.example", None, None)
    assert target.port == 22
    assert target.known_hosts_files[0] == str(home / ".ssh" / "known_hosts")
    assert str(home / ".ssh" / "id_ed25519") in target.identity_files
    assert target.use_agent


def test_config_env_override(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / ".ssh" / "config").write_text("Host backup\n    Port 2200\n")
    override = tmp_path / "other_config"
    override.write_text("Host backup\n    Port 2300\n")
    monkeypatch.setenv(CONFIG_ENV, str(override))
    assert resolve_target("backup", None, None).port == 2300


def test_config_proxy_rejected(home: Path) -> None:
    (home / ".ssh" / "config").write_text("Host hop\n    ProxyJump gateway\n")
    with pytest.raises(BackendError, match="ProxyJump"):
        resolve_target("hop", None, None)


def test_connect_through_home_alias(home: Path, sshd: SSHServer, tmp_path: Path) -> None:
    # Only paramiko reads ~/.ssh from $HOME: ssh takes the home directory from the password database.
    ssh_dir = home / ".ssh"
    shutil.copy(sshd.user_key_path, ssh_dir / "store_key")
    (ssh_dir / "known_hosts").write_text(sshd.known_hosts_path.read_text())
    (ssh_dir / "config").write_text(
        f"Host store-alias\n"
        f"    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile ~/.ssh/store_key\n"
        f"    IdentitiesOnly yes\n"
    )
    backend = get_backend(f"sftp://store-alias{tmp_path}/store?transport=paramiko")
    backend.create()
    with backend:
        backend.store("item", b"through the alias")
        assert backend.load("item") == b"through the alias"
    backend.destroy()


# Host keys and authentication


def write_config(path: Path, server: SSHServer, *, known_hosts: Path, key: Path | None = None) -> None:
    path.write_text(
        f"Host *\n"
        f"    User {server.user}\n"
        f"    IdentityFile {key or server.user_key_path}\n"
        f"    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts}\n"
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_host_key_rejected(
    sshd: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    write_config(tmp_path / "config", sshd, known_hosts=known_hosts)
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))
    with pytest.raises(HostKeyUnknown) as caught:
        get_backend(sshd.url(tmp_path / "store") + f"?transport={transport}").create()
    message = str(caught.value)
    assert f"[127.0.0.1]:{sshd.port}" in message
    assert fingerprint(sshd.host_key_path.with_suffix(".pub")) in message
    assert "ssh-ed25519" in message
    assert f"ssh-keyscan -p {sshd.port} -t ssh-ed25519 127.0.0.1" in message
    assert known_hosts.read_text() == ""
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_changed_host_key_rejected(
    sshd: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    other_key = generate_key(tmp_path / "other_host_key", "impostor")
    key_type, key_data, _ = other_key.split(" ", 2)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key_data}\n")
    write_config(tmp_path / "config", sshd, known_hosts=known_hosts)
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))
    with pytest.raises(HostKeyChanged) as caught:
        get_backend(sshd.url(tmp_path / "store") + f"?transport={transport}").create()
    message = str(caught.value)
    assert f"[127.0.0.1]:{sshd.port}" in message
    assert "CHANGED" in message
    assert fingerprint(sshd.host_key_path.with_suffix(".pub")) in message
    assert fingerprint(tmp_path / "other_host_key.pub") in message
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in message
    assert f"ssh-keyscan -p {sshd.port} -t ssh-ed25519 127.0.0.1" in message
    assert known_hosts.read_text() == f"[127.0.0.1]:{sshd.port} {key_type} {key_data}\n"
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unaccepted_user_key(sshd: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    generate_key(tmp_path / "stranger_key", "stranger")
    write_config(tmp_path / "config", sshd, known_hosts=sshd.known_hosts_path, key=tmp_path / "stranger_key")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))
    with pytest.raises(PermissionDenied) as caught:
        get_backend(sshd.url(tmp_path / "store") + f"?transport={transport}").create()
    message = str(caught.value)
    assert f"authentication to SFTP server {sshd.user}@127.0.0.1:{sshd.port} failed" in message
    assert str(tmp_path / "stranger_key") in message
    assert "authorized_keys" in message
    assert not (tmp_path / "store").exists()


# Lost connections


def test_connection_lost_classifier() -> None:
    assert is_connection_lost(TimeoutError("timed out"))
    assert is_connection_lost(ConnectionResetError())
    assert is_connection_lost(EOFError())
    assert is_connection_lost(paramiko.SSHException("Server connection dropped"))
    assert is_connection_lost(socket.gaierror(-2, "Name or service not known"))
    assert not is_connection_lost(SFTPStatusError(paramiko.sftp.SFTP_NO_SUCH_FILE, "No such file"))
    assert is_connection_lost(SFTPStatusError(paramiko.sftp.SFTP_CONNECTION_LOST, "lost"))
    assert not is_connection_lost(PermissionDenied("no"))
    assert not is_connection_lost(paramiko.AuthenticationException("no"))
    assert not is_connection_lost(ValueError("bad name"))
    assert is_connection_lost(SSHProcessEnded("ssh (pid 1) to host: its output ended"))
    assert not is_connection_lost(HostKeyUnknown("unknown"))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_restart_during_stores_and_loads(
    own_sshd: SSHServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    caplog.set_level(logging.INFO, logger="borgstorefs")
    timeout, attempts = 3.0, 5
    # A try waits at most about four timeouts (TCP connect, SSH banner,
    # authentication, a reply); the delays between tries add 0.5 + 1 + 2 + 4 s.
    bound = attempts * 4 * timeout + 7.5
    url = own_sshd.url(tmp_path / "store") + f"?timeout={timeout}&attempts={attempts}&transport={transport}"
    backend = get_backend(url)
    backend.create()
    backend.open()

    acknowledged: dict[str, bytes] = {}
    outcomes: list[str] = []
    restarter = threading.Timer(1.0, own_sshd.restart, kwargs={"down_seconds": 1.0})
    restarter.start()
    deadline = time.monotonic() + 6.0
    index = 0
    try:
        while time.monotonic() < deadline:
            key = f"item{index % 7}"
            value = os.urandom(64 * 1024) + index.to_bytes(4, "big")
            start = time.monotonic()
            try:
                backend.store(key, value)
                acknowledged[key] = value
                assert backend.load(key) == value
                outcomes.append("ok")
            except BackendError as err:
                outcomes.append(type(err).__name__)
            assert time.monotonic() - start < bound
            index += 1
    finally:
        restarter.join()

    assert "reconnected" in caplog.text
    assert outcomes.count("ok") > 10
    for key, value in acknowledged.items():
        assert backend.load(key) == value
    assert [info.name for info in backend.list("")] == sorted(acknowledged)
    leftovers = [path.name for path in (tmp_path / "store").iterdir() if path.name.endswith(".tmp")]
    assert leftovers == []
    backend.close()
    backend.destroy()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_silent_server_times_out(own_sshd: SSHServer, tmp_path: Path, transport: str) -> None:
    backend = get_backend(own_sshd.url(tmp_path / "store") + f"?timeout=1&attempts=2&transport={transport}")
    backend.create()
    backend.open()
    backend.store("item", b"before")
    own_sshd.pause()
    start = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{own_sshd.port}.*after 2 attempts"):
            backend.load("item")
    finally:
        elapsed = time.monotonic() - start
        own_sshd.resume()
    # One reply timeout, the 0.5 s delay, then a connect that gets no SSH banner.
    assert elapsed < 1 + 0.5 + 3 * 1 + 2
    assert backend.load("item") == b"before"
    backend.close()
    backend.destroy()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_down_raises_unavailable(own_sshd: SSHServer, tmp_path: Path, transport: str) -> None:
    backend = get_backend(own_sshd.url(tmp_path / "store") + f"?timeout=2&attempts=2&transport={transport}")
    backend.create()
    backend.open()
    own_sshd.stop()
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{own_sshd.port}"):
        backend.info("item")
    own_sshd.start()
    assert not backend.info("item").exists
    backend.close()
    backend.destroy()


class ThrottledStream(io.RawIOBase):
    """A stream of *total* zero bytes that sets `started` after the first read and pauses between reads."""

    def __init__(self, total: int, chunk_pause: float) -> None:
        self.remaining = total
        self.chunk_pause = chunk_pause
        self.started = threading.Event()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.started.is_set():
            time.sleep(self.chunk_pause)
        self.started.set()
        size = self.remaining if size < 0 else min(size, self.remaining)
        self.remaining -= size
        return bytes(size)


class SlowBytesIO(io.BytesIO):
    """A seekable in-memory stream that sets `started` at its first read and pauses before each later read."""

    def __init__(self, value: bytes, pause: float) -> None:
        super().__init__(value)
        self.pause = pause
        self.started = threading.Event()

    def read(self, size: int | None = -1) -> bytes:
        if self.started.is_set():
            time.sleep(self.pause)
        self.started.set()
        return super().read(size)


def start_slow_upload(backend: Backend, value: bytes) -> tuple[threading.Thread, list[BaseException]]:
    """Start storing *value* as ``item`` in a thread, slowly; return once the upload has begun.

    The thread appends any error to the returned list.
    """
    stream = SlowBytesIO(value, pause=0.3)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            backend.store("item", stream)
        except BaseException as err:
            errors.append(err)

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert stream.started.wait(timeout=30)
    return uploader, errors


def test_store_repeated_after_restart(own_sshd: SSHServer, tmp_path: Path) -> None:
    backend = get_backend(own_sshd.url(tmp_path / "store") + "?timeout=3")
    backend.create()
    backend.open()
    backend.store("item", b"old value")
    value = os.urandom(16 * MiB)
    uploader, errors = start_slow_upload(backend, value)
    own_sshd.restart()
    uploader.join(timeout=120)

    assert errors == []
    assert backend.load("item") == value
    leftovers = [path.name for path in (tmp_path / "store").iterdir() if path.name != "item"]
    assert leftovers == []
    backend.close()
    backend.destroy()


def test_unseekable_store_not_repeated(own_sshd: SSHServer, tmp_path: Path) -> None:
    backend = get_backend(own_sshd.url(tmp_path / "store") + "?timeout=3")
    backend.create()
    backend.open()
    backend.store("item", b"old value")
    stream = ThrottledStream(16 * MiB, chunk_pause=0.3)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            backend.store("item", cast(BinaryIO, stream))
        except BaseException as err:
            errors.append(err)

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert stream.started.wait(timeout=30)
    own_sshd.restart()
    uploader.join(timeout=120)

    assert len(errors) == 1
    assert isinstance(errors[0], BackendUnavailable)
    assert f"127.0.0.1:{own_sshd.port}" in str(errors[0])
    assert backend.load("item") == b"old value"
    assert [info.name for info in backend.list("")] == ["item"]
    backend.close()
    backend.destroy()


# Concurrency


def test_eight_threads_store_and_load(store_url: str) -> None:
    backend = get_backend(store_url)
    backend.create()
    backend.open()
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i in range(25):
                name = f"t{thread}/item{i}"
                value = os.urandom(1000 + 5000 * thread + i)
                backend.store(name, value)
                assert backend.load(name) == value
                assert backend.load(name, offset=-10) == value[-10:]
            assert len(list(backend.list(f"t{thread}"))) == 25
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert [info.name for info in backend.list("")] == [f"t{number}" for number in range(8)]
    backend.close()
    backend.destroy()


def test_large_upload_does_not_stall_listing(store_url: str) -> None:
    backend = get_backend(store_url)
    backend.create()
    backend.open()
    backend.store("small", b"x")
    stream = ThrottledStream(128 * MiB, chunk_pause=0.1)
    upload = threading.Thread(target=backend.store, args=("big", stream))
    upload.start()
    try:
        assert stream.started.wait(timeout=30)
        durations = []
        for _ in range(5):
            start = time.monotonic()
            assert [info.name for info in backend.list("")] == ["small"]
            durations.append(time.monotonic() - start)
        assert upload.is_alive(), "the upload ended before the listings, so they did not overlap"
        assert max(durations) < 1.0
    finally:
        upload.join(timeout=120)
    assert backend.info("big").size == 128 * MiB
    backend.close()
    backend.destroy()


def test_single_session_serializes(store_url: str) -> None:
    backend = get_backend(store_url + "?sessions=1")
    backend.create()
    backend.open()
    results: list[bytes] = []

    def store_and_load(number: int) -> None:
        backend.store(f"k{number}", b"v%d" % number)
        results.append(backend.load(f"k{number}"))

    threads = [threading.Thread(target=store_and_load, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [b"v0", b"v1", b"v2", b"v3"]
    backend.close()
    backend.destroy()


# Extensions


def test_mtime_whole_seconds(store_url: str) -> None:
    backend = get_backend(store_url)
    backend.create()
    with backend:
        assert backend.mtime_resolution_ns == 1_000_000_000
        backend.store("item", b"x")
        backend.set_mtime("item", 1_700_000_000_987_654_321)
        assert backend.info("item").mtime_ns == 1_700_000_000_000_000_000
        with pytest.raises(ValueError, match="outside what SFTP can store"):
            backend.set_mtime("item", -1)
    backend.destroy()


def test_space_matches_statvfs(store_url: str, tmp_path: Path) -> None:
    backend = get_backend(store_url)
    backend.create()
    with backend:
        space = backend.space()
    backend.destroy()
    assert space is not None
    local = os.statvfs(tmp_path)
    assert space.total == local.f_blocks * local.f_frsize


def test_store_unseekable_stream_after_read_error(store_url: str, tmp_path: Path) -> None:
    class BrokenStream(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            raise OSError("disk read error")

    backend = get_backend(store_url)
    backend.create()
    with backend:
        with pytest.raises(OSError, match="disk read error"):
            backend.store("item", cast(BinaryIO, BrokenStream()))
        assert not backend.info("item").exists
    assert not [path for path in (tmp_path / "store").iterdir() if path.name.endswith(".tmp")]
    backend.destroy()


def test_partial_read_of_staged_copy_uses_server(store_url: str) -> None:
    backend = get_backend(store_url)
    backend.create()
    with backend:
        value = os.urandom(3 * MiB + 11)
        backend.store("item", value)
        with backend.stage("item", copy_from="item") as staged:
            assert staged.size == len(value)
            assert staged.read(MiB, 100) == value[MiB : MiB + 100]
            staged.write(len(value), b"end")
            staged.commit("item")
        assert backend.load("item") == value + b"end"
    backend.destroy()


def test_mkdirs_pipelined(store_url: str) -> None:
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        backend.store("file", b"x")
        backend.mkdirs(["a/00", "a/01", "b", "a/00"])
        backend.mkdirs(["a/01", "c/00/ff"])
        assert [info.name for info in backend.list("a")] == ["00", "01"]
        assert [info.name for info in backend.list("")] == ["a", "b", "c", "file"]
        assert backend.info("c/00/ff").directory
        with pytest.raises(BackendError):
            backend.mkdirs(["file/sub"])
        with pytest.raises(ValueError, match="invalid backend name"):
            backend.mkdirs(["ok", "../escape"])
    backend.destroy()


def test_stage_copy_without_copy_data(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    announced = SFTPSession.supports
    monkeypatch.setattr(SFTPSession, "supports", lambda self, name: name != "copy-data" and announced(self, name))
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        value = os.urandom(5 * MiB + 3)
        backend.store("item", value)
        with backend.stage("copy", copy_from="item") as staged:
            staged.write(0, b"head")
            staged.commit("copy")
        assert backend.load("copy") == b"head" + value[4:]
    backend.destroy()


# Staged values


def temp_files(directory: Path) -> list[str]:
    """Return the temporary files anywhere below *directory*, sorted."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*.tmp"))


def count_requests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the SFTP requests that every session sends from now on, in the returned one-element list."""
    sent = [0]
    send = SFTPSession.send

    def counting_send(self: SFTPSession, kind: int, *args: object) -> Reply:
        sent[0] += 1
        return send(self, kind, *args)

    monkeypatch.setattr(SFTPSession, "send", counting_send)
    return sent


def test_stage_creates_temp_file_late(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        backend.store("warm-up", b"")  # opens the session, whose handshake sends requests too
        sent = count_requests(monkeypatch)

        staged = backend.stage("item")
        staged.write(0, b"head")
        staged.write(4, b"body")
        staged.truncate(6)
        staged.truncate(10)

        assert sent[0] == 0
        assert temp_files(tmp_path / "store") == []
        assert staged.size == 10
        assert staged.read(2, 100) == b"adbo\0\0\0\0"
        assert staged.read(10, 5) == b""

        staged.write(20, b"tail")  # does not continue the buffer, so the buffer goes out

        assert len(temp_files(tmp_path / "store")) == 1
        assert staged.read(0, 100) == b"headbo" + bytes(14) + b"tail"
        staged.commit("item")
        assert backend.load("item") == b"headbo" + bytes(14) + b"tail"
        assert temp_files(tmp_path / "store") == []
    backend.destroy()


def test_stage_discard_sends_nothing(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        backend.store("item", b"old")
        sent = count_requests(monkeypatch)

        with backend.stage("item") as staged:
            staged.write(0, b"never stored")

        assert sent[0] == 0
        assert backend.load("item") == b"old"
        assert temp_files(tmp_path / "store") == []
    backend.destroy()


def test_small_commit_request_count(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        backend.store("warm-up", b"")
        sent = count_requests(monkeypatch)

        staged = backend.stage("item")
        staged.write(0, os.urandom(4096))
        staged.commit("item", mtime_ns=1_600_000_000_000_000_000)

        # Create, write, set the mtime, close, stat and rename.
        assert sent[0] == 6
    backend.destroy()


@pytest.mark.parametrize("durable", [False, True])
@pytest.mark.parametrize("mtime_ns", [None, 1_600_000_000_123_000_000])
def test_commit_returns_info(store_url: str, mtime_ns: int | None, durable: bool) -> None:
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        cases = {
            "ns/new": lambda staged: staged.write(0, b"12345"),
            "ns/extended": lambda staged: staged.truncate(3 * MiB),
            "ns/large": lambda staged: staged.write(0, bytes(5 * MiB)),
            "ns/empty": lambda staged: None,
        }
        for name, change in cases.items():
            staged = backend.stage(name)
            change(staged)
            size = staged.size

            info = staged.commit(name, mtime_ns=mtime_ns, durable=durable)

            assert info == backend.info(name), name
            assert info.size == size, name
            assert info.mtime_ns is not None, name
            if mtime_ns is not None:
                assert info.mtime_ns == 1_600_000_000_000_000_000, name
    backend.destroy()


def test_commit_after_flush_returns_info(store_url: str) -> None:
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        backend.store("item", b"0123456789")
        for name, copy_from in (("item", "item"), ("other", None)):
            staged = backend.stage(name, copy_from=copy_from)
            staged.write(2, b"ab")
            staged.write(8, b"cd")  # sends the buffer, so the commit has only "cd" left to write

            info = staged.commit(f"moved/{name}")

            assert info == backend.info(f"moved/{name}")
            assert info.name == name
        assert backend.load("moved/item") == b"01ab4567cd"
        assert backend.load("moved/other") == b"\0\0ab\0\0\0\0cd"
    backend.destroy()


def test_commit_over_directory_fails_cleanly(store_url: str, tmp_path: Path) -> None:
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        backend.store("dir/inside", b"kept")
        staged = backend.stage("dir")
        staged.write(0, b"value")

        with pytest.raises(BackendError, match="'dir'"):
            staged.commit("dir")

        assert backend.load("dir/inside") == b"kept"
        assert temp_files(tmp_path / "store") == []
        with pytest.raises(ValueError, match="already committed or discarded"):
            staged.write(0, b"again")
    backend.destroy()


def test_failed_write_keeps_old_value(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        backend.store("item", b"old value")
        staged = backend.stage("item")
        staged.write(0, b"new value")
        # Writes to a handle the server never issued fail, as writes to a full disk do.
        writer = SFTPSession.writer
        monkeypatch.setattr(SFTPSession, "writer", lambda self, handle: writer(self, b"no such handle"))

        with pytest.raises(BackendError, match="'item'"):
            staged.commit("item", mtime_ns=1_600_000_000_000_000_000)

        monkeypatch.undo()
        assert backend.load("item") == b"old value"
        assert temp_files(tmp_path / "store") == []
    backend.destroy()


def lose_connection_once(monkeypatch: pytest.MonkeyPatch, backend: SFTPBackend, method: str) -> list[str]:
    """Make the first call of *method* of *backend* take effect, then fail as a lost connection.

    Returns the list of the methods that failed, for the test to check.
    """
    failed: list[str] = []
    original = getattr(backend, method)

    def take_effect_then_fail(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        if not failed:
            failed.append(method)
            raise ConnectionResetError(f"connection reset after {method}")
        return result

    monkeypatch.setattr(backend, method, take_effect_then_fail)
    return failed


@pytest.mark.parametrize("method", ["_create_exclusive", "_finish_rename"])
def test_commit_repeated_after_lost_connection(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.INFO, logger="borgstorefs")
    backend = sftp_backend(store_url)
    backend.create()
    with backend:
        backend.store("item", b"old value")
        failed = lose_connection_once(monkeypatch, backend, method)
        staged = backend.stage("item")
        staged.write(0, b"new value")

        info = staged.commit("item")

        assert failed == [method]
        assert "retrying in" in caplog.text
        assert info == backend.info("item")
        assert backend.load("item") == b"new value"
        assert temp_files(tmp_path / "store") == []
        if method == "_finish_rename":
            assert "already in place after a reconnect" in caplog.text
    backend.destroy()


# The ssh transport


def ssh_processes(port: int) -> list[int]:
    """Return the PIDs of this test process's ssh children that connect to *port*."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # it exited while we looked
        if os.path.basename(argv[0]) == b"ssh" and str(port).encode() in argv:
            found.append(pid)
    return found


def test_ssh_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/etc/borgstorefs/ssh_config")
    command = sftp_command("backup.example", "keeper", 2222, timeout=2.5, keepalive=7.4)
    joined = " ".join(command)
    assert command[0] == "ssh"
    assert "-o BatchMode=yes" in joined
    assert "-o StrictHostKeyChecking=yes" in joined
    assert "accept-new" not in joined
    assert "StrictHostKeyChecking=no" not in joined
    assert "-o UpdateHostKeys=no" in joined
    assert "-o ConnectTimeout=3" in joined
    assert "-o ServerAliveInterval=7" in joined
    assert "-F /etc/borgstorefs/ssh_config" in joined
    assert command[-3:] == ["--", "backup.example", "sftp"]
    assert command[command.index("-p") + 1] == "2222"
    assert command[command.index("-l") + 1] == "keeper"


def test_ssh_command_without_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    command = sftp_command("backup.example", None, None, timeout=30, keepalive=15)
    assert "-F" not in command
    assert "-p" not in command
    assert "-l" not in command


def test_ssh_transport_without_ssh(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = sftp_backend(store_url + "?transport=ssh")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendError) as caught:
        backend.create()
    assert not isinstance(caught.value, BackendUnavailable), "a missing program must not be retried"
    assert "transport=paramiko" in str(caught.value)


def test_ssh_alias_from_config(sshd: SSHServer, tmp_path: Path) -> None:
    # "sshd-test" is a Host alias in the server's ssh_config, which ssh reads through -F.
    backend = sftp_backend(f"sftp://sshd-test{tmp_path}/store?transport=ssh")
    backend.create()
    with backend:
        backend.store("item", b"through the alias")
        assert backend.load("item") == b"through the alias"
        assert backend._pool.label == f"{sshd.user}@127.0.0.1:{sshd.port}"
    backend.destroy()


def test_ssh_session_limits_and_extensions(store_url: str) -> None:
    backend = sftp_backend(store_url + "?transport=ssh")
    backend.create()
    with backend, backend._pool.session() as session:
        assert isinstance(session.sock, SSHChannel)
        assert session.supports("limits@openssh.com")
        assert session.supports("fsync@openssh.com")
        # OpenSSH's limits: 255 KiB of data per read or write, within our 256 KiB.
        assert session.read_size == 255 * 1024
        assert session.write_size == 255 * 1024
    backend.destroy()


def test_ssh_process_per_session(sshd: SSHServer, tmp_path: Path) -> None:
    backend = sftp_backend(sshd.url(tmp_path / "store") + "?transport=ssh&sessions=2")
    backend.create()
    backend.open()
    backend.store("first", b"one")
    backend.store("second", b"two")
    with backend.open_reader("first") as first, backend.open_reader("second") as second:
        pids = {first._session.sock.pid, second._session.sock.pid}  # type: ignore[attr-defined]
        assert len(pids) == 2
        assert pids <= set(ssh_processes(sshd.port))
        assert first.read(0, 3) == b"one"
        assert second.read(0, 3) == b"two"
    backend.close()
    assert not pids & set(ssh_processes(sshd.port)), "close() left ssh processes behind"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"ssh (pid {pid}) was not reaped"
    backend.destroy()


def test_killed_ssh_process_reconnects(own_sshd: SSHServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="borgstorefs")
    backend = sftp_backend(own_sshd.url(tmp_path / "store") + "?transport=ssh&timeout=5")
    backend.create()
    backend.open()
    value = os.urandom(16 * MiB)
    uploader, errors = start_slow_upload(backend, value)
    killed = ssh_processes(own_sshd.port)
    assert killed, "no ssh process to kill"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    uploader.join(timeout=120)

    assert errors == []
    assert "store('item') on" in caplog.text
    assert "lost the connection" in caplog.text
    assert "retrying in" in caplog.text
    assert "reconnected to" in caplog.text
    assert backend.load("item") == value
    assert not set(killed) & set(ssh_processes(own_sshd.port))
    backend.close()
    backend.destroy()


def in_force_cipher_options(sshd: SSHServer) -> list[str]:
    """Return `sftp_ssh.cipher_options` for *sshd* under the ssh_config in force."""
    options = sftp_ssh.ssh_settings(sftp_ssh.destination_options("127.0.0.1", sshd.user, sshd.port), "127.0.0.1", 10)
    return sftp_ssh.cipher_options(options, "127.0.0.1", sshd.user, sshd.port, timeout=10)


def test_aes_gcm_preferred_by_default(sshd: SSHServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sftp_ssh, "cpu_has_aes", lambda: True)

    options = in_force_cipher_options(sshd)

    assert options[0] == "-o"
    assert options[1].startswith("Ciphers=aes128-gcm@openssh.com,")
    assert "chacha20-poly1305@openssh.com" in options[1]


def test_configured_ciphers_kept(sshd: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(f"Ciphers aes256-ctr\n{Path(os.environ[CONFIG_ENV]).read_text()}")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setattr(sftp_ssh, "cpu_has_aes", lambda: True)

    assert in_force_cipher_options(sshd) == []


def test_no_cipher_change_without_aes(sshd: SSHServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sftp_ssh, "cpu_has_aes", lambda: False)

    assert in_force_cipher_options(sshd) == []
