"""The ``borgstorefs`` command: subcommands, logging setup and exit codes.

Each subcommand lives in the module of its concept and registers itself in
`build_parser`. This module only dispatches, and turns errors into one-line
messages with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import BackendError
from .nesting import parse_levels_option
from .store import Store

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def levels_argument(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``--levels NAMESPACE=LEVELS`` for argparse, with its error message on failure."""
    try:
        return parse_levels_option(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_levels_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """Add the repeatable ``--levels NAMESPACE=LEVELS`` option to *parser*."""
    parser.add_argument(
        "--levels",
        metavar="NAMESPACE=LEVELS",
        type=levels_argument,
        action="append",
        default=[],
        help=help_text,
    )


def configure_logging(verbose: int, debug: bool) -> None:
    """Send log records to stderr: WARNING by default, INFO with -v, DEBUG with --debug or -vv."""
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    if debug or verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    """Create an empty store with the given levels."""
    store = Store(args.url, levels=dict(args.levels))
    store.create()
    print(f"created {store!r}")
    return EXIT_OK


DEMO_LEVELS = {"config/": [0], "data/": [2]}


def cmd_demo(args: argparse.Namespace) -> int:
    """Walk through the store API on a new store, as a first look at what it does."""
    store = Store(args.url, levels=DEMO_LEVELS)
    print(f"Creating {store!r} with levels {DEMO_LEVELS}")
    store.create()
    with store:
        store.store("config/main", b"some configuration")
        for text in (b"one", b"two", b"three"):
            key = hashlib.sha256(text).hexdigest()
            store.store(f"data/{key}", text)
            print(f"stored data/{key} -> {text!r}")
        print_listing(store, "config")
        print_listing(store, "data")
        victim = next(store.list("data")).name
        print(f"\nSoft-deleting data/{victim}")
        store.move(f"data/{victim}", delete=True)
        print_listing(store, "data")
        print_listing(store, "data", deleted=True)
        print(f"\nLoading 5 bytes at offset 5 of config/main: {store.load('config/main', offset=5, size=5)!r}")
        print(f"Statistics: {store.stats['store_calls']:.0f} stores, {store.stats['load_calls']:.0f} loads")
    if args.destroy:
        answer = "DESTROY"
    else:
        answer = ""
        if sys.stdin.isatty():
            answer = input("\nType DESTROY to remove the demo store, anything else to keep it: ")
    if answer == "DESTROY":
        store.destroy()
        print("Store destroyed.")
    else:
        print(f"Store kept at {args.url}")
    return EXIT_OK


def print_listing(store: Store, namespace: str, *, deleted: bool = False) -> None:
    """Print the items of *namespace* with their sizes."""
    what = "soft-deleted items" if deleted else "items"
    print(f"\n{what} in {namespace}/:")
    for info in store.list(namespace, deleted=deleted):
        print(f"  {info.name}  {info.size} bytes")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="borgstorefs", description="Mount and manage borgstore-layout stores.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more: -v for INFO, -vv for DEBUG")
    parser.add_argument("--debug", action="store_true", help="log every store operation (DEBUG)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    create = subparsers.add_parser("create", help="create an empty store")
    create.add_argument("url", metavar="URL", help="file:///abs/path or sftp://[user@]host[:port]/path")
    add_levels_option(create, "nesting levels of a namespace, e.g. data=2 (repeatable; default: flat)")
    create.set_defaults(handler=cmd_create)

    demo = subparsers.add_parser("demo", help="create a store at URL and walk through the store API")
    demo.add_argument("url", metavar="URL", help="where to create the demo store, e.g. file:///tmp/demo-store")
    demo.add_argument("--destroy", action="store_true", help="remove the store at the end without asking")
    demo.set_defaults(handler=cmd_demo)

    for register in subcommand_registrars():
        register(subparsers)
    return parser


def subcommand_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """Return the functions that add the subcommands of other modules."""
    from .mount import add_parser as add_mount_parsers  # mount imports this module
    from .mstore_cli import add_parser as add_mstore_parsers

    return [add_mount_parsers, add_mstore_parsers]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.debug)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (BackendError, ValueError, TypeError, OSError) as err:
        logger.debug("command %s failed", args.command, exc_info=True)
        print(f"borgstorefs {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"borgstorefs {args.command}: interrupted", file=sys.stderr)
        return 130
