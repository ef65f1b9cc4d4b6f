"""The one reversible mapping between FUSE file names (bytes) and store keys (str).

Scheme:

- A name that is already a valid key (`names.is_valid_key`) and contains no
  ``%`` is stored unchanged, so existing stores look as they always did.
- Any other name is percent-encoded byte by byte with lowercase hex
  (``%41`` for ``A``). Only the bytes that would break a key rule are
  encoded. These are ``%`` itself, uppercase letters, bytes outside printable
  ASCII (so every byte of a UTF-8 sequence), whitespace, control bytes and
  backslash. A leading ``.``, the second ``.`` of each ``..`` and the ``.`` of
  a reserved ``.del`` or ``.tmp`` ending are encoded too.

The encoding of a name is unique, so a key is shown only if it is the
encoding of the name it decodes to. A key written by another tool that is not
(``100%``, ``%61``, ``%2E``) has no file name: `decode_key` returns None for
it and the file system hides it.
"""

from __future__ import annotations

import re

from .names import DEL_SUFFIX, MAX_KEY_LENGTH, TMP_SUFFIX, VALID_KEY

__all__ = ["MAX_NAME_BYTES", "InvalidName", "NameTooLong", "decode_key", "encode_name"]

MAX_NAME_BYTES = 255
"""Maximum length of a file name on Linux (NAME_MAX), in bytes."""

_RESERVED_SUFFIXES = (DEL_SUFFIX, TMP_SUFFIX)

# Bytes that may stand for themselves in a key: printable ASCII without
# space, uppercase letters, '%', '/' and backslash.
_SAFE_BYTES = frozenset(b for b in range(0x21, 0x7F) if not (0x41 <= b <= 0x5A) and b not in b"%/\\")
_BYTE_TEXT = tuple(chr(b) if b in _SAFE_BYTES else f"%{b:02x}" for b in range(256))
"""The text of each byte value in a key, before the rules for dots are applied."""
_ESCAPE = re.compile(r"%([0-9a-f]{2})")


class InvalidName(ValueError):
    """A file name no file may have: empty, ``.``, ``..``, or containing ``/`` or NUL (caller's fault)."""


class NameTooLong(ValueError):
    """A file name whose key would be longer than `MAX_KEY_LENGTH` characters (caller's fault)."""


def _is_plain_key(text: str) -> bool:
    """Return whether *text* is a valid key without ``%``, which stands for itself."""
    return "%" not in text and VALID_KEY.fullmatch(text) is not None


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b".."):
        raise InvalidName(f"invalid file name {name!r}: empty, '.' and '..' cannot be stored")
    if b"/" in name or b"\0" in name:
        raise InvalidName(f"invalid file name {name!r}: must not contain '/' or NUL")
    if len(name) > MAX_NAME_BYTES:
        raise NameTooLong(f"file name of {len(name)} bytes is longer than {MAX_NAME_BYTES} bytes")


def encode_name(name: bytes) -> str:
    """Return the store key of file name *name*.

    Raises `InvalidName` for a name no file may have and `NameTooLong` if the
    key would exceed `MAX_KEY_LENGTH` characters.
    """
    _check_name(name)
    if name.isascii():
        text = name.decode("ascii")
        if _is_plain_key(text):
            return text
    key = "".join(map(_BYTE_TEXT.__getitem__, name))
    # A leading '.' is encoded, and so is every second '.' of a run of
    # literal ones. The dots of *key* are those of the name, because the
    # encoding of any other byte contains none.
    if key.startswith("."):
        key = f"%2e{key[1:]}"
    key = key.replace("..", ".%2e")
    for suffix in _RESERVED_SUFFIXES:
        if key.endswith(suffix):
            # The '.' of the suffix is literal here: an encoded one would read "%2e".
            key = f"{key[: -len(suffix)]}%2e{suffix[1:]}"
    if len(key) > MAX_KEY_LENGTH:
        raise NameTooLong(f"file name {name!r} needs a key of {len(key)} characters, the maximum is {MAX_KEY_LENGTH}")
    return key


def decode_key(key: str) -> bytes | None:
    """Return the file name whose encoding is *key*, or None if no name encodes to it."""
    if "%" not in key:
        return key.encode("ascii") if VALID_KEY.fullmatch(key) else None
    if not key.isascii():
        return None
    pieces = []
    position = 0
    for match in _ESCAPE.finditer(key):
        pieces.append(key[position : match.start()].encode("ascii"))
        pieces.append(bytes((int(match[1], 16),)))
        position = match.end()
    pieces.append(key[position:].encode("ascii"))
    name = b"".join(pieces)
    try:
        canonical = encode_name(name)
    except ValueError:
        return None
    return name if canonical == key else None
