"""The ``borgstorefs mstore check`` and ``borgstorefs mstore repair`` commands, and multi-store specifications.

A specification names the stores of an `MStore` with their bucket counts,
the kinds of its namespaces and their nesting levels. It comes from the
command line (``--store URL:BUCKETS`` in store order, ``--kind
NAMESPACE=KIND``, ``--levels NAMESPACE=LEVELS``) or from a TOML file
(``--config FILE``); ``docs/mstore.md`` shows both. `add_spec_options`,
`spec_from_args` and `build_mstore` are shared with ``borgstorefs mount``.

This module does not import `borgstorefs.cli`, so that ``cli`` can import
it at module level without an import cycle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .backends import redact_url
from .mstore import BUCKETS, KINDS, CopyReport, MStore, RepairResult, parse_kinds, read_missing_log
from .nesting import Levels, parse_levels_config, parse_levels_option
from .store import Store

__all__ = [
    "EXIT_PROBLEMS",
    "MStoreSpec",
    "ProgressDisplay",
    "StoreSpec",
    "add_parser",
    "add_spec_options",
    "build_mstore",
    "load_spec_file",
    "parse_kind_option",
    "parse_store_option",
    "spec_from_args",
]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_PROBLEMS = 3
"""Exit status of ``check`` when it found problems, and of ``repair`` when some remain."""

STATE_SAVE_INTERVAL = 2.0
"""Seconds between saves of the repair position, so an interrupted repair redoes at most this much work."""


# Specifications


@dataclass(frozen=True)
class StoreSpec:
    """One store of a specification: its URL and how many of the 256 buckets it holds."""

    url: str
    buckets: int


@dataclass
class MStoreSpec:
    """Everything needed to build an `MStore`: stores in order, kinds and nesting levels."""

    stores: list[StoreSpec]
    kinds: dict[str, str] = field(default_factory=dict)
    levels: dict[str, Levels] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Return a short hash of the layout (URLs without passwords, buckets, kinds) that names resume state."""
        layout = {
            "stores": [[redact_url(store.url), store.buckets] for store in self.stores],
            "kinds": dict(sorted(self.kinds.items())),
        }
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def parse_store_option(text: str) -> StoreSpec:
    """Parse ``URL:BUCKETS`` such as ``file:///srv/a:256`` (the bucket count follows the last colon)."""
    url, colon, count = text.rpartition(":")
    if not colon or not url or not count.isdigit():
        raise ValueError(
            f"invalid store {text!r}: expected URL:BUCKETS, for example file:///srv/a:256 or sftp://host/srv/b:128"
        )
    return StoreSpec(url, int(count))


def parse_kind_option(text: str) -> tuple[str, str]:
    """Parse ``NAMESPACE=KIND`` such as ``data=hex-hash``, where ``=generic`` sets the root namespace."""
    namespace, equals, kind = text.partition("=")
    if not equals:
        raise ValueError(f"invalid kind option {text!r}: expected NAMESPACE=KIND, for example data=hex-hash")
    parsed = parse_kinds({namespace: kind})
    return next(iter(parsed.items()))


SPEC_FILE_KEYS = {"stores", "kinds", "levels"}
STORE_TABLE_KEYS = {"url", "buckets"}


def load_spec_file(path: str | os.PathLike[str]) -> MStoreSpec:
    """Read a TOML specification: ``[[stores]]`` tables with ``url`` and ``buckets``, ``[kinds]``, ``[levels]``.

    Raises `ValueError` naming the file and the problem.
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"invalid TOML in {path}: {err}") from None
    unknown = set(data) - SPEC_FILE_KEYS
    if unknown:
        raise ValueError(f"unknown keys in {path}: {', '.join(sorted(unknown))} (known: stores, kinds, levels)")
    stores = data.get("stores")
    if not isinstance(stores, list) or not stores:
        raise ValueError(f"{path} must list the stores as [[stores]] tables with url and buckets")
    specs = [_store_table(path, number, table) for number, table in enumerate(stores, 1)]
    try:
        kinds = parse_kinds(data.get("kinds", {}))
        levels = parse_levels_config(data.get("levels", {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid specification in {path}: {err}") from None
    return MStoreSpec(specs, kinds, levels)


def _store_table(path: str | os.PathLike[str], number: int, table: Any) -> StoreSpec:
    if not isinstance(table, dict) or set(table) != STORE_TABLE_KEYS:
        raise ValueError(f"store {number} in {path} must have exactly the keys url and buckets, not {table!r}")
    url, buckets = table["url"], table["buckets"]
    if not isinstance(url, str) or not isinstance(buckets, int) or isinstance(buckets, bool):
        raise ValueError(f"store {number} in {path}: url must be a string and buckets an integer")
    return StoreSpec(url, buckets)


def _argument(parse: Any) -> Any:
    """Wrap *parse* so argparse reports its `ValueError` as a usage error with the message."""

    def parse_argument(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse_argument


def add_spec_options(parser: argparse.ArgumentParser, *, levels: bool = True) -> None:
    """Add ``--config``, ``--store``, ``--kind`` and (unless *levels* is False) ``--levels`` to *parser*.

    A parser that has its own ``--levels`` passes ``levels=False``, and its
    ``args.levels`` (pairs of namespace and levels) is then used instead.
    """
    parser.add_argument("--config", metavar="FILE", help="TOML file with the stores, kinds and levels")
    parser.add_argument(
        "--store",
        metavar="URL:BUCKETS",
        dest="stores",
        type=_argument(parse_store_option),
        action="append",
        default=[],
        help=f"a store URL and its number of the {BUCKETS} buckets, e.g. file:///srv/a:256 (repeat in store order)",
    )
    parser.add_argument(
        "--kind",
        metavar="NAMESPACE=KIND",
        dest="kinds",
        type=_argument(parse_kind_option),
        action="append",
        default=[],
        help=f"how items of a namespace are placed: {', '.join(KINDS)} (repeatable; default name-hash)",
    )
    if not levels:
        return
    parser.add_argument(
        "--levels",
        metavar="NAMESPACE=LEVELS",
        type=_argument(parse_levels_option),
        action="append",
        default=[],
        help="nesting levels of a namespace on every store, e.g. data=2 (repeatable; default: detected)",
    )


def spec_from_args(args: argparse.Namespace) -> MStoreSpec:
    """Return the specification given by the options of `add_spec_options`.

    ``--kind`` and ``--levels`` add to or override those of ``--config``.
    ``--config`` and ``--store`` cannot be combined.
    """
    if args.config and args.stores:
        raise ValueError("give the stores either with --config or with --store, not both")
    if args.config:
        spec = load_spec_file(args.config)
    elif args.stores:
        spec = MStoreSpec(list(args.stores))
    else:
        raise ValueError("no stores given: use --store URL:BUCKETS (repeatable) or --config FILE")
    spec.kinds.update(dict(args.kinds))
    spec.levels.update(dict(getattr(args, "levels", None) or []))
    return spec


def build_mstore(spec: MStoreSpec, **options: Any) -> MStore:
    """Return an unopened `MStore` for *spec*, passing *options* to `MStore` (e.g. ``missing_log``)."""
    stores = [Store(store.url, levels=spec.levels) for store in spec.stores]
    return MStore(stores, [store.buckets for store in spec.stores], spec.kinds, **options)


# Progress


class ProgressDisplay:
    """A progress line, redrawn in place on a terminal and written every *interval* seconds to other streams."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.interval = 0.2 if self.interactive else interval
        self._last = time.monotonic()  # the first line comes after one interval, so short runs print only the last

    def line(self, done: int, detail: str) -> str:
        """Return the progress line for *done* of `total` items."""
        fraction = done / self.total if self.total else 1.0
        filled = int(fraction * 30)
        bar = "#" * filled + "." * (30 - filled)
        return f"{self.label}: [{bar}] {fraction:6.1%} {done}/{self.total} items {detail}"

    def update(self, done: int, detail: str = "", *, force: bool = False) -> None:
        """Show the progress if the interval passed since the last update (or *force*)."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.interactive:
            self.stream.write("\r" + self.line(done, detail) + "\x1b[K")
        else:
            self.stream.write(self.line(done, detail) + "\n")
        self.stream.flush()

    def finish(self, done: int, detail: str = "") -> None:
        """Show the final state and end the line."""
        self.update(done, detail, force=True)
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


# check


def describe_problems(mstore: MStore, report: CopyReport) -> list[str]:
    """Return one line per problem of *report*, naming the stores."""

    def stores(indexes: Iterable[int]) -> str:
        return ", ".join(f"{i} ({mstore.stores[i]!r})" for i in indexes)

    item = f"{report.name} (soft-deleted)" if report.deleted else report.name
    lines = []
    if report.problem:
        lines.append(f"{item}: cannot be placed: {report.problem}")
    if report.missing:
        lines.append(f"{item}: missing copy on store {stores(report.missing)}")
    if report.differing:
        kind = "other content" if report.digests is not None else "another size"
        lines.append(f"{item}: copy of {kind} on store {stores(report.differing)}")
    if report.extra:
        lines.append(f"{item}: extra copy on store {stores(report.extra)}, which the layout does not assign it to")
    unreachable = [i for i in report.expected if i in report.unreachable]
    if unreachable:
        lines.append(f"{item}: cannot check store {stores(unreachable)}: unreachable")
    return lines


def cmd_check(args: argparse.Namespace) -> int:
    """Report items with missing, extra or differing copies, and return 3 if there are any."""
    spec = spec_from_args(args)
    with build_mstore(spec, read_repair=False) as mstore:
        namespaces = _namespaces(mstore, args.namespace)
        progress = ProgressDisplay("check", _count(mstore, namespaces))
        checked = unhealthy = 0
        for listed in mstore.scan(namespaces):
            checked += 1
            report = _verified(mstore, listed) if args.verify else listed
            if not report.healthy:
                unhealthy += 1
                for line in describe_problems(mstore, report):
                    print(line)
            progress.update(checked, f"{unhealthy} with problems")
        progress.finish(checked, f"{unhealthy} with problems")
    print(f"checked {checked} items: {unhealthy} with problems")
    return EXIT_PROBLEMS if unhealthy else EXIT_OK


def _verified(mstore: MStore, report: CopyReport) -> CopyReport:
    """Return *report* with content digests if its copies look alike by their listings."""
    if not report.healthy or len(report.copies) < 2:
        return report
    return mstore.inspect(report.name, deleted=report.deleted, verify=True)


def _namespaces(mstore: MStore, chosen: Sequence[str] | None) -> list[str]:
    if chosen:
        return sorted({namespace.removesuffix("/") for namespace in chosen})
    return ["", *mstore.namespaces()]


def _count(mstore: MStore, namespaces: Sequence[str]) -> int:
    """Count the items by listing every store once, so that the progress display has a total."""
    return sum(1 for _ in mstore.scan(namespaces))


# repair


def default_state_path(spec: MStoreSpec) -> Path:
    """Return where ``repair`` keeps its position for *spec*: below ``$XDG_STATE_HOME`` or ``~/.local/state``."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "borgstorefs" / f"mstore-repair-{spec.fingerprint()}.json"


@dataclass
class RepairState:
    """Resume point of an interrupted repair: the last item done, in scan order, and the counts so far."""

    fingerprint: str
    position: tuple[str, bool, str] | None = None
    copied: int = 0
    removed: int = 0

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> RepairState:
        """Return the saved state at *path*, or a fresh one if there is none or it is for another layout."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(fingerprint)
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable repair state %s: %s", path, err)
            return cls(fingerprint)
        if data.get("fingerprint") != fingerprint:
            logger.warning("ignoring repair state %s: it was saved for another layout", path)
            return cls(fingerprint)
        try:
            copied, removed = int(data["copied"]), int(data["removed"])
            if data["position"] is None:
                return cls(fingerprint, None, copied, removed)
            namespace, deleted, key = data["position"]
        except (KeyError, TypeError, ValueError) as err:
            logger.warning("ignoring invalid repair state %s: %s", path, err)
            return cls(fingerprint)
        return cls(fingerprint, (str(namespace), bool(deleted), str(key)), copied, removed)

    def save(self, path: Path) -> None:
        """Write the state atomically (temporary file and rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(path.name + ".tmp")
        state = {
            "fingerprint": self.fingerprint,
            "position": self.position,
            "copied": self.copied,
            "removed": self.removed,
        }
        temp.write_text(json.dumps(state))
        temp.replace(path)


def _scan_position(report: CopyReport) -> tuple[str, bool, str]:
    namespace, _, key = report.name.rpartition("/")
    return namespace, report.deleted, key


def cmd_repair(args: argparse.Namespace) -> int:
    """Re-create missing copies and move items to the stores of the layout, resuming a saved position."""
    spec = spec_from_args(args)
    with build_mstore(spec, read_repair=False) as mstore:
        if args.missing_log:
            result = _repair_from_log(mstore, Path(args.missing_log))
        else:
            state_path = Path(args.state) if args.state else default_state_path(spec)
            result = _repair_all(mstore, spec, state_path, args.namespace, restart=args.restart, verify=args.verify)
    for failure in result.failed:
        print(f"not repaired: {failure}")
    print(f"repair: {result.copied} copies made, {result.removed} extra copies removed, {len(result.failed)} failures")
    return EXIT_PROBLEMS if result.failed else EXIT_OK


def _repair_all(
    mstore: MStore,
    spec: MStoreSpec,
    state_path: Path,
    chosen: Sequence[str] | None,
    *,
    restart: bool,
    verify: bool,
) -> RepairResult:
    state = RepairState(spec.fingerprint()) if restart else RepairState.load(state_path, spec.fingerprint())
    if state.position is not None:
        print(f"resuming the repair after {state.position[0]}/{state.position[2]} ({state_path})", file=sys.stderr)
    namespaces = _namespaces(mstore, chosen)
    progress = ProgressDisplay("repair", _count(mstore, namespaces))
    result = RepairResult(state.copied, state.removed)
    done = 0
    last_save = time.monotonic()
    try:
        for report in mstore.scan(namespaces):
            done += 1
            position = _scan_position(report)
            if state.position is not None and position <= state.position:
                continue
            if verify or not report.healthy:
                result.add(mstore.repair_name(report.name, deleted=report.deleted, verify=verify))
            state.position, state.copied, state.removed = position, result.copied, result.removed
            if time.monotonic() - last_save >= STATE_SAVE_INTERVAL:
                state.save(state_path)
                last_save = time.monotonic()
            progress.update(done, f"{result.copied} copied, {result.removed} removed")
    except BaseException:
        # Interrupted (Ctrl-C) or failed: keep the position so the next run resumes.
        state.save(state_path)
        raise
    progress.finish(done, f"{result.copied} copied, {result.removed} removed")
    state_path.unlink(missing_ok=True)
    return result


def _repair_from_log(mstore: MStore, log_path: Path) -> RepairResult:
    """Repair only the items in a missing-copy log.

    The log is first renamed to ``*.repairing``, so that a running mount
    appends new records to a fresh file. The renamed file is removed only
    when every item was repaired. Otherwise, the next run reads it again.
    """
    working = log_path.with_name(log_path.name + ".repairing")
    if log_path.exists():
        if working.exists():
            with working.open("a", encoding="utf-8") as target:
                target.write(log_path.read_text(encoding="utf-8"))
            log_path.unlink()
        else:
            log_path.rename(working)
    if not working.exists():
        print(f"no missing-copy records in {log_path}", file=sys.stderr)
        return RepairResult()
    names = sorted({(record.name, record.deleted) for record in read_missing_log(working)})
    progress = ProgressDisplay("repair", len(names))
    result = RepairResult()
    for done, (name, deleted) in enumerate(names, 1):
        result.add(mstore.repair_name(name, deleted=deleted, verify=True))
        progress.update(done, f"{result.copied} copied, {result.removed} removed")
    progress.finish(len(names), f"{result.copied} copied, {result.removed} removed")
    if not result.failed:
        working.unlink()
    return result


# Registration

VERIFY_HELP = "read every copy and compare SHA-256 digests, not only sizes (reads all data)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``borgstorefs mstore check`` and ``borgstorefs mstore repair``."""
    mstore_parser = subparsers.add_parser("mstore", help="check and repair the copies of a multi-store")
    commands = mstore_parser.add_subparsers(dest="mstore_command", required=True, metavar="MSTORE_COMMAND")

    check = commands.add_parser(
        "check", help="report items with missing, extra or differing copies (exit status 3 if any)"
    )
    add_spec_options(check)
    check.add_argument("--namespace", action="append", help="check only this namespace (repeatable)")
    check.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    check.set_defaults(handler=cmd_check)

    repair = commands.add_parser("repair", help="re-create missing copies and move items where the layout wants them")
    add_spec_options(repair)
    repair.add_argument("--namespace", action="append", help="repair only this namespace (repeatable)")
    repair.add_argument(
        "--state",
        metavar="FILE",
        help="where to keep the position for resuming (default: $XDG_STATE_HOME/borgstorefs/mstore-repair-*.json)",
    )
    repair.add_argument("--restart", action="store_true", help="ignore a saved position and start from the beginning")
    repair.add_argument(
        "--missing-log",
        metavar="FILE",
        help="repair only the items recorded in this missing-copy log (written by a mount), not every item",
    )
    repair.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    repair.set_defaults(handler=cmd_repair)
