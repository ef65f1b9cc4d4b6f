"""Mount harness for tests that run the daemon for real and check it with real tools.

Load it in a test module with ``pytest_plugins = ["tests.mounting"]`` and mark the
module with `requires_fuse`. The `mount` fixture is a factory that starts
``python -m borgstorefs mount -f`` in a subprocess and returns a `Mount`. The
`background_mount` fixture runs the command without ``-f`` and hands back its exit
status. In teardown every mount is taken down even when the test failed, and the
test fails when:

- ``fusermount3 -u`` exits non-zero (the lazy unmount and the signals by PID
  still run, so no mount is left behind),
- a foreground daemon that the test did not kill exits with a non-zero status,
- the daemon logged a WARNING, ERROR, CRITICAL or a traceback that the test did
  not declare with `Mount.expect_log`.

The harness reports failures with `pytest.fail` and uses no bare ``assert``,
so it opts out of assertion rewriting, which test modules that import it
before loading it as a plugin would prevent anyway: PYTEST_DONT_REWRITE.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

from borgstorefs.store import Store

MOUNT_TIMEOUT = 30.0
"""Seconds to wait for a mount to appear or a daemon to exit. Generous, for 2 shared cores."""

BACKGROUND_TIMEOUT = 180.0
"""Seconds to wait for ``borgstorefs mount`` without ``-f`` to return.

Longer than a mount needs: the command itself waits up to two minutes for a
daemon whose SFTP login retries, and must report a failure within that time.
"""

CACHE_WAIT = 60.0
"""Seconds to wait for a change made by another client to show in the mount.

Longer than any attribute or entry cache timeout a sensible default would use.
"""

POLL_INTERVAL = 0.05
"""Seconds between two checks in a bounded wait."""

FSTYPE = "fuse.borgstorefs"

_UNEXPECTED_LOG = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^Traceback \(most recent call last\)")


def _missing_prerequisite() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: the kernel's FUSE module is not loaded or not available here"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    return None


MISSING_PREREQUISITE = _missing_prerequisite()
requires_fuse = pytest.mark.skipif(MISSING_PREREQUISITE is not None, reason=MISSING_PREREQUISITE or "")
"""Skip marker for tests that mount. Its reason names what is missing."""


# Mount table


class MountEntry(NamedTuple):
    """One line of ``/proc/self/mountinfo``."""

    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape_mountinfo(text: str) -> str:
    # The kernel writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), text)


def mount_entries() -> list[MountEntry]:
    """Return the mounts of this process's mount namespace."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
        for line in file:
            before, _, after = line.rstrip("\n").partition(" - ")
            fields = before.split(" ")
            fstype, source, super_options = after.split(" ", 2)
            options = f"{fields[5]},{super_options}"
            entries.append(MountEntry(_unescape_mountinfo(fields[4]), fstype, _unescape_mountinfo(source), options))
    return entries


def mount_entry(path: str | os.PathLike[str]) -> MountEntry | None:
    """Return the topmost mount on *path*, or None.

    Unlike `os.path.ismount`, this also finds a mount whose daemon died, where
    every ``stat`` fails with ``ENOTCONN``.
    """
    target = os.path.realpath(path)
    found = None
    for entry in mount_entries():
        if entry.mountpoint == target:
            found = entry
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Return whether anything is mounted on *path*, alive or not."""
    return mount_entry(path) is not None


# Small helpers for the suites


def wait_until(condition: Callable[[], bool], timeout: float, description: str) -> None:
    """Call *condition* until it returns true, and fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {description}")
        time.sleep(POLL_INTERVAL)


def errno_of(function: Callable[..., object], *args: object, **kwargs: object) -> int | None:
    """Call *function* and return the errno of the `OSError` it raises, or None if it succeeds."""
    try:
        function(*args, **kwargs)
    except OSError as err:
        return err.errno
    return None


def run(
    *argv: str | os.PathLike[str], check: bool = True, timeout: float = 600, **kwargs: object
) -> subprocess.CompletedProcess[bytes]:
    """Run a command line tool with captured output. With *check*, fail the test on a non-zero exit.

    *kwargs* go to `subprocess.run` (``cwd``, ``env``, ``input``).
    """
    result = subprocess.run([os.fspath(arg) for arg in argv], capture_output=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, argv))} exited with {result.returncode}\n"
            f"stdout: {result.stdout.decode(errors='replace')}\nstderr: {result.stderr.decode(errors='replace')}"
        )
    return result


def create_store(
    url: str,
    items: Mapping[str, bytes] | None = None,
    levels: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Create a store at *url* with the store library and fill it with *items* (name to value).

    *levels* is passed to `Store.create`, which makes the nesting directories
    of each namespace in advance, as borgstore does.
    """
    store = Store(url, levels=levels)
    store.create()
    with store:
        for namespace in levels or {}:
            if namespace.strip("/"):
                store.create_namespace(namespace.strip("/"))
        for name, value in (items or {}).items():
            store.store(name, value)


def local_path(url: str) -> Path:
    """Return the local directory of a test store URL.

    Both backends under test keep their stores on this machine: a ``file://``
    URL names the directory, and the test sshd serves absolute local paths.
    Tests use it to break a store on purpose, from outside the daemon.
    """
    return Path(unquote(urlsplit(url).path))


def url_at(url: str, path: Path) -> str:
    """Return *url* with its path replaced by the local directory *path* (see `local_path`)."""
    return urlunsplit(urlsplit(url)._replace(path=quote(str(path))))


def borgstorefs_command(*args: str | os.PathLike[str]) -> list[str]:
    """Return the argv that runs ``python -m borgstorefs`` with *args* in this interpreter."""
    return [sys.executable, "-m", "borgstorefs", *(os.fspath(arg) for arg in args)]


# Foreground mounts


@dataclass
class Mount:
    """A store mounted by a foreground daemon that this harness started."""

    url: str
    path: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    expected_log: list[re.Pattern[str]] = field(default_factory=list)
    killed: bool = False

    @property
    def pid(self) -> int:
        """Process id of the daemon."""
        return self.process.pid

    def log(self) -> str:
        """Return everything the daemon wrote to stderr and stdout so far."""
        return self.log_path.read_text(errors="replace")

    def expect_log(self, pattern: str) -> None:
        """Declare that log lines matching the regular expression *pattern* are expected, at any level."""
        self.expected_log.append(re.compile(pattern))

    def unexpected_log_lines(self) -> list[str]:
        """Return the WARNING, ERROR, CRITICAL and traceback lines that no expectation covers."""
        return [
            line
            for line in self.log().splitlines()
            if _UNEXPECTED_LOG.search(line) and not any(pattern.search(line) for pattern in self.expected_log)
        ]

    def kill(self) -> None:
        """Kill the daemon with SIGKILL and reap it. The mount stays behind, dead."""
        self.killed = True
        self.process.kill()
        self.process.wait(timeout=MOUNT_TIMEOUT)

    def stop(self, signum: int) -> int:
        """Send *signum* to the daemon and return its exit status (fails the test on timeout)."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon did not exit within {MOUNT_TIMEOUT:.0f} s of signal {signum}:\n{self.log()}")


def start_foreground_mount(
    url: str | None, mountpoint: Path, log_path: Path, options: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start ``borgstorefs mount -f`` and return its process once the mount is in place.

    A *url* of None leaves the URL out, for mounts whose *options* name the
    stores (``--store`` or ``--config``).

    Fails the test with the daemon's log if the process exits first or the
    mount does not appear within `MOUNT_TIMEOUT`, after ending the process.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            borgstorefs_command("mount", "-f", *options, *([url] if url is not None else []), mountpoint),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not os.path.ismount(mountpoint):
        status = process.poll()
        if status is not None:
            # A daemon that died right after mounting leaves a dead mount, which
            # os.path.ismount cannot see, but take_down finds and removes it.
            problems = take_down(mountpoint, process)
            pytest.fail(
                f"borgstorefs mount -f exited with {status} before mounting; cleanup: {problems or 'clean'}\n"
                f"{log_path.read_text()}"
            )
        if time.monotonic() > deadline:
            problems = take_down(mountpoint, process)
            pytest.fail(
                f"{mountpoint} was not mounted after {MOUNT_TIMEOUT:.0f} s; cleanup: {problems or 'clean'}\n"
                f"{log_path.read_text()}"
            )
        time.sleep(POLL_INTERVAL)
    return process


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount3", *args], capture_output=True, text=True, timeout=MOUNT_TIMEOUT)


def take_down(mountpoint: Path, process: subprocess.Popen[bytes] | None = None, pids: Sequence[int] = ()) -> list[str]:
    """Unmount *mountpoint* and end the daemon, whatever state they are in, and return the problems met.

    ``fusermount3 -u`` comes first. If it fails, ``fusermount3 -uz`` detaches
    the mount and the daemon gets SIGTERM, then SIGKILL. The daemon is either
    *process* (a child) or the processes *pids* (a background daemon).
    """
    problems = []
    if is_mounted(mountpoint):
        result = _fusermount("-u", str(mountpoint))
        if result.returncode != 0:
            problems.append(f"fusermount3 -u exited with {result.returncode}: {result.stderr.strip()}")
            lazy = _fusermount("-uz", str(mountpoint))
            if lazy.returncode != 0:
                problems.append(f"fusermount3 -uz exited with {lazy.returncode}: {lazy.stderr.strip()}")
    if process is not None:
        problems += _end_child(process)
    for pid in pids:
        problems += _end_pid(pid)
    if is_mounted(mountpoint):
        problems.append(f"{mountpoint} is still mounted after cleanup")
    return problems


def _end_child(process: subprocess.Popen[bytes]) -> list[str]:
    try:
        process.wait(timeout=MOUNT_TIMEOUT)
        return []
    except subprocess.TimeoutExpired:
        pass
    process.terminate()
    try:
        process.wait(timeout=MOUNT_TIMEOUT)
        return [f"daemon {process.pid} needed SIGTERM to exit after the unmount"]
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=MOUNT_TIMEOUT)
        return [f"daemon {process.pid} needed SIGKILL to exit after the unmount"]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Return a function that mounts a store URL in the foreground and returns a `Mount`.

    ``mount(url, "-o", "ro", mountpoint=None)``: extra arguments go to
    ``borgstorefs mount -f`` before the URL, and the mountpoint defaults to a
    fresh empty directory under *tmp_path*. ``mount(None, "--store", ...)``
    leaves the URL out, for several stores mounted as one.
    """
    mounts: list[Mount] = []

    def start(url: str | None, *options: str, mountpoint: Path | None = None) -> Mount:
        number = len(mounts)
        if mountpoint is None:
            mountpoint = tmp_path / f"mnt{number}"
            mountpoint.mkdir()
        log_path = tmp_path / f"daemon{number}.log"
        process = start_foreground_mount(url, mountpoint, log_path, options)
        result = Mount(url if url is not None else " ".join(options), mountpoint, process, log_path)
        mounts.append(result)
        return result

    yield start

    failures = []
    for entry in reversed(mounts):
        problems = take_down(entry.path, entry.process)
        status = entry.process.returncode
        if not entry.killed and status != 0:
            problems.append(f"daemon exited with status {status}")
        unexpected = entry.unexpected_log_lines()
        if unexpected:
            problems.append("daemon logged unexpected lines:\n  " + "\n  ".join(unexpected))
        if problems:
            failures.append(
                f"mount of {entry.url} on {entry.path}:\n" + "\n".join(problems) + f"\n--- log ---\n{entry.log()}"
            )
    if failures:
        pytest.fail("\n\n".join(failures))


# Background mounts


@dataclass
class BackgroundMount:
    """The outcome of ``borgstorefs mount`` without ``-f``."""

    url: str
    path: Path
    returncode: int
    output: str


def daemon_pids(mountpoint: Path) -> list[int]:
    """Return the ids of the borgstorefs processes whose command line names *mountpoint*.

    Each test mounts on a fresh directory under its own temporary path, so
    only daemons that this harness started can match.
    """
    target = os.fsencode(mountpoint)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")
        except OSError:
            continue  # the process has exited meanwhile
        if target in argv and any(b"borgstorefs" in arg for arg in argv) and b"mount" in argv:
            pids.append(int(entry.name))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in (b"Z", b"X")


def _end_pid(pid: int) -> list[str]:
    for signum, note in ((None, None), (signal.SIGTERM, "SIGTERM"), (signal.SIGKILL, "SIGKILL")):
        if signum is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if not _pid_alive(pid):
            return [f"daemon {pid} needed {note} to exit after the unmount"] if note else []
    return [f"daemon {pid} is still running after SIGKILL"]


@pytest.fixture
def background_mount(tmp_path: Path) -> Iterator[Callable[..., BackgroundMount]]:
    """Return a function that runs ``borgstorefs mount URL MOUNTPOINT`` (no ``-f``) and waits for it.

    ``background_mount(url, *options, mountpoint=None, command=None)`` returns
    the exit status and the output; it does not assert success, so failure
    cases can use it too. A *url* of None leaves the URL out, as in `mount`.
    *command* replaces ``python -m borgstorefs``, for example with the
    installed ``borgstorefs`` script. Teardown unmounts and ends the daemon by PID.
    """
    mountpoints: list[Path] = []

    def start(
        url: str | None, *options: str, mountpoint: Path | None = None, command: Sequence[str] | None = None
    ) -> BackgroundMount:
        if mountpoint is None:
            mountpoint = tmp_path / f"bgmnt{len(mountpoints)}"
            mountpoint.mkdir()
        mountpoints.append(mountpoint)
        log_path = tmp_path / f"background{len(mountpoints)}.log"
        urls = [url] if url is not None else []
        argv = (
            [*command, "mount", *options, *urls, str(mountpoint)]
            if command
            else borgstorefs_command("mount", *options, *urls, mountpoint)
        )
        # A file, not a pipe: the daemon may keep the inherited descriptors open
        # after the command returns, and a pipe would then never reach EOF.
        with open(log_path, "wb") as log:
            try:
                status = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=BACKGROUND_TIMEOUT
                ).returncode
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"{' '.join(argv)} did not return within {BACKGROUND_TIMEOUT:.0f} s:\n{log_path.read_text()}"
                )
        description = url if url is not None else " ".join(options)
        return BackgroundMount(description, mountpoint, status, log_path.read_text(errors="replace"))

    yield start

    failures = []
    for mountpoint in reversed(mountpoints):
        problems = take_down(mountpoint, pids=daemon_pids(mountpoint))
        if problems:
            failures.append(f"background mount on {mountpoint}: " + "; ".join(problems))
    if failures:
        pytest.fail("\n".join(failures))
