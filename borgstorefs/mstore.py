"""Several stores used as one: redundancy and distribution, with the API of `Store`.

`MStore` is split by concept over four modules. This one has the class
with its lifecycle, placement, reads and staging. The bucket layout and the
kinds are in `borgstorefs.mstore_layout`, the write rule (writes, removals,
renames, namespaces) in `borgstorefs.mstore_writes`, and the missing-copy
records with the check and repair methods in `borgstorefs.mstore_repair`.
`__all__` below re-exports the public names of the layout and repair modules.

An `MStore` splits the name space into 256 buckets and gives each of its
stores a number of them, taken in order and wrapping modulo 256: with
``buckets=[256, 256]`` both stores hold every bucket (a mirror), with
``[192, 64]`` the first store holds buckets 0-191 and the second 192-255,
and with ``[256, 256, 256]`` every item is kept three times. The total is
a positive multiple of 256, and the multiple is the number of copies.

How an item picks its bucket depends on the *kind* of its namespace:

- ``hex-hash``: the first byte of a hex key (``data/1f...`` is in bucket
  0x1f), for content-addressed items whose keys are already uniform.
- ``name-hash``: the first byte of the SHA-256 of the key, for arbitrary
  names such as files written through the mount. This is the default for
  namespaces that *kinds* does not name.
- ``generic``: no bucket. The item is kept on every store, for small and
  important items such as configuration.

Rules that keep copies consistent (see ``docs/mstore.md`` for the reasons):

- A write (store, commit, delete, move, soft deletion, set_mtime) must reach
  every store that should hold the item. If one of them fails or is
  unreachable, the write is still applied to the others but raises, so a
  write is never acknowledged while an expected copy holds an older value.
- Removals (delete, soft deletion, the source of a rename) also remove the
  copies on stores that should not hold the item any more, so that such a
  left-over copy cannot reappear once the expected copies are gone.
- Reads try the stores that should hold the item first. A store that
  should not hold it is read only when at least one store that should hold
  it reported "not found": then no write reached the item since the
  layout changed and the left-over copy is current.

Thread safety: like `Store`, an `MStore` may be used from several threads.
Writes and repairs of one name are serialized by a lock per name (striped
over `NAME_LOCKS` locks). Writers in other processes are not coordinated.
"""

from __future__ import annotations

import builtins
import heapq
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .backends import ItemInfo, SpaceInfo
from .errors import (
    BackendMustBeOpen,
    BackendMustNotBeOpen,
    BackendUnavailable,
    ObjectNotFound,
)
from .mstore_layout import BUCKETS, DEFAULT_KIND, GENERIC, KINDS, bucket_of, bucket_owners, parse_kinds
from .mstore_repair import STORE_FAILURES, CopyReport, MissingCopy, MStoreRepair, RepairResult, read_missing_log
from .mstore_writes import MStoreWrites, chunked_stream
from .names import split_name, validate_namespace
from .nesting import Levels
from .store import STATS_OPERATIONS, StagedDelegate, StagedItem, Store

if TYPE_CHECKING:
    from .backends import ValueReader

__all__ = [
    "BUCKETS",
    "DEFAULT_KIND",
    "KINDS",
    "CopyReport",
    "MStagedItem",
    "MStore",
    "MissingCopy",
    "RepairResult",
    "bucket_of",
    "bucket_owners",
    "parse_kinds",
    "read_missing_log",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

NAME_LOCKS = 64
"""Locks that serialize writes per name. Names share a lock by CRC-32, so more locks only lower contention."""

RETRY_INTERVAL = 10.0
"""Default seconds for which a store that was unreachable is skipped before it is tried again."""

FAILURE_LOG_INTERVAL = 60.0
"""Seconds between WARNING records about the same unreachable store. Repeats in between go to DEBUG."""


# Staging


class MStagedItem(StagedDelegate):
    """A value being written to an `MStore`, invisible until `commit`, with the `StagedItem` interface.

    The value is staged on one store (the first expected store, or with
    ``copy_existing`` the first store that has the item). `commit` streams
    it to the other expected stores in chunks and then commits it on the
    staging store, so memory stays bounded. Not thread-safe.
    """

    def __init__(self, mstore: MStore, name: str, store_index: int, staged: StagedItem) -> None:
        super().__init__(name, staged)
        self.store_index = store_index
        self._mstore = mstore

    def commit(self, name: str | None = None, *, mtime_ns: int | None = None, durable: bool = False) -> None:
        """Store the value as *name* (default: the staged name) on every store that should hold it.

        Raises like `MStore.store` if an expected store fails. The staged
        value is used up either way.
        """
        self._mstore._commit_staged(self, name if name is not None else self.name, mtime_ns, durable)


# The multi-store


_MISSING = object()
_FAILED = object()


class MStore(MStoreWrites, MStoreRepair):
    """Several `Store` objects used as one, with the API of `Store`.

    *stores* are unopened stores, *buckets* gives the bucket count of each
    (see the module docstring), and *kinds* maps namespaces to ``hex-hash``,
    ``name-hash`` or ``generic`` (default ``name-hash``).

    With ``read_repair=True`` a read of a whole value that finds an expected
    copy missing on a reachable store re-creates it at once. Every missing
    copy a read finds is kept in `missing_copies`, and with *missing_log*
    also appended as a JSON line to that local file, for `repair_missing` and
    ``borgstorefs mstore repair --missing-log``. A store that is unreachable
    is skipped for *retry_interval* seconds before it is tried again.

    The write methods come from `MStoreWrites`, and the check and repair
    methods from `MStoreRepair`.
    """

    def __init__(
        self,
        stores: Sequence[Store],
        buckets: Sequence[int],
        kinds: Mapping[str, str] | None = None,
        *,
        read_repair: bool = True,
        missing_log: str | os.PathLike[str] | None = None,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        if not stores:
            raise ValueError("an MStore needs at least one store")
        if len(buckets) != len(stores):
            raise ValueError(f"got {len(stores)} stores but {len(buckets)} bucket counts: give one count per store")
        self.owners = bucket_owners(buckets)
        self.stores = list(stores)
        self.buckets = tuple(buckets)
        self.kinds = parse_kinds(kinds)
        self.copies = sum(self.buckets) // BUCKETS
        """Copies of each hashed item. A ``generic`` item has one per store."""
        self.read_repair = read_repair
        self.missing_log = Path(missing_log) if missing_log is not None else None
        # NOTE: records are dropped only by a successful repair, so while a
        # store is down this set grows by one entry per item read.
        self.missing_copies: set[MissingCopy] = set()
        self._records_lock = threading.Lock()
        self._name_locks = [threading.Lock() for _ in range(NAME_LOCKS)]
        self.retry_interval = retry_interval
        self._opened: set[int] = set()
        self._down_until: dict[int, float] = {}
        self._open_lock = threading.Lock()
        self._failure_logged: dict[int, float] = {}
        self._is_open = False

    def __repr__(self) -> str:
        parts = ", ".join(f"{store!r}:{count}" for store, count in zip(self.stores, self.buckets, strict=True))
        return f"MStore({parts})"

    # Lifecycle

    def create(self) -> None:
        """Create every store, and raise the first error after trying all of them."""
        self._on_every_store("create", lambda store: store.create())

    def destroy(self) -> None:
        """Destroy every store, and raise the first error after trying all of them."""
        self._on_every_store("destroy", lambda store: store.destroy())

    def _on_every_store(self, action: str, function: Callable[[Store], None]) -> None:
        errors: list[BaseException] = []
        for store in self.stores:
            try:
                function(store)
            except STORE_FAILURES as err:
                logger.error("%s of %r failed: %s", action, store, err)
                errors.append(err)
        if errors:
            raise errors[0]

    def open(self) -> None:
        """Open the stores. One that cannot be opened is retried later, and reads use the others.

        Raises the first error if no store can be opened.
        """
        if self._is_open:
            raise BackendMustNotBeOpen(f"{self!r} is already open")
        errors: list[BaseException] = []
        for index in range(len(self.stores)):
            error = self._try_open(index)
            if error is not None:
                errors.append(error)
        if not self._opened:
            raise errors[0]
        self._is_open = True
        logger.info("opened %r with %d of %d stores reachable", self, len(self._opened), len(self.stores))

    def _try_open(self, index: int) -> BaseException | None:
        store = self.stores[index]
        try:
            store.open()
        except STORE_FAILURES as err:
            self._down_until[index] = time.monotonic() + self.retry_interval
            logger.warning("cannot open %r, next attempt in %.0f s: %s", store, self.retry_interval, err)
            return err
        self._opened.add(index)
        return None

    def close(self) -> None:
        """Close every open store."""
        with self._open_lock:
            for index in sorted(self._opened):
                try:
                    self.stores[index].close()
                except STORE_FAILURES as err:
                    logger.warning("closing %r failed: %s", self.stores[index], err)
            self._opened.clear()
            self._down_until.clear()
            self._is_open = False
        logger.info("closed %r", self)

    def __enter__(self) -> MStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._is_open:
            raise BackendMustBeOpen(f"{self!r} must be opened first")

    def _ready(self, index: int) -> Store:
        """Return store *index* for a call, or raise `BackendUnavailable` while it is marked unreachable.

        A store that failed to open, or failed with `BackendUnavailable`, is
        skipped for `retry_interval` seconds and then tried (and opened) again.
        """
        self._check_open()
        store = self.stores[index]
        until = self._down_until.get(index)
        if until is not None:
            remaining = until - time.monotonic()
            if remaining > 0:
                raise BackendUnavailable(f"{store!r} is unreachable; next attempt in {remaining:.0f} s")
            self._down_until.pop(index, None)
        if index in self._opened:
            return store
        with self._open_lock:
            if index not in self._opened:
                error = self._try_open(index)
                if error is not None:
                    raise BackendUnavailable(f"{store!r} cannot be opened: {error}") from error
                logger.info("opened %r, which was unreachable before", store)
        return store

    def _note_failure(self, index: int, action: str, name: str, err: BaseException) -> None:
        """Log a failed call on store *index* (WARNING once per `FAILURE_LOG_INTERVAL`, else DEBUG).

        A `BackendUnavailable` marks the store unreachable for `retry_interval`
        seconds, so that a dead server costs one timeout, not one per call.
        """
        now = time.monotonic()
        if isinstance(err, BackendUnavailable) and self._down_until.get(index, 0.0) <= now:
            self._down_until[index] = now + self.retry_interval
        if now - self._failure_logged.get(index, -FAILURE_LOG_INTERVAL) >= FAILURE_LOG_INTERVAL:
            self._failure_logged[index] = now
            logger.warning("%s of %r on %r failed: %s", action, name, self.stores[index], err)
        else:
            logger.debug("%s of %r on %r failed: %s", action, name, self.stores[index], err)

    # Placement

    def kind_of(self, namespace: str) -> str:
        """Return the kind of *namespace*: configured, or `DEFAULT_KIND`."""
        return self.kinds.get(namespace, DEFAULT_KIND)

    def placement(self, name: str) -> tuple[int, ...]:
        """Return the indexes of the stores that should hold *name*, in the order reads try them."""
        namespace, key = split_name(name)
        return self._placement_of_key(namespace, key)

    def _placement_of_key(self, namespace: str, key: str) -> tuple[int, ...]:
        bucket = bucket_of(self.kind_of(namespace), key)
        if bucket is None:
            return tuple(range(len(self.stores)))
        return self.owners[bucket]

    def read_order(self, name: str) -> tuple[int, ...]:
        """Return every store index: those that should hold *name* first, then the others."""
        expected = self.placement(name)
        return expected + tuple(i for i in range(len(self.stores)) if i not in expected)

    def _covers_every_bucket(self, namespace: str, available: set[int]) -> bool:
        """Return whether the stores in *available* together hold a copy of every item of *namespace*."""
        if self.kind_of(namespace) == GENERIC:
            return bool(available)
        return all(any(i in available for i in owners) for owners in self.owners)

    @contextmanager
    def _locked(self, *names: str) -> Iterator[None]:
        indexes = sorted({zlib.crc32(name.encode()) % NAME_LOCKS for name in names})
        with ExitStack() as stack:
            for index in indexes:
                stack.enter_context(self._name_locks[index])
            yield

    # Reads

    def _read(
        self, name: str, action: str, call: Callable[[Store], T], found: Callable[[T], bool] = lambda _: True
    ) -> tuple[T, int, list[int], list[int]]:
        """Run *call* on the stores in read order until one has the item.

        Returns the result, the store that returned it, and the expected
        stores that reported "not found" and that failed before it. Raises
        `ObjectNotFound` if no store has it, and `BackendUnavailable` if no
        expected store responded, because a left-over copy elsewhere may be
        outdated.
        """
        self._check_open()
        expected = self.placement(name)
        missing: list[int] = []
        failed: list[int] = []
        for index in expected:
            outcome = self._read_one(index, name, action, call, found)
            if outcome is _MISSING:
                missing.append(index)
            elif outcome is _FAILED:
                failed.append(index)
            else:
                return outcome, index, missing, failed  # type: ignore[return-value]
        if not missing:
            raise BackendUnavailable(
                f"cannot {action} {name!r}: none of the stores that should hold it "
                f"({', '.join(repr(self.stores[i]) for i in expected)}) is reachable"
            )
        for index in self.read_order(name)[len(expected) :]:
            outcome = self._read_one(index, name, action, call, found)
            if outcome is not _MISSING and outcome is not _FAILED:
                return outcome, index, missing, failed  # type: ignore[return-value]
        raise ObjectNotFound(name)

    def _read_one(
        self, index: int, name: str, action: str, call: Callable[[Store], T], found: Callable[[T], bool]
    ) -> object:
        try:
            result = call(self._ready(index))
        except ObjectNotFound:
            return _MISSING
        except STORE_FAILURES as err:
            self._note_failure(index, action, name, err)
            return _FAILED
        return result if found(result) else _MISSING

    def info(self, name: str, *, deleted: bool = False) -> ItemInfo:
        """Return an `ItemInfo` whose ``name`` is the key, with ``exists=False`` if no store has it.

        Raises `BackendUnavailable` if no store that should hold the item responded.
        """
        try:
            info, _, missing, failed = self._read(
                name, "info", lambda store: store.info(name, deleted=deleted), lambda info: info.exists
            )
        except ObjectNotFound:
            return ItemInfo(split_name(name)[1], False, 0, False)
        self._record_missing(name, deleted, missing, "missing")
        self._record_missing(name, deleted, failed, "unreachable")
        return info

    def load(self, name: str, *, size: int | None = None, offset: int = 0, deleted: bool = False) -> bytes:
        """Return *size* bytes (all if None) of the value from *offset*, from the first copy that has it.

        A negative *offset* counts from the end. `ObjectNotFound` if no store
        has the item, and `BackendUnavailable` if no store that should hold it responded.
        """
        value, _, missing, failed = self._read(
            name, "load", lambda store: store.load(name, size=size, offset=offset, deleted=deleted)
        )
        self._record_missing(name, deleted, missing, "missing")
        self._record_missing(name, deleted, failed, "unreachable")
        # Only a whole-value read repairs at once, so that small reads through
        # the mount never wait for a large value to be copied.
        if missing and self.read_repair and offset == 0 and size is None:
            try:
                self.repair_name(name, deleted=deleted)
            except STORE_FAILURES as err:
                logger.warning("read-repair of %r failed, the copy stays recorded as missing: %s", name, err)
        return value

    def open_reader(self, name: str, *, deleted: bool = False) -> ValueReader:
        """Open the value of *name* for reads at offsets, on the first store in read order that has it.

        Stores are tried and missing copies recorded as in `load`, but nothing
        is repaired, because opening a file must not wait for a copy.
        `ObjectNotFound` if no store has the item, and `BackendUnavailable`
        if no store that should hold it responded.

        NOTE: the reader belongs to one store. If that store fails later,
        reads through the reader fail too, and no other copy takes over.
        """
        reader, _, missing, failed = self._read(name, "open", lambda store: store.open_reader(name, deleted=deleted))
        self._record_missing(name, deleted, missing, "missing")
        self._record_missing(name, deleted, failed, "unreachable")
        return reader

    def list(self, namespace: str, *, deleted: bool = False) -> Iterator[ItemInfo]:
        """Yield the items of *namespace* sorted by key, each once, merged from every reachable store.

        The `ItemInfo` of a key comes from the first store in its read order.
        An unreachable store is left out while the others still hold a copy
        of every bucket; otherwise `BackendUnavailable` is raised. Raises
        `ObjectNotFound` (on the first `next`) if no store has the namespace.
        """
        validate_namespace(namespace)
        if not self._is_open:
            raise BackendMustBeOpen(f"{self!r} must be opened first")
        return self._merged_list(namespace, deleted)

    def _merged_list(self, namespace: str, deleted: bool) -> Iterator[ItemInfo]:
        available = set(range(len(self.stores)))
        without_namespace: set[int] = set()

        def lose(index: int, err: BaseException) -> None:
            available.discard(index)
            self._note_failure(index, "list", namespace, err)
            if not self._covers_every_bucket(namespace, available):
                raise BackendUnavailable(
                    f"cannot list {namespace!r}: {self.stores[index]!r} failed ({err}) "
                    f"and the reachable stores do not hold every bucket"
                ) from err

        def entries(index: int) -> Iterator[tuple[str, int, ItemInfo]]:
            try:
                for info in self._ready(index).list(namespace, deleted=deleted):
                    yield info.name, index, info
            except ObjectNotFound:
                without_namespace.add(index)
            except STORE_FAILURES as err:
                lose(index, err)

        merged = heapq.merge(*(entries(i) for i in range(len(self.stores))))
        for key, group in groupby(merged, key=lambda entry: entry[0]):
            copies = {index: info for _, index, info in group}
            try:
                order = self._placement_of_key(namespace, key)
            except ValueError:
                order = ()
            first = next((i for i in order if i in copies), min(copies))
            yield copies[first]
        if without_namespace == available:
            raise ObjectNotFound(namespace, f"namespace not found: {namespace!r}")

    def namespaces(self) -> builtins.list[str]:
        """Return the sorted union of the namespaces of the reachable stores (`ROOTNS` excluded)."""
        found: set[str] = set()
        responded = False
        for index in range(len(self.stores)):
            try:
                found.update(self._ready(index).namespaces())
                responded = True
            except STORE_FAILURES as err:
                self._note_failure(index, "namespaces", "", err)
        if not responded:
            raise BackendUnavailable(f"cannot list the namespaces of {self!r}: no store is reachable")
        return sorted(found)

    def levels_of(self, namespace: str) -> Levels:
        """Return the nesting levels of *namespace* on the first open store."""
        index = min(self._opened) if self._opened else 0
        return self.stores[index].levels_of(namespace)

    # Staging

    def stage(self, name: str, *, copy_existing: bool = False) -> MStagedItem:
        """Start writing a new value for *name* at offsets, invisible until committed.

        With ``copy_existing=True`` the staged value starts as a copy of the
        current value, taken from the first store in read order that has it
        (`ObjectNotFound` if none has).
        """

        def start(store: Store) -> StagedItem:
            return store.stage(name, copy_existing=copy_existing)

        if copy_existing:
            staged, index, missing, failed = self._read(name, "stage", start)
            self._record_missing(name, False, missing, "missing")
            self._record_missing(name, False, failed, "unreachable")
            return MStagedItem(self, name, index, staged)
        errors: list[BaseException] = []
        for index in self.placement(name):
            try:
                return MStagedItem(self, name, index, start(self._ready(index)))
            except STORE_FAILURES as err:
                self._note_failure(index, "stage", name, err)
                errors.append(err)
        raise BackendUnavailable(f"cannot stage {name!r}: no store that should hold it is reachable") from errors[0]

    def _commit_staged(self, item: MStagedItem, target: str, mtime_ns: int | None, durable: bool) -> None:
        staged = item._staged
        expected = self.placement(target)
        with self._locked(target):
            done: list[int] = []
            failures: list[tuple[int, BaseException]] = []
            try:
                # The other copies are written first because the commit uses up the staged value.
                for index in expected:
                    if index == item.store_index:
                        continue
                    try:
                        store = self._ready(index)
                        store.store(target, chunked_stream(staged.read))
                        if mtime_ns is not None:
                            store.set_mtime(target, mtime_ns)
                    except STORE_FAILURES as err:
                        self._note_failure(index, "commit", target, err)
                        failures.append((index, err))
                    else:
                        done.append(index)
                if item.store_index in expected:
                    try:
                        staged.commit(target, mtime_ns=mtime_ns, durable=durable)
                    except STORE_FAILURES as err:
                        self._note_failure(item.store_index, "commit", target, err)
                        failures.append((item.store_index, err))
                    else:
                        done.append(item.store_index)
            finally:
                staged.discard()
            if failures:
                self._raise_incomplete("commit", target, False, done, failures)

    # Facts

    def space(self) -> SpaceInfo | None:
        """Return the capacity in item bytes: what fits before the first store fills up.

        Store ``i`` holds ``buckets[i] / 256`` of the hashed items, so each of
        its byte counts is scaled by ``256 / buckets[i]`` and the minimum over
        the stores is returned: for a mirror this is the smallest store, for
        ``[128, 128]`` twice the smaller one. It assumes items spread evenly
        over the buckets and ignores ``generic`` items. Stores that hold no
        bucket, report no capacity or cannot be reached are left out. Returns None if none is left.
        """
        scaled: list[SpaceInfo] = []
        for index, count in enumerate(self.buckets):
            if count == 0:
                continue
            try:
                space = self._ready(index).space()
            except STORE_FAILURES as err:
                self._note_failure(index, "space", "", err)
                continue
            if space is not None:
                scaled.append(SpaceInfo(*(value * BUCKETS // count for value in space)))
        if not scaled:
            return None
        return SpaceInfo(
            min(space.total for space in scaled),
            min(space.free for space in scaled),
            min(space.available for space in scaled),
        )

    @property
    def mtime_resolution_ns(self) -> int:
        """The coarsest modification-time granularity of the stores' backends, in nanoseconds."""
        return max(store.backend.mtime_resolution_ns for store in self.stores)

    @property
    def stats(self) -> dict[str, float]:
        """Sum of the `Store.stats` of all stores. A write to a mirror counts once per copy."""
        totals: dict[str, float] = {}
        for store in self.stores:
            for key, value in store.stats.items():
                if not key.endswith("_throughput"):
                    totals[key] = totals.get(key, 0) + value
        for kind in STATS_OPERATIONS:
            seconds = totals.get(f"{kind}_time", 0.0)
            totals[f"{kind}_throughput"] = totals.get(f"{kind}_volume", 0.0) / seconds if seconds else 0.0
        return totals
