"""The ``mount`` and ``umount`` subcommands: options, the daemon's lifecycle, signals and unmounting.

``borgstorefs mount URL MOUNTPOINT`` returns 0 only once the store opened and
the kernel mounted the file system. ``borgstorefs mount --store URL:BUCKETS
... MOUNTPOINT`` or ``--config FILE MOUNTPOINT`` mounts several stores as one
`MStore` (see ``docs/mstore.md``), with the same semantics. Without ``-f`` the command starts itself
again as a detached foreground daemon (a fresh process, not a fork of one
that may already run threads) and waits for a line on a readiness pipe:
``ok`` or the error message, which it prints as its one line of output.

The daemon stops on unmount (``borgstorefs umount``, ``fusermount3 -u``,
``umount``) and on SIGINT or SIGTERM. Before it exits it commits every file
still open with changes. ``auto_unmount`` is not used, so a daemon that dies
leaves the mount point failing with ENOTCONN until someone unmounts it, and no
program mistakes a crash for an empty store.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import NamedTuple, cast
from urllib.parse import quote

from . import request_loop
from .backends import PosixFS, redact_url
from .cli import EXIT_ERROR, EXIT_OK, add_levels_option
from .fs import FileSystem, FSOptions
from .mstore import MStore
from .mstore_cli import MStoreSpec, add_spec_options, build_mstore, spec_from_args
from .mstore_layout import bucket_owners
from .request_loop import DEFAULT_POLL_US
from .store import Store
from .workers import DEFAULT_QUICK_WAIT_US, DEFAULT_THREADS, StoreRunner

__all__ = ["add_parser"]

logger = logging.getLogger(__name__)

FSTYPE = "fuse.borgstorefs"
"""File system type shown by ``mount`` and ``findmnt`` (FUSE prefixes the subtype)."""

DEFAULT_TIMEOUT = 10.0

"""Default attribute, entry and negative-entry cache timeout in seconds.

Long enough that ``ls -l`` and a repeated ``rsync`` are answered from the
kernel's cache; changes made by other clients of the store show after it.
"""

DEFAULT_READ_AHEAD_KIB = 1024
"""Kernel read-ahead for the mount, in KiB (``-o read_ahead=KIB``).

The kernel gives a FUSE mount 128 KiB, so a sequential reader reaches the
daemon as 128 KiB requests. At 1 MiB, the largest request libfuse 3 accepts,
a 1 GiB read takes half as long on a local store.
"""

DEFAULT_READ_AROUND_KIB = 256
"""Block loaded around a small read at a new place of a file on a remote store, in KiB (``-o read_around=KIB``).

The rest of the block goes to the kernel's page cache. Over SFTP a 256 KiB load
costs little more than the round trip of a 4 KiB one (about 0.5 ms on
loopback), and random readers of a file often come back near earlier reads.
"""

MAX_READ_AROUND_KIB = 8 * 1024
"""Largest ``-o read_around`` accepted, in KiB: the block is held in memory once per open handle."""

MAX_REQUEST_POLL_US = 100_000
"""Maximum ``-o request_poll`` value, in µs: the trio loop runs nothing else while it waits."""

MAX_QUICK_WAIT_US = 100_000
"""Maximum ``-o quick_wait`` value, in µs: the trio loop runs nothing else while it blocks."""

MAX_READ_AHEAD_KIB = 1024 * 1024
"""Largest ``-o read_ahead`` accepted, in KiB (1 GiB): more would only fill the page cache for nothing."""

STARTUP_TIMEOUT = 120.0
"""Seconds the background command waits for the daemon to report (an SFTP login may retry)."""

PASSED_OPTIONS = frozenset(
    {
        "allow_other",
        "allow_root",
        "auto_unmount",
        "debug",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "suid",
        "nosuid",
        "atime",
        "noatime",
        "sync",
        "async",
        "dirsync",
    }
)
"""``-o`` options handed to libfuse unchanged. ``ro``, ``rw`` and the timeouts are handled here."""


class MountError(Exception):
    """The mount cannot be made: a bad option or mount point, or libfuse failed (one-line message)."""


# Command line


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``mount`` and ``umount`` subcommands."""
    mount = subparsers.add_parser(
        "mount",
        help="mount a store as a file system",
        usage="%(prog)s [OPTIONS] URL MOUNTPOINT\n"
        "       %(prog)s [OPTIONS] --store URL:BUCKETS [--store URL:BUCKETS ...] [--kind NS=KIND ...] MOUNTPOINT\n"
        "       %(prog)s [OPTIONS] --config FILE MOUNTPOINT",
        description="Mount the store at URL on MOUNTPOINT (an empty directory), or several stores as one "
        "with --store (repeatable, in store order) or --config (a TOML file). "
        "Runs in the background unless -f is given; stop it with 'borgstorefs umount MOUNTPOINT'.",
    )
    mount.add_argument(
        "url",
        metavar="URL",
        nargs="?",
        help="file:///abs/path or sftp://[user@]host[:port]/path; leave it out with --store or --config",
    )
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground and log to stderr")
    mount.add_argument(
        "-d", "--debug", dest="debug_requests", action="store_true", help="log every request and store call (DEBUG)"
    )
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTION[,OPTION...]",
        help="mount options: ro, rw, allow_other, allow_root, debug (libfuse's own request log), "
        "attr_timeout=SECONDS, entry_timeout=SECONDS, negative_timeout=SECONDS (default "
        f"{DEFAULT_TIMEOUT:g} each), read_ahead=KIB (kernel read-ahead, default {DEFAULT_READ_AHEAD_KIB}; "
        f"0 keeps the kernel's), read_around=KIB (block loaded around a random read and kept in the kernel's "
        f"page cache, default {DEFAULT_READ_AROUND_KIB} for remote stores and 0, off, for file:// stores), "
        f"threads=N (store calls at once, default {DEFAULT_THREADS}), "
        f"request_poll=USEC (how long an idle request loop waits for the next request before it yields "
        f"to trio, default {DEFAULT_POLL_US}; 0 uses pyfuse3's own wait), "
        f"quick_wait=USEC (how long the request loop blocks for a quick store call in a worker thread "
        f"while it serves no other request, default {DEFAULT_QUICK_WAIT_US}; 0 always yields to trio), "
        "inline_quick or threaded_quick (run quick store calls, metadata and reads up to 128 KiB, in the "
        "request loop or in worker threads; default: inline for file:// stores), "
        "and the generic noatime, nodev, nosuid, noexec, sync, dirsync",
    )
    add_levels_option(
        mount,
        "nesting levels of a namespace, e.g. data=2 or data=0,1,2 (repeatable; default: detected from the "
        "store, flat for new namespaces)",
    )
    add_spec_options(mount, levels=False)
    mount.add_argument(
        "--missing-log",
        metavar="FILE",
        help="with --store or --config: append each copy that a read finds missing to FILE, "
        "for 'borgstorefs mstore repair --missing-log FILE' (default: only logged as WARNING)",
    )
    mount.add_argument(
        "--log-file",
        metavar="PATH",
        help="append the daemon's log to PATH instead of stderr (a daemon in the background has no stderr)",
    )
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.set_defaults(handler=cmd_mount)

    umount = subparsers.add_parser(
        "umount",
        help="unmount a mounted store",
        description="Unmount MOUNTPOINT, also after its daemon died (Transport endpoint is not connected).",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.set_defaults(handler=cmd_umount)


class MountSettings:
    """The parsed ``-o`` options: our own settings and the options passed to libfuse."""

    def __init__(self, option_args: list[str]) -> None:
        self.read_only = False
        self.timeouts = {"attr_timeout": DEFAULT_TIMEOUT, "entry_timeout": DEFAULT_TIMEOUT}
        self.timeouts["negative_timeout"] = DEFAULT_TIMEOUT
        self.threads = DEFAULT_THREADS
        self.read_ahead_kib = DEFAULT_READ_AHEAD_KIB
        self.read_ahead_given = False  # a failure to apply it is then a warning, not a note
        self.inline_quick: bool | None = None  # None: inline for local (file://) stores
        self.read_around_kib: int | None = None  # None: the default for remote stores, off for local ones
        self.request_poll_us = DEFAULT_POLL_US
        self.quick_wait_us = DEFAULT_QUICK_WAIT_US
        self.fuse_options: set[str] = set()
        for option in (part for arg in option_args for part in arg.split(",") if part):
            self._add(option)

    def _add(self, option: str) -> None:
        name, equals, value = option.partition("=")
        if option in ("ro", "rw"):
            self.read_only = option == "ro"
        elif option in ("inline_quick", "threaded_quick"):
            self.inline_quick = option == "inline_quick"
        elif option in PASSED_OPTIONS:
            self.fuse_options.add(option)
        elif equals and name in ("attr_timeout", "entry_timeout", "negative_timeout"):
            self.timeouts[name] = _parse_number(option, value, float, 0)
        elif equals and name == "threads":
            self.threads = int(_parse_number(option, value, int, 1))
        elif equals and name == "read_ahead":
            self.read_ahead_kib = int(_parse_number(option, value, int, 0))
            if self.read_ahead_kib > MAX_READ_AHEAD_KIB:
                raise MountError(f"invalid value in -o {option}: must be at most {MAX_READ_AHEAD_KIB}")
            self.read_ahead_given = True
        elif equals and name == "read_around":
            self.read_around_kib = int(_parse_number(option, value, int, 0))
            if self.read_around_kib > MAX_READ_AROUND_KIB:
                raise MountError(f"invalid value in -o {option}: must be at most {MAX_READ_AROUND_KIB}")
            if self.read_around_kib % 4:
                raise MountError(f"invalid value in -o {option}: must be a multiple of 4, the page size in KiB")
        elif equals and name == "request_poll":
            self.request_poll_us = int(_parse_number(option, value, int, 0))
            if self.request_poll_us > MAX_REQUEST_POLL_US:
                raise MountError(f"invalid value in -o {option}: must be at most {MAX_REQUEST_POLL_US}")
        elif equals and name == "quick_wait":
            self.quick_wait_us = int(_parse_number(option, value, int, 0))
            if self.quick_wait_us > MAX_QUICK_WAIT_US:
                raise MountError(f"invalid value in -o {option}: must be at most {MAX_QUICK_WAIT_US}")
        elif equals and name == "max_read":
            self.fuse_options.add(f"max_read={_parse_number(option, value, int, 4096)}")
        elif option in ("default_permissions", "fsname", "subtype") or name in ("fsname", "subtype"):
            raise MountError(f"option -o {option} is set by borgstorefs itself; leave it out")
        else:
            raise MountError(f"unknown mount option -o {option}; see 'borgstorefs mount --help'")


def _parse_number(option: str, text: str, kind: type[float] | type[int], minimum: float) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise MountError(f"invalid value in -o {option}: expected a number") from None
    if value < minimum:
        raise MountError(f"invalid value in -o {option}: must be at least {minimum}")
    return value


def check_mountpoint(path: str) -> None:
    """Raise `MountError` unless *path* is an existing, empty directory that nothing is mounted on."""
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        raise MountError(f"mount point {path} does not exist: create an empty directory first") from None
    except NotADirectoryError:
        raise MountError(f"mount point {path} is not a directory") from None
    except OSError as err:
        raise MountError(f"mount point {path} cannot be used: {err.strerror}") from None
    if entries:
        raise MountError(f"mount point {path} is not empty: mount on an empty directory")
    if mount_entry(path) is not None:
        raise MountError(f"mount point {path} is already a mount point")


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount the store: in the background by default, in the foreground with ``-f``."""
    ready_fd: int | None = args.ready_fd
    try:
        settings = MountSettings(args.options)
        spec = mstore_spec(args)
        check_mountpoint(args.mountpoint)
        if not args.foreground:
            return _start_background(args)
        _configure_daemon_logging(args, quiet_until_ready=ready_fd is not None)
        return run_daemon(args, settings, ready_fd, spec)
    except MountError as err:
        if ready_fd is not None:
            _report_ready(ready_fd, f"error: {err}")
            return EXIT_ERROR
        print(f"borgstorefs mount: error: {err}", file=sys.stderr)
        return EXIT_ERROR


def mstore_spec(args: argparse.Namespace) -> MStoreSpec | None:
    """Return the stores of ``--store`` or ``--config`` with their kinds and levels, or None for one URL.

    Raises `MountError` for a URL combined with ``--store`` or ``--config``,
    for no store at all, for multi-store options without several stores, and
    for an invalid specification (bucket counts included).
    """
    several = bool(args.config or args.stores)
    if args.url is not None and several:
        raise MountError("give either a store URL or --store/--config, not both")
    if args.url is None and not several:
        raise MountError("no store given: use URL MOUNTPOINT, or --store URL:BUCKETS (repeatable) or --config FILE")
    if not several:
        for option, value in (("--kind", args.kinds), ("--missing-log", args.missing_log)):
            if value:
                raise MountError(f"{option} applies to several stores: use it with --store or --config")
        return None
    try:
        spec = spec_from_args(args)
        bucket_owners([store.buckets for store in spec.stores])
    except OSError as err:
        raise MountError(f"cannot read --config {args.config}: {err.strerror}") from None
    except ValueError as err:
        raise MountError(str(err)) from None
    return spec


# Background start


def _daemon_argv(args: argparse.Namespace, ready_fd: int) -> list[str]:
    """Return the command line of the foreground daemon for the options in *args*, reporting on *ready_fd*."""
    argv = [sys.executable, "-m", "borgstorefs"]
    if args.verbose:
        argv.append("-" + "v" * args.verbose)
    if args.debug:
        argv.append("--debug")
    argv += ["mount", "--foreground", "--ready-fd", str(ready_fd)]
    if args.debug_requests:
        argv.append("-d")
    for option in args.options:
        argv += ["-o", option]
    for namespace, levels in args.levels:
        argv += ["--levels", f"{namespace}={','.join(map(str, levels))}"]
    if args.log_file:
        argv += ["--log-file", args.log_file]

    # Several stores: paths are made absolute, because the daemon changes to / after mounting.
    if args.config:
        argv += ["--config", os.path.abspath(args.config)]
    for store in args.stores:
        argv += ["--store", f"{store.url}:{store.buckets}"]
    for namespace, kind in args.kinds:
        argv += ["--kind", f"{namespace}={kind}"]
    if args.missing_log:
        argv += ["--missing-log", os.path.abspath(args.missing_log)]

    return [*argv, "--", *([args.url] if args.url is not None else []), args.mountpoint]


def _start_background(args: argparse.Namespace) -> int:
    read_end, write_end = os.pipe()
    argv = _daemon_argv(args, write_end)
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # The caller's stderr must not stay open for the daemon's lifetime:
            # `out=$(borgstorefs mount ...)` would wait until the unmount.
            # Errors before the mount travel through the readiness pipe, and
            # the log goes to --log-file.
            stderr=subprocess.DEVNULL,
            pass_fds=(write_end,),
            start_new_session=True,  # not stopped by the terminal's SIGINT or SIGHUP
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.readline(4096).decode(errors="replace").strip()
    if message == "ok":
        return EXIT_OK
    # The daemon exits right after reporting an error; wait so that no process outlives the command.
    try:
        status = process.wait(timeout=STARTUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        status = process.wait()
    if not message:
        message = f"error: the daemon exited with status {status} before mounting"
    print(f"borgstorefs mount: {message}", file=sys.stderr)
    return EXIT_ERROR


def _report_ready(ready_fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(ready_fd, message.encode(errors="replace").replace(b"\n", b" ") + b"\n")
        os.close(ready_fd)


def _configure_daemon_logging(args: argparse.Namespace, *, quiet_until_ready: bool) -> None:
    level = logging.DEBUG if args.debug_requests or args.debug or args.verbose > 1 else logging.INFO
    if not args.debug_requests and not args.debug and not args.verbose:
        level = logging.WARNING
    handler: logging.Handler
    handler = logging.FileHandler(args.log_file) if args.log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if quiet_until_ready and not args.log_file:
        # Errors before the mount go through the readiness pipe, as the one line the command prints.
        handler.setLevel(logging.CRITICAL + 1)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.raiseExceptions = False  # a daemon whose terminal went away must keep running
    logging.getLogger("pyfuse3").addFilter(demote_forgotten_release_replies)
    if level > logging.DEBUG:
        # paramiko logs a traceback for every dropped connection; the SFTP
        # backend already logs each reconnect and retry in one line.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def demote_forgotten_release_replies(record: logging.LogRecord) -> bool:
    """Log pyfuse3's "fuse_release(): fuse_reply_* failed with No such file or directory" at DEBUG.

    The kernel sends RELEASE without waiting for the answer once the file is
    closed, and forgets the request when the mount goes away, so the reply
    fails with ENOENT. Nothing is lost: the release itself has already run.
    """
    message = record.getMessage()
    forgotten = message.startswith("fuse_release") and "No such file or directory" in message
    if record.levelno >= logging.ERROR and forgotten:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("pyfuse3").isEnabledFor(logging.DEBUG)
    return True


def _enable_log_output() -> None:
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.NOTSET)


# The daemon


def run_daemon(
    args: argparse.Namespace, settings: MountSettings, ready_fd: int | None, spec: MStoreSpec | None = None
) -> int:
    """Open the store (or the stores of *spec*), mount, serve requests until unmounted or signalled, and unmount.

    Returns 0 after a clean stop. Errors before the mount is made raise
    `MountError` (or a store error), and nothing stays mounted.
    """
    import pyfuse3  # imported here so that the other subcommands work without libfuse
    import trio

    from .fuse_ops import Operations

    # Resolved before mounting: resolving the mountpoint afterwards would wait for this daemon.
    mountpoint = os.path.realpath(args.mountpoint)
    store = _open_store(args, spec)
    local = _all_local(store)
    read_around_kib = settings.read_around_kib
    if read_around_kib is None:
        read_around_kib = 0 if local else DEFAULT_READ_AROUND_KIB
    options = FSOptions(
        read_only=settings.read_only,
        read_around=read_around_kib * 1024,
        attr_timeout=settings.timeouts["attr_timeout"],
        entry_timeout=settings.timeouts["entry_timeout"],
        negative_timeout=settings.timeouts["negative_timeout"],
        uid=os.getuid(),
        gid=os.getgid(),
    )
    inline = settings.inline_quick if settings.inline_quick is not None else local
    # FileSystem is annotated with Store, and MStore provides every Store method that it calls.
    runner = StoreRunner(settings.threads, inline_quick=inline, quick_wait_us=settings.quick_wait_us)
    fs = FileSystem(cast(Store, store), options, runner)
    try:
        _init_fuse(pyfuse3, Operations(fs), args, settings, spec)
    except BaseException:
        store.close()
        raise
    logger.info("mounted %s on %s", _describe(args, spec), args.mountpoint)
    if ready_fd is not None:
        os.chdir("/")  # a background daemon must not keep a directory busy
    try:
        trio.run(_serve, fs, ready_fd, functools.partial(_tune, mountpoint, settings), settings.request_poll_us)
    finally:
        pyfuse3.close(unmount=True)
        store.close()
    logger.info("unmounted %s", args.mountpoint)
    return EXIT_OK


def _open_store(args: argparse.Namespace, spec: MStoreSpec | None) -> Store | MStore:
    """Open the store at ``args.url``, or an `MStore` over the stores of *spec*; `MountError` on failure.

    The `MStore` never repairs in the request path (``read_repair=False``):
    copies that reads find missing are logged and, with ``--missing-log``,
    written to that file for ``borgstorefs mstore repair``. It opens while
    at least one store can be opened, as reads may be served by the others.
    """
    store: Store | MStore
    try:
        if spec is None:
            store = Store(args.url, levels=dict(args.levels))
        else:
            # Absolute, because a background daemon changes to / after mounting and appends later.
            missing_log = Path(args.missing_log).absolute() if args.missing_log else None
            store = build_mstore(spec, read_repair=False, missing_log=missing_log)
        store.open()
    except Exception as err:
        raise MountError(f"cannot open store {_describe(args, spec)}: {err}") from None
    return store


def _all_local(store: Store | MStore) -> bool:
    """Return whether every store is a local (``file://``) one, whose quick calls may run inline."""
    stores = store.stores if isinstance(store, MStore) else [store]
    return all(isinstance(getattr(one, "backend", None), PosixFS) for one in stores)


def _describe(args: argparse.Namespace, spec: MStoreSpec | None) -> str:
    """Return the store URL, or each store's URL and bucket count, without passwords, for messages."""
    if spec is None:
        return redact_url(args.url)
    return "; ".join(f"{redact_url(store.url)}:{store.buckets}" for store in spec.stores)


def _init_fuse(
    pyfuse3: object,
    operations: object,
    args: argparse.Namespace,
    settings: MountSettings,
    spec: MStoreSpec | None = None,
) -> None:
    fuse_options = {f"fsname={mount_source(args.url, spec)}", "subtype=borgstorefs"}
    fuse_options |= settings.fuse_options
    if settings.fuse_options & {"allow_other", "allow_root"}:
        # Other users get in: the kernel must check the mode bits. Without
        # them only the mounting user can enter, and the kernel then skips
        # fetching the root's attributes on every path walk, which are never
        # cached (see `fuse_ops.Operations`).
        fuse_options.add("default_permissions")
    if settings.read_only:
        fuse_options.add("ro")
    with _captured_stderr() as captured:
        try:
            pyfuse3.init(operations, args.mountpoint, fuse_options)  # type: ignore[attr-defined]
        except RuntimeError:
            detail = captured.read().decode(errors="replace").strip().replace("\n", "; ")
            raise MountError(f"mounting on {args.mountpoint} failed: {detail or 'libfuse gave no reason'}") from None


def _fsname(url: str) -> str:
    # libfuse splits options at commas and passes them as ASCII.
    return quote(redact_url(url), safe=":/@[]?&=+~%!$'()*;#").replace(",", "%2C")


def mount_source(url: str | None, spec: MStoreSpec | None) -> str:
    """Return the source that ``findmnt`` shows: the URL, or ``URL:BUCKETS`` of each store joined by ``;``.

    Passwords are left out. A ``;`` inside a URL is percent-encoded, so the
    separator stays unambiguous.
    """
    if spec is None:
        assert url is not None, "a single-store mount has a URL"
        return _fsname(url)
    return ";".join(f"{_fsname(store.url).replace(';', '%3B')}:{store.buckets}" for store in spec.stores)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[tempfile._TemporaryFileWrapper[bytes]]:
    """Send file descriptor 2 to a temporary file for the block, so libfuse's messages become ours."""
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(capture.fileno(), 2)
            try:
                yield capture  # type: ignore[misc]
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        capture.seek(0)


async def _tune(mountpoint: str, settings: MountSettings) -> None:
    """Apply the settings that the kernel only takes after the mount's first request (FUSE's INIT)."""
    import trio

    if not settings.read_ahead_kib:
        return
    try:
        # The kernel queues every request until the reply to INIT, which resets
        # the read-ahead. Once this stat returns, a new setting stays.
        await trio.to_thread.run_sync(os.stat, mountpoint)
    except OSError as err:
        logger.info("cannot set read-ahead of %s: %s", mountpoint, err)
        return
    set_read_ahead(mountpoint, settings.read_ahead_kib, requested=settings.read_ahead_given)


async def _serve(
    fs: FileSystem, ready_fd: int | None, tune: Callable[[], Awaitable[None]], request_poll_us: int
) -> None:
    import pyfuse3
    import trio

    # Writes behind run in their own nursery: stopping the request loop must not cancel them.
    async with trio.open_nursery() as background:
        fs.spawn = background.start_soon
        try:
            async with trio.open_nursery() as nursery:
                wait = request_loop.install(pyfuse3, request_poll_us)
                if wait is not None:
                    fs.runner.may_block = wait.serves_only_caller
                await nursery.start(_stop_on_signal, wait)
                nursery.start_soon(_tune_then_report, tune, ready_fd)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            # Also when the request loop failed: what programs wrote must reach the store.
            with trio.CancelScope(shield=True):
                await fs.shutdown()


async def _tune_then_report(tune: Callable[[], Awaitable[None]], ready_fd: int | None) -> None:
    # Ready only once tuned: a file opened before keeps the kernel's read-ahead.
    await tune()
    if ready_fd is not None:
        _report_ready(ready_fd, "ok")
        _enable_log_output()


async def _stop_on_signal(wait: request_loop.RequestWait | None, task_status: object) -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()  # type: ignore[attr-defined]
        async for signum in signals:
            logger.info("received %s: unmounting", signal.Signals(signum).name)
            if wait is not None:
                wait.stop()
            pyfuse3.terminate()
            return


# Unmounting


class MountEntry(NamedTuple):
    fstype: str
    source: str
    device: str
    """``major:minor`` of the mount, as ``/sys/class/bdi`` names it."""


def mount_entry(path: str) -> MountEntry | None:
    """Return the topmost mount on *path*, or None.

    Reads ``/proc/self/mountinfo``, so it also finds a mount whose daemon died.
    """
    return _entry_at(os.path.realpath(path))


def _entry_at(target: str) -> MountEntry | None:
    # Never calls stat on target, because a daemon that is not serving yet would never reply.
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
        for line in file:
            before, _, after = line.partition(" - ")
            fields = before.split(" ")
            if _unescape(fields[4]) == target:
                fstype, source = after.split(" ")[:2]
                found = MountEntry(fstype, _unescape(source), fields[2])
    return found


def set_read_ahead(mountpoint: str, kib: int, *, requested: bool = False) -> None:
    """Set the kernel's read-ahead for the mount on *mountpoint*, a resolved path, to *kib* KiB.

    Only root may write the setting. A failure only costs sequential read
    speed, so the mount goes on: it is logged as a WARNING if the user
    *requested* the value with ``-o read_ahead``, and as INFO otherwise.
    """
    level = logging.WARNING if requested else logging.INFO
    entry = _entry_at(mountpoint)
    if entry is None:
        # This also happens when the mount was unmounted before the daemon could tune it.
        logger.log(level, "cannot set read-ahead: %s is not in the mount table", mountpoint)
        return
    setting = Path("/sys/class/bdi", entry.device, "read_ahead_kb")
    try:
        setting.write_text(f"{kib}\n")
    except OSError as err:
        logger.log(level, "kept the kernel's read-ahead for %s: cannot write %s: %s", mountpoint, setting, err)
    else:
        logger.debug("read-ahead of %s set to %d KiB", mountpoint, kib)


def _unescape(text: str) -> str:
    # The kernel writes space, tab, newline and backslash in mountinfo as octal escapes.
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(escaped, plain)
    return text


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount a borgstorefs mount, lazily if its daemon died and the mount is busy."""
    path = args.mountpoint
    entry = mount_entry(path)
    if entry is None:
        print(f"borgstorefs umount: error: {path} is not mounted", file=sys.stderr)
        return EXIT_ERROR
    if entry.fstype != FSTYPE:
        print(f"borgstorefs umount: error: {path} is a {entry.fstype} mount, not {FSTYPE}", file=sys.stderr)
        return EXIT_ERROR
    # fusermount3 rejects a path through a symbolic link, so it gets the one the mount table shows.
    resolved = os.path.realpath(path)
    result = _fusermount("-u", resolved)
    if result.returncode != 0 and _is_disconnected(path):
        logger.info("the daemon of %s is gone; detaching the mount lazily", path)
        result = _fusermount("-u", "-z", resolved)
    if result.returncode != 0:
        message = result.stderr.strip().replace("\n", "; ") or f"fusermount3 exited with {result.returncode}"
        print(f"borgstorefs umount: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount3", *args], capture_output=True, text=True, timeout=60, check=False)


def _is_disconnected(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ENOTCONN
    return False
