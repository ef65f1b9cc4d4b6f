"""The inode table: stable numbers, kernel lookup counts, renames, collisions and bounded memory."""

from __future__ import annotations

import pytest

from borgstorefs import inodes
from borgstorefs.inodes import ROOT_INODE, TRASH_INODE, InodeTable, NodeKind, UnknownInode

FILE = NodeKind.FILE
TRASH_FILE = NodeKind.TRASH_FILE


def test_fixed_directories() -> None:
    table = InodeTable()

    assert table.get(ROOT_INODE) is table.root
    assert table.get(TRASH_INODE) is table.trash_root
    assert table.find(NodeKind.ROOT, "", "") is table.root
    assert len(table) == 2


def test_unknown_inode_raises() -> None:
    with pytest.raises(UnknownInode):
        InodeTable().get(12345)


def test_number_stable_after_forget() -> None:
    table = InodeTable()
    node = table.add(FILE, "data", "0123")
    table.remember(node)
    number = node.ino

    table.forget(number, 1)

    assert len(table) == 2
    assert table.add(FILE, "data", "0123").ino == number


def test_views_get_distinct_numbers() -> None:
    table = InodeTable()
    live = table.add(FILE, "data", "0123")
    trash = table.add(TRASH_FILE, "data", "0123")
    namespace = table.add(NodeKind.NAMESPACE, "data", "")

    assert len({live.ino, trash.ino, namespace.ino, ROOT_INODE, TRASH_INODE}) == 5


def test_node_kept_while_counted() -> None:
    table = InodeTable()
    node = table.add(FILE, "ns", "key")
    table.remember(node, 2)

    table.forget(node.ino, 1)
    assert table.get(node.ino) is node

    table.forget(node.ino, 1)
    with pytest.raises(UnknownInode):
        table.get(node.ino)


def test_open_handle_keeps_node() -> None:
    table = InodeTable()
    node = table.add(FILE, "ns", "key")
    table.remember(node)
    table.opened(node)

    table.forget(node.ino, 1)
    assert table.get(node.ino) is node

    table.closed(node)
    with pytest.raises(UnknownInode):
        table.get(node.ino)


def test_forget_unknown_ignored() -> None:
    table = InodeTable()

    table.forget(999_999, 3)

    assert len(table) == 2


def test_listed_node_joins_when_remembered() -> None:
    table = InodeTable()

    node = table.listed(FILE, "ns", "key", inodes.derived_inode(FILE, "ns", "key"))

    assert len(table) == 2  # only the fixed directories: an entry the kernel rejected leaves nothing
    table.remember(node)
    assert table.find(FILE, "ns", "key") is node
    assert table.add(FILE, "ns", "key") is node
    assert node.lookups == 1


def test_listed_finds_known_node() -> None:
    table = InodeTable()
    known = table.add(FILE, "ns", "key")

    assert table.listed(FILE, "ns", "key", inodes.derived_inode(FILE, "ns", "key")) is known
    assert table.listed(NodeKind.TRASH_ROOT, "", "", TRASH_INODE) is table.trash_root


def test_listed_probes_past_taken_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inodes, "_derived_inode", lambda identity: inodes.InodeNo(1000))
    table = InodeTable()
    table.remember(table.add(FILE, "ns", "a"))

    second = table.listed(FILE, "ns", "b", inodes.derived_inode(FILE, "ns", "b"))
    assert len(table) == 3  # not added before the kernel takes the entry
    table.remember(second)

    assert second.ino != 1000
    assert table.find(FILE, "ns", "b") is second
    table.forget(second.ino, 1)
    assert table._aliases == {}


def test_remember_readds_dropped_node() -> None:
    table = InodeTable()
    node = table.add(FILE, "ns", "key")
    table.remember(node)
    table.forget(node.ino, 1)
    assert table.find(FILE, "ns", "key") is None

    table.remember(node)  # a lookup that found the node before the kernel forgot it

    assert table.get(node.ino) is node
    assert table.find(FILE, "ns", "key") is node


def test_move_follows_rename() -> None:
    table = InodeTable()
    moved = table.add(FILE, "ns", "old")
    target = table.add(FILE, "ns", "new")
    table.remember(target)

    replaced = table.move(moved, FILE, "ns", "new")

    assert replaced is target
    assert not target.attached
    assert table.find(FILE, "ns", "new") is moved
    assert table.find(FILE, "ns", "old") is None
    assert table.get(target.ino) is target  # still held by the kernel


def test_old_name_after_move_gets_new_number() -> None:
    table = InodeTable()
    moved = table.add(FILE, "ns", "old")
    table.remember(moved)
    table.move(moved, FILE, "ns", "new")

    again = table.add(FILE, "ns", "old")

    assert again is not moved
    assert again.ino != moved.ino
    assert table.find(FILE, "ns", "old") is again
    assert table.find(FILE, "ns", "new") is moved


def test_collision_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inodes, "_derived_inode", lambda identity: inodes.InodeNo(1000))
    table = InodeTable()
    first = table.add(FILE, "ns", "a")
    second = table.add(FILE, "ns", "b")
    table.remember(first)
    table.remember(second)

    assert first.ino == 1000
    assert second.ino != 1000
    assert table.find(FILE, "ns", "a") is first
    assert table.find(FILE, "ns", "b") is second

    table.forget(second.ino, 1)
    assert table.find(FILE, "ns", "b") is None
    assert table._aliases == {}


def test_detach_hides_name() -> None:
    table = InodeTable()
    node = table.add(FILE, "ns", "key")
    table.remember(node)

    table.detach(node)

    assert table.find(FILE, "ns", "key") is None
    assert table.get(node.ino) is node
    table.forget(node.ino, 1)
    assert len(table) == 2


def test_memory_bounded_after_forget() -> None:
    table = InodeTable()
    numbers = []
    for i in range(100_000):
        node = table.add(FILE, "many", f"{i:064x}")
        table.remember(node)
        numbers.append(node.ino)

    assert len(table) == 100_002
    assert len(set(numbers)) == 100_000
    for number in numbers:
        table.forget(number, 1)
    assert len(table) == 2
    assert table._aliases == {}
