"""The write rule of an `MStore`: writes, removals, renames and namespaces on every store that needs them.

A write must reach every store that should hold the item. `MStoreWrites`
applies each write to every reachable store and raises, after recording
the stores it missed, if any of them failed, so that no write is
acknowledged while an expected copy still has an older value. Removals also
reach stores that should not hold the item, so that a left-over copy
cannot reappear. ``docs/mstore.md`` gives the reasons.
"""

from __future__ import annotations

import io
import logging
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import TYPE_CHECKING, BinaryIO

from .backends import ItemInfo
from .backends._base import COPY_CHUNK_SIZE
from .errors import (
    BackendError,
    BackendUnavailable,
    DirectoryNotEmpty,
    NoSpaceLeft,
    ObjectAlreadyExists,
    ObjectNotFound,
    PermissionDenied,
)
from .mstore_repair import STORE_FAILURES
from .names import TMP_SUFFIX

if TYPE_CHECKING:
    from .store import Store

__all__ = ["MStoreWrites", "chunked_stream"]

logger = logging.getLogger(__name__)


# Streaming


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


def chunked_stream(read_at: Callable[[int, int], bytes]) -> BinaryIO:
    """Return a binary stream that reads through *read_at* in chunks of `COPY_CHUNK_SIZE` bytes."""
    return io.BufferedReader(_ReadAtStream(read_at), COPY_CHUNK_SIZE)  # type: ignore[return-value]


class MStoreWrites:
    """The `MStore` methods that write, remove, rename and manage namespaces under the write rule.

    `MStore` inherits them, and only `MStore` may: they use the attributes
    and helpers declared below, which `MStore` and `MStoreRepair` define.
    """

    if TYPE_CHECKING:
        stores: list[Store]

        def _ready(self, index: int) -> Store: ...

        def _note_failure(self, index: int, action: str, name: str, err: BaseException) -> None: ...

        def _record_missing(self, name: str, deleted: bool, indexes: Sequence[int], reason: str) -> None: ...

        def _locked(self, *names: str) -> AbstractContextManager[None]: ...

        def placement(self, name: str) -> tuple[int, ...]: ...

        def read_order(self, name: str) -> tuple[int, ...]: ...

        def info(self, name: str, *, deleted: bool = False) -> ItemInfo: ...

        def list(self, namespace: str, *, deleted: bool = False) -> Iterator[ItemInfo]: ...

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
            backend.store(target_nested, chunked_stream(read_at))
        else:
            # 3 random bytes keep the longest name (240-character key, .del, .xxxxxx.tmp) at 255 characters.
            temp = f"{target_nested}.{secrets.token_hex(3)}{TMP_SUFFIX}"
            try:
                backend.store(temp, chunked_stream(read_at))
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

        Raises `DirectoryNotEmpty` if any store contains a live or soft-deleted
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
