"""Several stores mounted as one: a mirror of a POSIX and an SFTP store, and a distributed set of POSIX stores."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from borgstorefs.mount import mount_source
from borgstorefs.mstore_cli import MStoreSpec, StoreSpec
from borgstorefs.mstore_layout import NAME_HASH, bucket_of, bucket_owners
from borgstorefs.store import Store
from tests.mounting import (
    FSTYPE,
    BackgroundMount,
    Mount,
    borgstorefs_command,
    create_store,
    errno_of,
    is_mounted,
    mount_entry,
    requires_fuse,
    run,
)
from tests.sshd import SSHServer

pytest_plugins = ["tests.mounting"]

LEVELS = {"data/": [1], "config/": [0], "files/": [0]}
KINDS_TOML = '[kinds]\n"data/" = "hex-hash"\n"config/" = "generic"\n'
SFTP_OPTIONS = "?attempts=1&timeout=5"
"""One try per SFTP call, so that each call on a stopped server fails at once instead of retrying."""


def hex_key(bucket: int, text: str = "") -> str:
    """Return a 64-digit hex key in *bucket*."""
    return f"{bucket:02x}" + hashlib.sha256(f"{bucket}{text}".encode()).hexdigest()[2:]


def value_of(name: str, size: int = 1000) -> bytes:
    """Return a value of *size* bytes that differs per name."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def copy_of(url: str, name: str, *, deleted: bool = False) -> bytes | None:
    """Return the value of *name* on the store at *url* alone, or None if that store lacks it."""
    with Store(url) as store:
        if not store.info(name, deleted=deleted).exists:
            return None
        return store.load(name, deleted=deleted)


@dataclass
class Mirror:
    """Two created stores, a local (POSIX) one and one on the test sshd, and a config file naming them."""

    local: str
    remote: str
    config: Path
    missing_log: Path
    state: Path

    @property
    def urls(self) -> list[str]:
        """The URLs of both stores, in no particular order."""
        return [self.local, self.remote]

    def mstore(self, *args: str | os.PathLike[str], check: bool = False) -> tuple[int, str]:
        """Run ``borgstorefs mstore ARGS --config CONFIG`` and return its exit status and stdout."""
        result = run(*borgstorefs_command("mstore", *args, "--config", self.config), check=check)
        return result.returncode, result.stdout.decode()


def write_config(path: Path, urls: Sequence[str]) -> Path:
    """Write a TOML specification of a mirror over *urls* (in read order) to *path*."""
    tables = "".join(f'[[stores]]\nurl = "{url}"\nbuckets = 256\n\n' for url in urls)
    path.write_text(tables + KINDS_TOML)
    return path


def make_mirror(tmp_path: Path, server: SSHServer, *, remote_first: bool) -> Mirror:
    local = f"file://{tmp_path}/local"
    remote = server.url(tmp_path / "remote") + SFTP_OPTIONS
    for url in (local, remote):
        create_store(url, levels=LEVELS)
    order = [remote, local] if remote_first else [local, remote]
    config = write_config(tmp_path / "mirror.toml", order)
    return Mirror(local, remote, config, tmp_path / "missing.jsonl", tmp_path / "repair-state.json")


@pytest.fixture
def mirror(tmp_path: Path, sshd: SSHServer) -> Mirror:
    """A mirror that reads from the local store first."""
    return make_mirror(tmp_path, sshd, remote_first=False)


def mount_mirror(mount: Callable[..., Mount], mirror: Mirror) -> Mount:
    return mount(None, "--config", str(mirror.config), "--missing-log", str(mirror.missing_log))


def write_through(mounted: Mount, items: dict[str, bytes]) -> None:
    """Write *items* (name to value) as files through the mount, creating namespaces as needed."""
    for name, value in items.items():
        path = mounted.path / name
        if not path.parent.exists():
            path.parent.mkdir()
        path.write_bytes(value)


def mirror_items() -> dict[str, bytes]:
    names = ["config/main", f"data/{hex_key(0x1F)}", f"data/{hex_key(0xE0)}", "files/a", "files/b", "files/big"]
    return {name: value_of(name, 3_000_000 if name == "files/big" else 1000) for name in names}


# Command line


def test_mount_source_without_passwords() -> None:
    spec = MStoreSpec([StoreSpec("sftp://backup:secret@nas/srv/a;b", 256), StoreSpec("file:///srv/c", 256)])

    source = mount_source(None, spec)

    assert source == "sftp://backup@nas/srv/a%3Bb:256;file:///srv/c:256"
    assert "secret" not in source


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--store", "file:///a:256", "file:///b"], "not both"),
        (["--kind", "data=hex-hash", "file:///b"], "--kind applies to several stores"),
        (["--store", "file:///a:200"], "not a positive multiple of 256"),
        ([], "no store given"),
    ],
)
def test_mount_usage_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()

    result = run(*borgstorefs_command("mount", *extra, mountpoint), check=False)

    assert result.returncode == 1
    assert message in result.stderr.decode()
    assert not is_mounted(mountpoint)


# A mirror of a POSIX and an SFTP store


@requires_fuse
def test_mirror_shows_type_and_source(mirror: Mirror, mount: Callable[..., Mount]) -> None:
    mounted = mount_mirror(mount, mirror)

    entry = mount_entry(mounted.path)

    assert entry is not None
    assert entry.fstype == FSTYPE
    assert entry.source == f"{mirror.local}:256;{mirror.remote}:256"


@requires_fuse
def test_mirror_writes_reach_both_stores(mirror: Mirror, mount: Callable[..., Mount]) -> None:
    mounted = mount_mirror(mount, mirror)
    items = mirror_items()

    write_through(mounted, items)

    for name, value in items.items():
        assert (mounted.path / name).read_bytes() == value, name
        for url in mirror.urls:
            assert copy_of(url, name) == value, f"{name} on {url}"
    assert sorted(os.listdir(mounted.path / "files")) == ["a", "b", "big"]
    assert not mirror.missing_log.exists()


@requires_fuse
def test_mirror_trash_and_restore(mirror: Mirror, mount: Callable[..., Mount]) -> None:
    mounted = mount_mirror(mount, mirror)
    write_through(mounted, {"files/a": b"first", "files/b": b"second"})
    live, trashed = mounted.path / "files" / "a", mounted.path / ".trash" / "files" / "a"

    live.unlink()

    assert trashed.read_bytes() == b"first"
    assert not live.exists()
    for url in mirror.urls:
        assert copy_of(url, "files/a") is None, url
        assert copy_of(url, "files/a", deleted=True) == b"first", url

    trashed.rename(live)

    assert live.read_bytes() == b"first"
    for url in mirror.urls:
        assert copy_of(url, "files/a") == b"first", url
        assert copy_of(url, "files/a", deleted=True) is None, url

    (mounted.path / "files" / "b").unlink()
    (mounted.path / ".trash" / "files" / "b").unlink()

    assert os.listdir(mounted.path / ".trash" / "files") == []
    for url in mirror.urls:
        assert copy_of(url, "files/b") is None, url
        assert copy_of(url, "files/b", deleted=True) is None, url


@requires_fuse
def test_mirror_survives_local_loss(mirror: Mirror, mount: Callable[..., Mount]) -> None:
    mounted = mount_mirror(mount, mirror)
    mounted.expect_log(r"WARNING .* on Store\(file://.*\) is missing; recorded for repair")
    items = mirror_items()
    write_through(mounted, items)

    # The local disk loses every item, under the running mount.
    with Store(mirror.local) as local:
        for name in items:
            local.delete(name)

    for name, value in items.items():
        assert (mounted.path / name).read_bytes() == value, name
    assert sorted(os.listdir(mounted.path / "files")) == ["a", "b", "big"]
    logged = {json.loads(line)["name"] for line in mirror.missing_log.read_text().splitlines()}
    assert logged == set(items)

    status, output = mirror.mstore("check")
    assert status == 3, output
    for name in items:
        assert f"{name}: missing copy on store 0" in output

    status, output = mirror.mstore("repair", "--state", mirror.state)
    assert status == 0, output
    assert f"repair: {len(items)} copies made" in output

    status, output = mirror.mstore("check")
    assert status == 0, output
    for name, value in items.items():
        for url in mirror.urls:
            assert copy_of(url, name) == value, f"{name} on {url}"


@requires_fuse
def test_mirror_survives_sshd_stop(tmp_path: Path, sshd: SSHServer, mount: Callable[..., Mount]) -> None:
    # The SFTP store comes first in read order, so reads must fall over to the local copy.
    mirror = make_mirror(tmp_path, sshd, remote_first=True)
    mounted = mount_mirror(mount, mirror)
    # Calls on the stopped server fail, and paramiko, the SFTP backend, the MStore and the errno mapping log them.
    mounted.expect_log(r"(borgstorefs\.(backends\.sftp\w*|mstore\w*|errnos)|paramiko\.transport): ")
    items = mirror_items()
    write_through(mounted, items)

    sshd.stop()
    try:
        for name, value in items.items():
            assert (mounted.path / name).read_bytes() == value, name
        assert sorted(os.listdir(mounted.path / "files")) == ["a", "b", "big"]
        assert errno_of((mounted.path / "files" / "new").write_bytes, b"not acknowledged") == errno.EIO
    finally:
        sshd.start()

    # The failed write reached the local store only, and reads found every copy on the server unreachable.
    assert copy_of(mirror.local, "files/new") == b"not acknowledged"
    assert copy_of(mirror.remote, "files/new") is None
    status, output = mirror.mstore("check")
    assert status == 3, output
    assert "files/new: missing copy on store 0" in output

    status, output = mirror.mstore("repair", "--missing-log", mirror.missing_log)
    assert status == 0, output

    status, output = mirror.mstore("check")
    assert status == 0, output
    for name, value in {**items, "files/new": b"not acknowledged"}.items():
        for url in mirror.urls:
            assert copy_of(url, name) == value, f"{name} on {url}"
    assert not mirror.missing_log.exists()


# A distributed set of POSIX stores


@requires_fuse
def test_distributed_stores_one_tree(tmp_path: Path, background_mount: Callable[..., BackgroundMount]) -> None:
    urls = [f"file://{tmp_path}/store{i}" for i in range(3)]
    buckets = [128, 64, 64]
    for url in urls:
        create_store(url, levels=LEVELS)
    spec_options = [arg for url, count in zip(urls, buckets, strict=True) for arg in ("--store", f"{url}:{count}")]
    spec_options += ["--kind", "data=hex-hash"]
    writer = background_mount(None, *spec_options)
    assert writer.returncode == 0, writer.output
    owners = bucket_owners(buckets)
    items = {f"files/file{i:02}": value_of(f"files/file{i:02}", 100) for i in range(40)}
    items |= {f"data/{hex_key(bucket)}": value_of(str(bucket), 100) for bucket in (0x00, 0x7F, 0x80, 0xC0, 0xFF)}

    for name, value in items.items():
        path = writer.path / name
        if not path.parent.exists():
            path.parent.mkdir()
        path.write_bytes(value)

    used = set()
    for name, value in items.items():
        namespace, key = name.split("/")
        bucket = bucket_of("hex-hash" if namespace == "data" else NAME_HASH, key)
        assert bucket is not None
        (owner,) = owners[bucket]
        holders = [index for index, url in enumerate(urls) if copy_of(url, name) is not None]
        assert holders == [owner], name
        assert copy_of(urls[owner], name) == value
        used.add(owner)
    assert used == {0, 1, 2}

    reader = background_mount(None, *spec_options, "-o", "ro")
    assert reader.returncode == 0, reader.output
    assert sorted(os.listdir(reader.path / "files")) == sorted(name.split("/")[1] for name in items if "files/" in name)
    assert len(os.listdir(reader.path / "data")) == 5
    for name, value in items.items():
        assert (reader.path / name).read_bytes() == value, name
