"""A real OpenSSH server for tests: `SSHServer`, the `sshd` fixture and URL helpers.

`SSHServer` runs ``sshd -D -e`` as a child process (not a daemon) on
127.0.0.1 on a free port. Everything it needs lives in one temporary
directory: a host key and a user key made by ``ssh-keygen``, its own
``sshd_config``, and for the client a ``known_hosts`` and an ``ssh_config``
that names the user key and that ``known_hosts``. Nothing of the system's
ssh configuration is read or changed. The one exception: sshd needs the
privilege-separation directory ``/run/sshd`` when it runs as root, so that
directory is created if it is missing.

The session-scoped `sshd` fixture points ``BORGSTOREFS_SSH_CONFIG`` at the
server's ``ssh_config`` for the whole test session, so that backends made
from its URLs (also in child processes) find the key and the host key there
and never read ``~/.ssh``.

Needs the Debian packages ``openssh-server`` and ``openssh-client``.

NOTE: only runs as root have been tried; as another user, sshd runs without
privilege separation and accepts only logins as that user, which is all
these tests need.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

logger = logging.getLogger(__name__)

SSHD = shutil.which("sshd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin") or "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 10.0
"""Seconds to wait for sshd to accept connections after it was started."""

STOP_TIMEOUT = 5.0
"""Seconds to wait for sshd to exit after SIGTERM before it is killed."""

CONFIG_ENV = "BORGSTOREFS_SSH_CONFIG"


class SSHServerError(RuntimeError):
    """sshd or ssh-keygen failed; the message carries their output."""


def sshd_version() -> tuple[int, int]:
    """Return the (major, minor) version of the installed OpenSSH server."""
    result = subprocess.run([SSHD, "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", result.stderr + result.stdout)
    if not match:
        raise SSHServerError(f"cannot tell the version of {SSHD}: {result.stderr.strip()!r}")
    return int(match.group(1)), int(match.group(2))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def generate_key(path: Path, comment: str) -> str:
    """Write a new ed25519 key pair without passphrase to *path* and *path*.pub; return the public line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def descendants(pid: int) -> list[int]:
    """Return the PIDs of all processes below *pid*, children first, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process exited while we looked
        # The command name in brackets may contain spaces; fields after it are fixed.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        children = parents.get(pending.pop(), [])
        found.extend(children)
        pending.extend(children)
    return found


class SSHServer:
    """One OpenSSH server on 127.0.0.1 with its keys and client files in *directory*.

    `start` and `stop` may be called repeatedly. The port, host key and user
    key stay the same, so clients see a restarted server as the same host.
    """

    def __init__(self, directory: Path, *, port: int | None = None) -> None:
        for program in (SSHD, "ssh-keygen"):
            if shutil.which(program) is None:
                raise SSHServerError(
                    f"{program} is missing: install the Debian packages openssh-server and openssh-client"
                )
        self.directory = directory
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "sshd.log"
        self.host_key_path = directory / "host_ed25519_key"
        self.user_key_path = directory / "id_ed25519"
        self.known_hosts_path = directory / "known_hosts"
        self.ssh_config_path = directory / "ssh_config"
        self.sshd_config_path = directory / "sshd_config"
        self._write_files()

    def __repr__(self) -> str:
        return f"SSHServer(127.0.0.1:{self.port}, pid={self.process.pid if self.process else None})"

    @property
    def host_public_key(self) -> str:
        """The server's public host key line: ``ssh-ed25519 AAAA... comment``."""
        return self.host_key_path.with_name(self.host_key_path.name + ".pub").read_text().strip()

    def _write_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        key_type, key_data, _ = self._generate_keys()
        self.known_hosts_path.write_text(f"[127.0.0.1]:{self.port} {key_type} {key_data}\n")
        self.sshd_config_path.write_text(self._sshd_config())
        self.ssh_config_path.write_text(self.client_config())

    def _generate_keys(self) -> list[str]:
        host_line = generate_key(self.host_key_path, "borgstorefs-test-host")
        user_line = generate_key(self.user_key_path, "borgstorefs-test-user")
        (self.directory / "authorized_keys").write_text(user_line + "\n")
        return host_line.split(" ", 2)

    def _sshd_config(self) -> str:
        lines = [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.host_key_path}",
            "PidFile none",
            # The temporary directory is not owned by the login user in the way
            # StrictModes demands, and it needs no protection in a test.
            "StrictModes no",
            f"AuthorizedKeysFile {self.directory}/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # CI runs as root; keys are the only way in.
            "PermitRootLogin prohibit-password",
            # internal-sftp is the same server code as the sftp-server binary,
            # whose path differs between distributions.
            "Subsystem sftp internal-sftp",
            "LogLevel INFO",
        ]
        if sshd_version() >= (9, 8):
            # Since 9.8, sshd delays clients that drop connections before they
            # authenticate, which the host key tests do on purpose.
            lines.append("PerSourcePenalties no")
        return "\n".join(lines) + "\n"

    def client_config(self, alias: str = "sshd-test") -> str:
        """Return an ssh_config for this server: the *alias* host and defaults for 127.0.0.1."""
        return (
            f"Host {alias}\n"
            f"    HostName 127.0.0.1\n"
            f"    Port {self.port}\n"
            f"Host *\n"
            f"    User {self.user}\n"
            f"    IdentityFile {self.user_key_path}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts_path}\n"
        )

    # Process control

    def start(self) -> None:
        """Start sshd and wait until it accepts connections; `SSHServerError` if it cannot."""
        if self.process is not None:
            raise SSHServerError(f"{self!r} is already running")
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.sshd_config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                # sshd stays in the process group of pytest, so a Ctrl-C or a
                # `timeout` that ends the test run ends the listener too.
                stderr=log,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("started %r", self)

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SSHServerError(f"sshd exited with status {self.process.returncode} at start:\n{self.log_tail()}")
            if self._banner_received():
                return
            time.sleep(0.05)
        raise SSHServerError(f"sshd did not accept connections within {START_TIMEOUT} s:\n{self.log_tail()}")

    def _banner_received(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as connection:
                return connection.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop sshd and every session process it started, by PID; safe to call twice.

        Killing the sessions too drops every client connection, like a
        server reboot does.
        """
        if self.process is None:
            return
        process, self.process = self.process, None
        sessions = descendants(process.pid)
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("sshd (pid %d) ignored SIGTERM for %.0f s; killing it", process.pid, STOP_TIMEOUT)
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
        for pid in sessions:
            # A session may already have ended with its connection.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        logger.info("stopped sshd (pid %d) and %d session processes", process.pid, len(sessions))

    def restart(self, *, down_seconds: float = 0.0) -> None:
        """Stop the server with all its connections, wait *down_seconds*, and start it on the same port."""
        self.stop()
        if down_seconds:
            time.sleep(down_seconds)
        self.start()

    def pause(self) -> None:
        """Freeze sshd and its sessions with SIGSTOP: connections stay open but nothing responds."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause` with SIGCONT."""
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _pids(self) -> list[int]:
        if self.process is None:
            raise SSHServerError(f"{self!r} is not running")
        return [self.process.pid, *descendants(self.process.pid)]

    def log_tail(self, lines: int = 20) -> str:
        """Return the last *lines* lines that sshd logged."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # URLs

    def url(self, path: str | os.PathLike[str]) -> str:
        """Return the ``sftp://`` URL of the absolute *path* on this server, percent-encoded."""
        path = os.fspath(path)
        if not path.startswith("/"):
            raise ValueError(f"path must be absolute: {path!r}")
        return f"sftp://{self.user}@127.0.0.1:{self.port}{quote(path)}"


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """Return an OpenSSH server running for the whole test session, with ``BORGSTOREFS_SSH_CONFIG`` set for it."""
    server = SSHServer(tmp_path_factory.mktemp("sshd"))
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CONFIG_ENV, str(server.ssh_config_path))
        try:
            yield server
        finally:
            server.stop()
