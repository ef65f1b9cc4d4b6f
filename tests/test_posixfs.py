"""Behaviour of the POSIX backend beyond the shared contract."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from borgstorefs.backends.posixfs import PosixFS
from borgstorefs.errors import BackendError, ObjectNotFound

GiB = 1024**3
HOLE = GiB
"""Size of the hole in bytes: a full copy is easy to tell apart, yet cannot fill the disk."""


def test_stage_copy_keeps_holes(tmp_path: Path) -> None:
    backend = PosixFS(tmp_path / "store")
    backend.create()
    with backend:
        backend.store("sparse", b"head")
        path = tmp_path / "store" / "sparse"
        with open(path, "r+b") as file:
            file.seek(HOLE)
            file.write(b"tail")

        staged = backend.stage("sparse", copy_from="sparse")
        staged.truncate(HOLE + 2)
        staged.commit("sparse")

        st = os.stat(path)
        assert st.st_size == HOLE + 2
        assert st.st_blocks * 512 < 1024 * 1024
        assert backend.load("sparse", size=4) == b"head"
        assert backend.load("sparse", offset=HOLE) == b"ta"
        assert backend.load("sparse", offset=HOLE // 2, size=8) == bytes(8)


def test_staged_size_counted(tmp_path: Path) -> None:
    backend = PosixFS(tmp_path / "store")
    backend.create()
    with backend:
        backend.store("item", b"0123456789")
        staged = backend.stage("item", copy_from="item")
        assert staged.size == 10
        staged.write(12, b"ab")
        assert staged.size == 14
        staged.write(0, b"")
        staged.write(20, b"")
        assert staged.size == 14
        staged.truncate(3)
        assert staged.size == 3

        info = staged.commit("item")

        assert info.size == 3
        assert os.stat(tmp_path / "store" / "item").st_size == 3


def test_directories_made_only_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = PosixFS(tmp_path / "store")
    backend.create()
    made_directories: list[str] = []
    removed_files: list[str] = []
    makedirs, unlink = os.makedirs, os.unlink

    def record_makedirs(path: str, *args: Any, **kwargs: Any) -> None:
        made_directories.append(path)
        makedirs(path, *args, **kwargs)

    def record_unlink(path: str, *args: Any, **kwargs: Any) -> None:
        removed_files.append(path)
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", record_makedirs)
    monkeypatch.setattr(os, "unlink", record_unlink)
    with backend:
        backend.store("ns/01/first", b"1")
        first = list(made_directories)  # os.makedirs calls itself again for each missing parent
        assert first[0] == str(tmp_path / "store" / "ns" / "01")

        backend.store("ns/01/second", b"2")
        staged = backend.stage("ns/01/third")
        staged.write(0, b"3")
        staged.commit("ns/01/third")
        backend.move("ns/01/third", "ns/01/fourth")
        assert made_directories == first
        assert removed_files == []

        backend.move("ns/01/fourth", "other/fourth")
        assert made_directories[len(first) :] == [str(tmp_path / "store" / "other")]
        assert backend.load("other/fourth") == b"3"


@pytest.mark.parametrize("mtime_ns", [None, 1_500_000_000_123_456_789])
def test_commit_returns_stored_info(tmp_path: Path, mtime_ns: int | None) -> None:
    backend = PosixFS(tmp_path / "store")
    backend.create()
    with backend:
        staged = backend.stage("ns/item")
        staged.write(0, b"value")

        info = staged.commit("ns/item", mtime_ns=mtime_ns)

        assert info == backend.info("ns/item")
        if mtime_ns is not None:
            assert info.mtime_ns == mtime_ns


def call_within(seconds: float, function: Any, *args: Any) -> Any:
    """Return ``function(*args)``, or fail the test if it has not returned after *seconds*."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("value", function(*args)))
        except Exception as error:
            outcome.append(("error", error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{function.__name__} still blocks after {seconds} s"
    kind, result = outcome[0]
    if kind == "error":
        raise result
    return result


def test_fifo_not_an_item(tmp_path: Path) -> None:
    backend = PosixFS(tmp_path / "store")
    backend.create()
    with backend:
        backend.store("ns/file", b"data")
        os.mkfifo(tmp_path / "store" / "ns" / "fifo")

        listed = [info.name for info in backend.list("ns")]
        info = backend.info("ns/fifo")

        assert listed == ["file"]
        assert not info.exists
        with pytest.raises(ObjectNotFound):
            call_within(5, backend.load, "ns/fifo")
        with pytest.raises(ObjectNotFound):
            call_within(5, backend.open_reader, "ns/fifo")
        with pytest.raises(ObjectNotFound):
            call_within(5, lambda: backend.stage("ns/fifo", copy_from="ns/fifo"))


def test_symbolic_links_followed(tmp_path: Path) -> None:
    backend = PosixFS(tmp_path / "store")
    backend.create()
    with backend:
        backend.store("ns/target", b"the value")
        directory = tmp_path / "store" / "ns"
        (directory / "link").symlink_to("target")
        (directory / "dangling").symlink_to("nowhere")
        (directory / "loop").symlink_to("loop")

        listed = {info.name: info.size for info in backend.list("ns")}

        assert listed == {"link": 9, "target": 9}
        assert backend.info("ns/link").size == 9
        assert backend.load("ns/link") == b"the value"
        assert not backend.info("ns/dangling").exists
        with pytest.raises(BackendError):  # skipped in listings, but looked up by name a loop is a broken store
            backend.info("ns/loop")
