"""The backend contract: every backend in `BACKEND_KINDS` must pass this suite unchanged.

Tests marked ``paramiko_too`` also run on the SFTP backend with
``transport=paramiko``, the transport that is not the default.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from borgstorefs.backends import Backend, get_backend
from borgstorefs.errors import (
    BackendAlreadyExists,
    BackendDoesNotExist,
    BackendMustBeOpen,
    BackendMustNotBeOpen,
    DirectoryNotEmpty,
    ObjectAlreadyExists,
    ObjectNotFound,
)

MiB = 1024 * 1024

UNSAFE_NAMES = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "..",
    ".",
    "a/./b",
    "a//b",
    "a\x00b",
    "caf\u00e9",
    "\u2024\u2024/x",  # ONE DOT LEADER, a lookalike of '.'
    "a\\b",
    "a b",
]


@pytest.fixture
def backend(make_url: Callable[[], str]) -> Iterator[Backend]:
    backend = get_backend(make_url())
    backend.create()
    backend.open()
    yield backend
    backend.close()
    backend.destroy()


def names_of(backend: Backend, directory: str) -> list[str]:
    return [info.name for info in backend.list(directory)]


# Lifecycle


def test_create_refuses_non_empty(make_url: Callable[[], str]) -> None:
    url = make_url()
    backend = get_backend(url)
    backend.create()
    with backend:
        backend.store("item", b"x")
    with pytest.raises(BackendAlreadyExists):
        get_backend(url).create()


def test_create_makes_parents_and_destroy_removes(make_url: Callable[[], str]) -> None:
    url = make_url() + "/deeper/store"
    backend = get_backend(url)
    backend.create()
    backend.open()
    backend.store("item", b"x")
    backend.close()
    backend.destroy()
    with pytest.raises(BackendDoesNotExist):
        get_backend(url).open()


@pytest.mark.paramiko_too
def test_open_missing_store(make_url: Callable[[], str]) -> None:
    with pytest.raises(BackendDoesNotExist):
        get_backend(make_url()).open()


def test_destroy_missing_store(make_url: Callable[[], str]) -> None:
    with pytest.raises(BackendDoesNotExist):
        get_backend(make_url()).destroy()


def test_closed_backend_raises(make_url: Callable[[], str]) -> None:
    backend = get_backend(make_url())
    backend.create()
    with pytest.raises(BackendMustBeOpen):
        backend.store("item", b"x")
    with pytest.raises(BackendMustBeOpen):
        backend.load("item")
    with pytest.raises(BackendMustBeOpen):
        backend.info("item")
    with pytest.raises(BackendMustBeOpen):
        list(backend.list(""))
    backend.destroy()


def test_open_backend_refuses_lifecycle(backend: Backend) -> None:
    with pytest.raises(BackendMustNotBeOpen):
        backend.create()
    with pytest.raises(BackendMustNotBeOpen):
        backend.destroy()
    with pytest.raises(BackendMustNotBeOpen):
        backend.open()


# Values


@pytest.mark.paramiko_too
@pytest.mark.parametrize("size", [0, 1, 1000, 1 * MiB + 7])
def test_store_load_round_trip(backend: Backend, size: int) -> None:
    value = os.urandom(size)
    backend.store("item", value)
    assert backend.load("item") == value


@pytest.mark.paramiko_too
@pytest.mark.slow
def test_store_load_64_mib(backend: Backend) -> None:
    value = os.urandom(64 * MiB)
    backend.store("big", value)
    assert backend.load("big") == value


def test_store_replaces_value(backend: Backend) -> None:
    backend.store("item", b"old value")
    backend.store("item", b"new")
    assert backend.load("item") == b"new"


@pytest.mark.paramiko_too
def test_store_from_stream(backend: Backend) -> None:
    value = os.urandom(3 * MiB + 5)
    backend.store("item", io.BytesIO(value))
    assert backend.load("item") == value


def test_store_creates_parent_directories(backend: Backend) -> None:
    backend.store("ns/01/23/0123", b"nested")
    assert backend.load("ns/01/23/0123") == b"nested"
    assert names_of(backend, "ns/01") == ["23"]


@pytest.mark.paramiko_too
@pytest.mark.parametrize(
    ("offset", "size", "expected"),
    [
        (0, 3, b"012"),
        (4, 3, b"456"),
        (7, 3, b"789"),
        (8, 10, b"89"),
        (10, 5, b""),
        (50, 5, b""),
        (-3, None, b"789"),
        (-3, 2, b"78"),
        (-50, 2, b"01"),
        (3, None, b"3456789"),
        (0, 0, b""),
    ],
)
def test_partial_load(backend: Backend, offset: int, size: int | None, expected: bytes) -> None:
    backend.store("item", b"0123456789")
    assert backend.load("item", offset=offset, size=size) == expected


@pytest.mark.paramiko_too
def test_load_missing_item(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.load("missing")


# Info and listing


def test_info_of_item(backend: Backend) -> None:
    backend.store("item", b"12345")
    info = backend.info("item")
    assert info.exists
    assert info.size == 5
    assert not info.directory
    assert info.mtime_ns is not None
    assert abs(info.mtime_ns / 1e9 - time.time()) < 300


def test_info_of_missing_item(backend: Backend) -> None:
    info = backend.info("missing")
    assert not info.exists


def test_info_of_directory(backend: Backend) -> None:
    backend.mkdir("dir")
    info = backend.info("dir")
    assert info.exists
    assert info.directory


@pytest.mark.paramiko_too
def test_list_sorted_and_flat(backend: Backend) -> None:
    for name in ["c", "a", "b2", "b1"]:
        backend.store(name, name.encode())
    backend.store("sub/inner", b"x")
    infos = list(backend.list(""))
    assert [info.name for info in infos] == ["a", "b1", "b2", "c", "sub"]
    assert [info.directory for info in infos] == [False, False, False, False, True]
    assert infos[1].size == 2


def test_list_carries_mtime(backend: Backend) -> None:
    backend.store("item", b"x")
    (info,) = backend.list("")
    assert info.mtime_ns == backend.info("item").mtime_ns


def test_list_hides_temporary_files(backend: Backend) -> None:
    backend.store("item", b"x")
    staged = backend.stage("other")
    staged.write(0, b"partial")
    assert names_of(backend, "") == ["item"]
    staged.discard()


def test_list_missing_directory(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        list(backend.list("missing"))


# Changes


def test_delete_item(backend: Backend) -> None:
    backend.store("item", b"x")
    backend.delete("item")
    assert not backend.info("item").exists


@pytest.mark.paramiko_too
def test_delete_missing_item(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.delete("missing")


@pytest.mark.paramiko_too
def test_move_replaces_target(backend: Backend) -> None:
    backend.store("a", b"value a")
    backend.store("b", b"value b")
    backend.move("a", "b")
    assert backend.load("b") == b"value a"
    assert not backend.info("a").exists


@pytest.mark.paramiko_too
def test_move_without_replace_keeps_both(backend: Backend) -> None:
    backend.store("a", b"value a")
    backend.store("b", b"value b")
    with pytest.raises(ObjectAlreadyExists):
        backend.move("a", "b", replace=False)
    assert backend.load("a") == b"value a"
    assert backend.load("b") == b"value b"


def test_move_into_new_directory(backend: Backend) -> None:
    backend.store("a", b"value")
    backend.move("a", "ns/01/a", replace=False)
    assert backend.load("ns/01/a") == b"value"


def test_move_missing_item(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.move("missing", "target")


def test_mkdir_rmdir(backend: Backend) -> None:
    backend.mkdir("a/b")
    backend.mkdir("a/b")
    backend.rmdir("a/b")
    assert names_of(backend, "a") == []


@pytest.mark.paramiko_too
def test_rmdir_not_empty(backend: Backend) -> None:
    backend.store("dir/item", b"x")
    with pytest.raises(DirectoryNotEmpty):
        backend.rmdir("dir")


def test_rmdir_missing(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.rmdir("missing")


@pytest.mark.paramiko_too
def test_set_mtime(backend: Backend) -> None:
    backend.store("item", b"x")
    mtime_ns = 1_500_000_000_000_000_000
    backend.set_mtime("item", mtime_ns)
    assert backend.info("item").mtime_ns == mtime_ns


@pytest.mark.paramiko_too
def test_space_reports_capacity(backend: Backend) -> None:
    space = backend.space()
    if space is None:
        pytest.skip(f"{backend!r} cannot report its capacity")
    assert space.total > 0
    assert 0 <= space.available <= space.total


# Staged values


def test_stage_writes_at_offsets(backend: Backend) -> None:
    with backend.stage("item") as staged:
        staged.write(4, b"tail")
        staged.write(0, b"ab")
        assert staged.size == 8
        assert staged.read(0, 100) == b"ab\0\0tail"
        staged.commit("item")
    assert backend.load("item") == b"ab\0\0tail"


def test_stage_invisible_until_commit(backend: Backend) -> None:
    backend.store("item", b"old")
    staged = backend.stage("item")
    staged.write(0, b"new value")
    assert backend.load("item") == b"old"
    staged.commit("item", mtime_ns=1_600_000_000_000_000_000)
    assert backend.load("item") == b"new value"
    assert backend.info("item").mtime_ns == 1_600_000_000_000_000_000


def test_stage_discard_leaves_nothing(backend: Backend) -> None:
    backend.store("item", b"old")
    with backend.stage("item") as staged:
        staged.write(0, b"never stored")
    assert backend.load("item") == b"old"
    assert names_of(backend, "") == ["item"]


@pytest.mark.paramiko_too
def test_stage_copy_then_modify(backend: Backend) -> None:
    value = os.urandom(2 * MiB)
    backend.store("item", value)
    staged = backend.stage("item", copy_from="item")
    staged.write(MiB, b"XYZ")
    staged.truncate(MiB + 10)
    staged.commit("item", durable=True)
    assert backend.load("item") == value[:MiB] + b"XYZ" + value[MiB + 3 : MiB + 10]


def test_stage_copy_of_missing_item(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.stage("item", copy_from="missing")


def test_stage_commit_elsewhere(backend: Backend) -> None:
    staged = backend.stage("ns/first")
    staged.write(0, b"value")
    staged.commit("other/second")
    assert backend.load("other/second") == b"value"
    assert names_of(backend, "ns") == []


# Readers


@pytest.mark.paramiko_too
@pytest.mark.parametrize(
    ("offset", "size", "expected"),
    [
        (0, 3, b"012"),
        (4, 3, b"456"),
        (8, 10, b"89"),
        (10, 5, b""),
        (50, 5, b""),
        (0, 0, b""),
    ],
)
def test_reader_reads_at_offsets(backend: Backend, offset: int, size: int, expected: bytes) -> None:
    backend.store("ns/item", b"0123456789")
    with backend.open_reader("ns/item") as reader:
        assert reader.size == 10
        assert reader.read(offset, size) == expected


def test_reader_size_and_mtime(backend: Backend) -> None:
    backend.store("item", b"value")
    backend.set_mtime("item", 1_600_000_000_000_000_000)
    with backend.open_reader("item") as reader:
        assert reader.size == 5
        assert reader.mtime_ns == 1_600_000_000_000_000_000


def test_reader_large_value_pieces(backend: Backend) -> None:
    value = os.urandom(9 * MiB + 5)
    backend.store("item", value)
    with backend.open_reader("item") as reader:
        assert reader.read(0, len(value) + 100) == value
        assert reader.read(3 * MiB + 1, 4096) == value[3 * MiB + 1 : 3 * MiB + 4097]
        assert reader.read(len(value) - 7, MiB) == value[-7:]


@pytest.mark.paramiko_too
def test_reader_keeps_replaced_value(backend: Backend) -> None:
    old = os.urandom(MiB)
    backend.store("item", old)
    backend.store("other", b"replacement")
    with backend.open_reader("item") as reader:
        assert reader.read(0, 10) == old[:10]
        backend.move("other", "item")
        assert reader.read(10, MiB) == old[10:]
        assert reader.size == MiB
    assert backend.load("item") == b"replacement"


def test_reader_keeps_value_stored_over(backend: Backend) -> None:
    backend.store("item", b"old value")
    with backend.open_reader("item") as reader:
        backend.store("item", b"new value, longer")
        assert reader.read(0, 100) == b"old value"


def test_reader_keeps_deleted_value(backend: Backend) -> None:
    backend.store("item", b"deleted value")
    with backend.open_reader("item") as reader:
        backend.delete("item")
        assert reader.read(0, 100) == b"deleted value"
    assert not backend.info("item").exists


def test_reader_follows_renamed_item(backend: Backend) -> None:
    backend.store("item", b"moved value")
    with backend.open_reader("item") as reader:
        backend.move("item", "item.del")
        assert reader.read(6, 100) == b"value"


def test_reader_of_missing_item(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.open_reader("missing")
    with pytest.raises(ObjectNotFound):
        backend.open_reader("ns/missing")


def test_reader_of_directory(backend: Backend) -> None:
    backend.mkdir("ns")
    with pytest.raises(ObjectNotFound):
        backend.open_reader("ns")


def test_reader_close_idempotent(backend: Backend) -> None:
    backend.store("item", b"value")
    reader = backend.open_reader("item")
    reader.close()
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read(0, 1)


def test_reader_rejects_negative_range(backend: Backend) -> None:
    backend.store("item", b"value")
    with backend.open_reader("item") as reader:
        with pytest.raises(ValueError):
            reader.read(-1, 1)
        with pytest.raises(ValueError):
            reader.read(0, -1)


@pytest.mark.paramiko_too
def test_readers_from_threads(backend: Backend) -> None:
    values = {f"item{index}": os.urandom(256 * 1024 + index) for index in range(6)}
    for name, value in values.items():
        backend.store(name, value)
    readers = {name: backend.open_reader(name) for name in values}
    failures: list[str] = []

    def read_all(name: str) -> None:
        value = values[name]
        for offset in range(0, len(value), 40_000):
            if readers[name].read(offset, 40_000) != value[offset : offset + 40_000]:
                failures.append(f"{name} at {offset}")

    threads = [threading.Thread(target=read_all, args=(name,)) for name in values for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for reader in readers.values():
        reader.close()
    assert failures == []


def test_closed_backend_reader_raises(make_url: Callable[[], str]) -> None:
    backend = get_backend(make_url())
    backend.create()
    with pytest.raises(BackendMustBeOpen):
        backend.open_reader("item")
    backend.destroy()


# Names


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_names_rejected(backend: Backend, name: str) -> None:
    operations: list[Callable[[], object]] = [
        lambda: backend.store(name, b"x"),
        lambda: backend.load(name),
        lambda: backend.info(name),
        lambda: backend.delete(name),
        lambda: backend.move("item", name),
        lambda: backend.mkdir(name),
        lambda: list(backend.list(name)),
        lambda: backend.stage(name),
        lambda: backend.open_reader(name),
    ]
    backend.store("item", b"x")
    for operation in operations:
        with pytest.raises(ValueError, match=r"invalid backend name|must not be empty"):
            operation()
    assert backend.load("item") == b"x"


def test_non_str_name_rejected(backend: Backend) -> None:
    with pytest.raises(TypeError):
        backend.store(b"item", b"x")  # type: ignore[arg-type]


# Crash safety

CRASH_WRITER = textwrap.dedent(
    """
    import sys, time
    from borgstorefs.backends import get_backend

    class SlowValue:
        # Returns 1 MiB, then signals the parent and waits to be killed.
        def __init__(self):
            self.sent = 0
        def read(self, size=-1):
            if self.sent == 0:
                self.sent = 1
                return b"n" * (1024 * 1024)
            print("writing", flush=True)
            time.sleep(60)
            return b""

    backend = get_backend(sys.argv[1])
    backend.open()
    backend.store("item", SlowValue())
    """
)


@pytest.mark.paramiko_too
def test_killed_writer_keeps_old_value(make_url: Callable[[], str]) -> None:
    url = make_url()
    backend = get_backend(url)
    backend.create()
    with backend:
        backend.store("item", b"old value")
    writer = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    with backend:
        assert backend.load("item") == b"old value"
        assert names_of(backend, "") == ["item"]
