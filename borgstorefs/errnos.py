"""The one place where exceptions become errno values for the kernel.

`ERRNO_TABLE` maps our exception classes to errno values; `errno_for` walks an
exception's class hierarchy through it, so the most specific entry wins.
`errno_boundary` wraps every FUSE handler: it converts any `Exception` into the
adapter's error type (``pyfuse3.FUSEError``) and logs it at a level that
depends on whose fault it is. This module imports no pyfuse3, so the file
system core can raise `FSError` and the mapping can be tested without a mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from .errors import (
    BackendError,
    BackendUnavailable,
    DirectoryNotEmpty,
    NoSpaceLeft,
    ObjectAlreadyExists,
    ObjectNotFound,
    PermissionDenied,
)
from .filenames import InvalidName, NameTooLong

__all__ = ["ERRNO_TABLE", "FSError", "errno_boundary", "errno_for"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class FSError(Exception):
    """A POSIX error that the file system model raises on purpose, such as EPERM in the trash."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


ERRNO_TABLE: dict[type[BaseException], int] = {
    NameTooLong: errno.ENAMETOOLONG,
    InvalidName: errno.EINVAL,
    ObjectNotFound: errno.ENOENT,
    ObjectAlreadyExists: errno.EEXIST,
    DirectoryNotEmpty: errno.ENOTEMPTY,
    NoSpaceLeft: errno.ENOSPC,
    PermissionDenied: errno.EACCES,
    BackendUnavailable: errno.EIO,
    BackendError: errno.EIO,
}
"""Exception class to errno. `FSError` and `OSError` carry their own errno instead."""

QUIET_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EPERM,
        errno.EROFS,
        errno.EXDEV,
        errno.EINVAL,
        errno.ENAMETOOLONG,
        errno.ENOSYS,
        errno.ESTALE,
    }
)
"""Errors that are the program's business (a missing file, a rule of the tree): logged at DEBUG only."""


def errno_for(error: BaseException) -> int | None:
    """Return the errno for *error*, or None if nothing maps it (the caller then uses EIO)."""
    if isinstance(error, FSError):
        return error.errno
    for cls in type(error).__mro__:
        code = ERRNO_TABLE.get(cls)
        if code is not None:
            return code
    if isinstance(error, OSError) and error.errno:
        return error.errno
    return None


def errno_boundary(
    make_error: Callable[[int], Exception],
) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Return a decorator for async handlers that raises ``make_error(errno)`` for any `Exception`.

    Exceptions of *make_error*'s own type pass unchanged. `BaseException`
    (trio's ``Cancelled``, ``KeyboardInterrupt``) is never caught. Expected
    errors are logged at DEBUG, ENOSPC at WARNING, other mapped errors at ERROR
    with their cause, and unmapped ones at ERROR with a traceback before they
    become EIO. With DEBUG enabled, every call is logged with its arguments
    and duration.
    """

    def decorate(handler: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        name = handler.__name__

        @functools.wraps(handler)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            start = time.perf_counter()
            try:
                result = await handler(*args, **kwargs)
            except Exception as error:
                if isinstance(error, _error_type(make_error)):
                    raise
                code = _log_failure(name, _describe(args[1:]), error)
                raise make_error(code) from error
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s%s: ok in %.3f ms", name, _describe(args[1:]), (time.perf_counter() - start) * 1e3)
            return result

        return wrapper

    return decorate


def _error_type(make_error: Callable[[int], Exception]) -> type[Exception] | tuple[()]:
    return make_error if isinstance(make_error, type) else ()


def _describe(args: tuple[object, ...]) -> str:
    """Format handler arguments for a log line; data buffers show only their length."""
    parts = (f"<{len(arg)} bytes>" if isinstance(arg, bytes) and len(arg) > 64 else repr(arg) for arg in args)
    return f"({', '.join(parts)})"


def _log_failure(handler: str, args: str, error: Exception) -> int:
    """Log *error* from *handler* called with *args* at the level its errno calls for; return the errno."""
    code = errno_for(error)
    if code is None:
        logger.error("%s%s failed unexpectedly, returning EIO: %r", handler, args, error, exc_info=error)
        return errno.EIO
    if code in QUIET_ERRNOS:
        logger.debug("%s%s: %s (%s)", handler, args, errno.errorcode.get(code, code), error)
    elif code == errno.ENOSPC:
        logger.warning("%s%s: no space left: %s", handler, args, error)
    else:
        cause = error.__cause__ or error.__context__
        logger.error(
            "%s%s failed with %s: %s%s",
            handler,
            args,
            errno.errorcode.get(code, code),
            error,
            f" (cause: {cause!r})" if cause else "",
        )
    return code
