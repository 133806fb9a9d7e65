"""Where Redis is and how to connect: Unix socket or loopback by default, password from the environment.

The published server defaulted to a lab LAN address and no password. Here the defaults are a
Unix socket or 127.0.0.1; a non-loopback host is refused unless asked for explicitly
(``allow_remote``), and the password is never a command-line argument (visible in ``ps``): it
is read from an environment variable (:data:`PASSWORD_ENV` unless another name is given).

One policy for every command (:func:`require_password`): Redis reached on, or listening on, a
non-loopback address must have a password — ``lm-server --allow-remote``, ``lm-worker``,
``evaluate --server --allow-remote`` and ``evaluate --bind`` alike. The connection may use TLS
(:class:`TlsFiles`: the CA that signed the server's certificate, optionally a client certificate
and key).

Connections are made without redis-py's automatic retries (which made ``SHUTDOWN`` take 3.4 s
and hide an outage): the server and the client each handle a lost connection themselves.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..ground.errors import B2txtError

PASSWORD_ENV = "B2TXT_REDIS_PASSWORD"
#: Exceptions that mean "Redis is (for now) unreachable": reconnect and carry on.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass(frozen=True)
class TlsFiles:
    """TLS files, PEM. Client side: ``ca`` verifies the server (None: the system's CAs),
    ``cert`` + ``key`` authenticate this client. Server side (:class:`~.redis_process.RedisServer`):
    ``cert`` + ``key`` are the server's, ``ca`` (when given) must have signed every client's."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def check(self, flag: str = "--tls") -> "TlsFiles":
        """One clear error for a missing file or a certificate without its key (or the reverse)."""
        for name, path in (("ca", self.ca), ("cert", self.cert), ("key", self.key)):
            if path is not None and not Path(path).is_file():
                raise B2txtError(f"{flag}-{name} {path}: file not found")
            if path is not None and any(c in str(path) for c in '"\n\r'):
                raise B2txtError(f"{flag}-{name} {path}: the path must not contain quotes or newlines")
        if (self.cert is None) != (self.key is None):
            raise B2txtError(f"{flag}-cert and {flag}-key go together (a certificate and its private key)")
        return self


@dataclass(frozen=True)
class RedisAddress:
    """A Unix socket (preferred) or a TCP host and port, optionally over TLS."""

    socket: Path | None = None
    host: str = "127.0.0.1"
    port: int = 6379
    password_env: str = PASSWORD_ENV
    tls: TlsFiles | None = None

    def __str__(self) -> str:
        if self.socket:
            return f"unix:{self.socket}"
        return f"{self.host}:{self.port}" + (" (TLS)" if self.tls else "")

    @property
    def password(self) -> str | None:
        return os.environ.get(self.password_env) or None

    @classmethod
    def parse(cls, spec: str, password_env: str = PASSWORD_ENV) -> "RedisAddress":
        """``unix:/path``, ``/path`` (a socket), ``host:port`` or ``port`` (loopback)."""
        if spec.startswith("unix:"):
            return cls(socket=Path(spec[5:]), password_env=password_env)
        if spec.startswith("/") or spec.startswith("."):
            return cls(socket=Path(spec), password_env=password_env)
        host, _, port = spec.rpartition(":")
        try:
            return cls(host=host or "127.0.0.1", port=int(port), password_env=password_env)
        except ValueError:
            raise B2txtError(f"redis address {spec!r}: expected unix:PATH, PATH, HOST:PORT or PORT") from None


def is_loopback(host: str) -> bool:
    """True for localhost names and 127.0.0.0/8 or ::1 (resolved, so 'localhost' works)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def require_password(host: str, password_env: str, what: str) -> None:
    """The one server policy: LM traffic crosses the network only to (or from) a Redis that
    requires a password. ``what`` names the culprit (``redis host H``, ``--bind H``).

    Checked before any connection is made or server started, so a password is never needed to
    learn the rule.
    """
    if not is_loopback(host) and not os.environ.get(password_env):
        raise B2txtError(f"{what}: not a loopback address, and {password_env} is not set: across hosts Redis "
                         f"must require a password (set {password_env}, or name another variable with "
                         f"--password-env)")


def check_address(address: RedisAddress, allow_remote: bool = False) -> RedisAddress:
    """One clear error for an address that is insecure or unusable: a non-loopback host only with
    ``allow_remote`` and a password (:func:`require_password`)."""
    if address.socket is not None:
        if len(str(address.socket).encode()) > 100:
            raise B2txtError(f"{address.socket}: Unix socket path too long (Linux allows 107 bytes)")
        return address
    if not 0 < address.port < 65536:
        raise B2txtError(f"redis port {address.port}: out of range")
    if not allow_remote and not is_loopback(address.host):
        raise B2txtError(f"redis host {address.host}: not a loopback address; LM traffic would cross the network. "
                         f"Pass --allow-remote to use it (with a password in {address.password_env})")
    require_password(address.host, address.password_env, f"redis host {address.host}")
    return address


def check_remote_password(address: RedisAddress) -> RedisAddress:
    """A worker's address: any host (workers cross hosts), a non-loopback one only with a password."""
    return check_address(address, allow_remote=True)


def connect(address: RedisAddress, timeout: float = 10.0) -> redis.Redis:
    """A client with no automatic retries; ``timeout`` must exceed any XREAD BLOCK it will issue."""
    common: dict = dict(password=address.password, socket_timeout=timeout, socket_connect_timeout=timeout,
                        retry=Retry(NoBackoff(), 0), health_check_interval=0)
    if address.socket is not None:
        return redis.Redis(unix_socket_path=str(address.socket), **common)
    if address.tls is not None:
        t = address.tls
        common.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True,
                      ssl_ca_certs=str(t.ca) if t.ca else None,
                      ssl_certfile=str(t.cert) if t.cert else None, ssl_keyfile=str(t.key) if t.key else None)
    return redis.Redis(host=address.host, port=address.port, **common)


def is_tls_error(exc: BaseException) -> bool:
    """A failed TLS handshake or certificate check (redis-py wraps them in ConnectionError)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        text = str(e).lower()
        if isinstance(e, ssl.SSLError) or "ssl" in text or "handshake" in text:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def connect_error_message(address: RedisAddress, exc: BaseException) -> str | None:
    """One line for an error that retrying cannot fix (wrong password, TLS), else None."""
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        state = "set" if address.password else "not set"
        return (f"redis at {address}: authentication failed ({exc}); the password is read from "
                f"{address.password_env}, which is {state}")
    if is_tls_error(exc):
        hint = "" if address.tls is None else " (check --tls-ca / --tls-cert / --tls-key)"
        return f"redis at {address}: TLS failed: {exc}{hint}"
    return None


def server_time_ms(r: redis.Redis) -> int:
    """Redis's clock in ms: where a reader starts so that only later entries are seen (as published)."""
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000
