"""The key/value store: names, nesting and soft deletion on top of one backend.

A `Store` turns ``namespace/key`` names into nested backend names according
to a per-namespace levels configuration, soft-deletes by renaming an item to
``<name>.del``, lists namespaces recursively through the nesting, and counts
calls, bytes and time per operation.

Thread safety: a `Store` may be used from several threads at once. It keeps
no per-item state; its counters are guarded by a lock, and the backend is
thread-safe by contract.

Two environment variables make a local backend behave like a remote one in
tests and benchmarks. ``BORGSTOREFS_LATENCY_MS`` adds that many milliseconds
to every backend request. ``BORGSTOREFS_BANDWIDTH_MIBPS`` caps the bytes
loaded and stored, in MiB per second.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import BinaryIO, ParamSpec, Self, TypeVar

from .backends import Backend, ItemInfo, PosixFS, SpaceInfo, StagedValue, ValueReader, get_backend, redact_url
from .backends._base import item_name
from .errors import (
    BackendAlreadyExists,
    BackendDoesNotExist,
    BackendError,
    BackendMustBeOpen,
    BackendMustNotBeOpen,
    BackendUnavailable,
    BackendURLInvalid,
    DirectoryNotEmpty,
    NoBackendGiven,
    NoSpaceLeft,
    ObjectAlreadyExists,
    ObjectNotFound,
    PermissionDenied,
)
from .names import DEL_SUFFIX, MAX_KEY_LENGTH, ROOTNS, TMP_SUFFIX, split_name, validate_namespace
from .nesting import (
    DEFAULT_LEVELS,
    MAX_LEVEL,
    Levels,
    LevelsConfig,
    fits_level,
    is_nesting_dir,
    nest,
    nesting_dirs,
    parse_levels_config,
)

__all__ = [
    "DEL_SUFFIX",
    "MAX_KEY_LENGTH",
    "ROOTNS",
    "TMP_SUFFIX",
    "Backend",
    "BackendAlreadyExists",
    "BackendDoesNotExist",
    "BackendError",
    "BackendMustBeOpen",
    "BackendMustNotBeOpen",
    "BackendURLInvalid",
    "BackendUnavailable",
    "DirectoryNotEmpty",
    "ItemInfo",
    "NoBackendGiven",
    "NoSpaceLeft",
    "ObjectAlreadyExists",
    "ObjectNotFound",
    "PermissionDenied",
    "PosixFS",
    "SpaceInfo",
    "StagedItem",
    "Store",
    "StoreReader",
    "ValueReader",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

STATS_OPERATIONS = ("info", "load", "store", "delete", "move", "list")

CHANGE_LOG_SIZE = 100_000
"""Names whose latest change a store remembers for `Store.changed_since` (about 100 bytes each)."""


class StagedDelegate:
    """Base of the staged items of `Store` and `MStore`: random access to a value being written.

    Subclasses provide `commit`. *staged* is the underlying staged value
    (a backend `StagedValue` or a `StagedItem`). Not thread-safe: the owner
    serializes calls.
    """

    def __init__(self, name: str, staged: StagedValue | StagedItem) -> None:
        self.name = name
        self._staged = staged

    @property
    def size(self) -> int:
        """Current size of the staged value in bytes."""
        return self._staged.size

    def write(self, offset: int, data: bytes) -> int:
        """Write *data* at *offset*; a gap past the end reads as zeros."""
        return self._staged.write(offset, data)

    def read(self, offset: int, size: int) -> bytes:
        """Return up to *size* bytes from *offset* of the staged value."""
        return self._staged.read(offset, size)

    def truncate(self, size: int) -> None:
        """Cut or zero-extend the staged value to *size* bytes."""
        self._staged.truncate(size)

    def discard(self) -> None:
        """Drop the staged value; the stored item, if any, is unchanged."""
        self._staged.discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


class StagedItem(StagedDelegate):
    """A value being written to a store, invisible until `commit` (see `Store.stage`).

    Not thread-safe: the owner serializes calls. `commit` looks the target up
    when it runs, so an item renamed while it was written lands under its new
    name.
    """

    def __init__(self, store: Store, name: str, staged: StagedValue) -> None:
        super().__init__(name, staged)
        self._store = store

    def commit(self, name: str | None = None, *, mtime_ns: int | None = None, durable: bool = False) -> ItemInfo | None:
        """Store the value as *name* (default: the name it was staged for), replacing any old value.

        Returns the stored item's `ItemInfo`, whose ``name`` is the key, if the
        backend has it without another request (see `StagedValue.commit`), or None.
        """
        target = name if name is not None else self.name
        nested_name = self._store.find(target)
        size = self._staged.size
        with self._store._operation("store", f"commit({target!r})", size, changes=(target,)):
            return self._staged.commit(nested_name, mtime_ns=mtime_ns, durable=durable)


class StoreReader(ValueReader):
    """A value opened with `Store.open_reader`: the backend's reader, with each read counted as a load."""

    def __init__(self, store: Store, name: str, reader: ValueReader) -> None:
        super().__init__(reader.size, reader.mtime_ns)
        self.name = name
        self._store = store
        self._reader = reader

    def __repr__(self) -> str:
        return f"StoreReader({self.name!r}, {self._reader!r})"

    def read(self, offset: int, size: int) -> bytes:
        with self._store._operation("load", f"read({self.name!r}, offset={offset}, size={size})") as operation:
            value = self._reader.read(offset, size)
            operation.volume = len(value)
        return value

    def close(self) -> None:
        self._reader.close()


class Store:
    """A key/value store on one backend, chosen by *url* or given as *backend*.

    *levels* maps namespaces (``"data/"`` or ``"data"``) to the nesting
    levels that may hold its items, such as ``{"config/": [0], "data/": [2]}``.
    New items go to the last listed level; reads find an item at any listed
    level. A namespace missing from *levels* uses the levels detected in the
    store when it is opened, or `DEFAULT_LEVELS` (flat) if it has no items.
    """

    def __init__(
        self,
        url: str | None = None,
        backend: Backend | None = None,
        levels: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        if backend is None:
            if url is None:
                raise NoBackendGiven("a Store needs a url or a backend")
            backend = get_backend(url)
        self.url = url
        self.backend = backend
        self.levels_config: LevelsConfig = parse_levels_config(levels)
        self._detected_levels: LevelsConfig = {}
        self._stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._changes = 0
        self._change_log: OrderedDict[str, int] = OrderedDict()  # name: number of its latest change
        self._forgotten_changes = 0  # the latest change number that the log dropped
        self._latency = float(os.environ.get("BORGSTOREFS_LATENCY_MS", "0")) / 1000
        self._bandwidth = float(os.environ.get("BORGSTOREFS_BANDWIDTH_MIBPS", "0")) * 1024 * 1024

    def __repr__(self) -> str:
        where = redact_url(self.url) if self.url else repr(self.backend)
        return f"Store({where})"

    # Lifecycle

    def create(self) -> None:
        """Create the backend's base location and, like borgstore, the configured nesting directories."""
        self.backend.create()
        if not self.backend.precreate_dirs:
            return
        with self.backend:
            for namespace, levels in self.levels_config.items():
                self._make_namespace_dirs(namespace, max(levels))

    def _make_namespace_dirs(self, namespace: str, level: int) -> None:
        if level == 0:
            if namespace:
                self.backend.mkdir(namespace)
            return
        # NOTE: borgstore makes all 2**(8*level) directories; past level 2
        # (65,536) they are made on demand by `store` instead.
        if level > 2:
            self.backend.mkdir(namespace)
            return
        self.backend.mkdirs(nesting_dirs(namespace, level))

    def destroy(self) -> None:
        """Remove the store and everything in it."""
        self.backend.destroy()

    def open(self) -> None:
        """Open the backend and detect the levels of namespaces the configuration does not name."""
        self.backend.open()
        try:
            self._detected_levels = self.detect_levels()
        except BaseException:
            self.backend.close()
            raise
        logger.info("opened %r", self)

    def close(self) -> None:
        """Close the backend; further operations raise `BackendMustBeOpen`."""
        self.backend.close()
        logger.info("closed %r", self)

    def __enter__(self) -> Store:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def mtime_resolution_ns(self) -> int:
        """Granularity of the modification times the backend keeps, in nanoseconds."""
        return self.backend.mtime_resolution_ns

    # Levels

    def levels_of(self, namespace: str) -> Levels:
        """Return the nesting levels of *namespace*: configured, detected, or the default."""
        return self.levels_config.get(namespace) or self._detected_levels.get(namespace) or DEFAULT_LEVELS

    def detect_levels(self) -> LevelsConfig:
        """Return the nesting levels that the existing namespaces use on the backend.

        For each namespace, level 0 counts if the namespace directory contains
        items directly, and the depth of its nesting directories counts along
        the first branch that reaches an item (or the deepest, in an empty
        store). A store that mixes other levels needs an explicit configuration.
        """
        detected: LevelsConfig = {}
        for namespace in self.namespaces():
            levels = self._detect_namespace_levels(namespace)
            if levels:
                detected[namespace] = levels
        logger.debug("detected levels %s", detected)
        return detected

    def _detect_namespace_levels(self, namespace: str) -> Levels:
        found: set[int] = set()
        directory, depth = namespace, 0
        while True:
            entries = self.backend.list_kinds(directory)
            if any(not is_directory for _, is_directory in entries):
                found.add(depth)
            subdirs = [name for name, is_directory in entries if is_directory and is_nesting_dir(name)]
            if not subdirs or depth == MAX_LEVEL:
                break
            directory, depth = f"{directory}/{min(subdirs)}", depth + 1
        if depth > 0:
            found.add(depth)  # the depth of the nesting directories, even where they are still empty
        return tuple(sorted(found))

    # Namespaces

    def namespaces(self) -> list[str]:
        """Return the sorted namespaces present in the store (`ROOTNS` excluded)."""
        return [entry.name for entry in self.backend.list("") if entry.directory]

    def create_namespace(self, namespace: str, levels: Sequence[int] | None = None) -> None:
        """Create *namespace* with *levels* (default: its configured or default levels)."""
        validate_namespace(namespace)
        if namespace == ROOTNS:
            raise ValueError("the root namespace always exists")
        if levels is not None:
            self.levels_config.update(parse_levels_config({namespace: levels}))
        self._make_namespace_dirs(namespace, max(self.levels_of(namespace)))

    def remove_namespace(self, namespace: str) -> None:
        """Remove an empty *namespace* and its nesting directories.

        Raises `DirectoryNotEmpty` if it contains live or soft-deleted items.
        """
        validate_namespace(namespace)
        if namespace == ROOTNS:
            raise ValueError("the root namespace cannot be removed")
        for deleted in (False, True):
            for _ in self.list(namespace, deleted=deleted):
                raise DirectoryNotEmpty(namespace)
        self._remove_tree(namespace)
        self.levels_config.pop(namespace, None)
        self._detected_levels.pop(namespace, None)

    def _remove_tree(self, directory: str) -> None:
        for entry in self.backend.list(directory):
            if not entry.directory:
                raise DirectoryNotEmpty(directory)
            self._remove_tree(f"{directory}/{entry.name}")
        self.backend.rmdir(directory)

    # Statistics

    @property
    def changes(self) -> int:
        """The number of the latest change of an item through this store; it only grows.

        Each change counts when it starts and again when it ends. A caller that
        keeps facts read from the store (a listing) notes this number first and
        calls `changed_since` for a name before it trusts them.
        """
        return self._changes

    def changed_since(self, changes: int, name: str) -> bool | None:
        """Return whether item *name* changed through this store after `changes` was *changes*.

        None if that is too long ago to tell: the store remembers the latest
        change of the last `CHANGE_LOG_SIZE` names only.
        """
        with self._stats_lock:
            if changes < self._forgotten_changes:
                return None
            latest = self._change_log.get(name)
        return latest is not None and latest > changes

    def _note_change(self, names: tuple[str, ...]) -> None:
        with self._stats_lock:
            for name in names:
                self._changes += 1
                self._change_log[name] = self._changes
                self._change_log.move_to_end(name)
            while len(self._change_log) > CHANGE_LOG_SIZE:
                _, self._forgotten_changes = self._change_log.popitem(last=False)

    def _operation(self, kind: str, description: str, volume: int = 0, *, changes: tuple[str, ...] = ()) -> _Operation:
        """Return a context that counts, times and logs one backend operation, and emulates latency and bandwidth.

        The caller sets the context's ``volume`` when the size is known only
        afterwards. An operation that raises is neither counted nor logged.
        *changes* names the items that the operation changes (see `changed_since`).
        """
        return _Operation(self, kind, description, volume, changes)

    def _finish_operation(self, kind: str, description: str, volume: int, start: int) -> None:
        emulated = self._latency + (volume / self._bandwidth if self._bandwidth else 0.0)
        if emulated:
            remaining = emulated - (time.perf_counter_ns() - start) / 1e9
            if remaining > 0:
                time.sleep(remaining)
        elapsed = time.perf_counter_ns() - start
        with self._stats_lock:
            self._stats[f"{kind}_calls"] += 1
            self._stats[f"{kind}_time"] += elapsed
            self._stats[f"{kind}_volume"] += volume
        logger.debug("%s: %d bytes in %.1f ms", description, volume, elapsed / 1e6)

    @property
    def stats(self) -> dict[str, float]:
        """Calls, time (seconds), volume (bytes) and throughput (bytes/second) per operation.

        Only what passes the Store API counts: callers' own time, caching and
        the cost of lists yielded to a slow consumer are not included.
        """
        with self._stats_lock:
            raw = dict(self._stats)
        result: dict[str, float] = {}
        for kind in STATS_OPERATIONS:
            seconds = raw.get(f"{kind}_time", 0) / 1e9
            volume = raw.get(f"{kind}_volume", 0)
            result[f"{kind}_calls"] = raw.get(f"{kind}_calls", 0)
            result[f"{kind}_time"] = seconds
            result[f"{kind}_volume"] = volume
            result[f"{kind}_throughput"] = volume / seconds if seconds else 0.0
        return result

    # Items

    def find(self, name: str, *, deleted: bool = False) -> str:
        """Return the nested backend name of *name*.

        An existing item is found at whichever configured level it is; a
        missing one gets its name at the last level, where new items go.
        Levels too deep for the key are skipped, and `ValueError` is raised if
        the key is too short for the last level and exists nowhere else.
        """
        namespace, key = split_name(name)
        return self._find(namespace, key, deleted)

    def _find(self, namespace: str, key: str, deleted: bool) -> str:
        """Return the nested backend name of the validated *key* in *namespace* (see `find`)."""
        levels = self.levels_of(namespace)
        newest = levels[-1]
        if len(levels) > 1:  # with a single level, the item can only be there
            for level in (newest, *reversed(levels[:-1])):
                if not fits_level(key, level):
                    continue
                nested_name = nest(namespace, key, level, deleted=deleted)
                if self.backend.info(nested_name).exists:
                    return nested_name
        return nest(namespace, key, newest, deleted=deleted)

    def info(self, name: str, *, deleted: bool = False) -> ItemInfo:
        """Return an `ItemInfo` whose ``name`` is the key; ``exists=False`` if missing."""
        with self._operation("info", f"info({name!r}, deleted={deleted})"):
            namespace, key = split_name(name)
            info = self.backend.info(self._find(namespace, key, deleted))
        return info._replace(name=key)

    def load(self, name: str, *, size: int | None = None, offset: int = 0, deleted: bool = False) -> bytes:
        """Return *size* bytes (all if None) of the value from *offset*.

        A negative *offset* counts from the end; past the end the available
        bytes (possibly none) are returned. `ObjectNotFound` if missing.
        """
        if size is not None and size < 0:
            raise ValueError(f"size must be None or >= 0, not {size}")
        description = f"load({name!r}, offset={offset}, size={size}, deleted={deleted})"
        with self._operation("load", description) as operation:
            nested_name = self.find(name, deleted=deleted)
            value = self._backend_call(name, self.backend.load, nested_name, size=size, offset=offset)
            operation.volume = len(value)
        return value

    def open_reader(self, name: str, *, deleted: bool = False) -> ValueReader:
        """Open the value of *name* (soft-deleted with ``deleted=True``) for reads at offsets.

        See `ValueReader`: the reader keeps the value of open time on backends
        that can hold an item open. In `stats`, opening counts as a load of no
        bytes and each read as a load. `ObjectNotFound` if missing.
        """
        with self._operation("load", f"open_reader({name!r}, deleted={deleted})"):
            nested_name = self.find(name, deleted=deleted)
            reader = self._backend_call(name, self.backend.open_reader, nested_name)
        return StoreReader(self, name, reader)

    def store(self, name: str, value: bytes | BinaryIO) -> None:
        """Store *value* (bytes, or a binary file object streamed to its end) as *name*.

        Atomic: readers see the old value or the new one. An existing item
        keeps its nesting level; a new one goes to the last level.
        """
        volume = len(value) if isinstance(value, bytes | bytearray | memoryview) else 0
        with self._operation("store", f"store({name!r})", volume, changes=(name,)):
            self.backend.store(self.find(name), value)

    def stage(self, name: str, *, copy_existing: bool = False) -> StagedItem:
        """Start writing a new value for *name* at offsets, invisible until committed.

        With ``copy_existing=True`` the staged value starts as a copy of the
        current value, or raises `ObjectNotFound` if there is none. Backends
        that can copy on the server side do so, without passing the value through memory.
        """
        nested_name = self.find(name)
        copy_from = nested_name if copy_existing else None
        staged = self._backend_call(name, self.backend.stage, nested_name, copy_from=copy_from)
        return StagedItem(self, name, staged)

    def set_mtime(self, name: str, mtime_ns: int, *, deleted: bool = False) -> None:
        """Set the modification time of *name* in nanoseconds since the epoch."""
        self._note_change((name,))
        try:
            self._backend_call(name, self.backend.set_mtime, self.find(name, deleted=deleted), mtime_ns)
        finally:
            self._note_change((name,))

    def delete(self, name: str, *, deleted: bool = False) -> None:
        """Delete *name* for good (with ``deleted=True``: its soft-deleted copy).

        See ``move(name, delete=True)`` for soft deletion.
        """
        with self._operation("delete", f"delete({name!r}, deleted={deleted})", changes=(name,)):
            self._backend_call(name, self.backend.delete, self.find(name, deleted=deleted))

    def move(
        self,
        name: str,
        new_name: str | None = None,
        *,
        delete: bool = False,
        undelete: bool = False,
        change_level: bool = False,
        deleted: bool = False,
        replace: bool = True,
    ) -> None:
        """Rename, soft-delete, undelete or re-nest an item; exactly one mode applies.

        - ``delete=True``: rename *name* to its soft-deleted form, replacing
          an older soft-deleted item of that name.
        - ``undelete=True``: restore the soft-deleted *name*. An existing live
          item is never replaced: `ObjectAlreadyExists` is raised instead.
        - ``change_level=True``: move the item (soft-deleted with
          ``deleted=True``) to the last configured level of its namespace.
        - otherwise: rename *name* to *new_name* (both soft-deleted with
          ``deleted=True``), replacing an existing *new_name* unless
          ``replace=False``, which raises `ObjectAlreadyExists` instead.
        """
        modes = sum((delete, undelete, change_level))
        if modes > 1 or (modes and new_name is not None):
            raise ValueError(f"move of {name!r}: choose one of new_name, delete, undelete, change_level")
        if delete:
            source = self.find(name)
            target = source + DEL_SUFFIX
            description = f"soft-delete({name!r})"
        elif undelete:
            source = self.find(name, deleted=True)
            target, replace = source.removesuffix(DEL_SUFFIX), False
            if self.info(name).exists:
                raise ObjectAlreadyExists(name, f"cannot undelete {name!r}: a live item with that name exists")
            description = f"undelete({name!r})"
        elif change_level:
            namespace, key = split_name(name)
            source = self.find(name, deleted=deleted)
            target = nest(namespace, key, self.levels_of(namespace)[-1], deleted=deleted)
            if source == target:
                return
            description = f"change-level({name!r}, deleted={deleted})"
        else:
            if new_name is None:
                raise ValueError(f"move of {name!r} needs new_name, delete, undelete or change_level")
            source, target = self.find(name, deleted=deleted), self.find(new_name, deleted=deleted)
            description = f"rename({name!r}, {new_name!r}, deleted={deleted})"
        changes = (name,) if new_name is None else (name, new_name)
        with self._operation("move", description, changes=changes):
            self._backend_call(name, self.backend.move, source, target, replace=replace)

    def list(self, namespace: str, *, deleted: bool = False) -> Iterator[ItemInfo]:
        """Yield the items of *namespace* sorted by key, through all nesting levels.

        ``name`` of each `ItemInfo` is the key. ``deleted=False`` yields live
        items only, ``deleted=True`` soft-deleted items only, with the suffix
        removed. Nesting directories never appear. Raises `ObjectNotFound`
        (on the first `next`) if the namespace does not exist.
        """
        validate_namespace(namespace)
        if not self.backend.opened:
            raise BackendMustBeOpen(f"{self!r} must be opened first")
        return self._list_counted(namespace, deleted)

    def _list_counted(self, namespace: str, deleted: bool) -> Iterator[ItemInfo]:
        start = time.perf_counter_ns()
        count = 0
        for info in self._list_directory(namespace, 0, max(self.levels_of(namespace)), deleted):
            count += 1
            yield info
        elapsed = time.perf_counter_ns() - start
        with self._stats_lock:
            self._stats["list_calls"] += 1
            self._stats["list_time"] += elapsed
        logger.debug("list(%r, deleted=%s): %d items in %.1f ms", namespace, deleted, count, elapsed / 1e6)

    def _list_directory(self, directory: str, depth: int, max_depth: int, deleted: bool) -> Iterable[ItemInfo]:
        if self._latency:
            time.sleep(self._latency)
        if depth >= max_depth and not deleted:
            # The common case stays lazy: the backend may read attributes as the caller goes.
            return (
                entry
                for entry in self.backend.list(directory)
                if not entry.directory and not entry.name.endswith(DEL_SUFFIX)
            )
        entries = list(self.backend.list(directory))
        if deleted:
            items = [
                entry._replace(name=entry.name.removesuffix(DEL_SUFFIX))
                for entry in entries
                if not entry.directory and entry.name.endswith(DEL_SUFFIX)
            ]
            # Without the suffix the order can change ("a-b.del" < "a.del" but "a" < "a-b").
            items.sort(key=item_name)
        else:
            items = [entry for entry in entries if not entry.directory and not entry.name.endswith(DEL_SUFFIX)]
        if depth >= max_depth:
            return items
        prefix = f"{directory}/" if directory else ""
        below = chain.from_iterable(
            self._list_directory(prefix + entry.name, depth + 1, max_depth, deleted)
            for entry in entries
            if entry.directory and is_nesting_dir(entry.name)
        )
        # Keys in this directory and keys in nesting directories below it
        # interleave when a namespace mixes levels; both streams are sorted.
        return heapq.merge(items, below, key=item_name)

    # Backend facts

    def space(self) -> SpaceInfo | None:
        """Return the backend's capacity, or None if it cannot tell."""
        return self.backend.space()

    # Helpers

    @staticmethod
    def _backend_call(name: str, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call *function*, and name the item the caller asked for in an `ObjectNotFound`."""
        try:
            return function(*args, **kwargs)
        except ObjectNotFound as err:
            if err.name == name:
                raise
            raise ObjectNotFound(name) from err
        except ObjectAlreadyExists as err:
            raise ObjectAlreadyExists(name, f"cannot move {name!r}: the target exists") from err


class _Operation:
    """One backend operation in progress (see `Store._operation`).

    A class rather than a generator-based context manager, because a mount
    runs one per request and the generator machinery costs microseconds.
    """

    __slots__ = ("_changes", "_description", "_kind", "_start", "_store", "volume")

    def __init__(self, store: Store, kind: str, description: str, volume: int, changes: tuple[str, ...]) -> None:
        self._store = store
        self._kind = kind
        self._description = description
        self.volume = volume
        self._changes = changes
        self._start = 0

    def __enter__(self) -> _Operation:
        if self._changes:
            self._store._note_change(self._changes)
        self._start = time.perf_counter_ns()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if self._changes:
            # Noted at both ends, so that a reader that started during the change also detects it.
            self._store._note_change(self._changes)
        if exc_type is None:
            self._store._finish_operation(self._kind, self._description, self.volume, self._start)


# MStore is a public name of this module, imported on first access because borgstorefs.mstore imports this module.
from typing import TYPE_CHECKING  # noqa: E402

__all__ += ["MStore"]
if TYPE_CHECKING:
    from .mstore import MStore
else:

    def __getattr__(name: str) -> object:
        if name == "MStore":
            from .mstore import MStore

            return MStore
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
