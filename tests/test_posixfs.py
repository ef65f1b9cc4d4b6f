"""Behaviour of the POSIX backend beyond the shared contract."""

from __future__ import annotations

import os
from pathlib import Path

from borgstorefs.backends.posixfs import PosixFS

GiB = 1024**3
HOLE = GiB
"""Size of the hole in bytes: a full copy is easy to tell apart, yet cannot fill the disk."""


def test_stage_copy_keeps_holes(tmp_path: Path) -> None:
    backend = PosixFS(tmp_path / "store")
    backend.create()
    with backend:
        backend.store("sparse", b"head")
        path = tmp_path / "store" / "sparse"
        with open(path, "r+b") as file:
            file.seek(HOLE)
            file.write(b"tail")

        staged = backend.stage("sparse", copy_from="sparse")
        staged.truncate(HOLE + 2)
        staged.commit("sparse")

        st = os.stat(path)
        assert st.st_size == HOLE + 2
        assert st.st_blocks * 512 < 1024 * 1024
        assert backend.load("sparse", size=4) == b"head"
        assert backend.load("sparse", offset=HOLE) == b"ta"
        assert backend.load("sparse", offset=HOLE // 2, size=8) == bytes(8)
