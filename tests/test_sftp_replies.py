"""Parsing of SFTP version 3 replies (NAME and ATTRS), from bytes built here: no server needed."""

from __future__ import annotations

import pytest
from paramiko.message import Message
from paramiko.sftp import SFTPError

from borgstorefs.backends.sftp_session import (
    ATTR_ACMODTIME,
    ATTR_EXTENDED,
    ATTR_PERMISSIONS,
    ATTR_SIZE,
    ATTR_UIDGID,
    Attributes,
    parse_attributes,
    parse_names,
)

ALL_FLAGS = ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME | ATTR_EXTENDED


def add_attributes(message: Message, flags: int, *, extensions: int = 0) -> None:
    message.add_int(flags)
    if flags & ATTR_SIZE:
        message.add_int64(5_000_000_000)  # above 2**32: the full 64 bits must be read
    if flags & ATTR_UIDGID:
        message.add_int(1000)
        message.add_int(1001)
    if flags & ATTR_PERMISSIONS:
        message.add_int(0o100644)
    if flags & ATTR_ACMODTIME:
        message.add_int(1_600_000_000)  # atime
        message.add_int(1_700_000_000)  # mtime
    if flags & ATTR_EXTENDED:
        message.add_int(extensions)
        for number in range(extensions):
            message.add_string(f"ext{number}@example.org")
            message.add_string(b"\x00\x01data")


def name_reply(entries: list[tuple[str, int]], *, extensions: int = 0) -> Message:
    message = Message()
    message.add_int(len(entries))
    for name, flags in entries:
        message.add_string(name.encode("utf-8"))
        message.add_string(f"-rw-r--r-- 1 user group 0 Jan 1 00:00 {name}".encode())
        add_attributes(message, flags, extensions=extensions)
    message.rewind()
    return message


def test_names_with_every_attribute() -> None:
    reply = name_reply([("a", ALL_FLAGS), ("b", ALL_FLAGS)], extensions=2)

    names = parse_names(reply)

    assert names == [
        Attributes("a", 5_000_000_000, 0o100644, 1_700_000_000),
        Attributes("b", 5_000_000_000, 0o100644, 1_700_000_000),
    ]


def test_names_missing_attributes_are_none() -> None:
    reply = name_reply([("size-only", ATTR_SIZE), ("bare", 0), ("times", ATTR_ACMODTIME)])

    names = parse_names(reply)

    assert names[0] == Attributes("size-only", 5_000_000_000, None, None)
    assert names[1] == Attributes("bare", None, None, None)
    assert names[2] == Attributes("times", None, None, 1_700_000_000)


def test_names_decoded_as_utf8() -> None:
    reply = name_reply([("grüße-😀", ATTR_SIZE)])

    assert parse_names(reply)[0].name == "grüße-😀"


def test_empty_name_reply() -> None:
    assert parse_names(name_reply([])) == []


@pytest.mark.parametrize("cut", [1, 9, 30])
def test_cut_reply_raises(cut: int) -> None:
    whole = name_reply([("a", ALL_FLAGS), ("b", ALL_FLAGS)], extensions=1).asbytes()
    reply = Message(whole[:-cut])

    with pytest.raises(SFTPError, match="cut short"):
        parse_names(reply)


def test_attributes_after_read_fields() -> None:
    message = Message()
    message.add_int(7)  # a field the caller reads first, as a request id
    add_attributes(message, ATTR_SIZE | ATTR_PERMISSIONS)
    message.rewind()
    assert message.get_int() == 7

    assert parse_attributes(message, "item") == Attributes("item", 5_000_000_000, 0o100644, None)


def test_attributes_cut_short_raise() -> None:
    message = Message()
    message.add_int(ATTR_SIZE)
    message.add_int(1)  # half of the 64-bit size
    message.rewind()

    with pytest.raises(SFTPError, match="cut short"):
        parse_attributes(message)
