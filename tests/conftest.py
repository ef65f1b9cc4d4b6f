"""Shared fixtures: store URLs for every backend, so each suite runs against all of them."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from .sshd import sshd  # noqa: F401 (registers the session-scoped fixture that make_url requests)

BACKEND_KINDS = ["posixfs", "sftp"]
"""Backends every contract and store test runs against."""

_counter = itertools.count()


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    return request.param


@pytest.fixture
def make_url(backend_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], str]:
    """Return a function that gives a fresh, not yet created store URL on the backend under test."""

    server = request.getfixturevalue("sshd") if backend_kind == "sftp" else None

    def make() -> str:
        name = f"store{next(_counter)}"
        if backend_kind == "posixfs":
            return f"file://{tmp_path}/{name}"
        if server is not None:
            return str(server.url(tmp_path / name))
        raise AssertionError(f"unknown backend kind {backend_kind!r}")

    return make
