"""Writing through a mounted store with real tools: files, names, renames, attributes, rsync, crashes."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import random
import signal
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import pytest

from borgstorefs.store import Store
from tests.mounting import (
    MOUNT_TIMEOUT,
    Mount,
    create_store,
    errno_of,
    requires_fuse,
    run,
    url_at,
    wait_until,
)

pytest_plugins = ["tests.mounting"]
pytestmark = requires_fuse

MiB = 1024 * 1024

KNOWN_MTIME_NS = 1_500_000_000 * 10**9
"""A modification time in whole seconds, which every backend (SFTP included) can keep exactly."""


def make_value(seed: int, size: int) -> bytes:
    """Return *size* reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


@pytest.fixture
def mounted(make_url: Callable[[], str], mount: Callable[..., Mount]) -> Mount:
    """Mount a new store with the empty namespaces ``ns`` (flat) and ``other`` (nested one level)."""
    url = make_url()
    create_store(url, levels={"ns": [0], "other": [0]})
    # The nesting of "other" comes from the option, so no nesting directories are made in advance.
    return mount(url, "--levels", "other=1")


def load(mounted: Mount, name: str, *, deleted: bool = False, fork: bool = True) -> bytes | None:
    """Return the stored value of *name* as a second client sees it, or None if it is missing.

    With ``fork=False`` the client starts no process. A caller with a file
    of the mount open needs that, because a child's copy of the descriptor
    closes at exec, the kernel then sends the daemon a flush, and a flush
    stores the value. The SFTP backend's default ``ssh`` transport starts ssh
    processes, so that case uses ``transport=paramiko``.
    """
    url = mounted.url
    if not fork and url.startswith("sftp://"):
        url += "?transport=paramiko"
    with Store(url) as store:
        if not store.info(name, deleted=deleted).exists:
            return None
        return store.load(name, deleted=deleted)


def stored_keys(mounted: Mount, namespace: str, *, deleted: bool = False) -> set[str]:
    """Return the keys of *namespace* in the store, as a second client lists them."""
    with Store(mounted.url) as store:
        return {info.name for info in store.list(namespace, deleted=deleted)}


def put(mounted: Mount, name: str, value: bytes) -> None:
    """Store *value* as *name* directly, before the mount has looked the name up."""
    with Store(mounted.url) as store:
        store.store(name, value)


def write_file(path: Path, value: bytes) -> None:
    with open(path, "wb") as file:
        file.write(value)


# cp, mv, rm, dd


def test_cp_file_stored(mounted: Mount, tmp_path: Path) -> None:
    source = tmp_path / "source"
    value = make_value(1, MiB + 3)
    source.write_bytes(value)

    run("cp", source, mounted.path / "ns" / "copied")

    assert load(mounted, "ns/copied") == value
    assert (mounted.path / "ns" / "copied").read_bytes() == value


def test_cp_empty_file(mounted: Mount, tmp_path: Path) -> None:
    source = tmp_path / "empty"
    source.write_bytes(b"")

    run("cp", source, mounted.path / "ns" / "empty")

    assert os.stat(mounted.path / "ns" / "empty").st_size == 0
    assert load(mounted, "ns/empty") == b""


def test_mv_into_mount(mounted: Mount, tmp_path: Path) -> None:
    source = tmp_path / "source"
    value = make_value(2, 70_000)
    source.write_bytes(value)

    run("mv", source, mounted.path / "ns" / "moved")

    assert not source.exists()
    assert load(mounted, "ns/moved") == value


def test_rm_written_file_trashed(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "doomed", b"soon in the trash")

    run("rm", mounted.path / "ns" / "doomed")

    assert "doomed" not in os.listdir(mounted.path / "ns")
    assert load(mounted, "ns/doomed") is None
    assert load(mounted, "ns/doomed", deleted=True) == b"soon in the trash"


def test_dd_writes_file(mounted: Mount, tmp_path: Path) -> None:
    source = tmp_path / "source"
    value = make_value(3, 5 * MiB + 17)
    source.write_bytes(value)

    run("dd", f"if={source}", f"of={mounted.path / 'ns' / 'dd'}", "bs=64k", "status=none")

    assert load(mounted, "ns/dd") == value


@pytest.mark.parametrize(
    ("block_size", "seek"),
    [(1, 500_000), (4096, 100), (1000, 1048)],
    ids=["unaligned", "page-aligned", "across-end"],
)
def test_dd_notrunc_patches(mounted: Mount, tmp_path: Path, block_size: int, seek: int) -> None:
    original = make_value(4, MiB)
    patch = make_value(5, 3 * block_size + 1)
    put(mounted, "ns/base", original)
    (tmp_path / "patch").write_bytes(patch)
    offset = block_size * seek
    expected = bytearray(original)
    expected[offset : offset + len(patch)] = patch

    target = mounted.path / "ns" / "base"
    run("dd", f"if={tmp_path / 'patch'}", f"of={target}", f"bs={block_size}", f"seek={seek}", "conv=notrunc")

    assert target.read_bytes() == bytes(expected)
    assert load(mounted, "ns/base") == bytes(expected)


# Truncation and offsets


def test_truncate_tool_sizes(mounted: Mount) -> None:
    original = make_value(6, 10_000)
    put(mounted, "ns/cut", original)
    path = mounted.path / "ns" / "cut"

    run("truncate", "-s", "3000", path)
    assert load(mounted, "ns/cut") == original[:3000]

    run("truncate", "-s", "8000", path)
    assert path.read_bytes() == original[:3000] + bytes(5000)
    assert load(mounted, "ns/cut") == original[:3000] + bytes(5000)

    run("truncate", "-s", "0", path)
    assert os.stat(path).st_size == 0
    assert load(mounted, "ns/cut") == b""


def test_truncate_path_while_reader_open(mounted: Mount) -> None:
    original = make_value(8, 80_000)
    put(mounted, "ns/shrink", original)
    path = mounted.path / "ns" / "shrink"

    with open(path, "rb") as reader:
        assert reader.read(100) == original[:100]
        os.truncate(path, 18_370)
        assert os.stat(path).st_size == 18_370
        assert load(mounted, "ns/shrink") == original[:18_370]

    assert os.stat(path).st_size == 18_370
    assert path.read_bytes() == original[:18_370]


def test_truncating_open_keeps_value_until_written(mounted: Mount) -> None:
    """``dd`` and shells dup the descriptor and close the first: the old value stays until data arrives."""
    original = make_value(9, 50_000)
    put(mounted, "ns/kept", original)
    path = mounted.path / "ns" / "kept"

    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    duplicate = os.dup(fd)
    os.close(fd)
    assert load(mounted, "ns/kept") == original

    os.write(duplicate, b"new value")
    os.close(duplicate)
    assert load(mounted, "ns/kept") == b"new value"


def test_ftruncate_then_write(mounted: Mount) -> None:
    put(mounted, "ns/file", make_value(7, 5000))

    with open(mounted.path / "ns" / "file", "r+b") as file:
        file.truncate(100)
        file.seek(200)
        file.write(b"tail")

    expected = make_value(7, 5000)[:100] + bytes(100) + b"tail"
    assert load(mounted, "ns/file") == expected


def test_append_two_processes(mounted: Mount) -> None:
    path = mounted.path / "ns" / "log"

    run("sh", "-c", 'printf "first line\\n" >> "$1"', "sh", path)
    run("sh", "-c", 'printf "second line\\n" >> "$1"', "sh", path)

    assert path.read_bytes() == b"first line\nsecond line\n"
    assert load(mounted, "ns/log") == b"first line\nsecond line\n"


def test_append_to_existing(mounted: Mount) -> None:
    put(mounted, "ns/log", b"stored before\n")
    path = mounted.path / "ns" / "log"

    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"appended\n")
    finally:
        os.close(fd)

    assert load(mounted, "ns/log") == b"stored before\nappended\n"


def test_o_trunc_replaces_value(mounted: Mount) -> None:
    put(mounted, "ns/file", make_value(8, 10_000))

    fd = os.open(mounted.path / "ns" / "file", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"short")
    finally:
        os.close(fd)

    assert load(mounted, "ns/file") == b"short"
    assert os.stat(mounted.path / "ns" / "file").st_size == 5


def test_write_past_end_zero_gap(mounted: Mount) -> None:
    put(mounted, "ns/existing", b"head")

    for name in ("existing", "new"):
        fd = os.open(mounted.path / "ns" / name, os.O_WRONLY | os.O_CREAT)
        try:
            os.pwrite(fd, b"x", 10_000)
        finally:
            os.close(fd)

    assert load(mounted, "ns/existing") == b"head" + bytes(9996) + b"x"
    assert load(mounted, "ns/new") == bytes(10_000) + b"x"


def test_rdwr_reads_own_writes(mounted: Mount) -> None:
    put(mounted, "ns/file", b"0123456789")

    fd = os.open(mounted.path / "ns" / "file", os.O_RDWR)
    try:
        os.pwrite(fd, b"abc", 3)
        seen = os.pread(fd, 100, 0)
    finally:
        os.close(fd)

    assert seen == b"012abc6789"
    assert load(mounted, "ns/file") == b"012abc6789"


def test_open_writer_visible_to_others(mounted: Mount) -> None:
    put(mounted, "ns/file", b"previous value")
    path = mounted.path / "ns" / "file"
    staged = make_value(9, 12_345)

    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, staged)
        size = run("stat", "-c", "%s", path).stdout.decode().strip()
        content = run("cat", path).stdout
    finally:
        os.close(fd)

    assert size == str(len(staged))
    assert content == staged


def test_open_writer_store_unchanged(mounted: Mount) -> None:
    put(mounted, "ns/file", b"previous value")
    staged = make_value(9, 12_345)

    fd = os.open(mounted.path / "ns" / "file", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, staged)
        stored_while_open = load(mounted, "ns/file", fork=False)
    finally:
        os.close(fd)

    assert stored_while_open == b"previous value"
    assert load(mounted, "ns/file") == staged


def test_fsync_stores_before_close(mounted: Mount) -> None:
    value = make_value(10, 300_000)

    fd = os.open(mounted.path / "ns" / "synced", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, value)
        os.fsync(fd)
        stored = load(mounted, "ns/synced")
    finally:
        os.close(fd)

    assert stored == value


def test_rename_while_open_lands(mounted: Mount) -> None:
    # The download-manager pattern: the file is renamed before the writer closes it.
    fd = os.open(mounted.path / "ns" / "download.part", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"first half, ")
        os.rename(mounted.path / "ns" / "download.part", mounted.path / "ns" / "download")
        os.write(fd, b"second half")
    finally:
        os.close(fd)

    assert os.listdir(mounted.path / "ns") == ["download"]
    assert stored_keys(mounted, "ns") == {"download"}
    assert load(mounted, "ns/download") == b"first half, second half"


def test_overwrite_then_read_new(mounted: Mount) -> None:
    path = mounted.path / "ns" / "file"
    write_file(path, b"A" * 8192)
    assert path.read_bytes() == b"A" * 8192

    write_file(path, b"B" * 8192)

    assert path.read_bytes() == b"B" * 8192
    assert load(mounted, "ns/file") == b"B" * 8192


def test_exclusive_create_eexist(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "file", b"kept")

    result = errno_of(os.open, mounted.path / "ns" / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL)

    assert result == errno.EEXIST
    assert load(mounted, "ns/file") == b"kept"


def test_mmap_shared_write(mounted: Mount) -> None:
    path = mounted.path / "ns" / "mapped"
    write_file(path, bytes(3 * 4096))

    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as mapping:
        mapping[4096:4101] = b"hello"
        mapping.flush()

    expected = bytes(4096) + b"hello" + bytes(2 * 4096 - 5)
    assert path.read_bytes() == expected
    assert load(mounted, "ns/mapped") == expected


def test_two_writers_same_file(mounted: Mount) -> None:
    path = mounted.path / "ns" / "shared"
    first = os.open(path, os.O_WRONLY | os.O_CREAT)
    second = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(first, b"AAAA", 0)
        os.pwrite(second, b"BBBB", 4)
        os.close(first)
        os.pwrite(second, b"CCCC", 8)
    finally:
        os.close(second)

    assert path.read_bytes() == b"AAAABBBBCCCC"
    assert load(mounted, "ns/shared") == b"AAAABBBBCCCC"


def test_reader_sees_closed_write(mounted: Mount) -> None:
    path = mounted.path / "ns" / "file"
    write_file(path, b"old value")

    with open(path, "rb", buffering=0) as reader:
        assert reader.read() == b"old value"
        write_file(path, b"new value, longer")
        seen = os.pread(reader.fileno(), 100, 0)

    assert seen == b"new value, longer"


def test_reader_keeps_replaced_value(mounted: Mount) -> None:
    # POSIX keeps the replaced file readable through descriptors opened before the rename.
    mounted.expect_log(r"ESTALE")
    old = make_value(14, 3 * MiB)
    put(mounted, "ns/target", old)
    write_file(mounted.path / "ns" / "source", b"replacement")

    with open(mounted.path / "ns" / "target", "rb", buffering=0) as reader:
        head = reader.read(1000)
        os.rename(mounted.path / "ns" / "source", mounted.path / "ns" / "target")
        tail = reader.read()

    assert head + tail == old
    assert (mounted.path / "ns" / "target").read_bytes() == b"replacement"


# Failed stores


@pytest.fixture
def small_store(make_url: Callable[[], str], tmp_path: Path) -> Iterator[str]:
    """URL of a store on its own 8 MiB tmpfs, so that writes run out of space.

    Request it before `mount` in the test's arguments: fixtures are torn down
    in reverse order, so the FUSE mount goes before the tmpfs under it.
    """
    where = tmp_path / "small"
    where.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", where)
    try:
        url = url_at(make_url(), where / "store")
        create_store(url, {"ns/victim": b"previous value"})
        yield url
    finally:
        result = run("umount", where, check=False)
    assert result.returncode == 0, result.stderr


def test_close_reports_failed_store(small_store: str, mount: Callable[..., Mount]) -> None:
    mounted = mount(small_store)
    mounted.expect_log(r"WARNING|ERROR|^Traceback")  # a failed store must be logged
    path = mounted.path / "ns" / "victim"

    result = errno_of(write_file, path, make_value(11, 16 * MiB))

    assert result in {errno.ENOSPC, errno.EIO}
    assert load(mounted, "ns/victim") == b"previous value"
    assert path.read_bytes() == b"previous value"


@pytest.mark.parametrize("tool", ["cp", "rsync"])
def test_copy_tool_sees_failed_store(small_store: str, mount: Callable[..., Mount], tmp_path: Path, tool: str) -> None:
    mounted = mount(small_store)
    mounted.expect_log(r"WARNING|ERROR|^Traceback")
    source = tmp_path / "big"
    source.write_bytes(make_value(12, 16 * MiB))

    result = run(tool, source, mounted.path / "ns" / "victim", check=False)

    assert result.returncode != 0
    assert load(mounted, "ns/victim") == b"previous value"


# Unmounting with open files


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_keeps_open_writes(make_url: Callable[[], str], mount: Callable[..., Mount], signum: int) -> None:
    url = make_url()
    create_store(url, {"ns/old": b"old value"})
    mounted = mount(url)
    value = make_value(13, 3 * MiB)
    new_fd = os.open(mounted.path / "ns" / "new", os.O_WRONLY | os.O_CREAT)
    old_fd = os.open(mounted.path / "ns" / "old", os.O_WRONLY)
    try:
        os.write(new_fd, value)
        os.pwrite(old_fd, b"NEW", 0)
        status = mounted.stop(signum)
    finally:
        for fd in (new_fd, old_fd):
            # The daemon is gone, so closing reports the dead connection or nothing.
            with suppress(OSError):
                os.close(fd)

    assert status == 0
    with Store(url) as store:
        assert store.load("ns/new") == value
        assert store.load("ns/old") == b"NEW value"


# Names


ROUND_TRIP_NAMES = [
    "MixedCase.TXT",
    "with space",
    " leading and trailing space ",
    "ünïcødé 名前 ✓",
    ".hidden",
    "..double-dot-start",
    "a..b",
    "name.tmp",
    "name.del",
    "name.TMP",
    "100%",
    "%41",
    "%zz",
    "~tilde",
    "tilde~",
    "back\\slash",
    "quote'and\"double",
    "A",
    "a",
    "x" * 240,
]

UNPRINTABLE_NAMES = [b"new\nline", b"tab\there", b"latin1-\xe9", b"\xff\xfe-not-utf8", b"\x01control"]


def test_names_round_trip_ls(mounted: Mount) -> None:
    namespace = mounted.path / "ns"
    for name in ROUND_TRIP_NAMES:
        write_file(namespace / name, name.encode())

    listing = run("ls", "-A1", namespace, env={**os.environ, "LC_ALL": "C.UTF-8"}).stdout.decode().splitlines()

    assert sorted(listing) == sorted(ROUND_TRIP_NAMES)
    for name in ROUND_TRIP_NAMES:
        assert (namespace / name).read_bytes() == name.encode(), name


def test_names_round_trip_bytes(mounted: Mount) -> None:
    namespace = os.fsencode(mounted.path / "ns")
    for name in UNPRINTABLE_NAMES:
        write_file(Path(os.fsdecode(namespace + b"/" + name)), name)

    listing = os.listdir(namespace)

    assert sorted(listing) == sorted(UNPRINTABLE_NAMES)
    for name in UNPRINTABLE_NAMES:
        with open(namespace + b"/" + name, "rb") as file:
            assert file.read() == name, name


def test_names_survive_remount(mounted: Mount, mount: Callable[..., Mount]) -> None:
    for name in ROUND_TRIP_NAMES:
        write_file(mounted.path / "ns" / name, name.encode())

    again = mount(mounted.url)

    assert sorted(os.listdir(again.path / "ns")) == sorted(ROUND_TRIP_NAMES)


def test_valid_keys_stored_unchanged(mounted: Mount) -> None:
    names = ["plain-name_1", "0123abcd", "backup~", "with.dots"]
    for name in names:
        write_file(mounted.path / "ns" / name, b"value")

    assert stored_keys(mounted, "ns") == set(names)


def test_uppercase_percent_encoded(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "A", b"upper")

    assert stored_keys(mounted, "ns") == {"%41"}
    assert load(mounted, "ns/%41") == b"upper"


@pytest.mark.parametrize(
    "name",
    ["é" * 127, "x" * 241, "X" * 200],
    ids=["utf8-254-bytes", "ascii-241", "upper-200"],
)
def test_overlong_encoding_enametoolong(mounted: Mount, name: str) -> None:
    assert errno_of(write_file, mounted.path / "ns" / name, b"value") == errno.ENAMETOOLONG
    assert os.listdir(mounted.path / "ns") == []
    assert stored_keys(mounted, "ns") == set()


def test_name_over_255_bytes_enametoolong(mounted: Mount) -> None:
    assert errno_of(write_file, mounted.path / "ns" / ("y" * 256), b"value") == errno.ENAMETOOLONG


# Namespaces


def test_mkdir_creates_namespace(mounted: Mount) -> None:
    os.mkdir(mounted.path / "fresh")
    write_file(mounted.path / "fresh" / "item", b"in a new namespace")

    with Store(mounted.url) as store:
        assert "fresh" in store.namespaces()
    assert load(mounted, "fresh/item") == b"in a new namespace"


def test_namespace_name_round_trips(mounted: Mount, mount: Callable[..., Mount]) -> None:
    os.mkdir(mounted.path / "My Photos")
    write_file(mounted.path / "My Photos" / "IMG 1.JPG", b"image")

    again = mount(mounted.url)

    assert "My Photos" in os.listdir(again.path)
    assert (again.path / "My Photos" / "IMG 1.JPG").read_bytes() == b"image"


def test_rmdir_removes_empty_namespace(mounted: Mount) -> None:
    os.mkdir(mounted.path / "fresh")

    os.rmdir(mounted.path / "fresh")

    assert "fresh" not in os.listdir(mounted.path)
    with Store(mounted.url) as store:
        assert "fresh" not in store.namespaces()


def test_rmdir_after_rm_enotempty(mounted: Mount) -> None:
    os.mkdir(mounted.path / "fresh")
    write_file(mounted.path / "fresh" / "item", b"value")
    os.unlink(mounted.path / "fresh" / "item")

    assert errno_of(os.rmdir, mounted.path / "fresh") == errno.ENOTEMPTY


def test_mkdir_nested_eperm(mounted: Mount) -> None:
    assert errno_of(os.mkdir, mounted.path / "ns" / "nested") == errno.EPERM


# Rename


def test_rename_within_namespace(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "before", b"renamed value")

    os.rename(mounted.path / "ns" / "before", mounted.path / "ns" / "after")

    assert sorted(os.listdir(mounted.path / "ns")) == ["after"]
    assert stored_keys(mounted, "ns") == {"after"}
    assert load(mounted, "ns/after") == b"renamed value"


def test_rename_across_namespaces(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "wanderer", b"moved across")

    run("mv", mounted.path / "ns" / "wanderer", mounted.path / "other" / "Wanderer")

    assert os.listdir(mounted.path / "ns") == []
    assert os.listdir(mounted.path / "other") == ["Wanderer"]
    assert stored_keys(mounted, "ns") == set()
    assert (mounted.path / "other" / "Wanderer").read_bytes() == b"moved across"


def test_rename_replaces_target(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "source", b"new content")
    write_file(mounted.path / "ns" / "target", b"old content")

    os.rename(mounted.path / "ns" / "source", mounted.path / "ns" / "target")

    assert os.listdir(mounted.path / "ns") == ["target"]
    assert (mounted.path / "ns" / "target").read_bytes() == b"new content"
    assert load(mounted, "ns/target") == b"new content"
    assert load(mounted, "ns/source") is None


RENAME_NOREPLACE = 1
AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename with ``renameat2(..., RENAME_NOREPLACE)``, raising `OSError` on failure."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source))


def test_rename_noreplace_eexist(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "source", b"source value")
    write_file(mounted.path / "ns" / "target", b"target value")

    result = errno_of(rename_noreplace, mounted.path / "ns" / "source", mounted.path / "ns" / "target")

    assert result == errno.EEXIST
    assert load(mounted, "ns/source") == b"source value"
    assert load(mounted, "ns/target") == b"target value"


def test_rename_noreplace_free_target(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "source", b"source value")

    rename_noreplace(mounted.path / "ns" / "source", mounted.path / "ns" / "target")

    assert load(mounted, "ns/target") == b"source value"
    assert load(mounted, "ns/source") is None


def test_mv_no_clobber_keeps_both(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "source", b"source value")
    write_file(mounted.path / "ns" / "target", b"target value")

    run("mv", "-n", mounted.path / "ns" / "source", mounted.path / "ns" / "target", check=False)

    assert (mounted.path / "ns" / "target").read_bytes() == b"target value"
    assert load(mounted, "ns/source") == b"source value"


def test_temp_file_renamed_over(mounted: Mount) -> None:
    # The editor and rsync pattern: write a temporary file, close, set its time, rename over the target.
    write_file(mounted.path / "ns" / "document", b"first version")
    temp = mounted.path / "ns" / ".document.Xy12Ab"
    write_file(temp, b"second version, longer")
    os.utime(temp, ns=(KNOWN_MTIME_NS, KNOWN_MTIME_NS))

    os.rename(temp, mounted.path / "ns" / "document")

    st = os.stat(mounted.path / "ns" / "document")
    assert os.listdir(mounted.path / "ns") == ["document"]
    assert st.st_size == len(b"second version, longer")
    assert st.st_mtime_ns == KNOWN_MTIME_NS
    assert load(mounted, "ns/document") == b"second version, longer"


def test_sqlite_database_works(mounted: Mount) -> None:
    path = mounted.path / "ns" / "Database.sqlite"
    connection = sqlite3.connect(path)
    try:
        connection.execute("CREATE TABLE entries (number INTEGER, text TEXT)")
        for batch in range(5):
            with connection:
                connection.executemany(
                    "INSERT INTO entries VALUES (?, ?)", [(batch * 100 + i, "x" * i) for i in range(100)]
                )
    finally:
        connection.close()

    reopened = sqlite3.connect(path)
    try:
        count = reopened.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        check = reopened.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        reopened.close()

    assert count == 500
    assert check == "ok"


NAMESPACE_RENAME_REJECTED = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EINVAL, errno.EBUSY, errno.EACCES}


def test_rename_namespace_clear_outcome(mounted: Mount) -> None:
    write_file(mounted.path / "ns" / "item", b"value")

    result = errno_of(os.rename, mounted.path / "ns", mounted.path / "renamed")

    if result is None:
        assert os.listdir(mounted.path / "renamed") == ["item"]
        assert load(mounted, "renamed/item") == b"value"
    else:
        assert result in NAMESPACE_RENAME_REJECTED
        assert load(mounted, "ns/item") == b"value"


# Attributes and links


def test_chmod_chown_accepted(mounted: Mount) -> None:
    path = mounted.path / "ns" / "file"
    write_file(path, b"value")
    before = os.stat(path)

    os.chmod(path, 0o600)
    os.chown(path, os.getuid(), os.getgid())
    os.chmod(mounted.path / "ns", 0o700)

    after = os.stat(path)
    assert after.st_mode == before.st_mode
    assert after.st_uid == before.st_uid


@pytest.mark.parametrize("kind", ["symlink", "hard link", "fifo", "device"])
def test_links_and_nodes_eperm(mounted: Mount, kind: str) -> None:
    existing = mounted.path / "ns" / "file"
    write_file(existing, b"value")
    created = mounted.path / "ns" / "created"
    makers = {
        "symlink": lambda: os.symlink("file", created),
        "hard link": lambda: os.link(existing, created),
        "fifo": lambda: os.mkfifo(created),
        "device": lambda: os.mknod(created, stat.S_IFCHR | 0o600, os.makedev(1, 3)),
    }

    assert errno_of(makers[kind]) == errno.EPERM
    assert not os.path.lexists(created)


def test_xattr_calls_unsupported(mounted: Mount) -> None:
    # The daemon returns ENOSYS. The kernel then remembers that the file system
    # has no extended attributes and reports EOPNOTSUPP to every later caller.
    path = mounted.path / "ns" / "file"
    write_file(path, b"value")

    assert errno_of(os.setxattr, path, "user.test", b"1") == errno.EOPNOTSUPP
    assert errno_of(os.getxattr, path, "user.test") == errno.EOPNOTSUPP
    assert errno_of(os.listxattr, path) == errno.EOPNOTSUPP
    assert errno_of(os.removexattr, path, "user.test") == errno.EOPNOTSUPP
    assert run("setfattr", "-n", "user.test", "-v", "1", path, check=False).returncode != 0
    assert run("getfattr", "-n", "user.test", path, check=False).returncode != 0


# Copy tools


def make_source_tree(directory: Path) -> dict[str, bytes]:
    """Fill *directory* with files whose names need encoding, with known mtimes and mode 0644."""
    directory.mkdir()
    names = ["MixedCase.TXT", "with space.txt", "ünïcødé 名前.txt", "archive.tmp", "backup.del", ".hidden", "plain"]
    files = {}
    for index, name in enumerate(names):
        value = make_value(100 + index, index * 3000)
        path = directory / name
        path.write_bytes(value)
        path.chmod(0o644)
        os.utime(path, ns=(KNOWN_MTIME_NS + index * 10**9, KNOWN_MTIME_NS + index * 10**9))
        files[name] = value
    return files


def assert_same_files(target: Path, source: Path, files: dict[str, bytes]) -> None:
    assert sorted(os.listdir(target)) == sorted(files)
    for name, value in files.items():
        assert (target / name).read_bytes() == value, name
        assert os.stat(target / name).st_mtime_ns // 10**9 == os.stat(source / name).st_mtime_ns // 10**9, name


def test_cp_a_preserves(mounted: Mount, tmp_path: Path) -> None:
    source = tmp_path / "source"
    files = make_source_tree(source)

    run("cp", "-a", f"{source}/.", mounted.path / "ns")

    assert_same_files(mounted.path / "ns", source, files)


def test_rsync_second_run_no_updates(mounted: Mount, tmp_path: Path) -> None:
    source = tmp_path / "source"
    files = make_source_tree(source)
    target = mounted.path / "ns"

    run("rsync", "-a", f"{source}/", target)
    second = run("rsync", "-a", "--itemize-changes", f"{source}/", target).stdout.decode().splitlines()

    assert_same_files(target, source, files)
    assert [line for line in second if line[1:2] == "f"] == []


def test_rsync_inplace_updates(mounted: Mount, tmp_path: Path) -> None:
    source = tmp_path / "source"
    files = make_source_tree(source)
    target = mounted.path / "ns"
    run("rsync", "-a", "--inplace", f"{source}/", target)

    changed = bytearray(files["with space.txt"])
    changed[1000:1010] = b"0123456789"
    (source / "with space.txt").write_bytes(bytes(changed))
    (source / "plain").write_bytes(files["plain"] + b" grown")
    run("rsync", "-a", "--inplace", "--no-whole-file", f"{source}/", target)

    assert (target / "with space.txt").read_bytes() == bytes(changed)
    assert (target / "plain").read_bytes() == files["plain"] + b" grown"
    assert load(mounted, "ns/plain") == files["plain"] + b" grown"


def test_rsync_delete_to_trash(mounted: Mount, tmp_path: Path) -> None:
    source = tmp_path / "source"
    files = make_source_tree(source)
    target = mounted.path / "ns"
    run("rsync", "-a", f"{source}/", target)

    (source / "plain").unlink()
    run("rsync", "-a", "--delete", f"{source}/", target)

    assert "plain" not in os.listdir(target)
    assert (mounted.path / ".trash" / "ns" / "plain").read_bytes() == files["plain"]
    assert "plain" in stored_keys(mounted, "ns", deleted=True)


# Concurrency and size


def test_concurrent_writers(mounted: Mount) -> None:
    values = {f"writer{i}": make_value(200 + i, 4 * MiB + i) for i in range(4)}

    def write_in_chunks(name: str) -> None:
        with open(mounted.path / "ns" / name, "wb", buffering=0) as file:
            value = values[name]
            for start in range(0, len(value), 65536):
                file.write(value[start : start + 65536])

    with ThreadPoolExecutor(max_workers=len(values)) as pool:
        list(pool.map(write_in_chunks, values))

    for name, value in values.items():
        assert load(mounted, f"ns/{name}") == value, name


@pytest.mark.parametrize("request_poll", ["0", "200", "100000"])
def test_small_requests_during_large_write(
    make_url: Callable[[], str], mount: Callable[..., Mount], request_poll: str
) -> None:
    # Large writes wait for worker threads; lookups, reads and listings in between do not.
    # This mixes both kinds of request in the request loop, with pyfuse3's own wait (0)
    # and with the daemon's select(2) wait, short and long.
    url = make_url()
    create_store(url, levels={"ns": [0]})
    mounted = mount(url, "-o", f"request_poll={request_poll}")
    small = {f"small{i}": make_value(300 + i, 100 + i) for i in range(100)}
    for name, value in small.items():
        (mounted.path / "ns" / name).write_bytes(value)
    large = make_value(299, 24 * MiB)

    def write_large() -> None:
        with open(mounted.path / "ns" / "large", "wb", buffering=0) as file:
            for start in range(0, len(large), MiB):
                file.write(large[start : start + MiB])

    writer = threading.Thread(target=write_large)
    writer.start()
    try:
        for _ in range(3):
            for name, value in small.items():
                assert os.stat(mounted.path / "ns" / name).st_size == len(value)
                assert (mounted.path / "ns" / name).read_bytes() == value
            assert set(small) <= set(os.listdir(mounted.path / "ns"))
    finally:
        writer.join(timeout=MOUNT_TIMEOUT)
    assert not writer.is_alive()
    assert load(mounted, "ns/large") == large


RSS_BOUND = 200 * MiB
"""Largest resident memory allowed for the daemon while it handles a 2 GiB file.

Measured with the POSIX backend (Python 3.11, pyfuse3 3.5): about 30 MiB idle
and about 60 MiB at the peak of this test. The bound leaves room for SFTP
buffers and read-ahead but stays far below the file size, so a daemon that
keeps the value in memory fails.
"""

LARGE_SIZE = 2 * 1024 * MiB


class RssSampler:
    """Reads a process's resident memory from /proc in a thread and keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.maximum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            with open(f"/proc/{self.pid}/status") as file:
                for line in file:
                    if line.startswith("VmRSS:"):
                        self.maximum = max(self.maximum, int(line.split()[1]) * 1024)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_large_file_bounded_memory(mounted: Mount) -> None:
    path = mounted.path / "ns" / "large"
    block = make_value(300, MiB)
    written = hashlib.sha256()

    with RssSampler(mounted.pid) as sampler:
        with open(path, "wb", buffering=0) as file:
            for index in range(LARGE_SIZE // MiB):
                chunk = index.to_bytes(8, "big") + block[8:]
                file.write(chunk)
                written.update(chunk)
        read = hashlib.sha256()
        with open(path, "rb", buffering=0) as file:
            while chunk := file.read(MiB):
                read.update(chunk)
        with open(path, "r+b", buffering=0) as file:
            file.seek(LARGE_SIZE // 2 + 5)
            file.write(b"patched in the middle")
        with open(path, "rb", buffering=0) as file:
            patched = os.pread(file.fileno(), 21, LARGE_SIZE // 2 + 5)

    with Store(mounted.url) as store:
        size = store.info("ns/large").size
        store.delete("ns/large")  # frees the disk space before teardown
    assert read.hexdigest() == written.hexdigest()
    assert size == LARGE_SIZE
    assert patched == b"patched in the middle"
    assert sampler.maximum < RSS_BOUND, f"daemon RSS reached {sampler.maximum / MiB:.0f} MiB"


# Crashes


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_kill_during_cp_no_partial(
    make_url: Callable[[], str], mount: Callable[..., Mount], tmp_path: Path, existing: bool
) -> None:
    url = make_url()
    create_store(url, {"ns/target": b"previous value"} if existing else {"ns/other": b"unrelated"})
    mounted = mount(url)
    target = mounted.path / "ns" / "target"

    # cp reads from a FIFO, so the copy is stuck half-way until the test closes its end.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    copy = subprocess.Popen(["cp", fifo, target], stderr=subprocess.PIPE)
    with open(fifo, "wb") as pipe:
        pipe.write(make_value(400, 4 * MiB))
        pipe.flush()
        wait_until(lambda: target.exists() and os.stat(target).st_size >= 4 * MiB, MOUNT_TIMEOUT, "cp to write 4 MiB")
        mounted.kill()
    copy.wait(timeout=MOUNT_TIMEOUT)

    with Store(url) as store:
        keys = {info.name for info in store.list("ns")}
        value = store.load("ns/target") if existing else None
    assert copy.returncode != 0
    assert keys == ({"target"} if existing else {"other"})
    assert value == (b"previous value" if existing else None)


# Modification times


def test_utime_kept_remount_rename(mounted: Mount, mount: Callable[..., Mount]) -> None:
    path = mounted.path / "ns" / "timed"
    write_file(path, b"value")
    os.utime(path, ns=(KNOWN_MTIME_NS, KNOWN_MTIME_NS))
    assert os.stat(path).st_mtime_ns == KNOWN_MTIME_NS

    run("fusermount3", "-u", mounted.path)
    again = mount(mounted.url)
    after_remount = os.stat(again.path / "ns" / "timed").st_mtime_ns
    os.rename(again.path / "ns" / "timed", again.path / "other" / "renamed")
    after_rename = os.stat(again.path / "other" / "renamed").st_mtime_ns

    assert after_remount == KNOWN_MTIME_NS
    assert after_rename == KNOWN_MTIME_NS
    with Store(mounted.url) as store:
        assert store.info("other/renamed").mtime_ns == KNOWN_MTIME_NS


@pytest.mark.parametrize("size", [0, 1, 70_000])
def test_size_mtime_right_after_close(mounted: Mount, size: int) -> None:
    path = mounted.path / "ns" / f"file{size}"
    write_file(path, make_value(500, size))
    os.utime(path, ns=(KNOWN_MTIME_NS, KNOWN_MTIME_NS))

    st = os.stat(path)

    assert st.st_size == size
    assert st.st_mtime_ns == KNOWN_MTIME_NS


def test_write_sets_current_mtime(mounted: Mount) -> None:
    put(mounted, "ns/file", b"old")
    path = mounted.path / "ns" / "file"
    os.utime(path, ns=(KNOWN_MTIME_NS, KNOWN_MTIME_NS))

    write_file(path, b"new content")

    assert os.stat(path).st_mtime_ns > KNOWN_MTIME_NS


# Read-only mounts


def test_read_only_mount_erofs(make_url: Callable[[], str], mount: Callable[..., Mount]) -> None:
    url = make_url()
    create_store(url, {"ns/item": b"kept"})
    read_only = mount(url, "-o", "ro")
    item = read_only.path / "ns" / "item"
    attempts: dict[str, Callable[[], object]] = {
        "open for writing": lambda: os.close(os.open(item, os.O_WRONLY)),
        "create": lambda: os.close(os.open(read_only.path / "ns" / "new", os.O_WRONLY | os.O_CREAT)),
        "mkdir": lambda: os.mkdir(read_only.path / "fresh"),
        "rmdir": lambda: os.rmdir(read_only.path / "ns"),
        "unlink": lambda: os.unlink(item),
        "rename": lambda: os.rename(item, read_only.path / "ns" / "renamed"),
        "truncate": lambda: os.truncate(item, 0),
        "utime": lambda: os.utime(item, ns=(KNOWN_MTIME_NS, KNOWN_MTIME_NS)),
    }

    for operation, attempt in attempts.items():
        assert errno_of(attempt) == errno.EROFS, operation
    with Store(url) as store:
        assert store.load("ns/item") == b"kept"
        assert {info.name for info in store.list("ns")} == {"item"}
