"""Exceptions of the store library.

Every error a backend or a store raises on purpose derives from `BackendError`.
Invalid names are the caller's fault and raise the builtin `ValueError` or
`TypeError` instead, so that they are never mistaken for a backend failure.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class of every store and backend error."""


class BackendURLInvalid(BackendError, ValueError):
    """The store URL cannot be parsed or names an unsupported scheme (caller's fault)."""


class NoBackendGiven(BackendError, ValueError):
    """Neither a URL nor a backend instance was given to a store (caller's fault)."""


class BackendAlreadyExists(BackendError):
    """`create()` found the base location already there and not empty."""


class BackendDoesNotExist(BackendError):
    """The base location of the store is missing: create the store first."""


class BackendMustBeOpen(BackendError):
    """An operation needs an open store, but it is closed (caller's fault)."""


class BackendMustNotBeOpen(BackendError):
    """`create()`, `destroy()` or `open()` was called on a store that is already open."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached (network down, server gone) after the allowed retries."""


class ObjectNotFound(BackendError):
    """The item, or the directory an operation needs, does not exist.

    `name` is the name the caller used, so that messages name what was missing.
    """

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"item not found: {name!r}")
        self.name = name


class ObjectAlreadyExists(BackendError):
    """The target of a move exists and the operation must not replace it."""

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"item already exists: {name!r}")
        self.name = name


class DirectoryNotEmpty(BackendError):
    """`rmdir` found items in the directory."""

    def __init__(self, name: str) -> None:
        super().__init__(f"directory not empty: {name!r}")
        self.name = name


class NoSpaceLeft(BackendError):
    """The backend has no room for the value (disk full or quota exceeded)."""


class PermissionDenied(BackendError):
    """The backend refused access to an item or directory."""


class HostKeyUnknown(BackendError):
    """The SSH server's host key is in no known_hosts file; the user must check and trust it first."""


class HostKeyChanged(BackendError):
    """The SSH server's host key differs from the one in known_hosts: an attack or a reinstalled server."""
