"""Several stores used as one: redundancy, distribution, check and repair.

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
import hashlib
import heapq
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeVar

from .backends import ItemInfo, SpaceInfo
from .backends._base import COPY_CHUNK_SIZE
from .errors import (
    BackendError,
    BackendMustBeOpen,
    BackendMustNotBeOpen,
    BackendUnavailable,
    DirectoryNotEmpty,
    NoSpaceLeft,
    ObjectAlreadyExists,
    ObjectNotFound,
    PermissionDenied,
)
from .names import ROOTNS, TMP_SUFFIX, split_name, validate_namespace
from .nesting import Levels
from .store import STATS_OPERATIONS, StagedItem, Store

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

BUCKETS = 256
"""Buckets of the name space. One byte of a key, or of its hash, selects the bucket."""

HEX_HASH = "hex-hash"
NAME_HASH = "name-hash"
GENERIC = "generic"
KINDS = (HEX_HASH, NAME_HASH, GENERIC)
HEX_DIGITS = frozenset("0123456789abcdef")
DEFAULT_KIND = NAME_HASH
"""Kind of a namespace that the *kinds* mapping does not name."""

NAME_LOCKS = 64
"""Locks that serialize writes per name. Names share a lock by CRC-32, so more locks only lower contention."""

RETRY_INTERVAL = 10.0
"""Default seconds for which a store that was unreachable is skipped before it is tried again."""

FAILURE_LOG_INTERVAL = 60.0
"""Seconds between WARNING records about the same unreachable store. Repeats in between go to DEBUG."""

STORE_FAILURES = (BackendError, OSError)
"""Errors that mean one store failed, so another copy may still serve or take the request."""


# Layout


def bucket_owners(buckets: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Return, for each of the 256 buckets, the indexes of the stores that hold it, in assignment order.

    Store ``i`` takes the next ``buckets[i]`` buckets, wrapping modulo 256.
    Raises `ValueError` for an empty list, a count that is not a
    non-negative integer, a total that is not a positive multiple of 256,
    or a store that would hold one bucket twice.
    """
    if not buckets:
        raise ValueError("an MStore needs at least one store and its bucket count")
    for index, count in enumerate(buckets):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"bucket count of store {index} must be a non-negative integer, not {count!r}")
    total = sum(buckets)
    if total == 0 or total % BUCKETS:
        raise ValueError(
            f"bucket counts {list(buckets)} add up to {total}, which is not a positive multiple of {BUCKETS}: "
            f"use a total of {BUCKETS} for one copy of each item, {2 * BUCKETS} for two, and so on"
        )
    owners: list[list[int]] = [[] for _ in range(BUCKETS)]
    position = 0
    for index, count in enumerate(buckets):
        for _ in range(count):
            bucket = position % BUCKETS
            if index in owners[bucket]:
                raise ValueError(
                    f"store {index} would hold bucket {bucket} twice, so two copies would land on one store: "
                    f"a store can hold at most {BUCKETS} buckets, not {count}"
                )
            owners[bucket].append(index)
            position += 1
    return tuple(tuple(bucket_stores) for bucket_stores in owners)


def parse_kinds(kinds: Mapping[str, str] | None) -> dict[str, str]:
    """Validate a kinds mapping such as ``{"data/": "hex-hash", "config/": "generic"}``.

    Namespaces may carry the trailing ``/``, and ``""`` is the root namespace.
    Returns a dict keyed by the bare namespace.
    """
    result: dict[str, str] = {}
    for raw_namespace, kind in (kinds or {}).items():
        if not isinstance(raw_namespace, str):
            raise TypeError(f"namespace must be str, not {type(raw_namespace).__name__}: {raw_namespace!r}")
        namespace = raw_namespace.removesuffix("/")
        validate_namespace(namespace)
        if kind not in KINDS:
            raise ValueError(f"invalid kind {kind!r} for namespace {namespace!r}: use one of {', '.join(KINDS)}")
        if namespace in result:
            raise ValueError(f"namespace {namespace!r} has a kind twice")
        result[namespace] = kind
    return result


def bucket_of(kind: str, key: str) -> int | None:
    """Return the bucket of *key* in a namespace of *kind*, or None for ``generic`` (every store).

    Raises `ValueError` for a ``hex-hash`` key that does not start with two hex digits.
    """
    if kind == GENERIC:
        return None
    if kind == HEX_HASH:
        prefix = key[:2]
        if len(prefix) < 2 or any(c not in HEX_DIGITS for c in prefix):
            raise ValueError(
                f"key {key!r} cannot be placed in a {HEX_HASH} namespace: it must start with two hex digits"
            )
        return int(prefix, 16)
    return hashlib.sha256(key.encode()).digest()[0]


# Records


class MissingCopy(NamedTuple):
    """A copy that a read found missing, or that a failed write left missing or outdated."""

    name: str
    deleted: bool
    store: int
    """Index of the store in `MStore.stores`."""


def read_missing_log(path: str | os.PathLike[str]) -> list[MissingCopy]:
    """Return the records of a missing-copy log written by an `MStore` with ``missing_log``."""
    records: list[MissingCopy] = []
    with open(path, encoding="utf-8") as log:
        for number, line in enumerate(log, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                records.append(MissingCopy(str(entry["name"]), bool(entry["deleted"]), int(entry["store"])))
            except (ValueError, KeyError, TypeError) as err:
                # A crash can cut the last line short, so skip it and keep the rest.
                logger.warning("skipping invalid line %d of missing-copy log %s: %s", number, path, err)
    return records


@dataclass(frozen=True)
class CopyReport:
    """Where the copies of one item are, compared with where the layout wants them.

    *copies* maps store index to what that store reports about its copy.
    *expected* is empty, and *problem* gives the reason, for a name the layout
    cannot place (a non-hex key in a ``hex-hash`` namespace). *digests* contains the
    SHA-256 of each copy's value when the report was made with ``verify=True``.
    """

    name: str
    deleted: bool
    expected: tuple[int, ...]
    copies: dict[int, ItemInfo]
    unreachable: frozenset[int] = frozenset()
    problem: str | None = None
    digests: dict[int, bytes] | None = None

    @property
    def missing(self) -> tuple[int, ...]:
        """Stores that should have a copy, responded, and have none."""
        return tuple(i for i in self.expected if i not in self.copies and i not in self.unreachable)

    @property
    def extra(self) -> tuple[int, ...]:
        """Stores that hold a copy but should not (left over from a layout change)."""
        return tuple(i for i in sorted(self.copies) if i not in self.expected)

    @property
    def source(self) -> int | None:
        """The copy that repair spreads: the newest expected copy, else the newest left-over one."""
        candidates = [i for i in self.expected if i in self.copies] or list(self.extra)
        if not candidates:
            return None
        return max(candidates, key=lambda i: (self.copies[i].mtime_ns or 0, -candidates.index(i)))

    @property
    def differing(self) -> tuple[int, ...]:
        """Expected stores whose copy differs from the source copy: by digest if known, else by size."""
        source = self.source
        if source is None:
            return ()
        if self.digests is not None and source in self.digests:
            digest = self.digests[source]
            return tuple(i for i in self.expected if i in self.digests and self.digests[i] != digest)
        size = self.copies[source].size
        return tuple(i for i in self.expected if i in self.copies and self.copies[i].size != size)

    @property
    def healthy(self) -> bool:
        """Whether every expected store has a copy, all of one size, and no other store has one."""
        return not (self.problem or self.missing or self.extra or self.differing or self.unreachable)


@dataclass
class RepairResult:
    """Counts of a repair: copies made or overwritten, left-over copies removed, and the failures."""

    copied: int = 0
    removed: int = 0
    failed: list[str] = field(default_factory=list)

    def add(self, other: RepairResult) -> None:
        """Add the counts and failures of *other* to this result."""
        self.copied += other.copied
        self.removed += other.removed
        self.failed.extend(other.failed)


# Staging


class _ReadAtStream(io.RawIOBase):
    """A read-only stream over a ``read_at(offset, size)`` function, so values stream in chunks."""

    def __init__(self, read_at: Callable[[int, int], bytes]) -> None:
        super().__init__()
        self._read_at = read_at
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._read_at(self._offset, len(buffer))
        buffer[: len(data)] = data
        self._offset += len(data)
        return len(data)


def _stream(read_at: Callable[[int, int], bytes]) -> BinaryIO:
    return io.BufferedReader(_ReadAtStream(read_at), COPY_CHUNK_SIZE)  # type: ignore[return-value]


class MStagedItem:
    """A value being written to an `MStore`, invisible until `commit`, with the `StagedItem` interface.

    The value is staged on one store (the first expected store, or with
    ``copy_existing`` the first store that has the item). `commit` streams
    it to the other expected stores in chunks and then commits it on the
    staging store, so memory stays bounded. Not thread-safe.
    """

    def __init__(self, mstore: MStore, name: str, store_index: int, staged: StagedItem) -> None:
        self.name = name
        self.store_index = store_index
        self._mstore = mstore
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

    def commit(self, name: str | None = None, *, mtime_ns: int | None = None, durable: bool = False) -> None:
        """Store the value as *name* (default: the staged name) on every store that should hold it.

        Raises like `MStore.store` if an expected store fails. The staged
        value is used up either way.
        """
        self._mstore._commit_staged(self, name if name is not None else self.name, mtime_ns, durable)

    def discard(self) -> None:
        """Drop the staged value; the stored item, if any, is unchanged."""
        self._staged.discard()

    def __enter__(self) -> MStagedItem:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


# The multi-store


_MISSING = object()
_FAILED = object()


class MStore:
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

    # Missing copies

    def _record_missing(self, name: str, deleted: bool, indexes: Sequence[int], reason: str) -> None:
        for index in indexes:
            record = MissingCopy(name, deleted, index)
            with self._records_lock:
                if record in self.missing_copies:
                    continue
                self.missing_copies.add(record)
                if self.missing_log is not None:
                    self._append_log(record)
            logger.warning(
                "copy of %r (deleted=%s) on %r is %s; recorded for repair", name, deleted, self.stores[index], reason
            )

    def _append_log(self, record: MissingCopy) -> None:
        assert self.missing_log is not None
        line = json.dumps({"name": record.name, "deleted": record.deleted, "store": record.store}) + "\n"
        try:
            # One open per record: a repair that renamed the log away gets a fresh file for new records.
            with open(self.missing_log, "a", encoding="utf-8") as log:
                log.write(line)
        except OSError as err:
            logger.error("cannot append to missing-copy log %s for %r: %s", self.missing_log, record.name, err)

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

    # Writes

    def _raise_incomplete(
        self, action: str, name: str, deleted: bool, done: Sequence[int], failures: Sequence[tuple[int, BaseException]]
    ) -> None:
        """Record the stores a write missed and raise: an incomplete write is never acknowledged."""
        failed = [index for index, _ in failures]
        if done:
            self._record_missing(name, deleted, failed, f"outdated after a failed {action}")
        details = "; ".join(f"{self.stores[i]!r}: {err}" for i, err in failures)
        message = (
            f"{action} of {name!r} reached {len(done)} of {len(done) + len(failed)} stores ({details}); "
            f"the copies may differ until the write is retried or `borgstorefs mstore repair` runs"
        )
        logger.error("%s", message)
        kinds = {type(err) for _, err in failures}
        error_class: type[BackendError] = BackendUnavailable
        for specific in (NoSpaceLeft, PermissionDenied):
            if kinds == {specific}:
                error_class = specific
        raise error_class(message) from failures[0][1]

    def store(self, name: str, value: bytes | BinaryIO) -> None:
        """Store *value* (bytes, or a binary file object read to its end) on every store that should hold *name*.

        Each copy is atomic, as in `Store.store`. If an expected store fails,
        the others are still written and `BackendUnavailable` (or
        `NoSpaceLeft`/`PermissionDenied` if every failure is one of those) is raised.
        """
        expected = self.placement(name)
        with ExitStack() as stack:
            rewind = self._rewindable(value, len(expected), stack)
            with self._locked(name):
                done: list[int] = []
                failures: list[tuple[int, BaseException]] = []
                for index in expected:
                    try:
                        self._ready(index).store(name, rewind())
                    except STORE_FAILURES as err:
                        self._note_failure(index, "store", name, err)
                        failures.append((index, err))
                    else:
                        done.append(index)
                if failures:
                    self._raise_incomplete("store", name, False, done, failures)

    @staticmethod
    def _rewindable(value: bytes | BinaryIO, copies: int, stack: ExitStack) -> Callable[[], bytes | BinaryIO]:
        """Return a function that gives *value* from its start once per copy.

        A stream that cannot seek is spooled to a local temporary file first,
        so that memory stays bounded.
        """
        if isinstance(value, bytes | bytearray | memoryview) or copies == 1:
            return lambda: value
        if value.seekable():
            start = value.tell()
        else:
            spool = stack.enter_context(tempfile.TemporaryFile(prefix="borgstorefs-mstore-"))  # noqa: SIM115
            shutil.copyfileobj(value, spool, COPY_CHUNK_SIZE)
            value, start = spool, 0  # type: ignore[assignment]

        def rewind() -> BinaryIO:
            value.seek(start)  # type: ignore[union-attr]
            return value  # type: ignore[return-value]

        return rewind

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
                        store.store(target, _stream(staged.read))
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

    def set_mtime(self, name: str, mtime_ns: int, *, deleted: bool = False) -> None:
        """Set the modification time (nanoseconds since the epoch) of every copy of *name*."""

        def set_copy_mtime(store: Store) -> None:
            store.set_mtime(name, mtime_ns, deleted=deleted)

        with self._locked(name):
            self._on_copies("set_mtime", name, deleted, set_copy_mtime, everywhere=True)

    def delete(self, name: str, *, deleted: bool = False) -> None:
        """Delete every copy of *name* for good, on all stores (with ``deleted=True``: its soft-deleted copies).

        `ObjectNotFound` if no store has it. See ``move(name, delete=True)`` for soft deletion.
        """
        with self._locked(name):
            self._on_copies("delete", name, deleted, lambda store: store.delete(name, deleted=deleted), everywhere=True)

    def _on_copies(
        self, action: str, name: str, deleted: bool, call: Callable[[Store], None], *, everywhere: bool = False
    ) -> None:
        """Run *call* on each store that should hold *name* (with *everywhere*: on all stores).

        A store that reports "not found" is skipped. Raises `ObjectNotFound`
        if every store did, and raises like `store` if a store failed.
        """
        indexes = self.read_order(name) if everywhere else self.placement(name)
        done: list[int] = []
        failures: list[tuple[int, BaseException]] = []
        for index in indexes:
            try:
                call(self._ready(index))
            except ObjectNotFound:
                continue
            except ObjectAlreadyExists:
                raise
            except STORE_FAILURES as err:
                self._note_failure(index, action, name, err)
                failures.append((index, err))
            else:
                done.append(index)
        if failures:
            self._raise_incomplete(action, name, deleted, done, failures)
        if not done:
            raise ObjectNotFound(name)

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
        """Rename, soft-delete, undelete or re-nest an item on every store, with the modes of `Store.move`.

        Soft deletion, undeletion and re-nesting apply to every store that
        has a copy. A rename to a name with other expected stores (a
        ``name-hash`` key, or another namespace) copies the value to the new
        stores first and removes the old copies last, so a crash in between
        leaves both names rather than neither.
        """
        modes = sum((delete, undelete, change_level))
        if modes > 1 or (modes and new_name is not None):
            raise ValueError(f"move of {name!r}: choose one of new_name, delete, undelete, change_level")
        if delete:
            with self._locked(name):
                self._on_copies("soft-delete", name, False, lambda s: s.move(name, delete=True), everywhere=True)
        elif undelete:
            with self._locked(name):
                if self.info(name).exists:
                    raise ObjectAlreadyExists(name, f"cannot undelete {name!r}: a live item with that name exists")
                self._on_copies("undelete", name, True, lambda s: s.move(name, undelete=True), everywhere=True)
        elif change_level:

            def change_copy_level(store: Store) -> None:
                store.move(name, change_level=True, deleted=deleted)

            with self._locked(name):
                self._on_copies("change-level", name, deleted, change_copy_level, everywhere=True)
        else:
            if new_name is None:
                raise ValueError(f"move of {name!r} needs new_name, delete, undelete or change_level")
            with self._locked(name, new_name):
                self._rename(name, new_name, deleted=deleted, replace=replace)

    def _rename(self, name: str, new_name: str, *, deleted: bool, replace: bool) -> None:
        if not replace and self.info(new_name, deleted=deleted).exists:
            raise ObjectAlreadyExists(new_name, f"cannot move {name!r}: the target {new_name!r} exists")
        targets = self.placement(new_name)
        done: list[int] = []
        needs_copy: list[int] = []
        failures: list[tuple[int, BaseException]] = []

        # 1. Rename in place on the target stores that hold the source.
        for index in targets:
            try:
                self._ready(index).move(name, new_name, deleted=deleted, replace=replace)
            except ObjectNotFound:
                needs_copy.append(index)
            except ObjectAlreadyExists:
                raise
            except STORE_FAILURES as err:
                self._note_failure(index, "move", name, err)
                failures.append((index, err))
            else:
                done.append(index)

        # 2. Copy to the target stores that lack the source, from a renamed copy or an old one.
        for index in needs_copy:
            try:
                self._copy_for_rename(name, new_name, deleted, done, index)
            except ObjectNotFound:
                logger.debug("move of %r: no copy left to copy to %r", name, self.stores[index])
                continue
            except STORE_FAILURES as err:
                self._note_failure(index, "move", name, err)
                failures.append((index, err))
            else:
                done.append(index)

        # 3. Remove the source from every other store, now that the new copies exist.
        if done:
            for index in self.read_order(name):
                if index in targets:
                    continue
                try:
                    self._ready(index).delete(name, deleted=deleted)
                except ObjectNotFound:
                    continue
                except STORE_FAILURES as err:
                    self._note_failure(index, "move", name, err)
                    failures.append((index, err))
        if failures:
            self._raise_incomplete("move", new_name, deleted, done, failures)
        if not done:
            raise ObjectNotFound(name)

    def _copy_for_rename(self, name: str, new_name: str, deleted: bool, renamed: Sequence[int], target: int) -> None:
        if renamed:
            self._copy(renamed[0], new_name, target, new_name, deleted, replace=True)
            return
        for source in self.read_order(name):
            if source == target:
                continue
            try:
                self._copy(source, name, target, new_name, deleted, replace=True)
                return
            except ObjectNotFound:
                continue
        raise ObjectNotFound(name)

    def _copy(self, source: int, name: str, target: int, new_name: str, deleted: bool, *, replace: bool) -> None:
        """Stream one copy from store *source* to store *target*, keeping its modification time.

        With ``replace=False`` the copy is written to a hidden temporary name
        and renamed without replacing, so a value written meanwhile by
        someone else always wins over the copy.
        """
        source_store, target_store = self._ready(source), self._ready(target)
        source_nested = source_store.find(name, deleted=deleted)
        source_info = source_store.backend.info(source_nested)
        if not source_info.exists:
            raise ObjectNotFound(name)
        target_nested = target_store.find(new_name, deleted=deleted)
        backend = target_store.backend

        def read_at(offset: int, size: int) -> bytes:
            return source_store.backend.load(source_nested, size=size, offset=offset)

        if replace:
            backend.store(target_nested, _stream(read_at))
        else:
            # 3 random bytes keep the longest name (240-character key, .del, .xxxxxx.tmp) at 255 characters.
            temp = f"{target_nested}.{secrets.token_hex(3)}{TMP_SUFFIX}"
            try:
                backend.store(temp, _stream(read_at))
                backend.move(temp, target_nested, replace=False)
            except BaseException:
                try:
                    backend.delete(temp)
                except STORE_FAILURES as err:
                    logger.debug("removing temporary copy %s failed: %s", temp, err)
                raise
        if source_info.mtime_ns is not None:
            backend.set_mtime(target_nested, source_info.mtime_ns)

    # Namespaces

    def create_namespace(self, namespace: str, levels: Sequence[int] | None = None) -> None:
        """Create *namespace* with *levels* on every store, and raise like `store` if one fails."""
        done: list[int] = []
        failures: list[tuple[int, BaseException]] = []
        for index in range(len(self.stores)):
            try:
                self._ready(index).create_namespace(namespace, levels)
            except STORE_FAILURES as err:
                self._note_failure(index, "create_namespace", namespace, err)
                failures.append((index, err))
            else:
                done.append(index)
        if failures:
            self._raise_incomplete("create_namespace", namespace or "/", False, [], failures)

    def remove_namespace(self, namespace: str) -> None:
        """Remove an empty *namespace* from every store.

        Raises `DirectoryNotEmpty` if any store holds a live or soft-deleted
        item in it, and `ObjectNotFound` if no store has it.
        """
        for deleted in (False, True):
            for _ in self.list(namespace, deleted=deleted):
                raise DirectoryNotEmpty(namespace)
        done: list[int] = []
        failures: list[tuple[int, BaseException]] = []
        for index in range(len(self.stores)):
            try:
                self._ready(index).remove_namespace(namespace)
            except ObjectNotFound:
                continue
            except STORE_FAILURES as err:
                self._note_failure(index, "remove_namespace", namespace, err)
                failures.append((index, err))
            else:
                done.append(index)
        if failures:
            self._raise_incomplete("remove_namespace", namespace, False, [], failures)
        if not done:
            raise ObjectNotFound(namespace, f"namespace not found: {namespace!r}")

    # Check and repair

    def inspect(self, name: str, *, deleted: bool = False, verify: bool = False) -> CopyReport:
        """Ask every store about *name* and return where its copies are.

        With ``verify=True`` every copy is read to compare SHA-256 digests, so
        that copies of equal size but other content count as differing.
        """
        namespace, key = split_name(name)
        copies: dict[int, ItemInfo] = {}
        unreachable: set[int] = set()
        for index in range(len(self.stores)):
            try:
                info = self._ready(index).info(name, deleted=deleted)
            except STORE_FAILURES as err:
                self._note_failure(index, "info", name, err)
                unreachable.add(index)
                continue
            if info.exists:
                copies[index] = info
        report = self._report(namespace, key, deleted, copies, frozenset(unreachable))
        if not verify or len(copies) < 2:
            return report
        digests: dict[int, bytes] = {}
        for index in list(copies):
            try:
                digests[index] = self._digest(index, name, deleted)
            except STORE_FAILURES as err:
                self._note_failure(index, "verify", name, err)
                del copies[index]
                unreachable.add(index)
        return self._report(namespace, key, deleted, copies, frozenset(unreachable), digests)

    def _digest(self, index: int, name: str, deleted: bool) -> bytes:
        """Return the SHA-256 of the copy of *name* on store *index*, read in chunks."""
        store = self._ready(index)
        nested = store.find(name, deleted=deleted)
        digest = hashlib.sha256()
        offset = 0
        while chunk := store.backend.load(nested, size=COPY_CHUNK_SIZE, offset=offset):
            digest.update(chunk)
            offset += len(chunk)
        return digest.digest()

    def _report(
        self,
        namespace: str,
        key: str,
        deleted: bool,
        copies: dict[int, ItemInfo],
        unreachable: frozenset[int],
        digests: dict[int, bytes] | None = None,
    ) -> CopyReport:
        name = f"{namespace}/{key}" if namespace else key
        try:
            expected = self._placement_of_key(namespace, key)
        except ValueError as err:
            return CopyReport(name, deleted, (), copies, unreachable, problem=str(err))
        return CopyReport(name, deleted, expected, copies, unreachable, digests=digests)

    def scan(self, namespaces: Sequence[str] | None = None) -> Iterator[CopyReport]:
        """Yield a `CopyReport` for every live and soft-deleted item, from the listings of all stores.

        Order: namespaces sorted (the root namespace first), live items before
        soft-deleted ones, keys sorted. A store that cannot be listed counts
        as unreachable for the items of that listing.
        """
        if namespaces is None:
            namespaces = [ROOTNS, *self.namespaces()]
        for namespace in sorted(namespaces):
            for deleted in (False, True):
                yield from self._scan_listing(namespace, deleted)

    def _scan_listing(self, namespace: str, deleted: bool) -> Iterator[CopyReport]:
        unreachable: set[int] = set()

        def entries(index: int) -> Iterator[tuple[str, int, ItemInfo]]:
            try:
                for info in self._ready(index).list(namespace, deleted=deleted):
                    yield info.name, index, info
            except ObjectNotFound:
                return
            except STORE_FAILURES as err:
                self._note_failure(index, "list", namespace, err)
                unreachable.add(index)

        merged = heapq.merge(*(entries(i) for i in range(len(self.stores))))
        for key, group in groupby(merged, key=lambda entry: entry[0]):
            copies = {index: info for _, index, info in group}
            yield self._report(namespace, key, deleted, copies, frozenset(unreachable))

    def repair_name(self, name: str, *, deleted: bool = False, verify: bool = False) -> RepairResult:
        """Bring the copies of *name* in line with the layout, and return what was done.

        Missing expected copies are re-created and differing copies (other
        size, or with *verify* other content) are overwritten from the source
        copy, the newest one (see `CopyReport.source`). Copies on stores that
        should not hold the item are removed, but only once every expected
        store holds a copy.
        """
        with self._locked(name):
            report = self.inspect(name, deleted=deleted, verify=verify)
            result = self._repair_report(report)
        if not result.failed:
            with self._records_lock:
                for index in range(len(self.stores)):
                    self.missing_copies.discard(MissingCopy(name, deleted, index))
        return result

    def _repair_report(self, report: CopyReport) -> RepairResult:
        result = RepairResult()
        source = report.source
        if report.problem or source is None:
            if report.problem:
                result.failed.append(f"{report.name}: {report.problem}")
            return result
        fixes = [(i, False) for i in report.missing] + [(i, True) for i in report.differing]
        for index, replace in fixes:
            try:
                self._copy(source, report.name, index, report.name, report.deleted, replace=replace)
            except ObjectAlreadyExists:
                # Written meanwhile by someone else, whose value wins over the copy.
                logger.debug("repair of %r: %r got a new value meanwhile, not copying", report.name, self.stores[index])
                continue
            except STORE_FAILURES as err:
                self._note_failure(index, "repair", report.name, err)
                result.failed.append(f"{report.name}: copy to {self.stores[index]!r} failed: {err}")
            else:
                result.copied += 1
        unreachable_expected = [i for i in report.expected if i in report.unreachable]
        for index in unreachable_expected:
            result.failed.append(f"{report.name}: {self.stores[index]!r} is unreachable")
        if result.failed:
            return result
        for index in report.extra:
            try:
                self._ready(index).delete(report.name, deleted=report.deleted)
            except ObjectNotFound:
                continue
            except STORE_FAILURES as err:
                self._note_failure(index, "repair", report.name, err)
                result.failed.append(f"{report.name}: removing the copy on {self.stores[index]!r} failed: {err}")
            else:
                result.removed += 1
        return result

    def repair_missing(self) -> RepairResult:
        """Repair every item in `missing_copies` with ``repair_name(verify=True)``, and return the totals.

        Verifying matters here because a failed overwrite can leave an old
        copy of the same size as the new one.
        """
        with self._records_lock:
            names = sorted({(record.name, record.deleted) for record in self.missing_copies})
        total = RepairResult()
        for name, deleted in names:
            total.add(self.repair_name(name, deleted=deleted, verify=True))
        return total

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
