"""The read side of a mounted store, checked with real tools: the tree, reads, soft deletion, errno, scale."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from borgstorefs.backends import PosixFS
from borgstorefs.store import Store
from tests.mounting import (
    CACHE_WAIT,
    Mount,
    create_store,
    errno_of,
    local_path,
    requires_fuse,
    run,
    wait_until,
)

pytest_plugins = ["tests.mounting"]
pytestmark = requires_fuse

MIXED_LEVELS = (0, 1, 2)
"""Levels of the ``mixed`` namespace, with items at each of them at once."""


def hex_key(text: str) -> str:
    """Return a 64-character hex key, the shape of the keys borg stores."""
    return hashlib.sha256(text.encode()).hexdigest()


def make_value(seed: int, size: int) -> bytes:
    """Return *size* reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def make_tree(url: str) -> dict[str, bytes]:
    """Create a store with mixed nesting and return its items (name to value).

    ``config`` is flat, ``data`` nested two levels deep, ``mixed`` has items
    at levels 0, 1 and 2, and the root namespace has one item.
    """
    items = {
        "settings": b"root namespace item\n",
        "config/main": b"[main]\nvalue = 1\n",
        "config/empty": b"",
    }
    store = Store(url)
    store.create()
    with store:
        # New items go to the last configured level, so changing the
        # configuration between writes spreads one namespace over levels.
        store.levels_config["data"] = (2,)
        items |= {f"data/{hex_key(f'data{i}')}": make_value(i, 1000 * i + 7) for i in range(5)}
        for level in MIXED_LEVELS:
            store.levels_config["mixed"] = tuple(range(level + 1))
            for i in range(3):
                name = f"mixed/{hex_key(f'mixed{level}-{i}')}"
                items[name] = make_value(100 + level * 10 + i, 300 + i)
                store.store(name, items[name])
        for name, value in items.items():
            if not name.startswith("mixed/"):
                store.store(name, value)
    return items


def namespaces_of(items: dict[str, bytes]) -> set[str]:
    return {name.partition("/")[0] for name in items if "/" in name}


def keys_in(items: dict[str, bytes], namespace: str) -> set[str]:
    return {name.partition("/")[2] for name in items if name.startswith(f"{namespace}/")}


def open_store(url: str) -> Store:
    """Return an open second client. ``mixed`` needs its levels named, the others are detected."""
    store = Store(url, levels={"mixed": MIXED_LEVELS})
    store.open()
    return store


@pytest.fixture
def tree(make_url: Callable[[], str], mount: Callable[..., Mount]) -> tuple[Mount, dict[str, bytes]]:
    """Mount a store made by `make_tree` and return the mount and the stored items."""
    url = make_url()
    items = make_tree(url)
    return mount(url, "--levels", "mixed=0,1,2"), items


def ls(path: Path, *flags: str) -> list[str]:
    """Return the names that ``ls -1`` prints for *path*."""
    return run("ls", "-1", *flags, path, env={**os.environ, "LC_ALL": "C.UTF-8"}).stdout.decode().splitlines()


# The tree


def test_root_lists_namespaces(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree

    expected = namespaces_of(items) | {"settings"}
    assert set(ls(mounted.path)) == expected


def test_trash_hidden_but_present(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, _ = tree

    assert ".trash" not in ls(mounted.path)
    assert stat.S_ISDIR(os.stat(mounted.path / ".trash").st_mode)


@pytest.mark.parametrize("namespace", ["config", "data", "mixed"])
def test_namespace_lists_keys_flat(tree: tuple[Mount, dict[str, bytes]], namespace: str) -> None:
    mounted, items = tree

    assert set(ls(mounted.path / namespace)) == keys_in(items, namespace)


def test_find_lists_every_item(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree

    output = run("find", ".", "-path", "./.trash", "-prune", "-o", "-type", "f", "-print", cwd=mounted.path).stdout
    found = {line.removeprefix("./") for line in output.decode().splitlines()}

    assert found == set(items)


def test_find_directories_not_nested(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree
    namespaces = namespaces_of(items)

    output = run("find", ".", "-type", "d", cwd=mounted.path).stdout
    found = {line.removeprefix("./") for line in output.decode().splitlines()}
    live = {path for path in found if not path.startswith(".trash")}
    trash = {path for path in found if path.startswith(".trash")}

    assert live == {"."} | namespaces
    assert trash <= {".trash"} | {f".trash/{namespace}" for namespace in namespaces}


def test_stat_matches_store(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree
    store = open_store(mounted.url)
    try:
        for name, value in items.items():
            st = os.stat(mounted.path / name)
            info = store.info(name)
            assert stat.S_ISREG(st.st_mode), name
            assert st.st_size == len(value), name
            assert info.mtime_ns is not None, name
            assert st.st_mtime_ns // 10**9 == info.mtime_ns // 10**9, name
            assert st.st_uid == os.getuid(), name
            assert st.st_gid == os.getgid(), name
            assert st.st_mode & stat.S_IRUSR, name
    finally:
        store.close()


def test_stat_tool_reports_size(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree
    name = next(name for name in items if name.startswith("data/"))

    output = run("stat", "-c", "%s %F", mounted.path / name).stdout.decode().strip()

    assert output == f"{len(items[name])} regular file"


def test_namespace_is_directory(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree

    for namespace in namespaces_of(items):
        st = os.stat(mounted.path / namespace)
        assert stat.S_ISDIR(st.st_mode), namespace
        assert st.st_uid == os.getuid(), namespace


def test_inode_stable_while_mounted(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree
    name = next(name for name in items if name.startswith("mixed/"))

    first = os.stat(mounted.path / name).st_ino
    os.listdir(mounted.path / "mixed")
    second = os.stat(mounted.path / name).st_ino

    assert first == second


# Reading


def test_cat_matches_store(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree

    for name, value in items.items():
        assert run("cat", mounted.path / name).stdout == value, name


@pytest.fixture
def large_item(make_url: Callable[[], str], mount: Callable[..., Mount]) -> tuple[Mount, str, bytes]:
    """Mount a store holding one value of a few MiB, not a multiple of the page size."""
    url = make_url()
    value = make_value(7, 3 * 1024 * 1024 + 123)
    create_store(url, {"data/big": value})
    return mount(url), "data/big", value


READ_OFFSETS = [0, 1, 511, 4095, 4096, 4097, 65535, 65536, 131071, 1024 * 1024 - 1, 2 * 1024 * 1024 + 5]
READ_SIZES = [1, 100, 4096, 4097, 65536, 1024 * 1024]


def test_partial_reads_match_store(large_item: tuple[Mount, str, bytes]) -> None:
    mounted, name, _ = large_item
    store = Store(mounted.url)
    store.open()
    fd = os.open(mounted.path / name, os.O_RDONLY)
    try:
        for offset in READ_OFFSETS:
            for size in READ_SIZES:
                expected = store.load(name, offset=offset, size=size)
                assert os.pread(fd, size, offset) == expected, (offset, size)
    finally:
        os.close(fd)
        store.close()


def test_random_reads_match_value(large_item: tuple[Mount, str, bytes]) -> None:
    mounted, name, value = large_item
    rng = random.Random(11)

    with open(mounted.path / name, "rb", buffering=0) as file:
        for _ in range(300):
            offset = rng.randrange(len(value) + 10)
            size = rng.randrange(1, 200_000)
            file.seek(offset)
            assert file.read(size) == value[offset : offset + size], (offset, size)


def test_mmap_read_matches(large_item: tuple[Mount, str, bytes]) -> None:
    mounted, name, value = large_item

    with open(mounted.path / name, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
        mapped = mapping[:]

    assert mapped == value


def test_reads_at_end_of_file(large_item: tuple[Mount, str, bytes]) -> None:
    mounted, name, value = large_item

    with open(mounted.path / name, "rb", buffering=0) as file:
        fd = file.fileno()
        assert os.pread(fd, 100, len(value) - 1) == value[-1:]
        assert os.pread(fd, 100, len(value)) == b""
        assert os.pread(fd, 100, len(value) + 4096) == b""


def test_sequential_read_odd_chunks(large_item: tuple[Mount, str, bytes]) -> None:
    mounted, name, value = large_item
    chunks = []

    with open(mounted.path / name, "rb", buffering=0) as file:
        while chunk := file.read(12_345):
            chunks.append(chunk)

    assert b"".join(chunks) == value


# Capacity


def test_df_shows_backend_capacity(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, _ = tree
    with Store(mounted.url) as store:
        space = store.space()
    assert space is not None

    df = run("df", "-B1", "--output=target,size", mounted.path).stdout.decode().splitlines()
    vfs = os.statvfs(mounted.path)

    assert df[-1].split()[0] == str(mounted.path)
    assert abs(vfs.f_blocks * vfs.f_frsize - space.total) <= vfs.f_frsize
    assert 0 < vfs.f_bavail * vfs.f_frsize <= space.total
    assert 0 < vfs.f_namemax <= 255


# Soft deletion and the trash view


def test_rm_moves_item_to_trash(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree
    name = next(name for name in items if name.startswith("mixed/"))
    namespace, _, key = name.partition("/")

    run("rm", mounted.path / name)

    assert key not in os.listdir(mounted.path / namespace)
    assert key in os.listdir(mounted.path / ".trash" / namespace)
    store = open_store(mounted.url)
    try:
        assert not store.info(name).exists
        assert key in {info.name for info in store.list(namespace, deleted=True)}
    finally:
        store.close()


def test_trash_item_readable(tree: tuple[Mount, dict[str, bytes]], tmp_path: Path) -> None:
    mounted, items = tree
    name = "config/main"
    trashed = mounted.path / ".trash" / name
    os.unlink(mounted.path / name)

    copy = tmp_path / "copy"
    run("cp", trashed, copy)

    assert run("cat", trashed).stdout == items[name]
    assert os.stat(trashed).st_size == len(items[name])
    assert copy.read_bytes() == items[name]


def test_mv_restores_from_trash(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, items = tree
    name = next(name for name in items if name.startswith("data/"))
    namespace, _, key = name.partition("/")
    os.unlink(mounted.path / name)

    run("mv", mounted.path / ".trash" / name, mounted.path / name)

    assert (mounted.path / name).read_bytes() == items[name]
    assert key not in os.listdir(mounted.path / ".trash" / namespace)
    with Store(mounted.url) as store:
        assert store.load(name) == items[name]
        assert not store.info(name, deleted=True).exists


@pytest.fixture
def live_and_trashed(make_url: Callable[[], str], mount: Callable[..., Mount]) -> tuple[Mount, str, bytes, bytes]:
    """Mount a store where ``data/key`` exists both live and soft-deleted, with different values."""
    url = make_url()
    name, old, new = "data/key", b"old soft-deleted value", b"new live value"
    create_store(url, {name: old, "config/main": b"another namespace"})
    with Store(url) as store:
        store.move(name, delete=True)
        store.store(name, new)
    return mount(url), name, old, new


def test_restore_onto_live_eexist(live_and_trashed: tuple[Mount, str, bytes, bytes]) -> None:
    mounted, name, old, new = live_and_trashed

    result = errno_of(os.rename, mounted.path / ".trash" / name, mounted.path / name)

    assert result == errno.EEXIST
    assert (mounted.path / name).read_bytes() == new
    assert (mounted.path / ".trash" / name).read_bytes() == old
    with Store(mounted.url) as store:
        assert store.load(name) == new
        assert store.load(name, deleted=True) == old


RESTORE_REJECTED = {errno.EXDEV, errno.EPERM, errno.EINVAL, errno.EACCES, errno.ENOTSUP}
"""Errors that clearly reject restoring to another name. EIO or ENOENT would hide the reason."""


@pytest.mark.parametrize("target", ["config/main-restored", "data/other-key", "config/key"])
def test_restore_elsewhere_rejected(live_and_trashed: tuple[Mount, str, bytes, bytes], target: str) -> None:
    mounted, name, old, _ = live_and_trashed

    result = errno_of(os.rename, mounted.path / ".trash" / name, mounted.path / target)

    assert result in RESTORE_REJECTED
    assert not (mounted.path / target).exists()
    assert (mounted.path / ".trash" / name).read_bytes() == old


def test_rm_in_trash_purges(live_and_trashed: tuple[Mount, str, bytes, bytes]) -> None:
    mounted, name, _, new = live_and_trashed
    namespace, _, key = name.partition("/")

    run("rm", mounted.path / ".trash" / name)

    assert key not in os.listdir(mounted.path / ".trash" / namespace)
    with Store(mounted.url) as store:
        assert not store.info(name, deleted=True).exists
        assert store.load(name) == new


def test_rm_replaces_trashed_copy(live_and_trashed: tuple[Mount, str, bytes, bytes]) -> None:
    mounted, name, _, new = live_and_trashed

    os.unlink(mounted.path / name)

    assert (mounted.path / ".trash" / name).read_bytes() == new
    with Store(mounted.url) as store:
        assert store.load(name, deleted=True) == new
        assert not store.info(name).exists


def test_open_file_readable_after_rm(large_item: tuple[Mount, str, bytes]) -> None:
    mounted, name, value = large_item
    half = len(value) // 2

    with open(mounted.path / name, "rb", buffering=0) as file:
        head = file.read(half)
        os.unlink(mounted.path / name)
        tail = file.read()
        rewound = os.pread(file.fileno(), 4096, 0)

    assert head + tail == value
    assert rewound == value[:4096]
    assert not (mounted.path / name).exists()
    assert (mounted.path / ".trash" / name).exists()


# Errors


def test_missing_item_enoent(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, _ = tree

    assert errno_of(os.stat, mounted.path / "config" / "missing") == errno.ENOENT
    assert errno_of(open, mounted.path / "config" / "missing", "rb") == errno.ENOENT
    assert errno_of(os.listdir, mounted.path / "missing-namespace") == errno.ENOENT
    assert errno_of(os.stat, mounted.path / ".trash" / "config" / "missing") == errno.ENOENT
    assert errno_of(os.unlink, mounted.path / "config" / "missing") == errno.ENOENT


def test_trash_writes_eperm(live_and_trashed: tuple[Mount, str, bytes, bytes]) -> None:
    mounted, name, old, _ = live_and_trashed
    trash = mounted.path / ".trash"

    def write_existing() -> None:
        with open(trash / name, "r+b") as file:
            file.write(b"changed")

    assert errno_of(open, trash / "data" / "new-file", "wb") == errno.EPERM
    assert errno_of(open, trash / "new-file", "wb") == errno.EPERM
    assert errno_of(os.mkdir, trash / "new-namespace") == errno.EPERM
    assert errno_of(os.mkdir, trash / "data" / "subdir") == errno.EPERM
    assert errno_of(write_existing) == errno.EPERM
    assert errno_of(os.truncate, trash / name, 0) == errno.EPERM
    assert errno_of(os.rename, mounted.path / name, trash / "data" / "moved-in") == errno.EPERM
    assert (trash / name).read_bytes() == old


def test_mkdir_in_namespace_eperm(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, _ = tree

    assert errno_of(os.mkdir, mounted.path / "config" / "subdir") == errno.EPERM
    assert not (mounted.path / "config" / "subdir").exists()


def test_overlong_name_enametoolong(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, _ = tree

    assert errno_of(os.stat, mounted.path / "config" / ("x" * 300)) == errno.ENAMETOOLONG


def test_rmdir_nonempty_enotempty(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, _ = tree

    assert errno_of(os.rmdir, mounted.path / "config") == errno.ENOTEMPTY
    assert os.path.isdir(mounted.path / "config")


def test_rmdir_trash_only_enotempty(make_url: Callable[[], str], mount: Callable[..., Mount]) -> None:
    url = make_url()
    create_store(url, {"old/item": b"soft-deleted soon"})
    with Store(url) as store:
        store.move("old/item", delete=True)
    mounted = mount(url)

    assert os.listdir(mounted.path / "old") == []
    assert errno_of(os.rmdir, mounted.path / "old") == errno.ENOTEMPTY
    with Store(url) as store:
        assert store.load("old/item", deleted=True) == b"soft-deleted soon"


def test_file_as_directory_enotdir(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, _ = tree

    assert errno_of(os.stat, mounted.path / "config" / "main" / "below") == errno.ENOTDIR
    assert errno_of(os.rmdir, mounted.path / "config" / "main") == errno.ENOTDIR


def test_directory_as_file_eisdir(tree: tuple[Mount, dict[str, bytes]]) -> None:
    mounted, _ = tree

    assert errno_of(open, mounted.path / "config", "rb") == errno.EISDIR


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    """URL of a store on the POSIX backend, for cases that only it can produce or afford."""
    return f"file://{tmp_path}/local-store"


def test_backend_failure_eio(file_url: str, mount: Callable[..., Mount]) -> None:
    # NOTE: POSIX backend only. Over SFTP the same loop reached the daemon as
    # "no such file" (observed with OpenSSH's sftp-server), so ENOENT is all it can report.
    create_store(file_url, {"good/item": b"still readable", "bad/item": b"hidden"})
    mounted = mount(file_url)
    mounted.expect_log(r"WARNING|ERROR|^Traceback")  # the daemon must log the cause of an EIO
    base = local_path(file_url)

    # A symbolic link loop in place of the namespace directory makes every
    # backend call on it fail with ELOOP, which no other errno describes.
    (base / "bad").rename(base / "bad-saved")
    (base / "bad").symlink_to("bad")

    assert errno_of(os.stat, mounted.path / "bad" / "item") == errno.EIO
    assert errno_of(os.listdir, mounted.path / "bad") == errno.EIO
    assert (mounted.path / "good" / "item").read_bytes() == b"still readable"


def test_read_only_mount_erofs(tree: tuple[Mount, dict[str, bytes]], mount: Callable[..., Mount]) -> None:
    mounted, items = tree
    read_only = mount(mounted.url, "-o", "ro", "--levels", "mixed=0,1,2")

    assert errno_of(os.unlink, read_only.path / "config" / "main") == errno.EROFS
    assert os.stat(read_only.path / "config" / "main").st_mode & 0o222 == 0
    assert os.stat(read_only.path / "config").st_mode & 0o222 == 0
    assert (read_only.path / "config" / "main").read_bytes() == items["config/main"]


# Scale and other clients


# With -d the daemon logs each store call at DEBUG level, in the form of
# borgstorefs.store: "info('ns/key', deleted=False): ..." and "list('ns', ...): ...".
STORE_LIST_CALL = re.compile(r"borgstorefs\.store: list\('ns'")
STORE_KEY_INFO_CALL = re.compile(r"borgstorefs\.store: info\('ns/")


@pytest.fixture
def debug_mount(make_url: Callable[[], str], mount: Callable[..., Mount]) -> Mount:
    """Mount a store with 50 keys in ``ns`` and every request and store call logged."""
    url = make_url()
    create_store(url, {f"ns/key{i:03d}": b"value" for i in range(50)})
    return mount(url, "-d")


def test_lookup_does_not_list(debug_mount: Mount) -> None:
    os.stat(debug_mount.path / "ns" / "key007")
    (debug_mount.path / "ns" / "key008").read_bytes()

    assert STORE_LIST_CALL.findall(debug_mount.log()) == []


def test_ls_l_one_list_no_info(debug_mount: Mount) -> None:
    listing = run("ls", "-l", debug_mount.path / "ns").stdout.decode().splitlines()
    log = debug_mount.log()

    assert len(listing) == 51  # the "total" line and one line per key
    assert len(STORE_LIST_CALL.findall(log)) == 1
    assert STORE_KEY_INFO_CALL.findall(log) == []


MANY_KEYS = 100_000


@pytest.mark.slow
def test_many_keys_listed(file_url: str, mount: Callable[..., Mount]) -> None:
    # NOTE: POSIX backend only, to keep the suite short. The keys are written
    # with fsync turned off and spread over levels 0, 1 and 2. Over SFTP, the
    # level-2 part alone means tens of thousands of directory listings.
    create_store(file_url)
    keys = [hex_key(f"many{i}") for i in range(MANY_KEYS)]
    third = MANY_KEYS // 3
    base = file_url.removeprefix("file://")
    for level, chunk in enumerate((keys[:third], keys[third : 2 * third], keys[2 * third :])):
        store = Store(backend=PosixFS(base, fsync=False), levels={"many": list(range(level + 1))})
        with store:
            for key in chunk:
                store.store(f"many/{key}", key[:8].encode())
    mounted = mount(file_url, "--levels", "many=0,1,2")

    listing = subprocess.run(["ls", mounted.path / "many"], capture_output=True, check=True).stdout.split()

    assert len(listing) == MANY_KEYS
    assert set(listing) == {key.encode() for key in keys}
    for key in (keys[0], keys[third], keys[-1]):
        assert (mounted.path / "many" / key).read_bytes() == key[:8].encode(), key


def process_state(pid: int) -> str:
    """Return the state letter of a process from /proc (``D``: waiting in the kernel, uninterruptibly)."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        return file.read().rsplit(b")", 1)[1].split()[0].decode()


def test_listing_during_slow_read(
    make_url: Callable[[], str], mount: Callable[..., Mount], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_url()
    create_store(url, {"data/big": make_value(3, 4 * 1024 * 1024), "config/main": b"small"})
    # The daemon's store loads at 1 MiB/s, so reading the 4 MiB value takes seconds.
    monkeypatch.setenv("BORGSTOREFS_BANDWIDTH_MIBPS", "1")
    mounted = mount(url)
    monkeypatch.delenv("BORGSTOREFS_BANDWIDTH_MIBPS")

    reader = subprocess.Popen(["cat", mounted.path / "data" / "big"], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: process_state(reader.pid) == "D", CACHE_WAIT, "cat to wait on the mount")
        listing = os.listdir(mounted.path / "config")
        still_reading = reader.poll() is None
    finally:
        reader.wait(timeout=CACHE_WAIT)

    assert listing == ["main"]
    assert still_reading
    assert reader.returncode == 0


SHORT_TIMEOUTS = "attr_timeout=1,entry_timeout=1,negative_timeout=1"
"""Cache timeouts of one second, so that changes by other clients show quickly (default: 10 s)."""


def test_other_client_changes_visible(make_url: Callable[[], str], mount: Callable[..., Mount]) -> None:
    url = make_url()
    items = make_tree(url)
    mounted = mount(url, "-o", SHORT_TIMEOUTS, "--levels", "mixed=0,1,2")
    config = mounted.path / "config"
    assert "added" not in os.listdir(config)
    assert (config / "main").read_bytes() == items["config/main"]
    assert (config / "empty").exists()

    store = open_store(mounted.url)
    try:
        store.store("config/added", b"added by another client")
        store.store("config/main", b"changed by another client, longer than before")
        store.delete("config/empty")
    finally:
        store.close()

    wait_until(lambda: "added" in os.listdir(config), CACHE_WAIT, "a new key in the listing")
    wait_until(lambda: (config / "added").exists(), CACHE_WAIT, "a new key to be found")
    wait_until(
        lambda: (config / "main").read_bytes() == b"changed by another client, longer than before",
        CACHE_WAIT,
        "a changed value",
    )
    wait_until(lambda: not (config / "empty").exists(), CACHE_WAIT, "a deleted key to disappear")
    assert (config / "added").read_bytes() == b"added by another client"
