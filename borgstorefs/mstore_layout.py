"""The bucket layout of an `MStore`: which stores hold each bucket, and how an item picks its bucket.

The name space is split into `BUCKETS` buckets. `bucket_owners` turns the
bucket counts of the stores into the stores that hold each bucket, and
`bucket_of` gives the bucket of a key from the kind of its namespace
(``hex-hash``, ``name-hash`` or ``generic``). Everything here is a pure
function of its arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from .names import validate_namespace

__all__ = [
    "BUCKETS",
    "DEFAULT_KIND",
    "GENERIC",
    "HEX_HASH",
    "KINDS",
    "NAME_HASH",
    "bucket_of",
    "bucket_owners",
    "parse_kinds",
]

BUCKETS = 256
"""Buckets of the name space. One byte of a key, or of its hash, selects the bucket."""

HEX_HASH = "hex-hash"
NAME_HASH = "name-hash"
GENERIC = "generic"
KINDS = (HEX_HASH, NAME_HASH, GENERIC)
HEX_DIGITS = frozenset("0123456789abcdef")
DEFAULT_KIND = NAME_HASH
"""Kind of a namespace that the *kinds* mapping does not name."""


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
