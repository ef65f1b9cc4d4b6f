"""Opening paramiko SSH connections for the SFTP backend: ssh_config, host keys and authentication.

The host key messages here serve the ``ssh`` transport (`sftp_ssh`) too.

Settings come from the URL first and from the ssh client configuration
second, as ``ssh`` applies them. The configuration file is the one that
``BORGSTOREFS_SSH_CONFIG`` names, or else ``~/.ssh/config``. Both it and
the default ``known_hosts`` files are looked up when a connection is opened,
with ``~`` expanded through ``os.path.expanduser``, so a changed ``HOME``
applies to the next connection.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from dataclasses import dataclass
from typing import NamedTuple

import paramiko

from ..errors import BackendError, HostKeyChanged, HostKeyUnknown, PermissionDenied
from .sftp_session import CHANNEL_PACKET_SIZE, PIPELINE_BYTES, SFTPSession

logger = logging.getLogger(__name__)

CONFIG_ENV = "BORGSTOREFS_SSH_CONFIG"
"""Environment variable naming an ssh_config file to use instead of ``~/.ssh/config``."""

SSH_PORT = 22
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
"""Files ``ssh`` reads when ssh_config sets no UserKnownHostsFile."""

GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
"""Files ``ssh`` reads when ssh_config sets no GlobalKnownHostsFile."""

DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
"""Key files tried when ssh_config names none: the default names of the key types paramiko can use."""


@dataclass(frozen=True)
class SSHTarget:
    """Connection settings of one server, after applying ssh_config."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    known_hosts_files: tuple[str, ...]
    use_agent: bool
    host_key_alias: str | None = None

    @property
    def label(self) -> str:
        """``user@host:port``, for messages."""
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """The name under which ``known_hosts`` lists this server, as ``ssh`` writes it."""
        name = self.host_key_alias or self.hostname
        return name if self.port == SSH_PORT else f"[{name}]:{self.port}"


def config_path() -> str:
    """Return the ssh_config file in force: ``$BORGSTOREFS_SSH_CONFIG`` or ``~/.ssh/config``."""
    return os.environ.get(CONFIG_ENV) or os.path.expanduser("~/.ssh/config")


def lookup_config(host: str) -> paramiko.SSHConfigDict:
    """Return the ssh_config options for *host*; empty if there is no config file."""
    path = config_path()
    if not os.path.isfile(path):
        return paramiko.SSHConfigDict()
    try:
        return paramiko.SSHConfig.from_path(path).lookup(host)
    except (OSError, paramiko.ConfigParseError) as err:
        raise BackendError(f"cannot read the ssh config {path!r}: {err}") from err


def resolve_target(host: str, user: str | None, port: int | None) -> SSHTarget:
    """Apply ssh_config to the *host*, *user* and *port* of a URL (None where the URL has none)."""
    options = lookup_config(host)
    if "proxycommand" in options or "proxyjump" in options:
        # NOTE: paramiko can run a ProxyCommand, but this backend does not use it yet.
        raise BackendError(
            f"ssh config {config_path()!r} sets ProxyCommand or ProxyJump for {host!r}, "
            "which the SFTP backend does not support: connect directly or use an SSH tunnel"
        )
    identity_files = tuple(os.path.expanduser(path) for path in options.get("identityfile", []))
    identities_only = options.get("identitiesonly", "no").lower() == "yes"
    if "userknownhostsfile" in options:
        known_hosts = tuple(os.path.expanduser(path) for path in options["userknownhostsfile"].split())
    else:
        known_hosts = tuple(os.path.expanduser(path) for path in DEFAULT_KNOWN_HOSTS)
    if "globalknownhostsfile" in options:
        known_hosts += tuple(os.path.expanduser(path) for path in options["globalknownhostsfile"].split())
    else:
        known_hosts += GLOBAL_KNOWN_HOSTS
    return SSHTarget(
        hostname=options.get("hostname", host),
        port=port or int(options.get("port", SSH_PORT)),
        user=user or options.get("user") or getpass.getuser(),
        identity_files=identity_files or tuple(os.path.expanduser(path) for path in DEFAULT_IDENTITIES),
        known_hosts_files=known_hosts,
        # NOTE: ssh with IdentitiesOnly still uses agent keys that match an
        # IdentityFile; here it turns the agent off altogether.
        use_agent=not identities_only and options.get("identityagent", "") != "none",
        host_key_alias=options.get("hostkeyalias"),
    )


class RejectUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """Rejects every server whose key is not in a known_hosts file, with `HostKeyUnknown`."""

    def __init__(self, target: SSHTarget) -> None:
        self._target = target

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyUnknown(unknown_key_message(self._target, HostKey(key.get_name(), key.fingerprint)))


def trust_command(target: SSHTarget, key_type: str) -> str:
    """Return a shell command that appends the server's *key_type* key to ``~/.ssh/known_hosts``."""
    port = f"-p {target.port} " if target.port != SSH_PORT else ""
    return f"ssh-keyscan {port}-t {key_type} {target.hostname} >> ~/.ssh/known_hosts"


class HostKey(NamedTuple):
    """A public key as messages name it."""

    key_type: str
    """The SSH key type name, such as ``ssh-ed25519``."""

    fingerprint: str
    """``SHA256:`` and the unpadded base64 of the key's SHA-256 digest, as ``ssh-keygen -l`` prints it."""


def unknown_key_message(target: SSHTarget, key: HostKey) -> str:
    """Return the error message for a server key found in no known_hosts file."""
    return (
        f"host key of SFTP server {target.known_hosts_name} is unknown: the server offers the "
        f"{key.key_type} key {key.fingerprint}, which none of {', '.join(target.known_hosts_files)} lists. "
        f"Compare the fingerprint with the one the server's administrator gives you, then trust the key with "
        f"'{trust_command(target, key.key_type)}' or by connecting once with "
        f"'ssh -p {target.port} {target.user}@{target.hostname}'"
    )


def changed_key_message(target: SSHTarget, key: HostKey, expected: HostKey) -> str:
    """Return the error message for a server key that differs from the one in known_hosts."""
    return (
        f"host key of SFTP server {target.known_hosts_name} has CHANGED: the server offers the "
        f"{key.key_type} key {key.fingerprint}, but known_hosts lists {expected.key_type} "
        f"{expected.fingerprint}. Someone may be intercepting the connection, or the server was reinstalled. "
        f"Only if the server's administrator confirms the new fingerprint, remove the old key with "
        f"\"ssh-keygen -R '{target.known_hosts_name}'\" (add -f FILE for a file other than ~/.ssh/known_hosts; "
        f"searched: {', '.join(target.known_hosts_files)}) and trust the new one with "
        f"'{trust_command(target, key.key_type)}'"
    )


def connect(target: SSHTarget, timeout: float, keepalive: float) -> paramiko.SSHClient:
    """Open and authenticate an SSH connection to *target*.

    Raises `HostKeyUnknown` or `HostKeyChanged` for an untrusted server,
    `PermissionDenied` if no key is accepted, and socket or paramiko errors
    if the server cannot be reached (which `is_connection_lost` recognizes).
    """
    client = paramiko.SSHClient()
    try:
        load_known_hosts(client.get_host_keys(), target)
        client.set_missing_host_key_policy(RejectUnknownHostKey(target))
        _connect_client(client, target, timeout)
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(max(1, round(keepalive)))
        # Small requests (the next READ, a window adjustment) must not wait
        # for the server's delayed ACK: with Nagle's algorithm a 1 MiB load
        # measured 15 to 50 ms on loopback instead of 7 to 10 ms.
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        client.close()
        raise
    return client


class ParamikoConnection:
    """A `sftp_session.Connection` over one paramiko SSH connection: each session is one channel."""

    def __init__(self, client: paramiko.SSHClient, timeout: float, label: str) -> None:
        self._client = client
        self._timeout = timeout
        self._label = label

    def is_active(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def open_session(self, generation: int) -> SFTPSession:
        transport = self._client.get_transport()
        if transport is None:
            raise paramiko.SSHException(f"SSH connection to {self._label} is closed")
        channel = transport.open_session(
            window_size=PIPELINE_BYTES, max_packet_size=CHANNEL_PACKET_SIZE, timeout=self._timeout
        )
        channel.settimeout(self._timeout)
        channel.invoke_subsystem("sftp")
        return SFTPSession(channel, generation)

    def close(self) -> None:
        self._client.close()


def load_known_hosts(host_keys: paramiko.HostKeys, target: SSHTarget) -> None:
    """Read the known_hosts files of *target* into *host_keys*; nothing is ever written back."""
    for path in target.known_hosts_files:
        if not os.path.isfile(path):
            continue
        try:
            host_keys.load(path)
        except (OSError, paramiko.SSHException) as err:
            raise BackendError(f"cannot read known_hosts file {path!r}: {err}") from err
    if target.host_key_alias:
        # paramiko looks keys up by the name it connects to, so the alias's
        # keys are listed under that name as well.
        connect_name = _lookup_name(target.hostname, target.port)
        for key_type, key in (host_keys.lookup(target.known_hosts_name) or {}).items():
            host_keys.add(connect_name, key_type, key)


def _connect_client(client: paramiko.SSHClient, target: SSHTarget, timeout: float) -> None:
    key_files = [path for path in target.identity_files if os.path.isfile(path)]
    try:
        client.connect(
            target.hostname,
            port=target.port,
            username=target.user,
            key_filename=key_files or None,
            allow_agent=target.use_agent,
            look_for_keys=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
        )
    except paramiko.BadHostKeyException as err:
        offered = HostKey(err.key.get_name(), err.key.fingerprint)
        expected = HostKey(err.expected_key.get_name(), err.expected_key.fingerprint)
        raise HostKeyChanged(changed_key_message(target, offered, expected)) from None
    except paramiko.AuthenticationException as err:
        tried = ", ".join(key_files) or "no key files"
        agent = "and the ssh-agent" if target.use_agent else "without ssh-agent"
        raise PermissionDenied(
            f"authentication to SFTP server {target.label} failed ({err}); tried {tried} {agent}. "
            f"Check that the server's authorized_keys lists one of these keys, or name the key with "
            f"IdentityFile in {config_path()!r}"
        ) from None


def _lookup_name(hostname: str, port: int) -> str:
    return hostname if port == SSH_PORT else f"[{hostname}]:{port}"
