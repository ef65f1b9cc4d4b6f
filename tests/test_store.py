"""The Store: names, nesting levels, soft deletion and listing, on every backend."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from borgstorefs.names import MAX_KEY_LENGTH
from borgstorefs.nesting import nesting_dirs
from borgstorefs.store import (
    ROOTNS,
    BackendMustBeOpen,
    DirectoryNotEmpty,
    ItemInfo,
    ObjectAlreadyExists,
    ObjectNotFound,
    Store,
)

LEVELS = {"config/": [0], "data/": [2], "mixed/": [0, 1, 2]}


def hex_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def store(make_url: Callable[[], str]) -> Iterator[Store]:
    # Created flat, so that the 65,536 nesting directories of level 2 are not
    # made for every test; they appear on demand as items are stored.
    url = make_url()
    Store(url, levels={"config/": [0]}).create()
    store = Store(url, levels=LEVELS)
    store.open()
    yield store
    store.close()
    store.destroy()


def keys(infos: Iterator[ItemInfo]) -> list[str]:
    return [info.name for info in infos]


# Round trips


@pytest.mark.parametrize("name", ["config/main", "data/" + hex_key("a"), "mixed/" + hex_key("b"), "rootitem"])
def test_store_load_round_trip(store: Store, name: str) -> None:
    store.store(name, b"value of " + name.encode())
    assert store.load(name) == b"value of " + name.encode()


def test_partial_loads(store: Store) -> None:
    name = "data/" + hex_key("partial")
    value = os.urandom(10_000)
    store.store(name, value)
    for offset in (0, 1, 4095, 5000, 9999, 10_000, 20_000):
        assert store.load(name, offset=offset, size=100) == value[offset : offset + 100]
    assert store.load(name, offset=-10) == value[-10:]


def test_store_from_file_object(store: Store) -> None:
    value = os.urandom(5_000_000)
    store.store("config/stream", io.BytesIO(value))
    assert store.load("config/stream") == value


def test_missing_item_names_name(store: Store) -> None:
    with pytest.raises(ObjectNotFound, match="config/missing"):
        store.load("config/missing")


def test_info_reports_key_and_size(store: Store) -> None:
    store.store("config/main", b"12345")
    info = store.info("config/main")
    assert info.name == "main"
    assert info.exists
    assert info.size == 5
    assert info.mtime_ns is not None


def test_set_mtime(store: Store) -> None:
    store.store("config/main", b"x")
    store.set_mtime("config/main", 1_400_000_000_000_000_000)
    assert store.info("config/main").mtime_ns == 1_400_000_000_000_000_000


def test_closed_store_raises(make_url: Callable[[], str]) -> None:
    store = Store(make_url(), levels={"config/": [0]})
    store.create()
    with pytest.raises(BackendMustBeOpen):
        store.store("config/main", b"x")
    with pytest.raises(BackendMustBeOpen):
        store.list("config")
    store.destroy()


# Nesting


def test_nested_layout_on_disk(store: Store, backend_kind: str) -> None:
    key = hex_key("layout")
    store.store(f"data/{key}", b"x")
    store.store("config/main", b"y")
    assert store.backend.info(f"data/{key[:2]}/{key[2:4]}/{key}").exists
    assert store.backend.info("config/main").exists


def test_create_precreates_nesting_dirs(make_url: Callable[[], str]) -> None:
    store = Store(make_url(), levels={"config/": [0], "data/": [1]})
    store.create()
    with store:
        assert store.backend.info("config").directory
        assert [info.name for info in store.backend.list("data")] == [f"{i:02x}" for i in range(256)]
    store.destroy()


def test_nesting_dirs_of_level_two() -> None:
    dirs = list(nesting_dirs("data", 2))
    assert len(dirs) == 65_536
    assert dirs[0] == "data/00/00"
    assert dirs[-1] == "data/ff/ff"


def test_new_items_go_to_last_level(store: Store) -> None:
    key = hex_key("mixed")
    store.store(f"mixed/{key}", b"x")
    assert store.find(f"mixed/{key}") == f"mixed/{key[:2]}/{key[2:4]}/{key}"


@pytest.mark.parametrize("level", [0, 1])
def test_reads_find_older_levels(store: Store, level: int) -> None:
    key = hex_key(f"old{level}")
    nested = "/".join(["mixed", *[key[2 * i : 2 * i + 2] for i in range(level)], key])
    store.backend.store(nested, b"old level")
    name = f"mixed/{key}"
    assert store.find(name) == nested
    assert store.load(name) == b"old level"
    assert store.info(name).size == 9
    store.store(name, b"overwritten")
    assert store.backend.load(nested) == b"overwritten"
    assert keys(store.list("mixed")) == [key]


def test_change_level_migrates(store: Store) -> None:
    key = hex_key("migrate")
    store.backend.store(f"mixed/{key}", b"flat")
    store.move(f"mixed/{key}", change_level=True)
    assert not store.backend.info(f"mixed/{key}").exists
    assert store.backend.load(f"mixed/{key[:2]}/{key[2:4]}/{key}") == b"flat"
    assert store.load(f"mixed/{key}") == b"flat"


def test_delete_and_move_find_older_level(store: Store) -> None:
    key = hex_key("older")
    store.backend.store(f"mixed/{key[:2]}/{key}", b"level one")
    store.move(f"mixed/{key}", delete=True)
    assert store.backend.info(f"mixed/{key[:2]}/{key}.del").exists
    store.delete(f"mixed/{key}", deleted=True)
    assert keys(store.list("mixed", deleted=True)) == []


def test_short_key_rejected_for_deep_level(store: Store) -> None:
    with pytest.raises(ValueError, match="too short for nesting level 2"):
        store.store("data/abc", b"x")


def test_short_key_uses_shallow_level(store: Store) -> None:
    store.backend.store("mixed/ab", b"flat")
    assert store.load("mixed/ab") == b"flat"


def test_mixed_levels_list_sorted(store: Store) -> None:
    names = sorted(hex_key(str(i)) for i in range(60))
    for i, key in enumerate(names):
        level = i % 3
        nested = "/".join(["mixed", *[key[2 * j : 2 * j + 2] for j in range(level)], key])
        store.backend.store(nested, b"x")
    assert keys(store.list("mixed")) == names


@pytest.mark.slow
@pytest.mark.parametrize("level", [0, 1, 2])
def test_ten_thousand_keys_listed(make_url: Callable[[], str], backend_kind: str, level: int) -> None:
    count = 10_000 if backend_kind == "posixfs" else 1_000
    url = make_url()
    Store(url).create()
    store = Store(url, levels={"data/": [level]})
    with store:
        names = sorted(hex_key(f"k{i}") for i in range(count))
        for key in names:
            store.store(f"data/{key}", b"")
        assert keys(store.list("data")) == names
    store.destroy()


# Soft deletion


def test_soft_delete_and_undelete(store: Store) -> None:
    name = "config/main"
    store.store(name, b"value")
    store.move(name, delete=True)
    assert not store.info(name).exists
    assert store.info(name, deleted=True).exists
    assert store.load(name, deleted=True) == b"value"
    assert keys(store.list("config")) == []
    assert keys(store.list("config", deleted=True)) == ["main"]
    store.move(name, undelete=True)
    assert store.load(name) == b"value"
    assert keys(store.list("config", deleted=True)) == []


def test_soft_delete_replaces_older_copy(store: Store) -> None:
    store.store("config/main", b"first")
    store.move("config/main", delete=True)
    store.store("config/main", b"second")
    store.move("config/main", delete=True)
    assert store.load("config/main", deleted=True) == b"second"


def test_undelete_never_replaces_live_item(store: Store) -> None:
    store.store("config/main", b"old")
    store.move("config/main", delete=True)
    store.store("config/main", b"new")
    with pytest.raises(ObjectAlreadyExists):
        store.move("config/main", undelete=True)
    assert store.load("config/main") == b"new"
    assert store.load("config/main", deleted=True) == b"old"


def test_purge_soft_deleted_item(store: Store) -> None:
    store.store("config/main", b"value")
    store.move("config/main", delete=True)
    store.delete("config/main", deleted=True)
    assert not store.info("config/main", deleted=True).exists


def test_soft_deleted_nested_layout(store: Store) -> None:
    key = hex_key("gone")
    store.store(f"data/{key}", b"x")
    store.move(f"data/{key}", delete=True)
    assert store.backend.info(f"data/{key[:2]}/{key[2:4]}/{key}.del").exists


# Rename


def test_rename_across_namespaces(store: Store) -> None:
    store.store("config/a", b"value")
    store.move("config/a", "other/b")
    assert store.load("other/b") == b"value"
    assert not store.info("config/a").exists


def test_rename_without_replace(store: Store) -> None:
    store.store("config/a", b"a")
    store.store("config/b", b"b")
    with pytest.raises(ObjectAlreadyExists):
        store.move("config/a", "config/b", replace=False)
    assert store.load("config/b") == b"b"


def test_move_modes_exclusive(store: Store) -> None:
    store.store("config/a", b"a")
    with pytest.raises(ValueError, match="choose one"):
        store.move("config/a", delete=True, undelete=True)
    with pytest.raises(ValueError, match="needs new_name"):
        store.move("config/a")


# Staging


def test_stage_commit_under_new_name(store: Store) -> None:
    staged = store.stage("config/first")
    staged.write(0, b"hello")
    staged.commit("config/second")
    assert store.load("config/second") == b"hello"
    assert not store.info("config/first").exists


def test_stage_copy_existing(store: Store) -> None:
    store.store("config/main", b"0123456789")
    with store.stage("config/main", copy_existing=True) as staged:
        staged.write(3, b"abc")
        staged.commit()
    assert store.load("config/main") == b"012abc6789"


# Namespaces


def test_namespaces_listed(store: Store) -> None:
    store.store("rootitem", b"x")
    store.store("data/" + hex_key("d"), b"x")
    store.store("mixed/" + hex_key("m"), b"x")
    assert store.namespaces() == ["config", "data", "mixed"]
    assert keys(store.list(ROOTNS)) == ["rootitem"]


def test_create_and_remove_namespace(store: Store) -> None:
    store.create_namespace("fresh")
    assert "fresh" in store.namespaces()
    store.remove_namespace("fresh")
    assert "fresh" not in store.namespaces()


def test_remove_namespace_with_trash(store: Store) -> None:
    store.store("config/main", b"x")
    store.move("config/main", delete=True)
    with pytest.raises(DirectoryNotEmpty):
        store.remove_namespace("config")


def test_levels_detected_on_open(store: Store, make_url: Callable[[], str]) -> None:
    key = hex_key("detect")
    store.store(f"data/{key}", b"x")
    store.store("config/main", b"y")
    reopened = Store(store.url)
    with reopened:
        assert reopened.levels_of("data") == (2,)
        assert reopened.levels_of("config") == (0,)
        assert reopened.load(f"data/{key}") == b"x"


# Names

INVALID_NAMES = [
    ("../x", ValueError),
    ("/etc/passwd", ValueError),
    ("a/../../b", ValueError),
    ("config/../x", ValueError),
    ("config/a\x00b", ValueError),
    ("config/caf\u00e9", ValueError),
    ("config/\u0430bc", ValueError),  # Cyrillic a, a lookalike
    ("config/a\\b", ValueError),
    ("config/Upper", ValueError),
    ("config/has space", ValueError),
    ("config/x.del", ValueError),
    ("config/x.tmp", ValueError),
    ("config/.hidden", ValueError),
    ("config/", ValueError),
    ("a/b/c", ValueError),
    ("config/" + "k" * (MAX_KEY_LENGTH + 1), ValueError),
    (b"config/main", TypeError),
    (None, TypeError),
]


@pytest.mark.parametrize(("name", "error"), INVALID_NAMES)
def test_invalid_names_rejected(store: Store, name: object, error: type[Exception]) -> None:
    operations: list[Callable[[], object]] = [
        lambda: store.store(name, b"x"),  # type: ignore[arg-type]
        lambda: store.load(name),  # type: ignore[arg-type]
        lambda: store.info(name),  # type: ignore[arg-type]
        lambda: store.delete(name),  # type: ignore[arg-type]
        lambda: store.move(name, delete=True),  # type: ignore[arg-type]
    ]
    if name is not None:  # new_name=None means "no rename target", a different error
        operations.append(lambda: store.move("config/main", name))  # type: ignore[arg-type]
    store.store("config/main", b"kept")
    for operation in operations:
        with pytest.raises(error):
            operation()
    assert store.load("config/main") == b"kept"


def test_invalid_name_message_names_value_and_rule(store: Store) -> None:
    with pytest.raises(ValueError, match=r"'Upper': must be lowercase"):
        store.store("config/Upper", b"x")


def test_longest_key_fits(store: Store) -> None:
    key = "k" * MAX_KEY_LENGTH
    store.store(f"config/{key}", b"x")
    store.move(f"config/{key}", delete=True)
    assert keys(store.list("config", deleted=True)) == [key]


# Statistics


def test_stats_count_calls_and_bytes(store: Store) -> None:
    store.store("config/main", b"12345")
    store.load("config/main")
    list(store.list("config"))
    stats = store.stats
    assert stats["store_calls"] == 1
    assert stats["store_volume"] == 5
    assert stats["load_volume"] == 5
    assert stats["list_calls"] == 1


def test_changes_grow_with_each_change_only(store: Store) -> None:
    changes = store.changes
    store.store("config/main", b"12345")
    assert store.changes > changes
    for change in (
        lambda: store.set_mtime("config/main", 1_600_000_000_000_000_000),
        lambda: store.move("config/main", "config/other"),
        lambda: store.move("config/other", delete=True),
        lambda: store.delete("config/other", deleted=True),
    ):
        changes = store.changes
        change()
        assert store.changes > changes
    store.store("config/main", b"12345")
    changes = store.changes
    store.info("config/main")
    store.load("config/main", offset=1, size=2)
    list(store.list("config"))
    assert store.changes == changes


def test_changed_since_names_each_change(store: Store) -> None:
    store.store("config/a", b"1")
    store.store("config/b", b"2")
    since = store.changes
    assert store.changed_since(since, "config/a") is False
    store.move("config/a", "config/c")
    store.set_mtime("config/b", 1_600_000_000_000_000_000)
    assert store.changed_since(since, "config/a") is True
    assert store.changed_since(since, "config/b") is True
    assert store.changed_since(since, "config/c") is True
    assert store.changed_since(since, "config/d") is False


def test_changed_since_unknown_after_many_changes(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("borgstorefs.store.CHANGE_LOG_SIZE", 3)
    since = store.changes
    for key in "abcde":
        store.store(f"config/{key}", b"v")
    assert store.changed_since(since, "config/z") is None
    assert store.changed_since(store.changes, "config/z") is False


def test_latency_emulation(make_url: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BORGSTOREFS_LATENCY_MS", "20")
    store = Store(make_url(), levels={"config/": [0]})
    store.create()
    with store:
        store.store("config/main", b"x")
        store.load("config/main")
        assert store.stats["load_time"] >= 0.02
    store.destroy()


# Compatibility


def test_borgstore_layout(tmp_path: Path) -> None:
    """A store made by this library has borgstore's directory tree for the same levels."""
    store = Store(f"file://{tmp_path}/store", levels={"config/": [0], "data/": [1]})
    store.create()
    with store:
        key = hex_key("compat")
        store.store(f"data/{key}", b"x")
        store.store("config/main", b"y")
        store.move("config/main", delete=True)
    top = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert top == ["config", "data"]
    assert len(list((tmp_path / "store/data").iterdir())) == 256
    assert (tmp_path / "store/data" / key[:2] / key).read_bytes() == b"x"
    assert (tmp_path / "store/config/main.del").read_bytes() == b"y"


def test_list_kinds_matches_list(store: Store) -> None:
    store.store("data/00000000", b"x")
    store.store("settings", b"y")
    store.move("settings", delete=True)

    listed = {(entry.name, entry.directory) for entry in store.backend.list("")}

    assert set(store.backend.list_kinds("")) == listed
    assert ("data", True) in listed
    assert ("settings.del", False) in listed


@pytest.mark.parametrize("mtime_ns", [None, 1_500_000_000_000_000_000])
def test_commit_returns_stored_info(store: Store, mtime_ns: int | None) -> None:
    staged = store.stage("config/main")
    staged.write(0, b"12345")

    info = staged.commit(mtime_ns=mtime_ns)

    # Only backends without their own staged values may return None, and every tested backend has them.
    assert info is not None
    assert info == store.info("config/main")
