"""The file system model: a store seen as a tree of directories and files, without pyfuse3.

The tree:

- ``/`` lists the namespaces as directories, the items of the root namespace
  as files, and the hidden directory ``.trash``.
- ``/<namespace>/`` lists the keys of the namespace as flat files, whatever
  their nesting level in the store.
- ``/.trash/`` mirrors the namespaces; ``/.trash/<namespace>/<key>`` is each
  soft-deleted item, and ``/.trash/<key>`` each soft-deleted root item.

File names map to keys through `filenames` only. Every store call runs in a
worker thread of a `StoreRunner`. A lookup costs at most one info-sized
request, a directory listing one `Store.list` pass. The methods mirror the
FUSE operations; `fuse_ops` adapts them to pyfuse3, and the errors they raise
become errno values in `errnos`. See ``docs/semantics.md`` for the behaviour
promised to programs.

Task safety: every method runs in the trio thread. Per-file state is guarded
by the `FileState` lock; table and handle maps change only between awaits.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import trio

from .errnos import FSError
from .errors import ObjectAlreadyExists, ObjectNotFound
from .filenames import decode_key, encode_name
from .handles import FileHandle, FileHandleNo, FileState, KernelPages
from .inodes import DIRECTORY_KINDS, TRASH_INODE, InodeNo, InodeTable, Node, NodeKind, derived_inode
from .names import MAX_KEY_LENGTH, ROOTNS
from .nesting import fits_level
from .store import ItemInfo, Store
from .workers import StoreRunner

__all__ = [
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "TRASH_NAME",
    "Attributes",
    "FSOptions",
    "FileSystem",
    "ListedEntry",
    "SpaceStats",
]

logger = logging.getLogger(__name__)

TRASH_NAME = b".trash"
"""Name of the trash directory at the root; no key can have it, because keys never start with '.'."""

RENAME_NOREPLACE = 1
"""Linux ``renameat2`` flag: fail with EEXIST instead of replacing the target."""

RENAME_EXCHANGE = 2
"""Linux ``renameat2`` flag: swap source and target (not supported: EINVAL)."""

BLOCK_SIZE = 4096
"""Block size reported by ``stat`` and ``statfs``, in bytes."""

UNKNOWN_CAPACITY = 1 << 50
"""Total and free bytes reported by ``statfs`` when the backend cannot tell (1 PiB)."""

REPORTED_INODES = 1 << 32
"""Total and free inode counts reported by ``statfs``; the store has no inode limit."""

MTIME_MEMO_SIZE = 100_000
"""Exact modification times remembered for backends that store whole seconds (see `FileSystem`)."""

HIDDEN_KEY_WARNINGS = 1000
"""Keys without a file name that are logged one by one; later ones are only counted."""

INDEX_AFTER_LOOKUPS = 64
"""Store lookups in one namespace, within `INDEX_WINDOW` seconds, after which the namespace is
listed once and further lookups are served from that listing (see `FileSystem`)."""

INDEX_WINDOW = 2.0

INDEX_WAIT = 1.0
"""Seconds a lookup waits for a listing of its namespace in progress before it calls the store itself."""

INDEX_MAX_KEYS = 500_000
"""Largest namespace listed for lookups (about 150 bytes of memory per key)."""


@dataclass(frozen=True)
class FSOptions:
    """Mount-wide settings of the model. Timeouts are in seconds."""

    read_only: bool = False
    attr_timeout: float = 10.0
    entry_timeout: float = 10.0
    negative_timeout: float = 10.0
    read_around: int = 0
    """Bytes loaded around a small read at a new place, the rest kept in the kernel's page cache (0: off)."""
    uid: int = 0
    gid: int = 0


class Attributes(NamedTuple):
    """Attributes of a node for ``stat``; ``mode`` includes the file type bits."""

    inode: InodeNo
    mode: int
    size: int
    mtime_ns: int

    @property
    def is_directory(self) -> bool:
        return stat.S_ISDIR(self.mode)


class ListedEntry(NamedTuple):
    """One directory entry for ``readdirplus``, with the offset of the entry after it."""

    name: bytes
    attributes: Attributes
    next_offset: int
    node: Node | None
    """The node whose kernel lookups a reply with this entry counts, or None for ``.`` and ``..``."""
    cacheable: bool = True
    """False for an entry changed through this mount since the listing started, whose current
    attributes are unknown. Its name and attributes may be out of date, so the kernel must not cache them."""


class SpaceStats(NamedTuple):
    """File system statistics for ``statfs``; sizes in `block_size` units."""

    block_size: int
    blocks: int
    blocks_free: int
    blocks_available: int
    files: int
    files_free: int
    name_max: int


class _Listing(NamedTuple):
    name: bytes
    kind: NodeKind
    namespace: str
    key: str
    size: int
    mtime_ns: int
    derived: InodeNo
    """`derived_inode` of the identity, computed in the listing's worker thread."""


class _Directory:
    """An open directory: a snapshot of its entries, taken by the first ``readdir``.

    The snapshot grows while a worker thread lists the store (`FileSystem._fill`),
    so that the first entries of a large namespace reach the kernel before the
    last ones are read. ``entries`` only grows, and only in the trio thread.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.entries: list[_Listing] | None = None
        self.listed_at = 0.0  # time.monotonic() when the listing started
        self.changes: int | None = None
        """`Store.changes` when the listing started, or None for stores without a change log (MStore)."""
        self.complete = False
        self.failure: Exception | None = None
        """The error that ended the listing early, raised to the ``readdir`` that needs the missing entries."""
        self.listing = 0
        """Number of the listing in progress: batches of an earlier one (before a rewind) are dropped."""
        self.closed = False
        self.grown = trio.Event()
        """Set, and then replaced, each time entries arrive or the listing ends."""

    def wake(self) -> None:
        self.grown.set()
        self.grown = trio.Event()


class _KeyIndex:
    """The items of one namespace as listed from ``listed_at`` on: key -> (size, mtime_ns).

    ``changes`` is `Store.changes` when the listing started.
    """

    __slots__ = ("changes", "items", "listed_at")

    def __init__(self, items: dict[str, tuple[int, int | None]], changes: int, listed_at: float) -> None:
        self.items = items
        self.changes = changes
        self.listed_at = listed_at


class FileSystem:
    """The store as a POSIX-like tree, with every operation that the FUSE adapter forwards.

    For backends that keep whole-second modification times (SFTP), the exact
    time set by ``utimens`` is remembered for `MTIME_MEMO_SIZE` items and
    reported while the store still has the matching whole second. That way a
    second ``rsync -a`` on the same mount sees equal times and transfers
    nothing; after a remount those items show whole seconds.
    """

    def __init__(self, store: Store, options: FSOptions | None = None, runner: StoreRunner | None = None) -> None:
        self.store = store
        self.options = options or FSOptions()
        self.runner = runner or StoreRunner()
        self.inodes = InodeTable()
        self.invalidate_entry: Callable[[InodeNo, bytes], None] = _ignore_invalidation
        """Set by the adapter: invalidates a cached directory entry in the kernel."""
        self.spawn: Callable[..., object] | None = None
        self.kernel_pages: KernelPages | None = None
        """Set by the adapter: access to the kernel's page cache (see `FSOptions.read_around`)."""
        """A nursery's ``start_soon`` for writes behind (see `FileState`); None writes synchronously."""
        self._files: dict[InodeNo, FileState] = {}
        self._handles: dict[FileHandleNo, FileHandle] = {}
        self._directories: dict[int, _Directory] = {}
        self._numbers = itertools.count(1)
        self._started_ns = time.time_ns()
        self._directory_mtimes: dict[tuple[NodeKind, str], int] = {}
        # A Store has one backend; a store over several (MStore) reports the coarsest resolution itself.
        resolution: int = getattr(store, "mtime_resolution_ns", 0) or getattr(store.backend, "mtime_resolution_ns", 1)
        self._mtime_resolution = max(1, resolution)
        self._mtime_memo: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._hidden_keys: set[str] = set()
        self._hidden_key_count = 0
        self._indexes: dict[str, _KeyIndex] = {}
        self._index_lookups: dict[str, tuple[int, float]] = {}  # namespace: (store lookups, window start)
        self._indexing: dict[str, trio.Event] = {}  # namespace: set when its listing for lookups ends
        write_bits = 0 if self.options.read_only else 0o200
        self._file_mode = stat.S_IFREG | 0o444 | write_bits
        self._directory_mode = stat.S_IFDIR | 0o555 | write_bits

    # Attributes

    def _directory_attributes(self, node: Node) -> Attributes:
        mtime = self._directory_mtimes.get((node.kind, node.namespace), self._started_ns)
        return Attributes(node.ino, self._directory_mode, 0, mtime)

    def _file_attributes(self, node: Node) -> Attributes:
        state = self._files.get(node.ino)
        if state is not None and state.dirty:
            return Attributes(node.ino, self._file_mode, state.size, state.mtime_ns)
        return Attributes(node.ino, self._file_mode, node.size, node.mtime_ns)

    def attributes(self, node: Node) -> Attributes:
        """Return the attributes of *node* as last known, without a store call."""
        return self._directory_attributes(node) if node.kind.is_directory else self._file_attributes(node)

    def _note_info(self, node: Node, info: ItemInfo) -> None:
        node.size = info.size
        node.mtime_ns = self._reported_mtime(node.store_name, info.mtime_ns)
        node.fetched = time.monotonic()

    def _reported_mtime(self, name: str, stored_ns: int | None) -> int:
        if stored_ns is None:
            return self._started_ns
        if self._mtime_memo:
            remembered = self._mtime_memo.get(name)
            if remembered is not None and remembered[0] == stored_ns:
                return remembered[1]
        return stored_ns

    def _remember_mtime(self, name: str, mtime_ns: int) -> None:
        if self._mtime_resolution <= 1:
            return
        stored = mtime_ns - mtime_ns % self._mtime_resolution
        self._mtime_memo[name] = (stored, mtime_ns)
        self._mtime_memo.move_to_end(name)
        while len(self._mtime_memo) > MTIME_MEMO_SIZE:
            self._mtime_memo.popitem(last=False)

    def _fresh(self, node: Node) -> bool:
        return node.fetched > 0 and time.monotonic() - node.fetched < self.options.attr_timeout

    # Names

    def _child_key(self, parent: Node, name: bytes) -> str:
        if not parent.kind.is_directory:
            raise FSError(errno.ENOTDIR, f"{parent!r} is not a directory")
        return encode_name(name)

    def _parent_of(self, node: Node) -> Node:
        if node.kind == NodeKind.NAMESPACE:
            return self.inodes.root
        if node.kind == NodeKind.TRASH_NAMESPACE:
            return self.inodes.trash_root
        return self.inodes.root

    def _can_exist(self, namespace: str, key: str) -> bool:
        # A key that fits a level fits every lower one, so checking the lowest level suffices.
        return fits_level(key, min(self.store.levels_of(namespace)))

    def _check_creatable(self, namespace: str, key: str) -> None:
        if not fits_level(key, self.store.levels_of(namespace)[-1]):
            raise FSError(errno.EINVAL, f"key {key!r} is too short for the nesting of namespace {namespace!r}")

    def _check_writable(self, parent: Node, action: str) -> None:
        if parent.kind.in_trash:
            raise FSError(errno.EPERM, f"cannot {action} in the trash")
        if self.options.read_only:
            raise FSError(errno.EROFS, f"cannot {action}: the mount is read-only")

    # Lookup and attributes

    async def lookup(self, parent_ino: int, name: bytes) -> Attributes | None:
        """Return the attributes of *name* in directory *parent_ino*, or None if it does not exist.

        A found node gains one kernel lookup. Costs at most one info request
        (two for a root item of the trash).
        """
        parent = self.inodes.get(parent_ino)
        node = await self._resolve(parent, name)
        if node is None:
            return None
        if name not in (b".", b".."):
            self.inodes.remember(node)
        return self.attributes(node)

    async def _resolve(self, parent: Node, name: bytes) -> Node | None:
        if name == b".":
            return parent
        if name == b"..":
            return self._parent_of(parent)
        if parent.kind == NodeKind.ROOT and name == TRASH_NAME:
            return self.inodes.trash_root
        key = self._child_key(parent, name)
        if parent.kind in (NodeKind.ROOT, NodeKind.TRASH_ROOT):
            return await self._resolve_at_root(parent, key)
        kind = NodeKind.TRASH_FILE if parent.kind.in_trash else NodeKind.FILE
        return await self._resolve_file(kind, parent.namespace, key)

    async def _resolve_at_root(self, parent: Node, key: str) -> Node | None:
        in_trash = parent.kind.in_trash
        known = self.inodes.find(NodeKind.TRASH_NAMESPACE if in_trash else NodeKind.NAMESPACE, key, "")
        if known is not None:
            return known
        info = await self.runner.run_quick(self.store.info, key)
        if info.exists and info.directory:
            return self.inodes.add(NodeKind.TRASH_NAMESPACE if in_trash else NodeKind.NAMESPACE, key, "")
        if not in_trash:
            return self._file_node(NodeKind.FILE, ROOTNS, key, info, self.inodes.find(NodeKind.FILE, ROOTNS, key))
        return await self._resolve_file(NodeKind.TRASH_FILE, ROOTNS, key)

    async def _resolve_file(self, kind: NodeKind, namespace: str, key: str) -> Node | None:
        node = self.inodes.find(kind, namespace, key)
        state = self._files.get(node.ino) if node is not None else None
        if state is not None and state.dirty and not state.unlinked:
            return node  # created or changed here and not committed yet
        if not self._can_exist(namespace, key):
            return None
        info = None
        waited = False
        if kind == NodeKind.FILE:
            listing = self._indexing.get(namespace)
            if listing is not None:
                # The listing uses a store session, so a lookup now could have to open another one.
                with trio.move_on_after(INDEX_WAIT):
                    await listing.wait()
                waited = True
            info = self._indexed_info(namespace, key)
        if info is None:
            name = f"{namespace}/{key}" if namespace else key
            info = await self.runner.run_quick(self.store.info, name, deleted=kind == NodeKind.TRASH_FILE)
            waited = True
            if kind == NodeKind.FILE:
                self._count_store_lookup(namespace)
        if waited:  # the table may have changed during the wait
            node = self.inodes.find(kind, namespace, key)
        return self._file_node(kind, namespace, key, info, node)

    # Lookups served from a listing
    #
    # A program that looks up many names of one namespace in a row (rsync
    # comparing its file list, a backup tool checking what exists) would pay
    # one store call per name, a network round trip over SFTP. After
    # INDEX_AFTER_LOOKUPS of them the namespace is listed once in the
    # background, and lookups are served from that listing while it is
    # younger than entry_timeout. A name that changed through this mount since
    # the listing started is looked up in the store (`Store.changed_since`).
    # Changes by other clients of the store show after entry_timeout at the
    # latest: the kernel caches looked-up names that long anyway. Namespaces
    # with nesting levels are not listed, since that reads every nesting
    # directory.

    def _indexed_info(self, namespace: str, key: str) -> ItemInfo | None:
        """Return the facts about *key* from its namespace's listing, or None if there is no valid listing."""
        index = self._indexes.get(namespace)
        if index is None:
            return None
        changed = self.store.changed_since(index.changes, f"{namespace}/{key}" if namespace else key)
        if changed is None or time.monotonic() - index.listed_at > self.options.entry_timeout:
            del self._indexes[namespace]
            return None
        if changed:
            return None
        found = index.items.get(key)
        if found is None:
            return ItemInfo(key, False, 0, False)
        return ItemInfo(key, True, found[0], False, found[1])

    def _count_store_lookup(self, namespace: str) -> None:
        changes = getattr(self.store, "changes", None)
        if (
            changes is None  # several stores (MStore) keep no change log
            or self.spawn is None
            or self.options.entry_timeout <= 0
            or namespace in self._indexing
            or namespace in self._indexes  # it looks up the names that changed since the listing
        ):
            return
        now = time.monotonic()
        count, window_start = self._index_lookups.get(namespace, (0, now))
        if now - window_start > INDEX_WINDOW:
            count, window_start = 0, now
        count += 1
        self._index_lookups[namespace] = (count, window_start)
        if count < INDEX_AFTER_LOOKUPS:
            return
        if any(level != 0 for level in self.store.levels_of(namespace)):
            return
        del self._index_lookups[namespace]
        self._indexing[namespace] = trio.Event()
        self.spawn(self._build_index, namespace, changes)

    async def _build_index(self, namespace: str, changes: int) -> None:
        listed_at = time.monotonic()
        try:
            items = await self.runner.run(self._index_items, namespace)
        except Exception as error:
            # Lookups go on with one store call each, as before; only the listing is lost.
            logger.warning("listing namespace %r for lookups failed: %s", namespace, error)
        else:
            if items is None:
                logger.info(
                    "namespace %r has more than %d keys: lookups are not served from a listing",
                    namespace,
                    INDEX_MAX_KEYS,
                )
            else:
                self._indexes[namespace] = _KeyIndex(items, changes, listed_at)
                logger.debug("serving lookups in %r from a listing of %d keys", namespace, len(items))
        finally:
            self._indexing.pop(namespace).set()

    def _index_items(self, namespace: str) -> dict[str, tuple[int, int | None]] | None:
        items = {}
        for info in self.store.list(namespace):
            if len(items) >= INDEX_MAX_KEYS:
                return None
            items[info.name] = (info.size, info.mtime_ns)
        return items

    def _file_node(self, kind: NodeKind, namespace: str, key: str, info: ItemInfo, known: Node | None) -> Node | None:
        """Return the node of the file that *info* describes, or None if it shows none.

        *known* is `InodeTable.find`'s result for the file, taken after the caller's last await.
        """
        state = self._files.get(known.ino) if known is not None else None
        if state is not None and state.dirty and not state.unlinked:
            return known  # created or changed here and not committed yet: the store does not know it
        if not info.exists or info.directory:
            return None
        node = known if known is not None else self.inodes.add(kind, namespace, key)
        self._note_info(node, info)
        return node

    async def getattr(self, ino: int) -> Attributes:
        """Return the attributes of inode *ino*, from the store once the cached ones are older than the timeout."""
        node = self.inodes.get(ino)
        if node.kind.is_directory:
            return self._directory_attributes(node)
        state = self._files.get(node.ino)
        if (state is not None and state.dirty) or self._fresh(node) or not node.attached:
            return self._file_attributes(node)
        info = await self.runner.run_quick(self.store.info, node.store_name, deleted=node.kind == NodeKind.TRASH_FILE)
        if not info.exists:
            raise ObjectNotFound(node.store_name)
        self._note_info(node, info)
        return self._file_attributes(node)

    async def setattr(
        self, ino: int, *, size: int | None = None, mtime_ns: int | None = None, fh: int | None = None
    ) -> Attributes:
        """Truncate and set the modification time; mode and owner changes are accepted and ignored.

        EPERM for size or time changes in the trash, EROFS on a read-only mount.
        """
        node = self.inodes.get(ino)
        if size is None and mtime_ns is None:
            return await self.getattr(ino)
        if self.options.read_only:
            raise FSError(errno.EROFS, "cannot change attributes: the mount is read-only")
        if node.kind.is_directory:
            if mtime_ns is not None:
                self._directory_mtimes[(node.kind, node.namespace)] = mtime_ns
            return self._directory_attributes(node)
        if node.kind.in_trash:
            raise FSError(errno.EPERM, f"cannot change {node.store_name!r} in the trash")
        if size is not None:
            await self._truncate(node, size, by_path=fh is None)
        if mtime_ns is not None:
            await self._set_mtime(node, mtime_ns)
        return await self.getattr(ino)

    async def _truncate(self, node: Node, size: int, *, by_path: bool) -> None:
        state = self._files.get(node.ino)
        if state is not None:
            await state.truncate(size)
            if by_path:
                # truncate(2) by path is visible at once, and the handles still
                # open may all be read-only ones that never commit.
                await state.commit()
            return
        if not self._fresh(node):
            await self.getattr(node.ino)
        state = FileState(self.store, self.runner, node, spawn=self.spawn)
        await state.truncate(size)
        await state.commit()

    async def _set_mtime(self, node: Node, mtime_ns: int) -> None:
        state = self._files.get(node.ino)
        if state is not None and state.dirty:
            state.set_mtime(mtime_ns)
            self._remember_mtime(node.store_name, mtime_ns)
            return
        await self.runner.run_quick(self.store.set_mtime, node.store_name, mtime_ns)
        self._remember_mtime(node.store_name, mtime_ns)
        node.mtime_ns = mtime_ns
        node.fetched = time.monotonic() if node.fetched else 0.0
        node.cache_version = None

    def forget(self, pairs: list[tuple[int, int]]) -> None:
        """Drop kernel lookups: *pairs* contains ``(inode, count)`` tuples. Never raises."""
        for ino, count in pairs:
            self.inodes.forget(ino, count)

    # Directories

    async def opendir(self, ino: int) -> int:
        """Return a directory handle for inode *ino*; ENOTDIR for a file."""
        node = self.inodes.get(ino)
        if not node.kind.is_directory:
            raise FSError(errno.ENOTDIR, f"{node!r} is not a directory")
        number = next(self._numbers)
        self._directories[number] = _Directory(node)
        self.inodes.opened(node)
        return number

    async def readdir(self, dh: int, start: int) -> Iterator[ListedEntry]:
        """Return the entries of open directory *dh* from offset *start* (0: the beginning).

        The first call starts one `Store.list` pass and keeps its entries, so
        that the kernel's many ``readdirplus`` requests cost no further store
        calls. It returns as soon as the first entries are there. Starting
        again at 0 lists again. The caller must pass every entry it replies
        with, and only those, to `count_listed`.
        """
        directory = self._directories.get(dh)
        if directory is None:
            raise FSError(errno.EBADF, f"directory handle {dh} is not open")
        if directory.entries is None or start == 0:
            await self._start_listing(directory)
        assert directory.entries is not None
        # Offsets 0 and 1 are "." and "..": the first call waits for one entry too,
        # so that a listing that fails at once fails this call, as a whole listing would.
        needed = max(start - 2, 0)
        while not directory.complete and len(directory.entries) <= needed:
            await directory.grown.wait()
        if directory.failure is not None and len(directory.entries) <= needed:
            raise directory.failure
        return self._entries_from(directory, start)

    def _entries_from(self, directory: _Directory, start: int) -> Iterator[ListedEntry]:
        node = directory.node
        entries = directory.entries or []
        dotted = ((b".", node), (b"..", self._parent_of(node)))
        for offset in range(start, 2):
            name, target = dotted[offset]
            yield ListedEntry(name, self.attributes(target), offset + 1, None)
        # This loop runs once per entry of listings of 100,000 keys and more, while the
        # kernel waits for the batch. So the names it uses are bound outside it.
        listed = self.inodes.listed
        file_mode = self._file_mode
        dirty = {state.node.identity: state for state in self._files.values() if state.dirty}
        # Items changed through this mount since the listing started are checked one by one.
        changed = directory.changes is not None and self.store.changes != directory.changes
        for offset in range(max(start, 2), len(entries) + 2):
            entry = entries[offset - 2]
            kind = entry.kind
            target = listed(kind, entry.namespace, entry.key, entry.derived)
            cacheable = True
            if kind in DIRECTORY_KINDS:
                mtime = self._directory_mtimes.get((kind, entry.namespace), self._started_ns)
                attributes = Attributes(target.ino, self._directory_mode, 0, mtime)
            else:
                state = dirty.get((kind, entry.namespace, entry.key)) if dirty else None
                if state is not None:
                    attributes = Attributes(target.ino, file_mode, state.size, state.mtime_ns)
                elif changed and self._changed_since_listing(directory, entry):
                    if target.attached and target.fetched > directory.listed_at:
                        attributes = self._file_attributes(target)  # fetched after the change
                    else:
                        attributes = Attributes(target.ino, file_mode, entry.size, entry.mtime_ns)
                        cacheable = False
                else:
                    attributes = Attributes(target.ino, file_mode, entry.size, entry.mtime_ns)
            yield ListedEntry(entry.name, attributes, offset + 1, target, cacheable)

    def _changed_since_listing(self, directory: _Directory, entry: _Listing) -> bool:
        assert directory.changes is not None
        name = f"{entry.namespace}/{entry.key}" if entry.namespace else entry.key
        # None means that the change log no longer reaches back to the listing's start.
        return self.store.changed_since(directory.changes, name) is not False

    def count_listed(self, dh: int, entry: ListedEntry) -> None:
        """Count the kernel lookup that replying with *entry* (from `readdir` of *dh*) made.

        Each entry must be counted before the next one is taken from `readdir`'s iterator.
        """
        node = entry.node
        if node is None:
            return
        self.inodes.remember(node)
        if entry.cacheable and node.kind not in DIRECTORY_KINDS and node.ino not in self._files:
            attributes = entry.attributes
            node.size, node.mtime_ns = attributes.size, attributes.mtime_ns
            node.fetched = self._directories[dh].listed_at

    async def releasedir(self, dh: int) -> None:
        """Close directory handle *dh*."""
        directory = self._directories.pop(dh, None)
        if directory is not None:
            directory.closed = True
            self.inodes.closed(directory.node)

    async def _start_listing(self, directory: _Directory) -> None:
        directory.listing += 1
        directory.entries = []
        directory.complete = False
        directory.failure = None
        directory.listed_at = time.monotonic()
        directory.changes = getattr(self.store, "changes", None)
        if self.spawn is None:
            await self._fill(directory, directory.listing)
        else:
            self.spawn(self._fill, directory, directory.listing)

    async def _fill(self, directory: _Directory, listing: int) -> None:
        """List *directory* from the store into ``directory.entries``; an error ends up in ``directory.failure``."""

        def current() -> bool:
            return directory.listing == listing and not directory.closed

        def deliver(rows: list[_Listing]) -> bool:
            if not current():
                return False
            assert directory.entries is not None
            directory.entries.extend(rows)
            directory.wake()
            return True

        node = directory.node
        hidden: list[tuple[str, str]] = []
        try:
            await self.runner.feed(self._listing_rows(node, hidden), deliver)
        except Exception as error:
            # Raised again by the readdir that needs the missing entries, which maps it to an errno.
            logger.debug("listing %r failed: %r", node, error)
            if current():
                directory.failure = error
        else:
            for namespace, key in hidden:
                self._warn_hidden_key(namespace, key)
            if current() and node.kind in (NodeKind.ROOT, NodeKind.NAMESPACE):
                assert directory.entries is not None
                directory.entries.extend(self._uncommitted_files(node, directory.entries))
        finally:
            if directory.listing == listing:
                directory.complete = True
                directory.wake()

    def _listing_rows(self, node: Node, hidden: list[tuple[str, str]]) -> Iterator[_Listing]:
        """Yield the entries of directory *node* (in a worker thread); add the keys without file names to *hidden*."""
        deleted = node.kind.in_trash
        file_kind = NodeKind.TRASH_FILE if deleted else NodeKind.FILE
        if node.kind in (NodeKind.ROOT, NodeKind.TRASH_ROOT):
            namespace = ROOTNS
            directory_kind = NodeKind.TRASH_NAMESPACE if deleted else NodeKind.NAMESPACE
            if node.kind == NodeKind.ROOT:
                yield _Listing(TRASH_NAME, NodeKind.TRASH_ROOT, "", "", 0, 0, TRASH_INODE)
            for name in self.store.namespaces():
                decoded = decode_key(name)
                if decoded is None:
                    hidden.append((ROOTNS, name))
                else:
                    yield _Listing(decoded, directory_kind, name, "", 0, 0, derived_inode(directory_kind, name, ""))
        else:
            namespace = node.namespace
        started = self._started_ns
        memo = self._mtime_memo
        for info in self.store.list(namespace, deleted=deleted):
            decoded = decode_key(info.name)
            if decoded is None:
                hidden.append((namespace, info.name))
                continue
            mtime = info.mtime_ns if info.mtime_ns is not None else started
            if memo:
                mtime = self._reported_mtime(f"{namespace}/{info.name}" if namespace else info.name, mtime)
            derived = derived_inode(file_kind, namespace, info.name)
            yield _Listing(decoded, file_kind, namespace, info.name, info.size, mtime, derived)

    def _uncommitted_files(self, node: Node, listing: list[_Listing]) -> list[_Listing]:
        """Return entries for files created here and not yet in the store."""
        pending = [
            state.node
            for state in self._files.values()
            if state.dirty
            and not state.unlinked
            and state.node.kind == NodeKind.FILE
            and state.node.namespace == node.namespace
        ]
        if not pending:
            return []
        listed = {entry.key for entry in listing if entry.kind == NodeKind.FILE}
        extra = []
        for pending_node in pending:
            name = decode_key(pending_node.key)
            if pending_node.key not in listed and name is not None:
                identity = pending_node.identity
                extra.append(_Listing(name, *identity, 0, 0, derived_inode(*identity)))
        return extra

    def _warn_hidden_key(self, namespace: str, key: str) -> None:
        where = f"{namespace}/{key}" if namespace else key
        if where in self._hidden_keys:
            return
        self._hidden_key_count += 1
        if self._hidden_key_count <= HIDDEN_KEY_WARNINGS:
            self._hidden_keys.add(where)
            logger.warning("store key %r is hidden: it is not the encoding of any file name", where)
        elif self._hidden_key_count == HIDDEN_KEY_WARNINGS + 1:
            logger.warning("more than %d store keys are hidden; further ones are not logged", HIDDEN_KEY_WARNINGS)

    async def mkdir(self, parent_ino: int, name: bytes) -> Attributes:
        """Create a namespace at the root; EPERM elsewhere, EEXIST if it exists. The node gains one lookup."""
        parent = self.inodes.get(parent_ino)
        self._check_writable(parent, "create a directory")
        if parent.kind != NodeKind.ROOT:
            raise FSError(errno.EPERM, "directories exist only at the root: namespaces do not nest")
        namespace = self._child_key(parent, name)
        info = await self.runner.run_quick(self.store.info, namespace)
        if info.exists:
            raise ObjectAlreadyExists(namespace)
        await self.runner.run(self.store.create_namespace, namespace)
        logger.info("created namespace %r", namespace)
        node = self.inodes.add(NodeKind.NAMESPACE, namespace, "")
        self.inodes.remember(node)
        return self._directory_attributes(node)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        """Remove an empty namespace; ENOTEMPTY if it contains live or soft-deleted items."""
        parent = self.inodes.get(parent_ino)
        if parent.kind == NodeKind.ROOT and name == TRASH_NAME:
            raise FSError(errno.EPERM, "the trash directory cannot be removed")
        self._check_writable(parent, "remove a directory")
        if parent.kind != NodeKind.ROOT:
            raise FSError(errno.ENOTDIR, "namespaces hold only files")
        namespace = self._child_key(parent, name)
        info = await self.runner.run_quick(self.store.info, namespace)
        if not info.exists:
            raise ObjectNotFound(namespace)
        if not info.directory:
            raise FSError(errno.ENOTDIR, f"{namespace!r} is a file")
        await self.runner.run(self.store.remove_namespace, namespace)
        logger.info("removed namespace %r", namespace)
        for kind in (NodeKind.NAMESPACE, NodeKind.TRASH_NAMESPACE):
            node = self.inodes.find(kind, namespace, "")
            if node is not None:
                self.inodes.detach(node)

    # Removing and renaming files

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        """Soft-delete a live file into the trash, or purge a file in the trash for good."""
        parent = self.inodes.get(parent_ino)
        if self.options.read_only:
            raise FSError(errno.EROFS, "cannot remove: the mount is read-only")
        key = self._child_key(parent, name)
        if parent.kind == NodeKind.ROOT and await self._is_namespace(key):
            raise FSError(errno.EISDIR, f"{key!r} is a namespace directory")
        if parent.kind.in_trash:
            await self._purge(parent, key)
        else:
            await self._soft_delete(parent, key, name)

    async def _is_namespace(self, key: str) -> bool:
        if self.inodes.find(NodeKind.NAMESPACE, key, "") is not None:
            return True
        if self.inodes.find(NodeKind.FILE, ROOTNS, key) is not None:
            return False
        info = await self.runner.run_quick(self.store.info, key)
        return info.exists and info.directory

    async def _purge(self, parent: Node, key: str) -> None:
        if parent.kind == NodeKind.TRASH_ROOT and await self._is_namespace(key):
            raise FSError(errno.EPERM, "namespaces in the trash cannot be removed")
        namespace = parent.namespace
        name = f"{namespace}/{key}" if namespace else key
        await self.runner.run_quick(self.store.delete, name, deleted=True)
        logger.debug("purged %r from the trash", name)
        node = self.inodes.find(NodeKind.TRASH_FILE, namespace, key)
        if node is not None:
            self._detach(node)

    async def _soft_delete(self, parent: Node, key: str, name: bytes) -> None:
        namespace = parent.namespace
        store_name = f"{namespace}/{key}" if namespace else key
        node = self.inodes.find(NodeKind.FILE, namespace, key)
        state = self._files.get(node.ino) if node is not None else None
        try:
            await self.runner.run_quick(self.store.move, store_name, delete=True)
        except ObjectNotFound:
            if state is None or not state.dirty:
                raise
            # Created here and never committed: there is nothing to move.
            state.unlinked = True
            self._detach(node)  # type: ignore[arg-type]
            return
        logger.debug("soft-deleted %r", store_name)
        if node is not None:
            if state is not None and state.dirty:
                state.unlinked = True
            replaced = self.inodes.move(node, NodeKind.TRASH_FILE, namespace, key)
            if replaced is not None:
                self._mark_unlinked(replaced)
        else:
            replaced = self.inodes.find(NodeKind.TRASH_FILE, namespace, key)
            if replaced is not None:
                self._detach(replaced)
        trash_parent = (
            self.inodes.find(NodeKind.TRASH_NAMESPACE, namespace, "") if namespace else self.inodes.trash_root
        )
        if trash_parent is not None:
            self.invalidate_entry(trash_parent.ino, name)

    def _detach(self, node: Node) -> None:
        self._mark_unlinked(node)
        self.inodes.detach(node)

    def _mark_unlinked(self, node: Node) -> None:
        state = self._files.get(node.ino)
        if state is not None:
            state.unlinked = True

    async def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int
    ) -> None:
        """Rename a file, or restore one from the trash (``.trash/<ns>/<key>`` to ``<ns>/<key>`` only).

        Replaces an existing target unless `RENAME_NOREPLACE` is set (then
        EEXIST). A restore never replaces a live item (EEXIST). EPERM for
        namespaces, for moves into the trash and for restores under another
        name; EINVAL for `RENAME_EXCHANGE`.
        """
        if flags & RENAME_EXCHANGE:
            raise FSError(errno.EINVAL, "exchanging two names is not supported")
        old_parent = self.inodes.get(old_parent_ino)
        new_parent = self.inodes.get(new_parent_ino)
        if self.options.read_only:
            raise FSError(errno.EROFS, "cannot rename: the mount is read-only")
        old_key = self._child_key(old_parent, old_name)
        new_key = self._child_key(new_parent, new_name)
        if old_parent.kind in (NodeKind.ROOT, NodeKind.TRASH_ROOT) and await self._is_namespace(old_key):
            raise FSError(errno.EPERM, "namespaces cannot be renamed")
        if new_parent.kind.in_trash:
            raise FSError(errno.EPERM, "files cannot be moved into the trash: remove them instead")
        if old_parent.kind.in_trash:
            await self._restore(old_parent, old_key, new_parent, new_key)
            return
        if new_parent.kind == NodeKind.ROOT and await self._is_namespace(new_key):
            raise FSError(errno.EISDIR, f"{new_key!r} is a namespace directory")
        self._check_creatable(new_parent.namespace, new_key)
        await self._rename_file(old_parent.namespace, old_key, new_parent.namespace, new_key, flags)

    async def _restore(self, old_parent: Node, old_key: str, new_parent: Node, new_key: str) -> None:
        if old_parent.namespace != new_parent.namespace or old_key != new_key:
            raise FSError(errno.EPERM, "a soft-deleted item can only be restored under its own name and namespace")
        namespace = old_parent.namespace
        name = f"{namespace}/{old_key}" if namespace else old_key
        await self.runner.run_quick(self.store.move, name, undelete=True)
        logger.debug("restored %r from the trash", name)
        node = self.inodes.find(NodeKind.TRASH_FILE, namespace, old_key)
        if node is not None:
            replaced = self.inodes.move(node, NodeKind.FILE, namespace, old_key)
            if replaced is not None:
                self._mark_unlinked(replaced)

    async def _rename_file(self, old_ns: str, old_key: str, new_ns: str, new_key: str, flags: int) -> None:
        old_name = f"{old_ns}/{old_key}" if old_ns else old_key
        new_name = f"{new_ns}/{new_key}" if new_ns else new_key
        if old_name == new_name:
            return
        node = self.inodes.find(NodeKind.FILE, old_ns, old_key)
        state = self._files.get(node.ino) if node is not None else None
        if state is not None and state.dirty:
            await state.commit()  # the store can move only a committed value
        await self.runner.run_quick(self.store.move, old_name, new_name, replace=not flags & RENAME_NOREPLACE)
        logger.debug("renamed %r to %r", old_name, new_name)
        memo = self._mtime_memo.pop(old_name, None)
        if memo is not None:
            self._mtime_memo[new_name] = memo
        if node is not None:
            replaced = self.inodes.move(node, NodeKind.FILE, new_ns, new_key)
        else:
            replaced = self.inodes.find(NodeKind.FILE, new_ns, new_key)
            if replaced is not None:
                self.inodes.detach(replaced)
        if replaced is not None:
            self._mark_unlinked(replaced)

    async def symlink(self) -> None:
        """Refuse: the store has no symbolic links (EPERM)."""
        raise FSError(errno.EPERM, "symbolic links are not supported")

    async def link(self) -> None:
        """Refuse: an item has exactly one name (EPERM)."""
        raise FSError(errno.EPERM, "hard links are not supported")

    async def mknod(self) -> None:
        """Refuse: the store has no device nodes, pipes or sockets (EPERM)."""
        raise FSError(errno.EPERM, "special files are not supported")

    # Files

    async def create(self, parent_ino: int, name: bytes, flags: int) -> tuple[FileHandleNo, Attributes]:
        """Create and open an empty file; it is in the store from its first commit (flush, fsync, close).

        The node gains one lookup. EPERM in the trash, EROFS on a read-only
        mount, EINVAL or ENAMETOOLONG for names that cannot be stored.
        """
        parent = self.inodes.get(parent_ino)
        self._check_writable(parent, "create a file")
        key = self._child_key(parent, name)
        namespace = parent.namespace
        self._check_creatable(namespace, key)
        node = self.inodes.add(NodeKind.FILE, namespace, key)
        state = self._files.get(node.ino)
        if state is None:
            state = FileState(self.store, self.runner, node, new=True, spawn=self.spawn)
            self._files[node.ino] = state
        elif flags & os.O_EXCL:
            raise ObjectAlreadyExists(node.store_name)
        handle = self._open_handle(node, state, flags)
        self.inodes.remember(node)
        return handle.number, self._file_attributes(node)

    async def open(self, ino: int, flags: int) -> tuple[FileHandleNo, bool]:
        """Open inode *ino*; return the handle and whether the kernel may keep its cached pages.

        See `uses_direct_io` for the page cache of write-only handles.

        EISDIR for directories, EPERM for writing in the trash, EROFS for
        writing on a read-only mount, ENOENT if the item is gone.
        """
        node = self.inodes.get(ino)
        if node.kind.is_directory:
            raise FSError(errno.EISDIR, f"{node!r} is a directory")
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            if node.kind.in_trash:
                raise FSError(errno.EPERM, "files in the trash cannot be written")
            if self.options.read_only:
                raise FSError(errno.EROFS, "cannot write: the mount is read-only")
        state = self._files.get(node.ino)
        if (state is None or not state.dirty) and not self._fresh(node):
            # Also with handles open: `prepare_read` compares the reader they share with these attributes.
            await self.getattr(ino)
        # Looked up again after the await, and reserved before the next one: a
        # release that runs meanwhile drops a state without handles from
        # `_files`, and a handle on a dropped state would miss every later commit.
        state = self._files.get(node.ino)
        if state is None:
            state = FileState(self.store, self.runner, node, spawn=self.spawn)
            self._files[node.ino] = state
        state.handles += 1
        if not state.dirty and flags & os.O_ACCMODE != os.O_WRONLY and not flags & os.O_TRUNC:
            try:
                await state.prepare_read(self._mtime_resolution)
            except BaseException:
                state.handles -= 1
                if state.handles == 0 and self._files.get(node.ino) is state:
                    del self._files[node.ino]
                raise
        version = (node.size, node.mtime_ns)
        keep_cache = not state.dirty and node.cache_version == version
        if not state.dirty:
            node.cache_version = version
        handle = self._open_handle(node, state, flags, reserved=True)
        if writable and flags & os.O_TRUNC:
            stored = not state.dirty or state.truncated_by_open
            await state.truncate(0)
            state.truncated_by_open = stored
        return handle.number, keep_cache

    @staticmethod
    def uses_direct_io(flags: int) -> bool:
        """Return whether a handle opened with *flags* should bypass the kernel's page cache.

        True for write-only handles (``cp``, ``dd``): writes through the page
        cache cost the kernel a page allocation and a copy per 4 KiB, which
        capped a 1 GiB ``dd`` at about a tenth of the speed without it. Handles
        that also read keep the cache, because direct I/O forbids shared
        writable ``mmap``.
        """
        return flags & os.O_ACCMODE == os.O_WRONLY

    def _open_handle(self, node: Node, state: FileState, flags: int, *, reserved: bool = False) -> FileHandle:
        """Register a handle on *state*; *reserved* means the caller already counted it in ``state.handles``."""
        number = FileHandleNo(next(self._numbers))
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        handle = FileHandle(
            number,
            state,
            self.store,
            self.runner,
            writable=writable,
            append=bool(flags & os.O_APPEND),
            spawn=self.spawn,
            read_around=self.options.read_around,
            kernel_pages=self.kernel_pages,
        )
        self._handles[number] = handle
        if not reserved:
            state.handles += 1
        if writable:
            state.writers += 1
        self.inodes.opened(node)
        return handle

    def _handle(self, fh: int) -> FileHandle:
        handle = self._handles.get(FileHandleNo(fh))
        if handle is None:
            raise FSError(errno.EBADF, f"file handle {fh} is not open")
        return handle

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        """Return up to *size* bytes from *offset* of open file *fh*."""
        return await self._handle(fh).read(offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """Write *data* at *offset* (at the end for ``O_APPEND``); return the bytes written."""
        handle = self._handle(fh)
        if not handle.writable:
            raise FSError(errno.EBADF, f"file handle {fh} is not open for writing")
        state = handle.state
        if handle.append:
            offset = state.size
        return await state.write(offset, data)

    async def flush(self, fh: int) -> None:
        """Commit the file's changes if *fh* may write (every ``close``); errors reach the program."""
        handle = self._handle(fh)
        if handle.writable and handle.state.commit_on_flush:
            await handle.state.commit()

    async def fsync(self, fh: int) -> None:
        """Commit the file's changes durably: on stable storage of the backend before returning."""
        await self._handle(fh).state.commit(durable=True)

    async def release(self, fh: int) -> None:
        """Close handle *fh*; the last handle of a file commits what is left (errors are only logged)."""
        handle = self._handles.pop(FileHandleNo(fh), None)
        if handle is None:
            return
        state = handle.state
        node = state.node
        state.handles -= 1
        if handle.writable:
            state.writers -= 1
        try:
            if state.handles == 0:
                try:
                    await self._finish(state)
                finally:
                    if state.handles == 0:  # unless a new handle opened while the commit ran
                        await state.close_reader()
        finally:
            if state.handles == 0 and self._files.get(node.ino) is state:
                del self._files[node.ino]
            self.inodes.closed(node)

    async def _finish(self, state: FileState) -> None:
        if state.unlinked or state.failed:  # a failure was reported and logged when it happened
            await state.discard()
            return
        try:
            await state.commit()
        except Exception:
            logger.exception("storing %r at its last close failed; its changes are lost", state.node.store_name)

    # File system

    async def statfs(self) -> SpaceStats:
        """Return the backend's capacity, or `UNKNOWN_CAPACITY` where it cannot tell."""
        space = await self.runner.run(self.store.space)
        total, free, available = (space.total, space.free, space.available) if space else (UNKNOWN_CAPACITY,) * 3
        return SpaceStats(
            block_size=BLOCK_SIZE,
            blocks=total // BLOCK_SIZE,
            blocks_free=free // BLOCK_SIZE,
            blocks_available=available // BLOCK_SIZE,
            files=REPORTED_INODES,
            files_free=REPORTED_INODES,
            name_max=MAX_KEY_LENGTH,
        )

    async def shutdown(self) -> None:
        """Commit every file with changes, durably, before the daemon exits; errors are logged."""
        for state in list(self._files.values()):
            await state.close_reader()
            if state.unlinked:
                await state.discard()
                continue
            try:
                await state.commit(durable=True)
            except Exception:
                logger.exception("storing %r at unmount failed; its changes are lost", state.node.store_name)


def _ignore_invalidation(parent: InodeNo, name: bytes) -> None:
    """Default for `FileSystem.invalidate_entry` when no kernel is attached."""
