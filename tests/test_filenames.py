"""The mapping between FUSE file names and store keys, both ways, with examples and properties."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from borgstorefs.filenames import MAX_NAME_BYTES, InvalidName, NameTooLong, decode_key, encode_name
from borgstorefs.names import MAX_KEY_LENGTH, is_valid_key

ENCODINGS = [
    (b"0123abcd", "0123abcd"),
    (b"file.txt", "file.txt"),
    (b"a~b_c-d+e=f,g", "a~b_c-d+e=f,g"),
    (b"A", "%41"),
    (b"Readme.MD", "%52eadme.%4d%44"),
    (b"with space", "with%20space"),
    (b"100%", "100%25"),
    (b".hidden", "%2ehidden"),
    (b"a..b", "a.%2eb"),
    (b"...", "%2e.%2e"),
    (b"x.del", "x%2edel"),
    (b"x.tmp", "x%2etmp"),
    (b"x.del.tmp", "x.del%2etmp"),
    (b"X.DEL", "%58.%44%45%4c"),
    (b"back\\slash", "back%5cslash"),
    (b"tab\tnewline\n", "tab%09newline%0a"),
    ("é".encode(), "%c3%a9"),
    (b"\xff", "%ff"),
]


@pytest.mark.parametrize(("name", "key"), ENCODINGS)
def test_encode_examples(name: bytes, key: str) -> None:
    assert encode_name(name) == key
    assert is_valid_key(key)


@pytest.mark.parametrize(("name", "key"), ENCODINGS)
def test_decode_examples(name: bytes, key: str) -> None:
    assert decode_key(key) == name


@pytest.mark.parametrize(
    "key",
    ["100%", "%61", "%2E", "%2f", "%00", "a%2", "%zz", "%2e", "%2e%2e", "%41%", "x%2e", "%30"],
)
def test_decode_rejects_non_canonical(key: str) -> None:
    assert decode_key(key) is None


@pytest.mark.parametrize("key", ["UPPER", ".hidden", "a..b", "x.del", "x.tmp", "back\\slash", "sp ace", "é"])
def test_decode_rejects_invalid_keys(key: str) -> None:
    assert decode_key(key) is None


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b"])
def test_encode_rejects_impossible_names(name: bytes) -> None:
    with pytest.raises(InvalidName):
        encode_name(name)


def test_encode_length_limits() -> None:
    assert len(encode_name(b"a" * MAX_KEY_LENGTH)) == MAX_KEY_LENGTH
    assert len(encode_name(b"A" * (MAX_KEY_LENGTH // 3))) == MAX_KEY_LENGTH
    with pytest.raises(NameTooLong):
        encode_name(b"a" * (MAX_KEY_LENGTH + 1))
    with pytest.raises(NameTooLong):
        encode_name(b"A" * (MAX_KEY_LENGTH // 3 + 1))
    with pytest.raises(NameTooLong):
        encode_name(b"a" * (MAX_NAME_BYTES + 1))


file_names = st.binary(min_size=1, max_size=MAX_NAME_BYTES).filter(
    lambda name: b"/" not in name and b"\0" not in name and name not in (b".", b"..")
)
"""Every name Linux lets a program create in a directory."""

ascii_names = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=80).map(
    str.encode
)


@given(file_names)
@example(b".del")
@example(b"..del")
@example(b"a.")
@example(b"%2e")
def test_name_round_trip(name: bytes) -> None:
    try:
        key = encode_name(name)
    except NameTooLong:
        return
    assert is_valid_key(key)
    assert decode_key(key) == name


@given(ascii_names.filter(lambda name: b"/" not in name and name not in (b".", b"..")))
def test_ascii_name_round_trip(name: bytes) -> None:
    key = encode_name(name)
    assert is_valid_key(key)
    assert decode_key(key) == name


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60))
@example("%41")
@example("%2e%2e")
def test_key_decodes_canonically(key: str) -> None:
    name = decode_key(key)
    if name is not None:
        assert encode_name(name) == key


@given(st.text(alphabet="abcdef0123456789.-_~%", min_size=1, max_size=40).filter(is_valid_key))
def test_valid_keys_without_percent_unchanged(key: str) -> None:
    if "%" in key:
        return
    assert decode_key(key) == key.encode()
    assert encode_name(key.encode()) == key
