"""The inode table: the inode number of each directory and item, and the kernel's references to them.

A node is identified by its kind (live or trash view, directory or file), its
namespace and its key. Its inode number is derived from that identity with
Python's (per-process) `hash`. The same identity therefore gets the same
number for the life of the mount, even after the kernel forgot it and the
table dropped it. A node stays while the kernel has a lookup reference to it
(`remember` / `forget`, where every entry that ``readdirplus`` returns counts
as a lookup) or while a file handle is open on it. Listing millions of keys
therefore costs memory only for the entries the kernel keeps in its cache.

When two identities hash to the same number, or a number is still taken by a
renamed or removed node, the newcomer gets the next free number of a fixed
probe sequence, recorded in a small alias map. Such a number is stable only
while the node stays in the table.

Not thread-safe: the file system calls it from the trio thread only.
"""

from __future__ import annotations

import enum
import logging
from typing import NewType

__all__ = [
    "DIRECTORY_KINDS",
    "ROOT_INODE",
    "TRASH_INODE",
    "InodeNo",
    "InodeTable",
    "Node",
    "NodeKind",
    "UnknownInode",
    "derived_inode",
]

logger = logging.getLogger(__name__)

InodeNo = NewType("InodeNo", int)
"""A FUSE inode number (``nodeid``)."""

ROOT_INODE = InodeNo(1)
"""The mount's root directory; FUSE fixes this number."""

TRASH_INODE = InodeNo(2)
"""The ``/.trash`` directory."""

FIRST_DERIVED_INODE = 16
"""Numbers below this are reserved for fixed directories."""

_INODE_MASK = (1 << 63) - 1  # positive 64-bit numbers, safe for signed C types in tools


class NodeKind(enum.IntEnum):
    """The type of a node and its view (live or trash)."""

    ROOT = 1
    TRASH_ROOT = 2
    NAMESPACE = 3
    TRASH_NAMESPACE = 4
    FILE = 5
    TRASH_FILE = 6

    @property
    def is_directory(self) -> bool:
        return self in DIRECTORY_KINDS

    @property
    def in_trash(self) -> bool:
        return self in _TRASH_KINDS


DIRECTORY_KINDS = frozenset({NodeKind.ROOT, NodeKind.TRASH_ROOT, NodeKind.NAMESPACE, NodeKind.TRASH_NAMESPACE})
"""The kinds whose nodes are directories. In loops, a set test is cheaper than `NodeKind.is_directory`."""
_TRASH_KINDS = frozenset({NodeKind.TRASH_ROOT, NodeKind.TRASH_NAMESPACE, NodeKind.TRASH_FILE})

_FIXED_KINDS = frozenset({NodeKind.ROOT, NodeKind.TRASH_ROOT})

Identity = tuple[NodeKind, str, str]


class UnknownInode(LookupError):
    """The kernel named an inode number that the table does not hold (stale handle)."""


class Node:
    """One inode: its identity, the kernel's lookup count, open handles and cached attributes.

    ``namespace`` is `names.ROOTNS` (``""``) for the root namespace and ``key``
    is ``""`` for directories. ``attached`` is False once no name leads to the
    node any more (its item was replaced or purged) while the kernel or a
    handle still refers to it. ``size`` (bytes) and ``mtime_ns`` are the last known
    attributes, fetched at ``fetched`` (`time.monotonic` seconds, 0 if never).
    ``cache_version`` is the ``(size, mtime_ns)`` that the kernel's page cache
    holds, or None; an open that finds the same version keeps that cache.
    """

    __slots__ = (
        "attached",
        "cache_version",
        "fetched",
        "ino",
        "key",
        "kind",
        "lookups",
        "mtime_ns",
        "namespace",
        "opens",
        "size",
    )

    def __init__(self, ino: InodeNo, kind: NodeKind, namespace: str, key: str) -> None:
        self.ino = ino
        self.kind = kind
        self.namespace = namespace
        self.key = key
        self.lookups = 0
        self.opens = 0
        self.attached = True
        self.size = 0
        self.mtime_ns = 0
        self.fetched = 0.0
        self.cache_version: tuple[int, int] | None = None

    def __repr__(self) -> str:
        state = "" if self.attached else ", detached"
        return f"Node({self.ino}, {self.kind.name}, {self.namespace!r}, {self.key!r}{state})"

    @property
    def identity(self) -> Identity:
        return (self.kind, self.namespace, self.key)

    @property
    def store_name(self) -> str:
        """The name of the node's item in the store (``namespace/key`` or ``key``)."""
        return f"{self.namespace}/{self.key}" if self.namespace else self.key


class InodeTable:
    """Inode numbers of the nodes that the kernel has looked up or that have open handles."""

    def __init__(self) -> None:
        self._nodes: dict[InodeNo, Node] = {}
        self._aliases: dict[Identity, InodeNo] = {}
        self.root = self._add_fixed(ROOT_INODE, NodeKind.ROOT)
        self.trash_root = self._add_fixed(TRASH_INODE, NodeKind.TRASH_ROOT)

    def _add_fixed(self, ino: InodeNo, kind: NodeKind) -> Node:
        node = Node(ino, kind, "", "")
        self._nodes[ino] = node
        return node

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, ino: int) -> Node:
        """Return the node with inode number *ino*; `UnknownInode` if the table does not hold it."""
        node = self._nodes.get(InodeNo(ino))
        if node is None:
            raise UnknownInode(f"inode {ino} is not known")
        return node

    def find(self, kind: NodeKind, namespace: str, key: str) -> Node | None:
        """Return the attached node with this identity, or None."""
        if kind == NodeKind.ROOT:
            return self.root
        if kind == NodeKind.TRASH_ROOT:
            return self.trash_root
        identity = (kind, namespace, key)
        return self._find(identity, _derived_inode(identity))

    def _find(self, identity: Identity, derived: InodeNo) -> Node | None:
        # Called once per directory entry listed: fields are compared without building a tuple.
        node = self._nodes.get(derived)
        if node is not None and node.attached and (node.kind, node.namespace, node.key) == identity:
            return node
        alias = self._aliases.get(identity)
        return self._nodes[alias] if alias is not None else None

    def listed(self, kind: NodeKind, namespace: str, key: str, derived: InodeNo) -> Node:
        """Return the node for a directory entry: the attached one, or a new one that `remember` adds.

        *derived* is `derived_inode` of the identity, which a caller that lists
        many entries computes elsewhere. A new node's number is free now and
        stays free only until the table changes: remember the node before any
        other change, or not at all. A new node whose derived number is taken
        gets the next free one; `remember` then records the alias.
        """
        if kind in _FIXED_KINDS:
            return self.add(kind, namespace, key)
        node = self._find((kind, namespace, key), derived)
        if node is not None:
            return node
        return Node(self._free_inode(derived), kind, namespace, key)

    def add(self, kind: NodeKind, namespace: str, key: str) -> Node:
        """Return the attached node with this identity, made if needed; lookup counts are not changed."""
        if kind in _FIXED_KINDS:
            return self.root if kind == NodeKind.ROOT else self.trash_root
        identity = (kind, namespace, key)
        derived = _derived_inode(identity)
        node = self._find(identity, derived)
        if node is not None:
            return node
        ino = self._free_inode(derived)
        node = Node(ino, kind, namespace, key)
        self._nodes[ino] = node
        if ino != derived:
            self._aliases[identity] = ino
        return node

    def _free_inode(self, derived: InodeNo) -> InodeNo:
        ino = derived
        while ino in self._nodes:
            ino = _next_probe(ino)
        return ino

    # Reference counts

    def remember(self, node: Node, count: int = 1) -> None:
        """Count *count* kernel lookups of *node* (lookup, create, mkdir, each readdirplus entry)."""
        if self._nodes.get(node.ino) is not node:
            self._adopt(node)
        node.lookups += count

    def _adopt(self, node: Node) -> None:
        """Add a node made by `listed`, or one dropped since it was found, at its own number."""
        if node.ino in self._nodes:
            raise RuntimeError(f"inode {node.ino} was taken before {node!r} was remembered")
        self._nodes[node.ino] = node
        identity = node.identity
        if node.ino != _derived_inode(identity):
            self._aliases[identity] = node.ino

    def forget(self, ino: int, count: int) -> None:
        """Drop *count* kernel lookups of inode *ino*, and the node once nothing refers to it.

        Never raises: the kernel may forget a number the table no longer has.
        """
        node = self._nodes.get(InodeNo(ino))
        if node is None:
            logger.debug("forget of unknown inode %d ignored", ino)
            return
        node.lookups = max(0, node.lookups - count)
        self._drop_if_unused(node)

    def opened(self, node: Node) -> None:
        """Count an open handle on *node*; it stays in the table until `closed`."""
        node.opens += 1

    def closed(self, node: Node) -> None:
        """Count a released handle on *node*."""
        node.opens = max(0, node.opens - 1)
        self._drop_if_unused(node)

    def _drop_if_unused(self, node: Node) -> None:
        if node.lookups or node.opens or node.ino in (ROOT_INODE, TRASH_INODE):
            return
        del self._nodes[node.ino]
        self._unname(node)

    # Names

    def move(self, node: Node, kind: NodeKind, namespace: str, key: str) -> Node | None:
        """Give *node* a new identity, as after a rename; return the node that had it, now detached."""
        previous = self.find(kind, namespace, key)
        if previous is node:
            return None
        if previous is not None:
            self.detach(previous)
        self._unname(node)
        node.kind, node.namespace, node.key = kind, namespace, key
        node.attached = True
        identity = node.identity
        if node.ino != _derived_inode(identity):
            self._aliases[identity] = node.ino
        return previous

    def detach(self, node: Node) -> None:
        """Make *node* unreachable by name; it stays while the kernel or a handle refers to it."""
        self._unname(node)
        node.attached = False
        self._drop_if_unused(node)

    def _unname(self, node: Node) -> None:
        identity = node.identity
        if self._aliases.get(identity) == node.ino:
            del self._aliases[identity]


def derived_inode(kind: NodeKind, namespace: str, key: str) -> InodeNo:
    """Return the number that an identity gets unless another node has it. Safe in any thread."""
    return _derived_inode((kind, namespace, key))


def _derived_inode(identity: Identity) -> InodeNo:
    ino = hash(identity) & _INODE_MASK
    if ino < FIRST_DERIVED_INODE:
        ino += FIRST_DERIVED_INODE
    return InodeNo(ino)


def _next_probe(ino: InodeNo) -> InodeNo:
    # A linear congruential step with full period modulo 2**63 (odd increment,
    # multiplier 1 mod 4), so the sequence does not cycle among taken numbers.
    following = (ino * 6364136223846793005 + 1442695040888963407) & _INODE_MASK
    return InodeNo(following if following >= FIRST_DERIVED_INODE else following + FIRST_DERIVED_INODE)
