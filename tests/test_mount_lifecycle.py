"""Mounting and unmounting: background and foreground modes, signals, failures, killed daemons."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from borgstorefs.backends import redact_url
from tests.mounting import (
    BACKGROUND_TIMEOUT,
    FSTYPE,
    MOUNT_TIMEOUT,
    BackgroundMount,
    Mount,
    borgstorefs_command,
    create_store,
    daemon_pids,
    errno_of,
    is_mounted,
    mount_entry,
    requires_fuse,
    run,
    take_down,
    wait_until,
)

pytest_plugins = ["tests.mounting"]
pytestmark = requires_fuse

ITEMS = {"data/item": b"mounted value\n"}


@pytest.fixture
def url(make_url: Callable[[], str]) -> str:
    """URL of a new store holding `ITEMS`."""
    result = make_url()
    create_store(result, ITEMS)
    return result


# Background mode


def test_background_mount_returns_mounted(url: str, background_mount: Callable[..., BackgroundMount]) -> None:
    result = background_mount(url)

    assert result.returncode == 0, result.output
    assert is_mounted(result.path)
    assert (result.path / "data" / "item").read_bytes() == ITEMS["data/item"]


def test_background_daemon_detached(url: str, background_mount: Callable[..., BackgroundMount]) -> None:
    result = background_mount(url)

    assert result.returncode == 0, result.output
    assert len(daemon_pids(result.path)) == 1


def test_background_mount_releases_output(url: str, tmp_path: Path) -> None:
    """``out=$(borgstorefs mount ...)`` returns: the daemon keeps no descriptor of the caller's pipes."""
    mountpoint = tmp_path / "piped"
    mountpoint.mkdir()
    try:
        result = subprocess.run(
            borgstorefs_command("mount", url, mountpoint), stdin=subprocess.DEVNULL, capture_output=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint)
    finally:
        if is_mounted(mountpoint):
            subprocess.run(borgstorefs_command("umount", mountpoint), check=True, timeout=60)


def test_installed_script_mounts(url: str, background_mount: Callable[..., BackgroundMount]) -> None:
    script = Path(sys.executable).parent / "borgstorefs"

    result = background_mount(url, command=[str(script)])

    assert result.returncode == 0, result.output
    assert is_mounted(result.path)


def test_umount_command_unmounts(url: str, background_mount: Callable[..., BackgroundMount]) -> None:
    mounted = background_mount(url)
    assert mounted.returncode == 0, mounted.output
    pids = daemon_pids(mounted.path)

    result = run(*borgstorefs_command("umount", mounted.path), check=False)

    assert result.returncode == 0, result.stderr
    assert not is_mounted(mounted.path)
    wait_until(lambda: not daemon_pids(mounted.path), MOUNT_TIMEOUT, f"daemon {pids} to exit after umount")


def test_findmnt_type_and_source(url: str, background_mount: Callable[..., BackgroundMount]) -> None:
    mounted = background_mount(url)
    assert mounted.returncode == 0, mounted.output

    output = run("findmnt", "-n", "-o", "FSTYPE,SOURCE", mounted.path).stdout.decode().split()

    assert output[0] == FSTYPE
    assert output[1] == redact_url(url)  # the URL without a password, where it had one


# Foreground mode and signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_foreground_signal_unmounts(url: str, mount: Callable[..., Mount], signum: int) -> None:
    mounted = mount(url)
    assert (mounted.path / "data" / "item").read_bytes() == ITEMS["data/item"]

    status = mounted.stop(signum)

    assert status == 0
    assert not is_mounted(mounted.path)


def test_fusermount_ends_foreground_daemon(url: str, mount: Callable[..., Mount]) -> None:
    mounted = mount(url)

    run("fusermount3", "-u", mounted.path)

    assert mounted.process.wait(timeout=MOUNT_TIMEOUT) == 0
    assert not is_mounted(mounted.path)


def test_read_only_option_shown(url: str, mount: Callable[..., Mount]) -> None:
    mounted = mount(url, "-o", "ro")
    entry = mount_entry(mounted.path)

    assert entry is not None
    assert "ro" in entry.options.split(",")


def test_allow_other_option_shown(url: str, mount: Callable[..., Mount]) -> None:
    mounted = mount(url, "-o", "allow_other")
    entry = mount_entry(mounted.path)

    assert entry is not None
    assert "allow_other" in entry.options.split(",")


def test_debug_option_logs_requests(url: str, mount: Callable[..., Mount]) -> None:
    mounted = mount(url, "-d")
    before = len(mounted.log())

    os.listdir(mounted.path / "data")
    (mounted.path / "data" / "item").read_bytes()

    assert "DEBUG" in mounted.log()[before:]


# Failures leave nothing mounted


def assert_failed_cleanly(result: BackgroundMount) -> None:
    """Check the contract of a failed mount: non-zero exit, one line of error, nothing mounted."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.output
    assert not is_mounted(result.path)
    assert daemon_pids(result.path) == []


@pytest.mark.parametrize(
    "bad_url",
    ["ftp://127.0.0.1/store", "file://relative/path", "not a url", "sftp://"],
)
def test_bad_url_fails(background_mount: Callable[..., BackgroundMount], bad_url: str) -> None:
    assert_failed_cleanly(background_mount(bad_url))


@pytest.mark.parametrize(
    "option",
    [
        "read_around=6",
        "read_around=16384",
        "read_around=-4",
        "read_ahead=2097152",
        "request_poll=-1",
        "request_poll=100001",
        "request_poll=fast",
        "quick_wait=-1",
        "quick_wait=100001",
        "quick_wait=fast",
    ],
)
def test_bad_option_value_fails(url: str, background_mount: Callable[..., BackgroundMount], option: str) -> None:
    result = background_mount(url, "-o", option)

    assert_failed_cleanly(result)
    assert option in result.output


def test_missing_store_fails(tmp_path: Path, background_mount: Callable[..., BackgroundMount]) -> None:
    result = background_mount(f"file://{tmp_path}/no-such-store")

    assert_failed_cleanly(result)


def test_unreachable_sftp_fails(background_mount: Callable[..., BackgroundMount]) -> None:
    # Port 1 on loopback has no listener, so the connection is refused at once.
    result = background_mount("sftp://nobody@127.0.0.1:1/store")

    assert_failed_cleanly(result)


def test_missing_mountpoint_fails(url: str, tmp_path: Path, background_mount: Callable[..., BackgroundMount]) -> None:
    result = background_mount(url, mountpoint=tmp_path / "no-such-dir")

    assert_failed_cleanly(result)
    assert not (tmp_path / "no-such-dir").exists()


def test_nonempty_mountpoint_fails(url: str, tmp_path: Path, background_mount: Callable[..., BackgroundMount]) -> None:
    mountpoint = tmp_path / "busy"
    mountpoint.mkdir()
    (mountpoint / "file").write_bytes(b"local data")

    result = background_mount(url, mountpoint=mountpoint)

    assert_failed_cleanly(result)
    assert (mountpoint / "file").read_bytes() == b"local data"


def test_foreground_failure_exits_nonzero(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    command = borgstorefs_command("mount", "-f", f"file://{tmp_path}/no-such-store", mountpoint)

    try:
        result = run(*command, check=False, timeout=BACKGROUND_TIMEOUT)
        mounted_after = is_mounted(mountpoint)
    finally:
        # Unmounts whatever a daemon that wrongly succeeded left behind.
        cleanup = take_down(mountpoint)

    assert result.returncode != 0
    assert len(result.stderr.decode().strip().splitlines()) == 1, result.stderr
    assert not mounted_after
    assert cleanup == []


# Killed daemons


def test_killed_daemon_enotconn(url: str, mount: Callable[..., Mount]) -> None:
    mounted = mount(url)

    mounted.kill()

    assert is_mounted(mounted.path)
    assert errno_of(os.stat, mounted.path) == errno.ENOTCONN
    assert errno_of(os.listdir, mounted.path) == errno.ENOTCONN
    assert errno_of(os.stat, mounted.path / "data" / "item") == errno.ENOTCONN


def test_rsync_delete_stops_on_dead_mount(url: str, mount: Callable[..., Mount], tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mounted = mount(url)
    run("rsync", "-a", f"{mounted.path}/data/", mirror)
    assert (mirror / "item").read_bytes() == ITEMS["data/item"]

    mounted.kill()
    result = run("rsync", "-a", "--delete", f"{mounted.path}/data/", mirror, check=False)

    assert result.returncode != 0
    assert (mirror / "item").read_bytes() == ITEMS["data/item"]


@pytest.mark.parametrize("unmount", ["borgstorefs umount", "fusermount3 -u"])
def test_kill_umount_cycles(url: str, tmp_path: Path, mount: Callable[..., Mount], unmount: str) -> None:
    mountpoint = tmp_path / "cycled"
    mountpoint.mkdir()
    command = borgstorefs_command("umount") if unmount == "borgstorefs umount" else ["fusermount3", "-u"]

    for cycle in range(2):
        mounted = mount(url, mountpoint=mountpoint)
        assert (mountpoint / "data" / "item").read_bytes() == ITEMS["data/item"], cycle
        run(*command, mountpoint)
        assert not is_mounted(mountpoint), cycle
        assert mounted.process.wait(timeout=MOUNT_TIMEOUT) == 0, cycle

        mounted = mount(url, mountpoint=mountpoint)
        mounted.kill()
        assert errno_of(os.listdir, mountpoint) == errno.ENOTCONN, cycle
        run(*command, mountpoint)
        assert not is_mounted(mountpoint), cycle
        assert os.listdir(mountpoint) == [], cycle


def _read_ahead_kib(mountpoint: Path) -> int:
    device = os.stat(mountpoint).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may change a mount's read-ahead")
def test_background_mount_raises_read_ahead(url: str, background_mount: Callable[..., BackgroundMount]) -> None:
    result = background_mount(url)
    assert result.returncode == 0, result.output

    # Set before the mount command returns, so the first file opened already uses it.
    assert _read_ahead_kib(result.path) == 1024


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may change a mount's read-ahead")
def test_read_ahead_option(url: str, background_mount: Callable[..., BackgroundMount]) -> None:
    result = background_mount(url, "-o", "read_ahead=256")
    assert result.returncode == 0, result.output

    assert _read_ahead_kib(result.path) == 256
