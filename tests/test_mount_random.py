"""A seeded random sequence of file operations, run on a mount and on a plain directory, must agree."""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.mounting import Mount, create_store, requires_fuse, run

pytest_plugins = ["tests.mounting"]
pytestmark = requires_fuse

SEED = 20_261_204
"""Seed of the operation sequence. A failure message names the seed and the operation index."""

OPERATION_COUNT = 3000
COMPARE_EVERY = 250
"""Operations between two full comparisons of both directories."""

NAMES = ["alpha", "beta", "gamma", "delta", "Upper Case", ".dot-file", "ünïcødé", "name.tmp"]
"""File names the operations pick from. A few need encoding, so the encoding is exercised too."""

MAX_OFFSET = 70_000
MAX_CHUNK = 9000


@dataclass(frozen=True)
class Operation:
    """One file operation: its kind, the file name and the arguments that kind uses."""

    kind: str
    name: str
    offset: int = 0
    size: int = 0
    data: bytes = b""
    target: str = ""

    def __str__(self) -> str:
        arguments = f"offset={self.offset} size={self.size} data=<{len(self.data)} bytes> target={self.target!r}"
        return f"{self.kind} {self.name!r} {arguments}"


def generate_operations(rng: random.Random, count: int) -> list[Operation]:
    """Return *count* random operations."""
    kinds = ["write", "read", "truncate", "rename", "unlink", "append", "replace", "stat"]
    weights = [30, 25, 10, 10, 6, 8, 5, 6]
    operations = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        name = rng.choice(NAMES)
        if kind == "write":
            offset = rng.randrange(MAX_OFFSET)
            operations.append(Operation(kind, name, offset=offset, data=rng.randbytes(rng.randrange(1, MAX_CHUNK))))
        elif kind == "read":
            offset = rng.randrange(MAX_OFFSET + MAX_CHUNK)
            operations.append(Operation(kind, name, offset=offset, size=rng.randrange(1, 3 * MAX_CHUNK)))
        elif kind == "truncate":
            operations.append(Operation(kind, name, size=rng.randrange(MAX_OFFSET)))
        elif kind == "rename":
            operations.append(Operation(kind, name, target=rng.choice(NAMES)))
        elif kind in ("append", "replace"):
            operations.append(Operation(kind, name, data=rng.randbytes(rng.randrange(0, MAX_CHUNK))))
        else:
            operations.append(Operation(kind, name))
    return operations


def apply(directory: Path, operation: Operation) -> object:
    """Run *operation* in *directory* and return its result, or ``("errno", n)`` if it raised `OSError`."""
    path = directory / operation.name
    try:
        return _apply(directory, path, operation)
    except OSError as err:
        return ("errno", err.errno)


def _apply(directory: Path, path: Path, operation: Operation) -> object:
    if operation.kind == "write":
        return _with_fd(path, os.O_WRONLY | os.O_CREAT, lambda fd: os.pwrite(fd, operation.data, operation.offset))
    if operation.kind == "read":
        return _with_fd(path, os.O_RDONLY, lambda fd: os.pread(fd, operation.size, operation.offset))
    if operation.kind == "truncate":
        os.truncate(path, operation.size)
    elif operation.kind == "rename":
        os.rename(path, directory / operation.target)
    elif operation.kind == "unlink":
        os.unlink(path)
    elif operation.kind == "append":
        return _with_fd(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, lambda fd: os.write(fd, operation.data))
    elif operation.kind == "replace":
        return _with_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, lambda fd: os.write(fd, operation.data))
    elif operation.kind == "stat":
        return os.stat(path).st_size
    else:
        raise AssertionError(f"unknown operation kind {operation.kind!r}")
    return None


def _with_fd(path: Path, flags: int, action: Callable[[int], object]) -> object:
    fd = os.open(path, flags, 0o644)
    try:
        return action(fd)
    finally:
        os.close(fd)


def describe(index: int, operation: Operation) -> str:
    """Return a short description of an operation for a failure message."""
    return f"operation {index} of seed {SEED}: {operation}"


def assert_same_contents(on_mount: Path, reference: Path, when: str) -> None:
    """Check that both directories contain the same file names with the same bytes."""
    names = sorted(os.listdir(reference))
    assert sorted(os.listdir(on_mount)) == names, when
    for name in names:
        assert (on_mount / name).read_bytes() == (reference / name).read_bytes(), f"{name} {when}"


def test_random_operations_match(make_url: Callable[[], str], mount: Callable[..., Mount], tmp_path: Path) -> None:
    url = make_url()
    create_store(url, levels={"random": [1]})
    mounted = mount(url)
    on_mount = mounted.path / "random"
    reference = tmp_path / "reference"
    reference.mkdir()
    operations = generate_operations(random.Random(SEED), OPERATION_COUNT)

    for index, operation in enumerate(operations):
        expected = apply(reference, operation)
        assert apply(on_mount, operation) == expected, describe(index, operation)
        if index % COMPARE_EVERY == COMPARE_EVERY - 1:
            assert_same_contents(on_mount, reference, f"after {describe(index, operation)}")

    assert_same_contents(on_mount, reference, "at the end")
    run("fusermount3", "-u", mounted.path)
    remounted = mount(url)
    assert_same_contents(remounted.path / "random", reference, "after a remount")


def _read_to_end(path: Path, buffer: mmap.mmap) -> None:
    # O_DIRECT: every read reaches the daemon, so none is hidden by a kernel retry.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        offset = 0
        while (count := os.preadv(fd, [buffer], offset)) > 0:
            offset += count
    finally:
        os.close(fd)


def test_reads_during_rewrites_succeed(make_url: Callable[[], str], mount: Callable[..., Mount]) -> None:
    url = make_url()
    create_store(url, {"data/busy": os.urandom(16 * 1024 * 1024)})
    mounted = mount(url)
    path = mounted.path / "data" / "busy"
    errors: list[OSError] = []
    stop = time.monotonic() + 3

    def read_repeatedly() -> None:
        buffer = mmap.mmap(-1, 1024 * 1024)
        while time.monotonic() < stop:
            try:
                _read_to_end(path, buffer)
            except OSError as error:
                errors.append(error)

    def rewrite_repeatedly() -> None:
        while time.monotonic() < stop:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x", 5)
            finally:
                os.close(fd)
            time.sleep(0.002)

    threads = [threading.Thread(target=read_repeatedly) for _ in range(2)]
    threads.append(threading.Thread(target=rewrite_repeatedly))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # A read that overlaps a commit returns the old or the new value, never an error.
    assert errors == []


def test_random_reads_see_each_rewrite(make_url: Callable[[], str], mount: Callable[..., Mount]) -> None:
    url = make_url()
    value = bytearray(os.urandom(2 * 1024 * 1024))
    create_store(url, {"data/file": bytes(value)})
    # Blocks of 64 KiB around each read go to the kernel's page cache, also for a local store.
    mounted = mount(url, "-o", "read_around=64")
    path = mounted.path / "data" / "file"
    rng = random.Random(5)
    for _ in range(15):
        with open(path, "rb", buffering=0) as reader:
            for _ in range(30):
                offset = rng.randrange(len(value) - 4096)
                reader.seek(offset)
                assert reader.read(4096) == value[offset : offset + 4096], offset
        offset = rng.randrange(len(value) - 100)
        patch = os.urandom(100)
        with open(path, "r+b", buffering=0) as writer:
            writer.seek(offset)
            writer.write(patch)
        value[offset : offset + 100] = patch
