"""Shared fixtures: store URLs for every backend, so each suite runs against all of them."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from .sshd import sshd  # noqa: F401 (registers the session-scoped fixture that make_url requests)

BACKEND_KINDS = ["posixfs", "sftp"]
"""Backends every contract and store test runs against; ``sftp`` uses the default transport."""

PARAMIKO_KIND = "sftp-paramiko"
"""The SFTP backend with ``transport=paramiko``, for tests marked ``paramiko_too``."""

_counter = itertools.count()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Running every test under both SFTP transports would double the
    # longest part of the suite, so only a marked subset runs under the
    # transport that is not the default.
    if "backend_kind" in metafunc.fixturenames:
        kinds = list(BACKEND_KINDS)
        if metafunc.definition.get_closest_marker("paramiko_too") is not None:
            kinds.append(PARAMIKO_KIND)
        metafunc.parametrize("backend_kind", kinds, indirect=True)


@pytest.fixture
def backend_kind(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test: one of `BACKEND_KINDS` or `PARAMIKO_KIND`."""
    return str(request.param)


@pytest.fixture
def make_url(backend_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], str]:
    """Return a function that gives a fresh, not yet created store URL on the backend under test."""

    server = request.getfixturevalue("sshd") if backend_kind.startswith("sftp") else None

    def make() -> str:
        name = f"store{next(_counter)}"
        if backend_kind == "posixfs":
            return f"file://{tmp_path}/{name}"
        if server is not None and backend_kind == PARAMIKO_KIND:
            return f"{server.url(tmp_path / name)}?transport=paramiko"
        if server is not None:
            return str(server.url(tmp_path / name))
        raise AssertionError(f"unknown backend kind {backend_kind!r}")

    return make
