"""SFTP readers: sessions pinned per handle, spreading over the pool, and lost connections."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from borgstorefs.backends import get_backend
from borgstorefs.backends.sftp import SFTPBackend
from borgstorefs.backends.sftp_connect import CONFIG_ENV
from borgstorefs.errors import BackendError

from .sshd import SSHServer

MiB = 1024 * 1024


@pytest.fixture
def own_sshd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SSHServer]:
    """Return an sshd of this test alone, which it may restart, with the client config set for it."""
    server = SSHServer(tmp_path / "sshd")
    server.start()
    monkeypatch.setenv(CONFIG_ENV, str(server.ssh_config_path))
    try:
        yield server
    finally:
        server.stop()


def open_backend(url: str) -> SFTPBackend:
    backend = get_backend(url)
    assert isinstance(backend, SFTPBackend)
    backend.create()
    backend.open()
    return backend


def test_readers_spread_over_sessions(sshd: SSHServer, tmp_path: Path) -> None:
    backend = open_backend(sshd.url(tmp_path / "store") + "?sessions=2")
    backend.store("first", b"one")
    backend.store("second", b"two")

    with backend.open_reader("first") as first, backend.open_reader("second") as second:
        assert first._session is not second._session  # type: ignore[attr-defined]
        assert first.read(0, 10) == b"one"
        assert second.read(0, 10) == b"two"

    backend.close()
    backend.destroy()


def test_reader_with_one_session_and_loads(sshd: SSHServer, tmp_path: Path) -> None:
    # Reads wait for the reader's session while loads in other threads use it, and none blocks for good.
    backend = open_backend(sshd.url(tmp_path / "store") + "?sessions=1")
    value = os.urandom(2 * MiB)
    backend.store("item", value)
    failures: list[str] = []

    with backend.open_reader("item") as reader:

        def read_and_load(number: int) -> None:
            for offset in range(0, len(value), 256 * 1024):
                if reader.read(offset, 256 * 1024) != value[offset : offset + 256 * 1024]:
                    failures.append(f"read {number} at {offset}")
                if backend.load("item", offset=offset, size=10) != value[offset : offset + 10]:
                    failures.append(f"load {number} at {offset}")

        threads = [threading.Thread(target=read_and_load, args=(number,)) for number in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)

    assert failures == []
    backend.close()
    backend.destroy()


def test_reader_reopens_after_restart(own_sshd: SSHServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="borgstorefs")
    backend = open_backend(own_sshd.url(tmp_path / "store") + "?timeout=3")
    value = os.urandom(MiB)
    backend.store("item", value)

    with backend.open_reader("item") as reader:
        assert reader.read(0, 1000) == value[:1000]
        own_sshd.restart(down_seconds=0.5)
        assert reader.read(1000, MiB) == value[1000:]

    assert "opened" in caplog.text
    assert "again on a new SFTP session" in caplog.text
    backend.close()
    backend.destroy()


def test_reader_fails_after_replacement_while_down(own_sshd: SSHServer, tmp_path: Path) -> None:
    backend = open_backend(own_sshd.url(tmp_path / "store") + "?timeout=3")
    backend.store("item", b"old value")

    with backend.open_reader("item") as reader:
        assert reader.read(0, 3) == b"old"
        own_sshd.stop()
        (tmp_path / "store" / "item").write_bytes(b"a new value of another size")
        own_sshd.start()
        with pytest.raises(BackendError, match="replaced meanwhile"):
            reader.read(3, 100)

    backend.close()
    backend.destroy()


def test_reader_fails_after_removal_while_down(own_sshd: SSHServer, tmp_path: Path) -> None:
    backend = open_backend(own_sshd.url(tmp_path / "store") + "?timeout=3")
    backend.store("item", b"old value")

    with backend.open_reader("item") as reader:
        assert reader.read(0, 3) == b"old"
        own_sshd.stop()
        (tmp_path / "store" / "item").unlink()
        own_sshd.start()
        with pytest.raises(BackendError, match="removed or renamed meanwhile"):
            reader.read(3, 100)

    backend.close()
    backend.destroy()
