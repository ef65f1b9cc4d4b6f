"""The request wait that replaces pyfuse3's: the reader role, stopping, and when it is installed.

A pipe takes the place of ``/dev/fuse``: a byte written to it is a pending request.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import trio

from borgstorefs.request_loop import RequestWait, install


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def test_wait_returns_when_request_pending(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe

    async def main() -> bool:
        wait = RequestWait(read_end, 200)
        os.write(write_end, b"r")
        return await wait()

    assert trio.run(main) is True


def test_one_reader_per_request(pipe: tuple[int, int]) -> None:
    # Two tasks wait and one request arrives. Only one may return True, or the
    # other one's read would block the event loop.
    read_end, write_end = pipe
    results: list[bool] = []

    async def main() -> None:
        wait = RequestWait(read_end, 200)

        async def serve() -> None:
            ready = await wait()
            results.append(ready)
            if ready:
                os.read(read_end, 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(serve)
            await trio.sleep(0.05)
            os.write(write_end, b"r")
            await trio.sleep(0.05)
            assert results == [True]
            wait.stop()
            trio.lowlevel.notify_closing(read_end)  # as pyfuse3.terminate does

    trio.run(main)
    assert results == [True, False]


def test_stop_ends_every_waiting_task(pipe: tuple[int, int]) -> None:
    read_end, _ = pipe
    results: list[bool] = []

    async def main() -> None:
        wait = RequestWait(read_end, 200)

        async def serve() -> None:
            results.append(await wait())

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(serve)
            await trio.sleep(0.05)  # one task waits on the descriptor, three for the reader role
            wait.stop()
            trio.lowlevel.notify_closing(read_end)

    trio.run(main)
    assert results == [False] * 4


class FakePyfuse3(ModuleType):
    def __init__(self, version: str, *, has_wait: bool = True) -> None:
        super().__init__("pyfuse3")
        self.__version__ = version
        if has_wait:
            self._wait_fuse_readable = self.original_wait

    async def original_wait(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("module", "poll_us"),
    [
        (FakePyfuse3("3.5.0"), 0),
        (FakePyfuse3("4.0.0"), 200),
        (FakePyfuse3("3.5.0", has_wait=False), 200),
    ],
    ids=["poll-off", "untested-release", "no-wait-function"],
)
def test_install_keeps_pyfuse3_wait(module: FakePyfuse3, poll_us: int) -> None:
    before = getattr(module, "_wait_fuse_readable", None)

    assert install(module, poll_us) is None
    assert getattr(module, "_wait_fuse_readable", None) == before


def test_install_needs_fuse_descriptor() -> None:
    # This test process has no /dev/fuse open, so there is nothing to wait on.
    module = FakePyfuse3("3.5.0")

    assert install(module, 200) is None
    assert module._wait_fuse_readable == module.original_wait


def test_serves_only_caller(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    seen: dict[str, bool] = {}

    async def main() -> None:
        wait = RequestWait(read_end, 200)
        seen["idle"] = wait.serves_only_caller()
        os.write(write_end, b"r")
        assert await wait()
        os.read(read_end, 1)
        seen["serving"] = wait.serves_only_caller()

        async def other() -> None:
            seen["other task"] = wait.serves_only_caller()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)

    trio.run(main)
    assert seen["idle"] is True
    assert seen["serving"] is True
    assert seen["other task"] is False
