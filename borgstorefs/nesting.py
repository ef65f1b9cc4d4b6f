"""Nesting of keys into sub-directories, and the per-namespace level configuration.

Directories with millions of entries are slow on most file systems and
servers, so a namespace may spread its items over nesting directories made of
the key's first characters, two per level::

    nest("data", "0123abcd", 2) == "data/01/23/0123abcd"

The last component is always the full key, so a directory listing yields keys
without reassembling them, and sorting nested names sorts keys. This is the
borgstore layout, which keeps existing stores readable.

A key shorter than ``2 * level`` characters cannot be nested that deep.
`nest` raises `ValueError` for it instead of making empty path components.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import product

from .names import DEL_SUFFIX, ROOTNS, validate_namespace

MAX_LEVEL = 3
"""Deepest nesting; 3 levels give 16,777,216 directories, more than any store needs."""

DEFAULT_LEVELS: tuple[int, ...] = (0,)
"""Levels of a namespace that the configuration does not mention: flat."""

CHARS_PER_LEVEL = 2

Levels = tuple[int, ...]
LevelsConfig = dict[str, Levels]


def nest(namespace: str, key: str, level: int, *, deleted: bool = False) -> str:
    """Return the nested name of *key* in *namespace* at *level*.

    ``deleted=True`` appends `DEL_SUFFIX`. Raises `ValueError` if the key is
    shorter than the level needs.
    """
    if level == 0:  # the most common layout, built without a list
        stored_key = key + DEL_SUFFIX if deleted else key
        return f"{namespace}/{stored_key}" if namespace else stored_key
    if len(key) < CHARS_PER_LEVEL * level:
        raise ValueError(
            f"key {key!r} is too short for nesting level {level} in namespace {namespace!r}: "
            f"at least {CHARS_PER_LEVEL * level} characters are needed"
        )
    parts = [key[CHARS_PER_LEVEL * i : CHARS_PER_LEVEL * (i + 1)] for i in range(level)]
    if namespace:
        parts.insert(0, namespace)
    parts.append(key + DEL_SUFFIX if deleted else key)
    return "/".join(parts)


def fits_level(key: str, level: int) -> bool:
    """Return whether *key* is long enough to be nested at *level*."""
    return len(key) >= CHARS_PER_LEVEL * level


def is_nesting_dir(name: str) -> bool:
    """Return whether a directory entry name can be a nesting directory."""
    return len(name) == CHARS_PER_LEVEL and "." not in name


def nesting_dirs(namespace: str, level: int) -> Iterator[str]:
    """Yield every deepest nesting directory of *namespace* at *level*, for hex keys.

    These are the directories borgstore creates in advance; ``level=2`` yields
    ``ns/00/00`` to ``ns/ff/ff``.
    """
    hex_digits = [f"{i:02x}" for i in range(256)]
    for parts in product(hex_digits, repeat=level):
        yield "/".join((namespace, *parts)) if namespace else "/".join(parts)


def validate_levels(namespace: str, levels: Iterable[int]) -> Levels:
    """Return *levels* as a tuple, or raise `ValueError` naming the namespace and the problem."""
    result = tuple(levels)
    if not result:
        raise ValueError(f"levels of namespace {namespace!r} must not be empty")
    for level in result:
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= MAX_LEVEL:
            raise ValueError(
                f"invalid level {level!r} for namespace {namespace!r}: must be an integer from 0 to {MAX_LEVEL}"
            )
    if len(set(result)) != len(result):
        raise ValueError(f"levels of namespace {namespace!r} list a level twice: {list(result)}")
    if namespace == ROOTNS and result != (0,):
        raise ValueError("the root namespace cannot be nested: its levels must be [0]")
    return result


def parse_levels_config(config_in: Mapping[str, Sequence[int]] | None) -> LevelsConfig:
    """Validate a levels configuration such as ``{"config/": [0], "data/": [2]}``.

    Namespaces may be written with or without the trailing ``/`` that
    borgstore uses. Returns a dict keyed by the bare namespace.
    """
    config: LevelsConfig = {}
    for raw_namespace, levels in (config_in or {}).items():
        if not isinstance(raw_namespace, str):
            raise TypeError(f"namespace must be str, not {type(raw_namespace).__name__}: {raw_namespace!r}")
        namespace = raw_namespace.removesuffix("/")
        validate_namespace(namespace)
        if namespace in config:
            raise ValueError(f"namespace {namespace!r} is configured twice")
        config[namespace] = validate_levels(namespace, levels)
    return config


def parse_levels_option(text: str) -> tuple[str, Levels]:
    """Parse a command-line ``NAMESPACE=LEVELS`` option such as ``data=0,1,2``."""
    namespace, equals, levels_text = text.partition("=")
    if not equals:
        raise ValueError(f"invalid levels option {text!r}: expected NAMESPACE=LEVELS, for example data=2 or data=0,1,2")
    try:
        levels = [int(part) for part in levels_text.split(",")]
    except ValueError:
        raise ValueError(f"invalid levels option {text!r}: levels must be integers separated by commas") from None
    namespace = namespace.removesuffix("/")
    validate_namespace(namespace)
    return namespace, validate_levels(namespace, levels)
