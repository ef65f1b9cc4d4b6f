"""MStore: placement by kind, reads with a store missing or down, the write rule, repair and redistribution."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from borgstorefs.backends import PosixFS
from borgstorefs.errors import (
    BackendMustNotBeOpen,
    BackendUnavailable,
    DirectoryNotEmpty,
    ObjectAlreadyExists,
    ObjectNotFound,
)
from borgstorefs.mstore import BUCKETS, MissingCopy, MStore, bucket_of, bucket_owners, parse_kinds, read_missing_log
from borgstorefs.mstore_cli import (
    EXIT_PROBLEMS,
    RepairState,
    add_parser,
    load_spec_file,
    parse_store_option,
)
from borgstorefs.store import Store

KINDS = {"data/": "hex-hash", "config/": "generic"}
LEVELS = {"data/": [1]}
THREE_WAY = [192, 192, 128]
"""Two copies over three stores: store 0 gets buckets 0-191, store 1 192-255 and 0-127, store 2 128-255."""


class SwitchablePosixFS(PosixFS):
    """A POSIX backend that fails every call with `BackendUnavailable` while ``down`` is set, like a dead server."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, fsync=False)
        self.down = False

    def _check_open(self) -> None:
        if self.down:
            raise BackendUnavailable(f"{self!r} is switched off by the test")
        super()._check_open()

    def open(self) -> None:
        if self.down:
            raise BackendUnavailable(f"{self!r} is switched off by the test")
        super().open()


def hex_key(bucket: int, text: str = "") -> str:
    """Return a 64-digit hex key in *bucket*."""
    return f"{bucket:02x}" + hashlib.sha256(f"{bucket}{text}".encode()).hexdigest()[2:]


def store_at(path: Path) -> Store:
    return Store(backend=SwitchablePosixFS(path), levels=LEVELS)


def backend_of(store: Store) -> SwitchablePosixFS:
    backend = store.backend
    assert isinstance(backend, SwitchablePosixFS)
    return backend


@pytest.fixture
def store_paths(tmp_path: Path) -> list[Path]:
    """Three created, empty store directories."""
    paths = [tmp_path / f"store{i}" for i in range(3)]
    for path in paths:
        store_at(path).create()
    return paths


@pytest.fixture
def open_mstore() -> Iterator[Callable[..., MStore]]:
    """Return a function that builds and opens an MStore over new Store objects on the given paths."""
    opened: list[MStore] = []

    def make(
        paths: Sequence[Path], buckets: Sequence[int], kinds: dict[str, str] | None = None, **options: object
    ) -> MStore:
        options.setdefault("retry_interval", 0.0)
        mstore = MStore([store_at(path) for path in paths], buckets, KINDS if kinds is None else kinds, **options)  # type: ignore[arg-type]
        mstore.open()
        opened.append(mstore)
        return mstore

    yield make
    for mstore in opened:
        mstore.close()


def holders(paths: Sequence[Path], name: str, *, deleted: bool = False) -> list[int]:
    """Return the indexes of the stores at *paths* that hold *name*, asked through a plain Store each."""
    found = []
    for index, path in enumerate(paths):
        with store_at(path) as store:
            if store.info(name, deleted=deleted).exists:
                found.append(index)
    return found


def load_from(path: Path, name: str) -> bytes:
    with store_at(path) as store:
        return store.load(name)


# Layout


def test_bucket_owners_mirror_and_weights() -> None:
    assert bucket_owners([256, 256])[0] == (0, 1)
    owners = bucket_owners([192, 64])
    assert owners[191] == (0,)
    assert owners[192] == (1,)


def test_bucket_owners_wrap_modulo_256() -> None:
    owners = bucket_owners(THREE_WAY)
    assert owners[0] == (0, 1)
    assert owners[127] == (0, 1)
    assert owners[128] == (0, 2)
    assert owners[192] == (1, 2)
    assert all(len(stores) == 2 for stores in owners)


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        ([], "at least one store"),
        ([0], "positive multiple of 256"),
        ([100, 100], "positive multiple of 256"),
        ([300, 212], "twice"),
        ([-256, 512], "non-negative integer"),
        ([True, 255], "non-negative integer"),
    ],
)
def test_bucket_owners_invalid(buckets: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bucket_owners(buckets)


def test_mstore_rejects_mismatched_lengths(store_paths: list[Path]) -> None:
    with pytest.raises(ValueError, match="3 stores but 2 bucket counts"):
        MStore([store_at(path) for path in store_paths], [256, 256])


def test_mstore_rejects_no_stores() -> None:
    with pytest.raises(ValueError, match="at least one store"):
        MStore([], [])


def test_parse_kinds_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="invalid kind 'sha'"):
        parse_kinds({"data/": "sha"})


def test_hex_hash_rejects_non_hex_key() -> None:
    with pytest.raises(ValueError, match="two hex digits"):
        bucket_of("hex-hash", "zz00")
    with pytest.raises(ValueError, match="two hex digits"):
        bucket_of("hex-hash", "+1ab")


# Placement


def test_hex_hash_placement_on_each_store(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, THREE_WAY)
    owners = bucket_owners(THREE_WAY)
    for bucket in range(BUCKETS):
        mstore.store(f"data/{hex_key(bucket)}", bytes([bucket]))
    for bucket in range(BUCKETS):
        assert holders(store_paths, f"data/{hex_key(bucket)}") == sorted(owners[bucket]), f"bucket {bucket}"
    for bucket in (0, 128, 200, 255):
        assert mstore.load(f"data/{hex_key(bucket)}") == bytes([bucket])


def test_generic_items_on_every_store(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, THREE_WAY)
    mstore.store("config/main", b"settings")
    assert holders(store_paths, "config/main") == [0, 1, 2]
    for path in store_paths:
        assert load_from(path, "config/main") == b"settings"


def test_name_hash_is_the_default_kind(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, THREE_WAY)
    owners = bucket_owners(THREE_WAY)
    used: set[tuple[int, ...]] = set()
    for number in range(40):
        name = f"files/report-{number}.txt"
        mstore.store(name, name.encode())
        expected = owners[hashlib.sha256(f"report-{number}.txt".encode()).digest()[0]]
        used.add(expected)
        assert holders(store_paths, name) == sorted(expected), name
        assert mstore.load(name) == name.encode()
    assert len(used) == 3, "40 names should reach every pair of stores"


# Reads with a copy missing or a store down


def test_read_with_store_directory_removed(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256], read_repair=False)
    names = [f"data/{hex_key(b)}" for b in (1, 100, 250)] + ["config/main", "files/a"]
    for name in names:
        mstore.store(name, name.encode())
    shutil.rmtree(store_paths[0])
    for name in names:
        assert mstore.load(name) == name.encode()
        assert mstore.info(name).size == len(name)
    assert {MissingCopy(name, False, 0) for name in names} <= mstore.missing_copies


def test_read_with_store_down(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"value")
    backend_of(mstore.stores[0]).down = True
    assert mstore.load("files/a") == b"value"
    assert mstore.info("files/a").exists
    assert [info.name for info in mstore.list("files")] == ["a"]
    assert MissingCopy("files/a", False, 0) in mstore.missing_copies


def test_read_expected_store_down_fails(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [128, 128])
    name = f"data/{hex_key(10)}"
    mstore.store(name, b"value")
    backend_of(mstore.stores[0]).down = True
    with pytest.raises(BackendUnavailable, match="none of the stores that should hold it"):
        mstore.load(name)
    with pytest.raises(BackendUnavailable, match="do not hold every bucket"):
        list(mstore.list("data"))


def test_read_missing_everywhere(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, THREE_WAY)
    with pytest.raises(ObjectNotFound):
        mstore.load("files/nothing")
    assert not mstore.info("files/nothing").exists
    assert not mstore.missing_copies


def test_open_with_store_down_then_back(store_paths: list[Path]) -> None:
    stores = [store_at(path) for path in store_paths[:2]]
    backend_of(stores[1]).down = True
    with MStore(stores, [256, 256], retry_interval=0.0) as mstore:
        with pytest.raises(BackendUnavailable):
            mstore.store("files/a", b"value")
        backend_of(stores[1]).down = False
        mstore.store("files/a", b"value")
    assert holders(store_paths[:2], "files/a") == [0, 1]


# The write rule


def test_write_with_store_down_raises_and_records(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"old")
    backend_of(mstore.stores[1]).down = True
    with pytest.raises(BackendUnavailable, match="reached 1 of 2 stores"):
        mstore.store("files/a", b"new")
    assert MissingCopy("files/a", False, 1) in mstore.missing_copies


def test_write_with_every_store_down_raises(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    for store in mstore.stores:
        backend_of(store).down = True
    with pytest.raises(BackendUnavailable, match="reached 0 of 2 stores"):
        mstore.store("files/a", b"value")
    with pytest.raises(BackendUnavailable):
        mstore.stage("files/a")


def test_acknowledged_write_survives_either_loss(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"old")
    backend_of(mstore.stores[1]).down = True
    with pytest.raises(BackendUnavailable):
        mstore.store("files/a", b"new")
    backend_of(mstore.stores[1]).down = False
    mstore.store("files/a", b"newer")  # acknowledged: both copies hold it
    for down in (0, 1):
        backend_of(mstore.stores[down]).down = True
        assert mstore.load("files/a") == b"newer"
        backend_of(mstore.stores[down]).down = False


def test_failed_write_repaired_from_newest(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"old")
    backend_of(mstore.stores[1]).down = True
    with pytest.raises(BackendUnavailable):
        mstore.store("files/a", b"new")
    backend_of(mstore.stores[1]).down = False
    result = mstore.repair_missing()
    assert result.failed == []
    assert result.copied == 1
    assert load_from(store_paths[1], "files/a") == b"new"
    assert not mstore.missing_copies


def test_delete_with_store_down_raises(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"value")
    backend_of(mstore.stores[1]).down = True
    with pytest.raises(BackendUnavailable):
        mstore.delete("files/a")
    with pytest.raises(BackendUnavailable):
        mstore.move("files/a", delete=True)


def test_missing_log_records_copies(
    store_paths: list[Path], open_mstore: Callable[..., MStore], tmp_path: Path
) -> None:
    log = tmp_path / "missing.jsonl"
    mstore = open_mstore(store_paths[:2], [256, 256], read_repair=False, missing_log=log)
    mstore.store("files/a", b"value")
    shutil.rmtree(store_paths[0])
    assert mstore.load("files/a") == b"value"
    assert mstore.load("files/a") == b"value"
    assert read_missing_log(log) == [MissingCopy("files/a", False, 0)]


# Repair


def test_read_repair_restores_copy(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256])
    mstore.store("files/a", b"value")
    mstore.store(f"data/{hex_key(7)}", b"chunk")
    shutil.rmtree(store_paths[0])
    assert mstore.load("files/a") == b"value"
    assert mstore.load(f"data/{hex_key(7)}") == b"chunk"
    assert holders(store_paths, "files/a") == [0, 1, 2]
    assert holders(store_paths, f"data/{hex_key(7)}") == [0, 1, 2]
    assert load_from(store_paths[0], "files/a") == b"value"
    assert not mstore.missing_copies


def test_partial_read_records_without_repair(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"value")
    (store_paths[0] / "files" / "a").unlink()
    assert mstore.load("files/a", offset=1, size=2) == b"al"
    assert holders(store_paths[:2], "files/a") == [1]
    assert mstore.repair_missing().copied == 1
    assert holders(store_paths[:2], "files/a") == [0, 1]


requires_store_reader = pytest.mark.skipif(
    not hasattr(Store, "open_reader"), reason="Store.open_reader is not in this tree yet"
)


@requires_store_reader
def test_open_reader_uses_first_copy(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"value")
    with mstore.open_reader("files/a") as reader:
        assert reader.size == 5
        assert reader.read(1, 3) == b"alu"
    assert mstore.missing_copies == set()


@requires_store_reader
def test_open_reader_falls_back_and_records(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:3], [256, 256, 256])
    mstore.store("files/a", b"value")
    (store_paths[0] / "files" / "a").unlink()
    backend_of(mstore.stores[1]).down = True
    with mstore.open_reader("files/a") as reader:
        assert reader.read(0, 10) == b"value"
    assert MissingCopy("files/a", False, 0) in mstore.missing_copies
    assert MissingCopy("files/a", False, 1) in mstore.missing_copies
    assert holders(store_paths[:1], "files/a") == [], "opening a reader must not repair"


@requires_store_reader
def test_open_reader_soft_deleted(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"value")
    mstore.move("files/a", delete=True)
    with mstore.open_reader("files/a", deleted=True) as reader:
        assert reader.read(0, 5) == b"value"
    with pytest.raises(ObjectNotFound):
        mstore.open_reader("files/a")


@requires_store_reader
def test_open_reader_expected_stores_down(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"value")
    for store in mstore.stores:
        backend_of(store).down = True
    with pytest.raises(BackendUnavailable):
        mstore.open_reader("files/a")


def test_repair_restores_every_missing_copy(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, THREE_WAY)
    names = [f"data/{hex_key(b)}" for b in range(0, 256, 5)] + ["config/main"] + [f"files/f{i}" for i in range(20)]
    for name in names:
        mstore.store(name, name.encode())
    mstore.move("files/f0", delete=True)
    mstore.close()
    shutil.rmtree(store_paths[1])
    store_at(store_paths[1]).create()

    mstore = open_mstore(store_paths, THREE_WAY)
    problems = [report for report in mstore.scan() if not report.healthy]
    assert problems, "removing a store must leave items with missing copies"
    assert all(report.missing == (1,) for report in problems)
    for report in problems:
        assert mstore.repair_name(report.name, deleted=report.deleted).failed == []
    assert all(report.healthy for report in mstore.scan())
    owners = bucket_owners(THREE_WAY)
    for bucket in range(0, 256, 5):
        assert holders(store_paths, f"data/{hex_key(bucket)}") == sorted(owners[bucket])
    assert holders(store_paths, "config/main") == [0, 1, 2]
    assert mstore.stores[1].info("files/f0", deleted=True).exists == (1 in mstore.placement("files/f0"))


def test_redistribution_to_a_third_mirror(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    before = open_mstore(store_paths[:2], [256, 256])
    names = [f"data/{hex_key(b)}" for b in range(0, 256, 3)] + ["files/a", "files/b", "config/main"]
    for name in names:
        before.store(name, name.encode())
    before.close()

    after = open_mstore(store_paths, [256, 256, 256])
    for name in names:
        assert after.load(name) == name.encode()
    reports = list(after.scan())
    assert all(report.missing == (2,) for report in reports if report.name != "config/main")
    for report in reports:
        after.repair_name(report.name, deleted=report.deleted)
    for name in names:
        assert holders(store_paths, name) == [0, 1, 2]
    assert all(report.healthy for report in after.scan())


def test_redistribution_after_weight_change(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    before = open_mstore(store_paths, [128, 64, 64])
    names = {bucket: f"data/{hex_key(bucket)}" for bucket in range(256)}
    for bucket, name in names.items():
        before.store(name, bytes([bucket]))
    before.close()

    layout = [64, 64, 128]
    after = open_mstore(store_paths, layout)
    moved = [b for b in range(256) if bucket_owners(layout)[b] != bucket_owners([128, 64, 64])[b]]
    assert moved
    # Not yet redistributed: the expected store reports "not found", so the left-over copy serves.
    for bucket in moved[:5]:
        assert after.load(names[bucket]) == bytes([bucket])
    for report in after.scan():
        assert after.repair_name(report.name, deleted=report.deleted).failed == []
    owners = bucket_owners(layout)
    for bucket, name in names.items():
        assert holders(store_paths, name) == list(owners[bucket]), f"bucket {bucket}"
        assert after.load(name) == bytes([bucket])


def test_left_over_copy_cannot_reappear(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    before = open_mstore(store_paths[:2], [256, 0])
    name = f"data/{hex_key(3)}"
    before.store(name, b"old")
    before.close()

    after = open_mstore(store_paths[:2], [0, 256])
    after.store(name, b"new")
    assert after.load(name) == b"new"
    after.delete(name)
    assert holders(store_paths[:2], name) == []
    with pytest.raises(ObjectNotFound):
        after.load(name)


def test_left_over_copy_skipped_when_down(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    before = open_mstore(store_paths[:2], [256, 0])
    name = f"data/{hex_key(3)}"
    before.store(name, b"old")
    before.close()

    after = open_mstore(store_paths[:2], [0, 256])
    after.store(name, b"new")
    backend_of(after.stores[1]).down = True
    with pytest.raises(BackendUnavailable):
        after.load(name)


# Soft deletion, listing, renames and staging


def test_soft_delete_and_undelete_across_copies(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256])
    mstore.store("files/a", b"value")
    mstore.move("files/a", delete=True)
    assert holders(store_paths, "files/a") == []
    assert holders(store_paths, "files/a", deleted=True) == [0, 1, 2]
    assert [info.name for info in mstore.list("files", deleted=True)] == ["a"]
    assert [info.name for info in mstore.list("files")] == []
    assert mstore.load("files/a", deleted=True) == b"value"

    mstore.move("files/a", undelete=True)
    assert holders(store_paths, "files/a") == [0, 1, 2]
    assert holders(store_paths, "files/a", deleted=True) == []

    mstore.move("files/a", delete=True)
    mstore.store("files/a", b"new")
    with pytest.raises(ObjectAlreadyExists):
        mstore.move("files/a", undelete=True)
    mstore.delete("files/a", deleted=True)
    assert holders(store_paths, "files/a", deleted=True) == []


def test_list_merges_disagreeing_stores(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    for index, path in enumerate(store_paths):
        with store_at(path) as store:
            store.store("files/common", b"x" * (index + 1))
            store.store(f"files/only{index}", b"x")
            store.store(f"files/z{2 - index}", b"x")
    mstore = open_mstore(store_paths, [256, 256, 256])
    listed = [info.name for info in mstore.list("files")]
    assert listed == ["common", "only0", "only1", "only2", "z0", "z1", "z2"]
    assert next(iter(mstore.list("files"))).size == 1, "the entry comes from the first store in read order"
    with pytest.raises(ObjectNotFound):
        list(mstore.list("nonexistent"))


def test_rename_moves_between_stores(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [128, 64, 64])
    names = [f"files/n{i}" for i in range(50)]
    source = names[0]
    target = next(name for name in names if not set(mstore.placement(name)) & set(mstore.placement(source)))
    mstore.store(source, b"value")
    mstore.move(source, target)
    assert holders(store_paths, target) == list(mstore.placement(target))
    assert holders(store_paths, source) == []
    assert mstore.load(target) == b"value"
    mstore.store(source, b"other")
    with pytest.raises(ObjectAlreadyExists):
        mstore.move(source, target, replace=False)


def test_stage_commit_writes_every_copy(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256])
    with mstore.stage("files/a") as staged:
        staged.write(0, b"hello world")
        staged.truncate(5)
        staged.commit(mtime_ns=1_000_000_000)
    for path in store_paths:
        assert load_from(path, "files/a") == b"hello"
    assert mstore.info("files/a").mtime_ns == 1_000_000_000

    staged = mstore.stage("files/a", copy_existing=True)
    staged.write(5, b"!")
    staged.commit("files/b")
    assert holders(store_paths, "files/b") == [0, 1, 2]
    assert mstore.load("files/b") == b"hello!"
    assert mstore.load("files/a") == b"hello"


def test_store_stream_to_every_copy(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256])

    class OneWayStream(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            return self._data.readinto(buffer)

    mstore.store("files/stream", OneWayStream(b"streamed" * 1000))  # type: ignore[arg-type]
    for path in store_paths:
        assert load_from(path, "files/stream") == b"streamed" * 1000


def test_namespaces_and_space(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256])
    mstore.create_namespace("extra")
    assert "extra" in mstore.namespaces()
    mstore.remove_namespace("extra")
    assert "extra" not in mstore.namespaces()
    space = mstore.space()
    assert space is not None
    assert 0 < space.available <= space.total
    assert mstore.mtime_resolution_ns >= 1


def test_space_scales_by_bucket_share(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mirror = open_mstore(store_paths[:2], [256, 256]).space()
    spread = open_mstore(store_paths[:2], [128, 128]).space()
    assert mirror is not None
    assert spread is not None
    # Both stores are on one file system, so spreading over two of them doubles the room. Free space
    # is left out of the comparison because other processes change it between the two calls.
    assert spread.total == 2 * mirror.total


def test_concurrent_writes_leave_equal_copies(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256])

    def write(worker: int) -> None:
        for round_number in range(20):
            mstore.store("files/contended", f"{worker}-{round_number}".encode() * 100)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    values = {load_from(path, "files/contended") for path in store_paths}
    assert len(values) == 1


def test_set_mtime_on_every_copy(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256])
    mstore.store("files/a", b"value")
    mstore.set_mtime("files/a", 1_234_000_000_000)
    for path in store_paths:
        with store_at(path) as store:
            assert store.info("files/a").mtime_ns == 1_234_000_000_000


def test_remove_namespace_not_empty(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256])
    mstore.store("files/a", b"value")
    mstore.move("files/a", delete=True)
    with pytest.raises(DirectoryNotEmpty):
        mstore.remove_namespace("files")


def test_open_twice_raises(store_paths: list[Path], open_mstore: Callable[..., MStore]) -> None:
    mstore = open_mstore(store_paths, [256, 256, 256])
    with pytest.raises(BackendMustNotBeOpen):
        mstore.open()


# The command line


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="borgstorefs")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def store_options(paths: Sequence[Path], buckets: Sequence[int]) -> list[str]:
    options = []
    for path, count in zip(paths, buckets, strict=True):
        options += ["--store", f"file://{path}:{count}"]
    return [*options, "--kind", "data=hex-hash", "--kind", "config=generic", "--levels", "data=1"]


def test_cli_check_and_repair(
    store_paths: list[Path],
    open_mstore: Callable[..., MStore],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mstore = open_mstore(store_paths, THREE_WAY)
    for bucket in range(0, 256, 16):
        mstore.store(f"data/{hex_key(bucket)}", b"chunk")
    mstore.store("config/main", b"settings")
    mstore.close()
    shutil.rmtree(store_paths[2])
    store_at(store_paths[2]).create()
    options = store_options(store_paths, THREE_WAY)

    assert run_cli(["mstore", "check", *options]) == EXIT_PROBLEMS
    output = capsys.readouterr()
    assert "config/main: missing copy on store 2" in output.out
    assert "check: [" in output.err

    state = tmp_path / "repair-state.json"
    assert run_cli(["mstore", "repair", "--state", str(state), *options]) == 0
    output = capsys.readouterr()
    assert "repair: [" in output.err
    assert not state.exists()
    assert run_cli(["mstore", "check", *options]) == 0
    assert holders(store_paths, "config/main") == [0, 1, 2]


def test_cli_with_store_missing(
    store_paths: list[Path], open_mstore: Callable[..., MStore], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"value")
    mstore.close()
    shutil.rmtree(store_paths[1])
    options = store_options(store_paths[:2], [256, 256])

    assert run_cli(["mstore", "check", *options]) == EXIT_PROBLEMS
    assert "files/a: cannot check store 1" in capsys.readouterr().out
    assert run_cli(["mstore", "repair", "--state", str(tmp_path / "state.json"), *options]) == EXIT_PROBLEMS
    assert "not repaired: files/a" in capsys.readouterr().out


def test_cli_verify_finds_same_size_difference(
    store_paths: list[Path], open_mstore: Callable[..., MStore], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"new")
    mstore.close()
    with store_at(store_paths[1]) as store:
        store.store("files/a", b"old")
        store.set_mtime("files/a", 1_000_000_000)
    options = store_options(store_paths[:2], [256, 256])

    assert run_cli(["mstore", "check", *options]) == 0
    assert run_cli(["mstore", "check", "--verify", *options]) == EXIT_PROBLEMS
    assert "files/a: copy of other content on store 1" in capsys.readouterr().out
    assert run_cli(["mstore", "repair", "--verify", "--state", str(tmp_path / "state.json"), *options]) == 0
    assert load_from(store_paths[1], "files/a") == b"new"


def test_cli_repair_resumes_after_saved_position(
    store_paths: list[Path], open_mstore: Callable[..., MStore], tmp_path: Path
) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    for name in ("files/a", "files/b", "files/c"):
        mstore.store(name, b"value")
    mstore.close()
    for name in ("a", "b", "c"):
        (store_paths[1] / "files" / name).unlink()
    options = store_options(store_paths[:2], [256, 256])
    spec_fingerprint = _fingerprint(options)
    state = tmp_path / "state.json"
    RepairState(spec_fingerprint, ("files", False, "a"), 1, 0).save(state)

    assert run_cli(["mstore", "repair", "--state", str(state), *options]) == 0
    assert holders(store_paths[:2], "files/a") == [0], "items up to the saved position are skipped"
    assert holders(store_paths[:2], "files/b") == [0, 1]
    assert holders(store_paths[:2], "files/c") == [0, 1]


def _fingerprint(options: list[str]) -> str:
    from borgstorefs.mstore_cli import add_spec_options, spec_from_args

    parser = argparse.ArgumentParser()
    add_spec_options(parser)
    return spec_from_args(parser.parse_args(options)).fingerprint()


def test_cli_config_file_redistributes(
    store_paths: list[Path], open_mstore: Callable[..., MStore], tmp_path: Path
) -> None:
    mstore = open_mstore(store_paths[:2], [256, 256])
    mstore.store("files/a", b"value")
    mstore.close()
    config = tmp_path / "mstore.toml"
    stores = "".join(f'[[stores]]\nurl = "file://{path}"\nbuckets = 256\n\n' for path in store_paths)
    config.write_text(stores + '[kinds]\n"data/" = "hex-hash"\n\n[levels]\n"data/" = [1]\n')
    spec = load_spec_file(config)
    assert [store.buckets for store in spec.stores] == [256, 256, 256]

    assert run_cli(["mstore", "repair", "--config", str(config), "--state", str(tmp_path / "s.json")]) == 0
    assert holders(store_paths, "files/a") == [0, 1, 2]


def test_cli_repair_from_missing_log(
    store_paths: list[Path], open_mstore: Callable[..., MStore], tmp_path: Path
) -> None:
    log = tmp_path / "missing.jsonl"
    mstore = open_mstore(store_paths[:2], [256, 256], read_repair=False, missing_log=log)
    mstore.store("files/a", b"value")
    (store_paths[0] / "files" / "a").unlink()
    assert mstore.load("files/a") == b"value"
    assert read_missing_log(log) == [MissingCopy("files/a", False, 0)]
    mstore.close()

    options = store_options(store_paths[:2], [256, 256])
    assert run_cli(["mstore", "repair", "--missing-log", str(log), *options]) == 0
    assert holders(store_paths[:2], "files/a") == [0, 1]
    assert not log.exists()
    assert not log.with_name(log.name + ".repairing").exists()


@pytest.mark.parametrize("text", ["file:///srv/a", "file:///srv/a:", ":256", "file:///srv/a:x"])
def test_store_option_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="expected URL:BUCKETS"):
        parse_store_option(text)


def test_config_file_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('copies = 2\n[[stores]]\nurl = "file:///a"\nbuckets = 256\n')
    with pytest.raises(ValueError, match=r"unknown keys .*copies"):
        load_spec_file(config)


# A mirror of a POSIX store and an SFTP store


SFTP_READY = importlib.util.find_spec("borgstorefs.backends.sftp") is not None and shutil.which("sshd") is not None


@pytest.mark.skipif(not SFTP_READY, reason="the SFTP backend (borgstorefs.backends.sftp) or sshd is not installed")
def test_sftp_posix_mirror_survives_sshd_stop(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    sshd = request.getfixturevalue("sshd")
    # One try per call, so that each call on the stopped server fails at once.
    remote = Store(sshd.url(tmp_path / "remote") + "?attempts=1&timeout=5", levels=LEVELS)
    local = Store(f"file://{tmp_path}/local", levels=LEVELS)
    # The SFTP store comes first, so reads must fall over to the POSIX copy.
    mstore = MStore([remote, local], [256, 256], KINDS, retry_interval=0.0)
    mstore.create()
    names = ["config/main", "files/a", f"data/{hex_key(9)}"]
    with mstore:
        for name in names:
            mstore.store(name, name.encode())
        sshd.stop()
        try:
            for name in names:
                assert mstore.load(name) == name.encode()
            assert [info.name for info in mstore.list("files")] == ["a"]
            with pytest.raises(BackendUnavailable):
                mstore.store("files/b", b"value")
            assert {MissingCopy(name, False, 0) for name in names} <= mstore.missing_copies
        finally:
            sshd.start()

        result = mstore.repair_missing()
        assert result.failed == []
        assert result.copied == 1, "only files/b, which the failed write left on the POSIX store, needs a copy"
        assert holders_by_store(mstore, "files/b") == [0, 1]
        mstore.store("files/a", b"new")
        assert mstore.stores[0].load("files/a") == b"new"
        assert all(report.healthy for report in mstore.scan())


def holders_by_store(mstore: MStore, name: str) -> list[int]:
    return [index for index, store in enumerate(mstore.stores) if store.info(name).exists]


def test_store_module_exports_mstore() -> None:
    import borgstorefs.store

    assert "MStore" in borgstorefs.store.__all__
    assert borgstorefs.store.MStore is MStore
