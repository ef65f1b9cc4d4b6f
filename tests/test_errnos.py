"""The exception to errno table and the handler boundary, without a mount."""

from __future__ import annotations

import errno
import logging

import pytest
import trio

from borgstorefs.errnos import ERRNO_TABLE, FSError, errno_boundary, errno_for
from borgstorefs.errors import (
    BackendError,
    BackendUnavailable,
    DirectoryNotEmpty,
    NoSpaceLeft,
    ObjectAlreadyExists,
    ObjectNotFound,
    PermissionDenied,
)
from borgstorefs.filenames import InvalidName, NameTooLong


class FakeFUSEError(Exception):
    """Stands in for ``pyfuse3.FUSEError``: only an errno."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.errno = code


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ObjectNotFound("ns/key"), errno.ENOENT),
        (ObjectAlreadyExists("ns/key"), errno.EEXIST),
        (DirectoryNotEmpty("ns"), errno.ENOTEMPTY),
        (NoSpaceLeft("full"), errno.ENOSPC),
        (PermissionDenied("no"), errno.EACCES),
        (BackendUnavailable("gone"), errno.EIO),
        (BackendError("failed"), errno.EIO),
        (NameTooLong("long"), errno.ENAMETOOLONG),
        (InvalidName("bad"), errno.EINVAL),
        (FSError(errno.EPERM, "trash"), errno.EPERM),
        (FSError(errno.EXDEV, "elsewhere"), errno.EXDEV),
        (OSError(errno.ELOOP, "loop"), errno.ELOOP),
    ],
)
def test_errno_for_mapped(error: Exception, code: int) -> None:
    assert errno_for(error) == code


@pytest.mark.parametrize("error", [RuntimeError("bug"), KeyError("k"), ValueError("v"), OSError("no errno")])
def test_errno_for_unmapped(error: Exception) -> None:
    assert errno_for(error) is None


def test_table_entries_are_exceptions() -> None:
    for cls, code in ERRNO_TABLE.items():
        assert issubclass(cls, Exception), cls
        assert code in errno.errorcode, cls


def call(handler_result: BaseException | str) -> object:
    """Run a wrapped handler that raises or returns *handler_result*; return its result or error."""

    @errno_boundary(FakeFUSEError)
    async def handler(self: object, inode: int, name: bytes) -> str:
        if isinstance(handler_result, BaseException):
            raise handler_result
        return handler_result

    async def main() -> object:
        try:
            return await handler(None, 7, b"name")
        except FakeFUSEError as error:
            return error

    return trio.run(main)


def test_boundary_passes_result() -> None:
    assert call("fine") == "fine"


def test_boundary_maps_expected_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "borgstorefs.errnos")

    result = call(ObjectNotFound("ns/key"))

    assert isinstance(result, FakeFUSEError)
    assert result.errno == errno.ENOENT
    assert all(record.levelno == logging.DEBUG for record in caplog.records)


def test_boundary_logs_backend_error_cause(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise BackendError("listing failed") from OSError(errno.ELOOP, "Too many levels of symbolic links")
    except BackendError as error:
        result = call(error)

    assert isinstance(result, FakeFUSEError)
    assert result.errno == errno.EIO
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "listing failed" in errors[0].getMessage()
    assert "symbolic links" in errors[0].getMessage()
    assert "(7, b'name')" in errors[0].getMessage()


def test_boundary_unmapped_becomes_eio(caplog: pytest.LogCaptureFixture) -> None:
    result = call(RuntimeError("a bug"))

    assert isinstance(result, FakeFUSEError)
    assert result.errno == errno.EIO
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None


def test_boundary_warns_on_enospc(caplog: pytest.LogCaptureFixture) -> None:
    result = call(NoSpaceLeft("disk full"))

    assert isinstance(result, FakeFUSEError)
    assert result.errno == errno.ENOSPC
    assert [record.levelno for record in caplog.records] == [logging.WARNING]


def test_boundary_passes_own_error_type() -> None:
    result = call(FakeFUSEError(errno.ENOSYS))

    assert isinstance(result, FakeFUSEError)
    assert result.errno == errno.ENOSYS


def test_boundary_lets_base_exceptions_through() -> None:
    class Stop(BaseException):
        pass

    with pytest.raises(Stop):
        call(Stop())


def test_boundary_debug_log_shortens_data(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "borgstorefs.errnos")

    @errno_boundary(FakeFUSEError)
    async def write(self: object, fh: int, offset: int, data: bytes) -> int:
        return len(data)

    assert trio.run(write, None, 3, 0, bytes(1000)) == 1000
    messages = [record.getMessage() for record in caplog.records]
    assert any("<1000 bytes>" in message for message in messages)
    assert not any("\\x00" * 100 in message for message in messages)
