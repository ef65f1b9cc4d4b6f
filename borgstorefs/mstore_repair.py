"""Missing copies, copy reports, and the check and repair of the copies of an `MStore`.

`MissingCopy` records a copy that a read found missing or that a failed
write left outdated, and `read_missing_log` reads such records back from a
mount's log file. `CopyReport` compares where an item's copies are with
where the layout wants them. `MStoreRepair` contains the `MStore` methods that
record missing copies and that inspect, scan and repair items.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .backends import ItemInfo
from .backends._base import COPY_CHUNK_SIZE
from .errors import BackendError, ObjectAlreadyExists, ObjectNotFound
from .names import ROOTNS, split_name

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "STORE_FAILURES",
    "MStoreRepair",
    "CopyReport",
    "MissingCopy",
    "RepairResult",
    "read_missing_log",
]

logger = logging.getLogger(__name__)


STORE_FAILURES = (BackendError, OSError)
"""Errors that mean one store failed, so another copy may still serve or take the request."""


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


# Methods of MStore


class MStoreRepair:
    """The `MStore` methods that record missing copies and inspect, scan and repair items.

    `MStore` inherits them, and only `MStore` may: they use the attributes
    and helpers declared below, which `MStore` defines.
    """

    if TYPE_CHECKING:
        stores: list[Store]
        missing_log: Path | None
        missing_copies: set[MissingCopy]
        _records_lock: threading.Lock

        def _ready(self, index: int) -> Store: ...

        def _note_failure(self, index: int, action: str, name: str, err: BaseException) -> None: ...

        def _placement_of_key(self, namespace: str, key: str) -> tuple[int, ...]: ...

        def _locked(self, *names: str) -> AbstractContextManager[None]: ...

        def _copy(
            self, source: int, name: str, target: int, new_name: str, deleted: bool, *, replace: bool
        ) -> None: ...

        def namespaces(self) -> list[str]: ...

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
