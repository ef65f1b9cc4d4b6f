"""The file system model driven directly, without FUSE, over a local store."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import pytest
import trio

from borgstorefs.errnos import errno_for
from borgstorefs.errors import NoSpaceLeft
from borgstorefs.fs import INDEX_AFTER_LOOKUPS, RENAME_EXCHANGE, RENAME_NOREPLACE, Attributes, FileSystem, FSOptions
from borgstorefs.inodes import ROOT_INODE, NodeKind
from borgstorefs.names import MAX_KEY_LENGTH
from borgstorefs.store import Store

MiB = 1024 * 1024

Body = Callable[[FileSystem, Store], Awaitable[None]]


def run_model(
    tmp_path: Path,
    body: Body,
    *,
    items: Mapping[str, bytes] | None = None,
    levels: Mapping[str, Sequence[int]] | None = None,
    options: FSOptions | None = None,
) -> Store:
    """Create a store with *items*, run *body* on a `FileSystem` over it, and return the store (closed)."""
    url = f"file://{tmp_path}/store"
    store = Store(url, levels=levels)
    store.create()
    with store:
        for name, value in (items or {}).items():
            store.store(name, value)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fs = FileSystem(store, options)
            fs.spawn = nursery.start_soon
            await body(fs, store)
            await fs.shutdown()

    with store:
        trio.run(main)
    return store


async def lookup(fs: FileSystem, path: str) -> Attributes | None:
    """Look up each component of *path* from the root, as the kernel does."""
    attributes: Attributes | None = await fs.getattr(ROOT_INODE)
    for part in path.split("/"):
        assert attributes is not None, path
        attributes = await fs.lookup(attributes.inode, part.encode())
    return attributes


async def inode_of(fs: FileSystem, path: str) -> int:
    attributes = await lookup(fs, path)
    assert attributes is not None, f"{path} not found"
    return attributes.inode


async def listdir(fs: FileSystem, path: str = "") -> list[bytes]:
    ino = await inode_of(fs, path) if path else ROOT_INODE
    dh = await fs.opendir(ino)
    try:
        # Like the kernel: ask again from the last offset until a reply is empty.
        names: list[bytes] = []
        offset = 0
        while entries := list(await fs.readdir(dh, offset)):
            for entry in entries:
                fs.count_listed(dh, entry)
                names.append(entry.name)
                offset = entry.next_offset
        return names[2:]  # without . and ..
    finally:
        await fs.releasedir(dh)


async def read_file(fs: FileSystem, path: str) -> bytes:
    fh, _ = await fs.open(await inode_of(fs, path), os.O_RDONLY)
    try:
        chunks = []
        offset = 0
        while chunk := bytes(await fs.read(fh, offset, 128 * 1024)):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        await fs.release(fh)


async def write_file(fs: FileSystem, path: str, value: bytes, chunk: int = MiB) -> None:
    directory, _, name = path.rpartition("/")
    parent = await inode_of(fs, directory) if directory else ROOT_INODE
    fh, _ = await fs.create(parent, name.encode(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for offset in range(0, len(value), chunk):
            await fs.write(fh, offset, value[offset : offset + chunk])
        await fs.flush(fh)
    finally:
        await fs.release(fh)


async def errno_of(call: Awaitable[object]) -> int | None:
    try:
        await call
    except Exception as error:
        return errno_for(error)
    return None


TREE = {
    "settings": b"root item",
    "config/main": b"main config",
    "data/0123456789": b"nested value",
    "data/abcdef0123": b"x" * 1000,
}
TREE_LEVELS = {"data": [1]}


# The tree


def test_root_lists_namespaces_and_items(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        assert sorted(await listdir(fs)) == [b".trash", b"config", b"data", b"settings"]
        root_item = await lookup(fs, "settings")
        namespace = await lookup(fs, "config")
        assert root_item is not None
        assert namespace is not None
        assert stat.S_ISREG(root_item.mode)
        assert stat.S_ISDIR(namespace.mode)

    run_model(tmp_path, body, items=TREE, levels=TREE_LEVELS)


def test_nested_namespace_lists_flat(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        assert sorted(await listdir(fs, "data")) == [b"0123456789", b"abcdef0123"]
        assert await read_file(fs, "data/0123456789") == b"nested value"
        attributes = await lookup(fs, "data/abcdef0123")
        assert attributes is not None
        assert attributes.size == 1000

    run_model(tmp_path, body, items=TREE, levels=TREE_LEVELS)


def test_trash_mirrors_namespaces(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        assert sorted(await listdir(fs, ".trash")) == [b"config", b"data"]
        assert await listdir(fs, ".trash/config") == []

    run_model(tmp_path, body, items=TREE, levels=TREE_LEVELS)


def test_modes_and_read_only(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        item = await lookup(fs, "config/main")
        assert item is not None
        assert stat.S_IMODE(item.mode) == 0o444
        assert stat.S_IMODE((await fs.getattr(ROOT_INODE)).mode) == 0o555
        config = await inode_of(fs, "config")
        assert await errno_of(fs.create(config, b"new", os.O_WRONLY)) == errno.EROFS
        assert await errno_of(fs.unlink(config, b"main")) == errno.EROFS
        assert await errno_of(fs.open(item.inode, os.O_WRONLY)) == errno.EROFS
        assert await errno_of(fs.mkdir(ROOT_INODE, b"other")) == errno.EROFS

    run_model(tmp_path, body, items=TREE, options=FSOptions(read_only=True))


def test_readdir_counts_only_replied_entries(tmp_path: Path) -> None:
    items = {f"many/{i:08x}": b"v" for i in range(50)}

    async def body(fs: FileSystem, store: Store) -> None:
        before = len(fs.inodes)
        ino = await inode_of(fs, "many")
        dh = await fs.opendir(ino)
        entries = await fs.readdir(dh, 0)
        for count, entry in enumerate(entries):
            if count == 5:  # the kernel's buffer is full after . and .. and three items
                break
            fs.count_listed(dh, entry)
        await fs.releasedir(dh)
        files = [node for node in fs.inodes._nodes.values() if node.kind == NodeKind.FILE]
        assert len(files) == 3
        assert len(fs.inodes) == before + 1 + 3  # the namespace and three items
        rest = [entry.name for entry in await fs.readdir(await fs.opendir(ino), 5)]
        assert len(rest) == 47

    run_model(tmp_path, body, items=items)


def test_readdir_resumes_at_offset(tmp_path: Path) -> None:
    items = {f"ns/key{i:03d}": b"v" for i in range(20)}

    async def body(fs: FileSystem, store: Store) -> None:
        dh = await fs.opendir(await inode_of(fs, "ns"))
        first = list(await fs.readdir(dh, 0))[:7]
        rest = list(await fs.readdir(dh, first[-1].next_offset))
        names = [entry.name for entry in first + rest][2:]
        assert names == [f"key{i:03d}".encode() for i in range(20)]

    run_model(tmp_path, body, items=items)


def test_listing_shows_own_overwrite(tmp_path: Path) -> None:
    items = {f"ns/key{i:03d}": b"old" for i in range(20)}

    async def body(fs: FileSystem, store: Store) -> None:
        dh = await fs.opendir(await inode_of(fs, "ns"))
        first = list(await fs.readdir(dh, 0))[:7]
        await write_file(fs, "ns/key015", b"a longer value")

        rest = {entry.name: entry for entry in await fs.readdir(dh, first[-1].next_offset)}

        assert rest[b"key015"].attributes.size == 14
        assert rest[b"key015"].cacheable
        assert rest[b"key016"].attributes.size == 3

    run_model(tmp_path, body, items=items)


def test_listing_own_removal_uncacheable(tmp_path: Path) -> None:
    items = {f"ns/key{i:03d}": b"old" for i in range(20)}

    async def body(fs: FileSystem, store: Store) -> None:
        dh = await fs.opendir(await inode_of(fs, "ns"))
        first = list(await fs.readdir(dh, 0))[:7]
        await fs.unlink(await inode_of(fs, "ns"), b"key015")

        rest = {entry.name: entry for entry in await fs.readdir(dh, first[-1].next_offset)}

        # The snapshot still names it, but the kernel keeps neither the name nor its attributes.
        assert not rest[b"key015"].cacheable
        assert rest[b"key016"].cacheable
        assert await lookup(fs, "ns/key015") is None

    run_model(tmp_path, body, items=items)


def test_non_canonical_keys_hidden(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = {"ns/100%": b"a", "ns/%61": b"b", "ns/fine": b"c"}

    async def body(fs: FileSystem, store: Store) -> None:
        assert await listdir(fs, "ns") == [b"fine"]
        assert await listdir(fs, "ns") == [b"fine"]

    run_model(tmp_path, body, items=items)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("ns/100%" in message for message in warnings)
    assert any("ns/%61" in message for message in warnings)


def test_encoded_names_round_trip(tmp_path: Path) -> None:
    names = ["Readme.TXT", "with space", ".hidden", "x.del", "y.tmp", "a..b", "100%", "ünï"]

    async def body(fs: FileSystem, store: Store) -> None:
        await fs.mkdir(ROOT_INODE, b"ns")
        for name in names:
            await write_file(fs, f"ns/{name}", name.encode())
        assert sorted(await listdir(fs, "ns")) == sorted(name.encode() for name in names)
        for name in names:
            assert await read_file(fs, f"ns/{name}") == name.encode()

    store = run_model(tmp_path, body)
    with store:
        keys = [info.name for info in store.list("ns")]
    assert "%52eadme.%54%58%54" in keys
    assert "x%2edel" in keys


def test_lookup_errors(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        config = await inode_of(fs, "config")
        main = await inode_of(fs, "config/main")
        assert await lookup(fs, "config/missing") is None
        assert await errno_of(fs.lookup(config, b"x" * 300)) == errno.ENAMETOOLONG
        assert await errno_of(fs.lookup(config, b"X" * (MAX_KEY_LENGTH // 3 + 1))) == errno.ENAMETOOLONG
        assert await errno_of(fs.lookup(main, b"below")) == errno.ENOTDIR
        assert await errno_of(fs.open(config, os.O_RDONLY)) == errno.EISDIR
        assert await lookup(fs, "data/a") is None  # too short for level 1: cannot exist

    run_model(tmp_path, body, items=TREE, levels=TREE_LEVELS)


# Lookups served from a listing

BURST = [f"ns/{i:04x}" for i in range(INDEX_AFTER_LOOKUPS + 10)]
"""More names than the lookups after which a namespace is listed for lookups."""


async def look_up_all(fs: FileSystem, paths: Sequence[str]) -> None:
    for path in paths:
        assert await lookup(fs, path) is not None, path


async def until_answered_from_listing(fs: FileSystem, store: Store, path: str) -> None:
    """Look *path* up until that costs no store call: the listing in the background is done."""
    with trio.fail_after(10):
        while True:
            calls = store.stats["info_calls"]
            await lookup(fs, path)
            if store.stats["info_calls"] == calls:
                return
            await trio.sleep(0.01)


def test_lookups_served_from_one_listing(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        await look_up_all(fs, BURST)
        await until_answered_from_listing(fs, store, BURST[0])
        calls = store.stats["info_calls"]
        await look_up_all(fs, BURST)
        assert await lookup(fs, "ns/missing") is None
        attributes = await lookup(fs, BURST[1])
        assert attributes is not None
        assert attributes.size == 1
        assert store.stats["info_calls"] == calls

    run_model(tmp_path, body, items=dict.fromkeys(BURST, b"v"))


def test_lookups_see_own_changes(tmp_path: Path) -> None:
    mtime = 1_600_000_000_000_000_000

    async def body(fs: FileSystem, store: Store) -> None:
        await look_up_all(fs, BURST)
        await until_answered_from_listing(fs, store, BURST[0])
        await write_file(fs, "ns/new", b"new value")
        attributes = await lookup(fs, "ns/new")
        assert attributes is not None
        assert attributes.size == len(b"new value")

        await fs.unlink(await inode_of(fs, "ns"), BURST[0].removeprefix("ns/").encode())
        assert await lookup(fs, BURST[0]) is None

        await fs.setattr(await inode_of(fs, BURST[1]), mtime_ns=mtime)
        attributes = await lookup(fs, BURST[1])
        assert attributes is not None
        assert attributes.mtime_ns == mtime

        await fs.rename(
            await inode_of(fs, "ns"), BURST[2].removeprefix("ns/").encode(), await inode_of(fs, "ns"), b"renamed", 0
        )
        assert await lookup(fs, BURST[2]) is None
        assert await lookup(fs, "ns/renamed") is not None

        # Names that did not change are still served from the listing.
        calls = store.stats["info_calls"]
        await look_up_all(fs, BURST[3:])
        assert store.stats["info_calls"] == calls

    run_model(tmp_path, body, items=dict.fromkeys(BURST, b"v"))


def test_lookups_see_other_clients_later(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        await look_up_all(fs, BURST)
        await until_answered_from_listing(fs, store, BURST[0])
        with Store(f"file://{tmp_path}/store") as other:
            other.store("ns/elsewhere", b"from another client")
        await trio.sleep(0.6)
        attributes = await lookup(fs, "ns/elsewhere")
        assert attributes is not None
        assert attributes.size == len(b"from another client")

    run_model(tmp_path, body, items=dict.fromkeys(BURST, b"v"), options=FSOptions(entry_timeout=0.5))


def test_nested_namespace_not_listed_for_lookups(tmp_path: Path) -> None:
    names = [f"data/{i:04x}" for i in range(INDEX_AFTER_LOOKUPS + 10)]

    async def body(fs: FileSystem, store: Store) -> None:
        await look_up_all(fs, names)
        await trio.sleep(0.1)
        calls = store.stats["info_calls"]
        await look_up_all(fs, names[:5])
        assert store.stats["info_calls"] == calls + 5

    run_model(tmp_path, body, items=dict.fromkeys(names, b"v"), levels={"data": [1]})


def test_statfs_name_max(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        stats = await fs.statfs()
        assert stats.name_max == MAX_KEY_LENGTH
        assert stats.blocks > 0
        assert stats.blocks_available <= stats.blocks

    run_model(tmp_path, body, items=TREE)


# Soft deletion and the trash


def test_rm_moves_to_trash(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        await fs.unlink(await inode_of(fs, "config"), b"main")
        assert await listdir(fs, "config") == []
        assert await listdir(fs, ".trash/config") == [b"main"]
        assert await read_file(fs, ".trash/config/main") == b"main config"

    run_model(tmp_path, body, items=TREE)


def test_restore_and_conflicts(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        config = await inode_of(fs, "config")
        await fs.unlink(config, b"main")
        trash = await inode_of(fs, ".trash/config")
        data = await inode_of(fs, "data")
        assert await errno_of(fs.rename(trash, b"main", config, b"other", 0)) == errno.EPERM
        assert await errno_of(fs.rename(trash, b"main", data, b"main", 0)) == errno.EPERM
        await write_file(fs, "config/main", b"newer value")
        assert await errno_of(fs.rename(trash, b"main", config, b"main", 0)) == errno.EEXIST
        assert await read_file(fs, "config/main") == b"newer value"
        assert await read_file(fs, ".trash/config/main") == b"main config"
        await fs.unlink(config, b"main")  # replaces the older soft-deleted copy
        assert await read_file(fs, ".trash/config/main") == b"newer value"
        await fs.rename(trash, b"main", config, b"main", 0)
        assert await read_file(fs, "config/main") == b"newer value"
        assert await listdir(fs, ".trash/config") == []

    run_model(tmp_path, body, items=TREE)


def test_purge_from_trash(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        await fs.unlink(await inode_of(fs, "config"), b"main")
        await fs.unlink(await inode_of(fs, ".trash/config"), b"main")
        assert await listdir(fs, ".trash/config") == []
        assert not store.info("config/main", deleted=True).exists

    run_model(tmp_path, body, items=TREE)


def test_trash_rejects_writes(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        await fs.unlink(await inode_of(fs, "config"), b"main")
        trash = await inode_of(fs, ".trash/config")
        trashed = await inode_of(fs, ".trash/config/main")
        assert await errno_of(fs.create(trash, b"new", os.O_WRONLY)) == errno.EPERM
        assert await errno_of(fs.open(trashed, os.O_WRONLY)) == errno.EPERM
        assert await errno_of(fs.mkdir(trash, b"dir")) == errno.EPERM
        assert await errno_of(fs.mkdir(await inode_of(fs, ".trash"), b"dir")) == errno.EPERM
        assert await errno_of(fs.setattr(trashed, size=0)) == errno.EPERM
        config = await inode_of(fs, "config")
        assert await errno_of(fs.rename(config, b"..", trash, b"x", 0)) == errno.EINVAL
        await write_file(fs, "config/other", b"v")
        assert await errno_of(fs.rename(config, b"other", trash, b"other", 0)) == errno.EPERM

    run_model(tmp_path, body, items=TREE)


def test_open_file_readable_after_rm(tmp_path: Path) -> None:
    value = os.urandom(3 * MiB)

    async def body(fs: FileSystem, store: Store) -> None:
        fh, _ = await fs.open(await inode_of(fs, "ns/big"), os.O_RDONLY)
        assert bytes(await fs.read(fh, 0, 1000)) == value[:1000]
        await fs.unlink(await inode_of(fs, "ns"), b"big")
        assert bytes(await fs.read(fh, 2 * MiB, 1000)) == value[2 * MiB : 2 * MiB + 1000]
        await fs.release(fh)

    run_model(tmp_path, body, items={"ns/big": value})


# Namespaces


def test_mkdir_and_rmdir(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        await fs.mkdir(ROOT_INODE, b"fresh")
        assert b"fresh" in await listdir(fs)
        assert await errno_of(fs.mkdir(ROOT_INODE, b"fresh")) == errno.EEXIST
        assert await errno_of(fs.mkdir(await inode_of(fs, "fresh"), b"sub")) == errno.EPERM
        await write_file(fs, "fresh/item", b"v")
        assert await errno_of(fs.rmdir(ROOT_INODE, b"fresh")) == errno.ENOTEMPTY
        await fs.unlink(await inode_of(fs, "fresh"), b"item")
        assert await errno_of(fs.rmdir(ROOT_INODE, b"fresh")) == errno.ENOTEMPTY  # the trash counts
        await fs.unlink(await inode_of(fs, ".trash/fresh"), b"item")
        await fs.rmdir(ROOT_INODE, b"fresh")
        assert b"fresh" not in await listdir(fs)
        assert await errno_of(fs.rmdir(ROOT_INODE, b".trash")) == errno.EPERM

    run_model(tmp_path, body, items=TREE)


def test_unsupported_nodes_eperm(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        assert await errno_of(fs.symlink()) == errno.EPERM
        assert await errno_of(fs.link()) == errno.EPERM
        assert await errno_of(fs.mknod()) == errno.EPERM
        assert await errno_of(fs.rename(ROOT_INODE, b"config", ROOT_INODE, b"renamed", 0)) == errno.EPERM

    run_model(tmp_path, body, items=TREE)


# Writing


def test_write_commits_on_flush(tmp_path: Path) -> None:
    value = os.urandom(3 * MiB + 17)

    async def body(fs: FileSystem, store: Store) -> None:
        fh, _ = await fs.create(await inode_of(fs, "ns"), b"new", os.O_WRONLY | os.O_CREAT)
        for offset in range(0, len(value), 100_000):
            await fs.write(fh, offset, value[offset : offset + 100_000])
        attributes = await lookup(fs, "ns/new")
        assert attributes is not None
        assert attributes.size == len(value)  # visible before the commit
        assert b"new" in await listdir(fs, "ns")
        assert not store.info("ns/new").exists
        await fs.flush(fh)
        assert store.load("ns/new") == value
        await fs.release(fh)

    run_model(tmp_path, body, items={"ns/old": b"o"})


def test_empty_file_stored(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        await write_file(fs, "ns/empty", b"")
        assert store.info("ns/empty").exists
        assert store.load("ns/empty") == b""

    run_model(tmp_path, body, items={"ns/old": b"o"})


def test_write_in_middle_truncate_and_gap(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        ino = await inode_of(fs, "ns/file")
        fh, _ = await fs.open(ino, os.O_RDWR)
        await fs.write(fh, 2, b"XY")
        assert bytes(await fs.read(fh, 0, 100)) == b"01XY456789"
        await fs.write(fh, 12, b"end")
        await fs.flush(fh)
        assert store.load("ns/file") == b"01XY456789\0\0end"
        await fs.setattr(ino, size=4)
        await fs.flush(fh)
        await fs.release(fh)
        assert store.load("ns/file") == b"01XY"
        await fs.setattr(ino, size=6)  # not open: truncated in the store directly
        assert store.load("ns/file") == b"01XY\0\0"

    run_model(tmp_path, body, items={"ns/file": b"0123456789"})


def test_append_and_truncate_flags(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        ino = await inode_of(fs, "ns/log")
        for line in (b"two\n", b"three\n"):
            fh, _ = await fs.open(ino, os.O_WRONLY | os.O_APPEND)
            await fs.write(fh, 0, line)
            await fs.flush(fh)
            await fs.release(fh)
        assert store.load("ns/log") == b"one\ntwo\nthree\n"
        fh, _ = await fs.open(ino, os.O_WRONLY | os.O_TRUNC)
        await fs.flush(fh)
        await fs.release(fh)
        assert store.load("ns/log") == b""

    run_model(tmp_path, body, items={"ns/log": b"one\n"})


def test_utimens_after_close_stored(tmp_path: Path) -> None:
    mtime = 1_600_000_000_123_456_789

    async def body(fs: FileSystem, store: Store) -> None:
        await write_file(fs, "ns/file", b"value")
        await fs.setattr(await inode_of(fs, "ns/file"), mtime_ns=mtime)
        assert store.info("ns/file").mtime_ns == mtime
        attributes = await lookup(fs, "ns/file")
        assert attributes is not None
        assert attributes.mtime_ns == mtime

    run_model(tmp_path, body, items={"ns/old": b"o"})


def test_utimens_while_open_kept_at_commit(tmp_path: Path) -> None:
    mtime = 1_500_000_000_000_000_000

    async def body(fs: FileSystem, store: Store) -> None:
        fh, _ = await fs.create(await inode_of(fs, "ns"), b"file", os.O_WRONLY)
        await fs.write(fh, 0, b"data")
        await fs.setattr(await inode_of(fs, "ns/file"), mtime_ns=mtime, fh=fh)
        await fs.flush(fh)
        await fs.release(fh)
        assert store.info("ns/file").mtime_ns == mtime

    run_model(tmp_path, body, items={"ns/old": b"o"})


def test_rename_replace_and_noreplace(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        ns = await inode_of(fs, "ns")
        other = await inode_of(fs, "other")
        assert await errno_of(fs.rename(ns, b"a", ns, b"b", RENAME_NOREPLACE)) == errno.EEXIST
        assert await errno_of(fs.rename(ns, b"a", ns, b"b", RENAME_EXCHANGE)) == errno.EINVAL
        await fs.rename(ns, b"a", ns, b"b", 0)
        assert store.load("ns/b") == b"A"
        assert not store.info("ns/a").exists
        await fs.rename(ns, b"b", other, b"moved", RENAME_NOREPLACE)
        assert store.load("other/moved") == b"A"
        assert sorted(await listdir(fs, "ns")) == []

    run_model(tmp_path, body, items={"ns/a": b"A", "ns/b": b"B", "other/x": b"x"})


def test_rsync_pattern(tmp_path: Path) -> None:
    mtime = 1_400_000_000_987_654_321

    async def body(fs: FileSystem, store: Store) -> None:
        ns = await inode_of(fs, "ns")
        assert await lookup(fs, "ns/.file.Ab12Cd") is None
        fh, _ = await fs.create(ns, b".file.Ab12Cd", os.O_RDWR | os.O_CREAT | os.O_EXCL)
        await fs.write(fh, 0, b"new content")
        await fs.flush(fh)
        temp = await inode_of(fs, "ns/.file.Ab12Cd")
        await fs.setattr(temp, mtime_ns=mtime)
        await fs.release(fh)
        await fs.rename(ns, b".file.Ab12Cd", ns, b"file", 0)
        assert store.load("ns/file") == b"new content"
        assert store.info("ns/file").mtime_ns == mtime
        attributes = await lookup(fs, "ns/file")
        assert attributes is not None
        assert (attributes.size, attributes.mtime_ns) == (11, mtime)
        assert await listdir(fs, "ns") == [b"file"]

    run_model(tmp_path, body, items={"ns/file": b"old"})


def test_failed_store_reported_and_sticky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        original_stage = store.stage

        def failing_stage(name: str, **kwargs: bool) -> object:
            staged = original_stage(name, **kwargs)

            def write(offset: int, data: bytes) -> int:
                raise NoSpaceLeft(f"no space left for {name!r}")

            staged.write = write  # type: ignore[method-assign]
            return staged

        monkeypatch.setattr(store, "stage", failing_stage)
        fh, _ = await fs.open(await inode_of(fs, "ns/victim"), os.O_WRONLY)
        first = await errno_of(fs.write(fh, 0, bytes(MiB)))
        second = await errno_of(fs.write(fh, MiB, bytes(MiB)))
        assert errno.ENOSPC in (first, second)
        assert await errno_of(fs.write(fh, 2 * MiB, b"more")) == errno.ENOSPC
        assert await errno_of(fs.flush(fh)) == errno.ENOSPC
        await fs.release(fh)
        assert store.load("ns/victim") == b"previous value"

    run_model(tmp_path, body, items={"ns/victim": b"previous value"})


def test_short_key_for_nesting_einval(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        data = await inode_of(fs, "data")
        assert await errno_of(fs.create(data, b"a", os.O_WRONLY)) == errno.EINVAL

    run_model(tmp_path, body, items=TREE, levels=TREE_LEVELS)


def test_shutdown_commits_open_files(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        fh, _ = await fs.create(await inode_of(fs, "ns"), b"open", os.O_WRONLY)
        await fs.write(fh, 0, b"written, never closed")

    store = run_model(tmp_path, body, items={"ns/old": b"o"})
    with store:
        assert store.load("ns/open") == b"written, never closed"
