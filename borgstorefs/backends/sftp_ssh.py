"""SFTP over an OpenSSH client process: the ``ssh`` transport of the SFTP backend.

Each session runs ``ssh -s HOST sftp`` and speaks SFTP over the pipes of
that process, as sshfs does. Encryption and MACs then run in C in the ssh
process, which the kernel can schedule on another core than the Python code
that builds and parses the SFTP packets. Each session has a process of its
own, so parallel sessions spread that work over the cores too.

ssh reads its configuration itself: the file that ``BORGSTOREFS_SSH_CONFIG``
names (passed with ``-F``), or else ``~/.ssh/config`` and the system-wide
file. Unlike the paramiko transport, ssh expands ``~`` to the home directory
of the password database, not ``$HOME``. ProxyJump and ProxyCommand work.
The command line forces what the paramiko transport always does: no
password prompts (``BatchMode``), a host key that known_hosts must list
(``StrictHostKeyChecking=yes``), and no writes to known_hosts
(``UpdateHostKeys=no``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import select
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO

from ..errors import BackendError, HostKeyChanged, HostKeyUnknown, PermissionDenied
from .sftp_connect import (
    CONFIG_ENV,
    SSH_PORT,
    HostKey,
    SSHTarget,
    changed_key_message,
    config_path,
    unknown_key_message,
)
from .sftp_session import SFTPSession, is_connection_lost

logger = logging.getLogger(__name__)

SSH_PROGRAM = "ssh"

PIPE_SIZE = 1024 * 1024
"""Bytes of kernel buffer asked for each pipe to ssh (Linux ``F_SETPIPE_SZ``).

Four 256 KiB SFTP packets fit, so ssh and this process wake each other less
often than with the 64 KiB default. 1 MiB is Linux's default
``/proc/sys/fs/pipe-max-size``, the limit for unprivileged processes.
"""

PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
"""Ciphers moved to the front of OpenSSH's default order where the CPU has AES instructions."""

DRAIN_SIZE = 256 * 1024
"""Bytes read at a time from ssh's output while a `send` waits for ssh to take input."""

CLOSE_GRACE = 0.5
"""Seconds a healthy ssh process gets to exit after its input closes, before SIGTERM.

ssh exits one round trip after its input ends. SIGTERM after the grace
loses nothing either, because every request whose effect counts has had its
reply by then, and the server drops the session's handles when it ends.
"""

KILL_TIMEOUT = 5.0
"""Seconds to wait for ssh to exit after SIGTERM before SIGKILL."""

STDERR_LIMIT = 16 * 1024
"""Bytes at the end of ssh's stderr that messages quote."""

# Linux only; on other systems the pipes keep their default size.
F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)


def ssh_available() -> bool:
    """Return whether an ``ssh`` program is on PATH."""
    return shutil.which(SSH_PROGRAM) is not None


def config_options() -> list[str]:
    """Return ``-F FILE`` when ``BORGSTOREFS_SSH_CONFIG`` is set, else nothing (ssh's own defaults)."""
    path = os.environ.get(CONFIG_ENV)
    return ["-F", path] if path else []


def destination_options(
    host: str, user: str | None, port: int | None, *, config: Sequence[str] | None = None
) -> list[str]:
    """Return the ssh arguments that name the server, the host last after ``--``.

    *config* replaces the `config_options` (``["-F", "/dev/null"]`` reads no configuration).
    """
    if host.startswith("-"):
        # ssh would read it as an option, and no host name starts with "-".
        raise BackendError(f"invalid SFTP host {host!r}: a host name cannot start with '-'")
    options = [*(config_options() if config is None else config)]
    if port is not None:
        options += ["-p", str(port)]
    if user is not None:
        options += ["-l", user]
    return [*options, "--", host]


def sftp_command(
    host: str,
    user: str | None,
    port: int | None,
    *,
    timeout: float,
    keepalive: float,
    extra_options: Sequence[str] = (),
) -> list[str]:
    """Return the ssh command line that starts an SFTP session on *host*; *extra_options* go before ``-s``."""
    return [
        SSH_PROGRAM,
        "-x",
        "-a",
        "-T",
        "-o",
        "ClearAllForwardings=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "UpdateHostKeys=no",
        "-o",
        f"ConnectTimeout={max(1, math.ceil(timeout))}",
        "-o",
        f"ServerAliveInterval={max(1, round(keepalive))}",
        "-o",
        "ServerAliveCountMax=3",
        *extra_options,
        # No IPQoS or TCP_NODELAY option is needed: with ssh 9.2p1, strace
        # shows TCP_NODELAY set at connect and kept for the subsystem session.
        "-s",
        *destination_options(host, user, port),
        "sftp",
    ]


def ssh_target(options: dict[str, list[str]], host: str, user: str | None) -> SSHTarget:
    """Return the target that the `ssh_settings` *options* of *host* describe."""

    def first(key: str, default: str) -> str:
        return options.get(key, [default])[0]

    known_hosts = first("userknownhostsfile", "").split() + first("globalknownhostsfile", "").split()
    return SSHTarget(
        hostname=first("hostname", host),
        port=int(first("port", str(SSH_PORT))),
        user=first("user", user or ""),
        identity_files=tuple(options.get("identityfile", [])),
        known_hosts_files=tuple(known_hosts),
        use_agent=first("identitiesonly", "no") == "no" and first("identityagent", "").lower() != "none",
        host_key_alias=options["hostkeyalias"][0] if "hostkeyalias" in options else None,
    )


def ssh_settings(arguments: list[str], host: str, timeout: float) -> dict[str, list[str]]:
    """Return what ``ssh -G ARGUMENTS`` prints, as lists of values per lowercase keyword."""
    command = [SSH_PROGRAM, "-G", *arguments]
    try:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendError(
            f"cannot run '{SSH_PROGRAM} -G' for SFTP server {host!r}: {err}. Install the OpenSSH client "
            "or add transport=paramiko to the store URL"
        ) from err
    if result.returncode != 0:
        raise BackendError(
            f"ssh cannot read its configuration for SFTP server {host!r} (config {config_path()!r}): "
            f"{result.stderr.strip()}"
        )
    options: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        options.setdefault(key, []).append(value)
    return options


def cipher_options(
    options: dict[str, list[str]], host: str, user: str | None, port: int | None, timeout: float
) -> list[str]:
    """Return ``-o Ciphers=...`` that puts AES-GCM first, or nothing; *options* are the `ssh_settings` in force.

    OpenSSH prefers chacha20-poly1305, which costs more CPU time per byte
    than AES-GCM on a CPU with AES instructions. Reading 1 GiB through a
    mount took 4.0 s with it and 3.0 s with aes128-gcm on a 2-core AMD EPYC.
    Only OpenSSH's own default list is reordered, never a list that an
    ssh_config sets: the list in force is compared with that of ``-F /dev/null``.
    """
    if not cpu_has_aes():
        return []
    effective = options.get("ciphers", [""])[0]
    try:
        builtin_arguments = destination_options(host, user, port, config=["-F", "/dev/null"])
        builtin = ssh_settings(builtin_arguments, host, timeout).get("ciphers", [""])[0]
    except BackendError as err:
        logger.info("kept ssh's cipher order for %s: %s", host, err)
        return []
    if not effective or effective != builtin:
        return []
    ciphers = effective.split(",")
    first = [cipher for cipher in PREFERRED_CIPHERS if cipher in ciphers]
    if not first:
        return []
    ordered = first + [cipher for cipher in ciphers if cipher not in first]
    return ["-o", f"Ciphers={','.join(ordered)}"]


def cpu_has_aes() -> bool:
    """Return whether the CPU has AES instructions (the ``aes`` flag in ``/proc/cpuinfo``; False elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


class SSHConnection:
    """A `sftp_session.Connection` whose sessions each start an ``ssh`` process; nothing is shared."""

    def __init__(self, target: SSHTarget, command: list[str], timeout: float) -> None:
        self.target = target
        self._command = command
        self._timeout = timeout
        self._closed = False

    def is_active(self) -> bool:
        return not self._closed

    def open_session(self, generation: int) -> SFTPSession:
        """Start ssh and the SFTP handshake; map ssh's refusals to `HostKeyUnknown` and the others."""
        channel = SSHChannel.start(self._command, self._timeout, self.target.label)
        try:
            return SFTPSession(channel, generation)
        except BaseException as err:
            channel.close()
            if not isinstance(err, Exception):
                raise
            stderr = channel.stderr_text()
            logger.debug("ssh (pid %d) to %s failed to start SFTP: %s", channel.pid, self.target.label, stderr)
            raise startup_error(self.target, self._command, stderr, channel.returncode, err) from err

    def close(self) -> None:
        self._closed = True


class SSHChannel:
    """The pipes of one ssh process, as the byte stream of one `SFTPSession`.

    Every wait ends after *timeout* seconds without progress with
    `TimeoutError`. The end of ssh's output raises `SSHProcessEnded`. Both
    are errors that `is_connection_lost` recognizes. Use from one thread at
    a time, like the session.
    """

    def __init__(self, process: subprocess.Popen[bytes], stderr: IO[bytes], timeout: float, label: str) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stderr = stderr
        self._timeout_ms = max(1, round(timeout * 1000))
        self._label = label
        self._input = process.stdin.fileno()
        self._output = process.stdout.fileno()
        self._buffer = bytearray()  # bytes that ssh wrote and recv has not returned yet
        self._failed = False
        self._closed = False
        self._final_stderr = ""
        for fd in (self._input, self._output):
            os.set_blocking(fd, False)
            if F_SETPIPE_SZ is not None:
                with contextlib.suppress(OSError):
                    # A larger pipe is only faster; the default works too.
                    fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        self._readable = select.poll()
        self._readable.register(self._output, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(self._input, select.POLLOUT)
        self._writable.register(self._output, select.POLLIN)

    @classmethod
    def start(cls, command: list[str], timeout: float, label: str) -> SSHChannel:
        """Start *command* (an ssh command line) with its stdin and stdout as the channel."""
        stderr = tempfile.TemporaryFile(prefix="borgstorefs-ssh-")  # noqa: SIM115 (the channel owns and closes it)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                bufsize=0,
                # A Ctrl-C meant for the daemon must not end its sessions
                # before it unmounts. ssh still exits when this process dies,
                # because its input then ends.
                start_new_session=True,
            )
        except OSError as err:
            stderr.close()
            raise BackendError(
                f"cannot start {command[0]!r} for SFTP server {label}: {err}. Install the OpenSSH client "
                "or add transport=paramiko to the store URL"
            ) from err
        except BaseException:
            stderr.close()
            raise
        logger.debug("started ssh (pid %d) for an SFTP session to %s", process.pid, label)
        return cls(process, stderr, timeout, label)

    @property
    def pid(self) -> int:
        """The process ID of ssh."""
        return self._process.pid

    def get_name(self) -> str:
        """Return a name for paramiko's log lines, as `paramiko.Channel.get_name` does."""
        return f"ssh pid {self.pid}"

    @property
    def returncode(self) -> int | None:
        """ssh's exit status, or None while it runs."""
        return self._process.poll()

    @property
    def alive(self) -> bool:
        """Whether ssh runs and no wait on it failed."""
        return not self._closed and not self._failed and self._process.poll() is None

    def send(self, data: bytes) -> int:
        """Write all of *data* to ssh, reading its output meanwhile so that neither side blocks for good."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._input, view)
            except BlockingIOError:
                self._wait_writable()
                continue
            except OSError as err:
                raise self._ended(f"writing failed: {err}") from err
            view = view[written:]
        return len(data)

    def recv(self, size: int) -> bytes:
        """Return the next *size* bytes that ssh wrote, waiting for all of them."""
        # Reading no more than requested lets a whole 256 KiB DATA reply
        # arrive in one read and one copy. Reading ahead would cost another
        # copy through the buffer, which is dearer than a read per header.
        buffer = self._buffer
        if len(buffer) >= size:
            data = bytes(memoryview(buffer)[:size])
            del buffer[:size]
            return data
        pieces = [bytes(buffer)] if buffer else []
        missing = size - len(buffer)
        buffer.clear()
        while missing:
            chunk = self._read(missing)
            pieces.append(chunk)
            missing -= len(chunk)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read(self, size: int) -> bytes:
        """Return up to *size* bytes that ssh wrote, at least one, waiting up to the timeout for them."""
        while True:
            try:
                chunk = os.read(self._output, size)
            except BlockingIOError:
                self._wait(self._readable)
                continue
            except OSError as err:
                raise self._ended(f"reading failed: {err}") from err
            if not chunk:
                raise self._ended("its output ended")
            return chunk

    def _wait_writable(self) -> None:
        """Wait until ssh takes input; collect its output meanwhile, which it may block on."""
        while True:
            for fd, events in self._wait(self._writable):
                if fd == self._input:
                    if events & (select.POLLERR | select.POLLHUP):
                        raise self._ended("its input closed")
                    return
                self._buffer += self._read(DRAIN_SIZE)

    def _wait(self, poll: select.poll) -> list[tuple[int, int]]:
        events = poll.poll(self._timeout_ms)
        if not events:
            self._failed = True
            raise TimeoutError(
                f"timed out after {self._timeout_ms / 1000:g} s waiting for SFTP server {self._label} "
                f"(ssh pid {self.pid})"
            )
        return events

    def _ended(self, failure: str) -> SSHProcessEnded:
        """Return the error for an ssh process that stopped talking, with its exit status and stderr."""
        self._failed = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=CLOSE_GRACE)
        status = self._process.returncode
        exit_text = f"exited with status {status}" if status is not None else "still runs"
        stderr = self.stderr_text() or "no message"
        return SSHProcessEnded(f"ssh (pid {self.pid}) to {self._label}: {failure}; it {exit_text}: {stderr}")

    def stderr_text(self) -> str:
        """Return the end of what ssh wrote to stderr, stripped."""
        if self._closed:
            return self._final_stderr
        return self._read_stderr()

    def _read_stderr(self) -> str:
        try:
            size = os.fstat(self._stderr.fileno()).st_size
            data = os.pread(self._stderr.fileno(), STDERR_LIMIT, max(0, size - STDERR_LIMIT))
        except (OSError, ValueError):
            return ""  # the file is closed
        return data.decode(errors="replace").strip()

    def close(self) -> None:
        """End ssh: close its input, give it `CLOSE_GRACE` seconds, then SIGTERM and at last SIGKILL."""
        if self._closed:
            return
        grace = CLOSE_GRACE if self.alive else 0.0
        self._closed = True
        for pipe in (self._process.stdin, self._process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        stop_process(self._process, grace, self._label)
        self._final_stderr = self._read_stderr()
        self._stderr.close()

    def __del__(self) -> None:
        # A session dropped without close must not leave ssh running or unreaped.
        if not getattr(self, "_closed", True):
            self._failed = True  # no grace period in a finalizer
            with contextlib.suppress(Exception):
                self.close()


class SSHProcessEnded(ConnectionError):
    """The ssh process of a session exited or closed its pipes: the connection is lost."""


def stop_process(process: subprocess.Popen[bytes], grace: float, label: str) -> None:
    """Wait *grace* seconds for *process* to exit, then terminate it by its PID, then kill it; reap it."""
    if grace > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    if process.poll() is None:
        logger.debug("stopping ssh (pid %d) to %s with SIGTERM", process.pid, label)
        process.terminate()
        try:
            process.wait(timeout=KILL_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning(
                "ssh (pid %d) to %s ignored SIGTERM for %.0f s; killing it", process.pid, label, KILL_TIMEOUT
            )
            process.kill()
            process.wait()
    logger.debug("ssh (pid %d) to %s exited with status %s", process.pid, label, process.returncode)


# Errors at the start of a session


def startup_error(
    target: SSHTarget, command: list[str], stderr: str, status: int | None, error: BaseException
) -> BaseException:
    """Return the error to raise for an ssh process that failed before the SFTP handshake ended.

    A rejected host key or user key is final (`HostKeyChanged`,
    `HostKeyUnknown`, `PermissionDenied`). A server without SFTP raises
    `BackendError`. Anything else, such as an unreachable host, raises
    `SSHProcessEnded` or the original *error*, which count as a lost connection.
    """
    if "Host key verification failed" in stderr or "IDENTIFICATION HAS CHANGED" in stderr:
        return host_key_error(target, command, stderr)
    if "Permission denied" in stderr:
        tried = ", ".join(target.identity_files) or "no key files"
        agent = "and the ssh-agent" if target.use_agent else "without ssh-agent"
        return PermissionDenied(
            f"authentication to SFTP server {target.label} failed ({last_line(stderr)}); ssh tried {tried} "
            f"{agent}. Check that the server's authorized_keys lists one of these keys, or name the key with "
            f"IdentityFile in {config_path()!r}"
        )
    if "subsystem request failed" in stderr:
        return BackendError(
            f"SFTP server {target.label} does not offer the sftp subsystem: enable SFTP in its sshd_config"
        )
    if not is_connection_lost(error) or isinstance(error, ConnectionError | TimeoutError):
        return error
    return SSHProcessEnded(f"ssh to {target.label} failed (exit status {status}): {stderr or error}")


def host_key_error(target: SSHTarget, command: list[str], stderr: str) -> BackendError:
    """Return `HostKeyChanged` or `HostKeyUnknown`, naming the offered key's fingerprint.

    ssh prints the fingerprint of an unknown key only with ``-v``, so this
    runs the command once more with ``-v`` and no input. ssh stops again at
    the host key check, before it authenticates.
    """
    verbose = probe_verbose(command)
    offered = offered_key(verbose)
    if "IDENTIFICATION HAS CHANGED" in stderr or "IDENTIFICATION HAS CHANGED" in verbose:
        expected = listed_key(verbose + "\n" + stderr)
        return HostKeyChanged(changed_key_message(target, offered, expected))
    return HostKeyUnknown(unknown_key_message(target, offered))


def probe_verbose(command: list[str]) -> str:
    """Return the stderr of *command* run with ``-v``, or "" if it cannot run."""
    try:
        result = subprocess.run(
            [command[0], "-v", *command[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=KILL_TIMEOUT * 2,
            check=False,
            start_new_session=True,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.warning("cannot run ssh -v to read the offered host key: %s", err)
        return ""
    return result.stderr


def offered_key(verbose: str) -> HostKey:
    """Return the server's key from ssh's ``debug1: Server host key: TYPE SHA256:...`` line."""
    match = re.search(r"Server host key: (\S+) (SHA256:[A-Za-z0-9+/]+)", verbose)
    if match is None:
        return HostKey("(unknown type)", "(fingerprint unknown: ssh -v did not print it)")
    return HostKey(match.group(1), match.group(2))


def listed_key(stderr: str) -> HostKey:
    """Return the key that known_hosts lists, from ssh's ``Offending KEY key in FILE:LINE`` line."""
    unknown = HostKey("(unknown type)", "(fingerprint unknown: see the known_hosts files)")
    match = re.search(r"Offending \S+ key in (.+):(\d+)", stderr)
    if match is None:
        return unknown
    try:
        with open(match.group(1), encoding="utf-8", errors="replace") as known_hosts:
            lines = known_hosts.read().splitlines()
        fields = lines[int(match.group(2)) - 1].split()
        if fields[0].startswith("@"):
            fields = fields[1:]  # a marker such as @cert-authority
        blob = base64.b64decode(fields[2], validate=True)
    except (OSError, IndexError, ValueError) as err:
        logger.debug("cannot read the listed host key from %s: %s", match.group(0), err)
        return unknown
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return HostKey(fields[1], f"SHA256:{digest}")


def last_line(text: str) -> str:
    """Return the last non-empty line of *text*."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else text
