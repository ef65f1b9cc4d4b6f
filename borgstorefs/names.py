"""Names of stored items: validation and splitting into namespace and key.

A name is ``namespace/key``, or just ``key`` in the root namespace (`ROOTNS`).
Namespaces do not nest, so a name contains at most one ``/``.

Rules for a key (and, identically, for a namespace):

- a non-empty `str` of printable ASCII without uppercase letters,
- no ``/``, no backslash, no whitespace, no ``..``, no leading ``.``,
- no reserved suffix (`DEL_SUFFIX` marks soft-deleted items, `TMP_SUFFIX`
  marks values still being written),
- at most `MAX_KEY_LENGTH` characters.

The rules keep every name a safe relative path below a backend's base
directory and leave the suffixes free for the store's own bookkeeping.
"""

from __future__ import annotations

import re

ROOTNS = ""
"""The root namespace: items whose name has no ``namespace/`` part."""

DEL_SUFFIX = ".del"
"""Suffix of a soft-deleted item, as in the borgstore layout."""

TMP_SUFFIX = ".tmp"
"""Suffix of a temporary file that contains a value while it is written."""

TMP_NAME_EXTRA = 13
"""Characters a backend adds to a key for its temporary file: ``.`` + 8 random hex + ``.tmp``."""

MAX_COMPONENT_BYTES = 255
"""Maximum length in bytes of a file name component on Linux file systems (ext4, xfs, btrfs) and of OpenSSH's sftp."""

MAX_KEY_LENGTH = 240
"""Maximum length of a key or namespace, in characters.

The key is the last path component on disk. The longest component a backend
makes from it is the temporary file (``key`` + `TMP_NAME_EXTRA` characters),
so the limit is 255 - 13 = 242, rounded down to 240. Soft-deleted items add
only `DEL_SUFFIX` and nesting directories are separate components.
"""

assert MAX_KEY_LENGTH + TMP_NAME_EXTRA <= MAX_COMPONENT_BYTES
assert MAX_KEY_LENGTH + len(DEL_SUFFIX) <= MAX_COMPONENT_BYTES


def validate_key(key: str, *, what: str = "key") -> None:
    """Raise `TypeError` or `ValueError` if *key* breaks a rule of the module docstring.

    *what* names the part in the message (``key`` or ``namespace``).
    """
    if not isinstance(key, str):
        raise TypeError(f"{what} must be str, not {type(key).__name__}: {key!r}")
    problem = _key_problem(key)
    if problem:
        raise ValueError(f"invalid {what} {key!r}: {problem}")


_KEY_CHARACTERS = r"!-.0-@\[\]-~"
"""Characters a key may contain: printable ASCII without space, uppercase, ``/`` or backslash."""


def _key_pattern(characters: str) -> re.Pattern[str]:
    """Return a pattern that fully matches the keys made of *characters* that follow every rule."""
    reserved = "|".join(re.escape(suffix) for suffix in (DEL_SUFFIX, TMP_SUFFIX))
    return re.compile(rf"(?!\.)(?!.*\.\.)(?!.*(?:{reserved})$)[{characters}]{{1,{MAX_KEY_LENGTH}}}", re.ASCII)


VALID_KEY = _key_pattern(_KEY_CHARACTERS)
"""Matches (``fullmatch``) exactly the valid keys; listings check each name with it."""


def _key_problem(key: str) -> str | None:
    if VALID_KEY.fullmatch(key):
        return None
    # The checks below only name the problem, because every key that fails the test above breaks one of them.
    if not key:
        return "must not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"is {len(key)} characters long, the maximum is {MAX_KEY_LENGTH}"
    if not key.isascii():
        return "must be ASCII"
    if not key.isprintable() or any(c.isspace() for c in key):
        return "must not contain whitespace or control characters"
    if key != key.lower():
        return "must be lowercase"
    if "/" in key:
        return "must not contain '/' (namespaces do not nest)"
    if "\\" in key:
        return "must not contain a backslash"
    if ".." in key:
        return "must not contain '..'"
    if key.startswith("."):
        return "must not start with '.'"
    for suffix in (DEL_SUFFIX, TMP_SUFFIX):
        if key.endswith(suffix):
            return f"must not end with the reserved suffix {suffix!r}"
    return None


def is_valid_key(key: str) -> bool:
    """Return whether *key* is a `str` that follows every key rule."""
    # No message is built here, because a mount checks every file name that it is asked for,
    # and names that are not valid keys (rsync's temporary ``.name.XXXXXX``) are common.
    return isinstance(key, str) and VALID_KEY.fullmatch(key) is not None


def validate_namespace(namespace: str) -> None:
    """Raise `TypeError` or `ValueError` unless *namespace* is `ROOTNS` or a valid namespace."""
    if namespace == ROOTNS:
        return
    validate_key(namespace, what="namespace")


def split_name(name: str) -> tuple[str, str]:
    """Validate *name* and split it into ``(namespace, key)``.

    ``"data/0123"`` gives ``("data", "0123")`` and ``"settings"`` gives
    ``(ROOTNS, "settings")``. A name with more than one ``/`` raises
    `ValueError`, because namespaces do not nest.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be str, not {type(name).__name__}: {name!r}")
    namespace, separator, key = name.rpartition("/")
    # Valid names return here. The checks below only find the problem of an invalid one.
    if VALID_KEY.fullmatch(key) is not None and (not separator or VALID_KEY.fullmatch(namespace) is not None):
        return namespace, key
    if name.startswith("/"):
        raise ValueError(f"invalid name {name!r}: must not start with '/'")
    if "/" in namespace:
        raise ValueError(f"invalid name {name!r}: nested namespaces are not supported")
    validate_namespace(namespace)
    validate_key(key)
    return namespace, key


def join_name(namespace: str, key: str) -> str:
    """Return the name of *key* in *namespace*; both are validated."""
    validate_namespace(namespace)
    validate_key(key)
    return f"{namespace}/{key}" if namespace else key
