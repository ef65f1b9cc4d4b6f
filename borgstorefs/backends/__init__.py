"""Backends: where a store keeps its files, chosen by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import BackendURLInvalid
from ._base import Backend, ItemInfo, SpaceInfo, StagedValue, ValueReader
from .posixfs import PosixFS, get_file_backend

__all__ = [
    "Backend",
    "ItemInfo",
    "PosixFS",
    "SpaceInfo",
    "StagedValue",
    "ValueReader",
    "get_backend",
    "redact_url",
]

SCHEMES = ("file", "sftp")


def get_backend(url: str) -> Backend:
    """Return a backend for *url* (``file:///abs/path`` or ``sftp://[user@]host[:port]/path``).

    Raises `BackendURLInvalid` for an unknown scheme or a malformed URL.
    """
    if not isinstance(url, str):
        raise TypeError(f"store URL must be str, not {type(url).__name__}: {url!r}")
    scheme = urlsplit(url).scheme
    backend: Backend | None
    if scheme == "file":
        backend = get_file_backend(url)
    elif scheme == "sftp":
        from .sftp import get_sftp_backend  # paramiko is imported only when needed

        backend = get_sftp_backend(url)
    else:
        backend = None
    if backend is None:
        raise BackendURLInvalid(
            f"unsupported store URL {redact_url(url)!r}: use file:///abs/path or sftp://[user@]host[:port]/path"
        )
    return backend


def redact_url(url: str) -> str:
    """Return *url* without a password, so that it can be logged or shown in `mount`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"  # an IPv6 address keeps its brackets
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return parts._replace(netloc=netloc).geturl()
