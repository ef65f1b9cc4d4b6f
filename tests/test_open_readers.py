"""Open files and their shared readers, driven through the file system model without FUSE."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from borgstorefs.errnos import errno_for
from borgstorefs.fs import FileSystem, FSOptions
from borgstorefs.store import Store, ValueReader

from .test_fs_model import inode_of, run_model

MiB = 1024 * 1024


class CountingStore:
    """A `Store` that counts the readers it opens and closes."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.opened = 0
        self.closed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def open_reader(self, name: str, *, deleted: bool = False) -> ValueReader:
        reader = self._store.open_reader(name, deleted=deleted)
        self.opened += 1
        close = reader.close

        def counted_close() -> None:
            self.closed += 1
            close()

        reader.close = counted_close  # type: ignore[method-assign]
        return reader


class LoadOnlyStore:
    """A store with `load` but no `open_reader`, as a store type may be before it gains readers."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        if name == "open_reader":
            raise AttributeError(name)
        return getattr(self._store, name)


async def read_handle(fs: FileSystem, fh: int) -> bytes:
    """Read open file *fh* from offset 0 to its end in 128 KiB requests, as the kernel does."""
    chunks = []
    offset = 0
    while chunk := bytes(await fs.read(fh, offset, 128 * 1024)):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


async def read_errno(fs: FileSystem, fh: int) -> int | None:
    try:
        await fs.read(fh, 0, 100)
    except Exception as error:
        return errno_for(error)
    return None


def test_purged_file_stays_readable(tmp_path: Path) -> None:
    value = os.urandom(3 * MiB)

    async def body(fs: FileSystem, store: Store) -> None:
        fh, _ = await fs.open(await inode_of(fs, "ns/item"), os.O_RDONLY)
        assert bytes(await fs.read(fh, 0, 1000)) == value[:1000]
        ns = await inode_of(fs, "ns")
        trash_ns = await inode_of(fs, ".trash/ns")
        await fs.unlink(ns, b"item")
        await fs.unlink(trash_ns, b"item")
        assert not store.info("ns/item", deleted=True).exists
        assert await read_handle(fs, fh) == value
        await fs.release(fh)

    run_model(tmp_path, body, items={"ns/item": value})


def test_renamed_over_file_stays_readable(tmp_path: Path) -> None:
    value = os.urandom(3 * MiB)

    async def body(fs: FileSystem, store: Store) -> None:
        fh, _ = await fs.open(await inode_of(fs, "ns/target"), os.O_RDONLY)
        ns = await inode_of(fs, "ns")
        await fs.rename(ns, b"source", ns, b"target", 0)
        assert store.load("ns/target") == b"replacement"
        assert await read_handle(fs, fh) == value
        await fs.release(fh)

    run_model(tmp_path, body, items={"ns/target": value, "ns/source": b"replacement"})


def test_handles_share_one_reader(tmp_path: Path) -> None:
    counting: list[CountingStore] = []

    async def body(fs: FileSystem, store: Store) -> None:
        counter = CountingStore(store)
        counting.append(counter)
        fs.store = counter  # type: ignore[assignment]
        ino = await inode_of(fs, "ns/item")
        first, _ = await fs.open(ino, os.O_RDONLY)
        second, _ = await fs.open(ino, os.O_RDONLY)
        assert bytes(await fs.read(first, 0, 5)) == b"value"
        assert bytes(await fs.read(second, 0, 5)) == b"value"
        assert counter.opened == 1
        await fs.release(first)
        assert counter.closed == 0
        await fs.release(second)
        assert counter.closed == 1

    run_model(tmp_path, body, items={"ns/item": b"value"})
    assert counting[0].opened == 1


def test_open_of_missing_item_enoent(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        ino = await inode_of(fs, "ns/item")
        store.delete("ns/item")
        fs.inodes.get(ino).fetched = 0.0  # as if the attribute timeout had passed
        with pytest.raises(Exception) as raised:
            await fs.open(ino, os.O_RDONLY)
        assert errno_for(raised.value) == errno.ENOENT

    run_model(tmp_path, body, items={"ns/item": b"value"})


def test_other_client_value_reaches_handles(tmp_path: Path) -> None:
    async def body(fs: FileSystem, store: Store) -> None:
        ino = await inode_of(fs, "ns/item")
        first, _ = await fs.open(ino, os.O_RDONLY)
        assert bytes(await fs.read(first, 0, 100)) == b"old"
        store.store("ns/item", b"another client's value")
        second, _ = await fs.open(ino, os.O_RDONLY)  # attr_timeout=0: the open fetches the new size
        assert bytes(await fs.read(second, 0, 100)) == b"another client's value"
        assert bytes(await fs.read(first, 0, 100)) == b"another client's value"
        await fs.release(first)
        await fs.release(second)

    run_model(tmp_path, body, items={"ns/item": b"old"}, options=FSOptions(attr_timeout=0))


def test_store_without_readers_loads(tmp_path: Path) -> None:
    value = os.urandom(MiB)

    async def body(fs: FileSystem, store: Store) -> None:
        fs.store = LoadOnlyStore(store)  # type: ignore[assignment]
        fh, _ = await fs.open(await inode_of(fs, "ns/target"), os.O_RDONLY)
        assert await read_handle(fs, fh) == value
        ns = await inode_of(fs, "ns")
        await fs.rename(ns, b"source", ns, b"target", 0)
        assert await read_errno(fs, fh) == errno.ESTALE
        await fs.release(fh)

    run_model(tmp_path, body, items={"ns/target": value, "ns/source": b"replacement"})
