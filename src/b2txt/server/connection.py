"""Where Redis is and how to connect: Unix socket or loopback by default, password from the environment.

The published server defaulted to a lab LAN address and no password. Here the defaults are a
Unix socket or 127.0.0.1; a non-loopback host is refused unless asked for explicitly
(``allow_remote``), and the password is never a command-line argument (visible in ``ps``): it
is read from an environment variable (:data:`PASSWORD_ENV` unless another name is given).

Connections are made without redis-py's automatic retries (which made ``SHUTDOWN`` take 3.4 s
and hide an outage): the server and the client each handle a lost connection themselves.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import B2txtError

PASSWORD_ENV = "B2TXT_REDIS_PASSWORD"
#: Exceptions that mean "Redis is (for now) unreachable": reconnect and carry on.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass(frozen=True)
class RedisAddress:
    """A Unix socket (preferred) or a TCP host and port."""

    socket: Path | None = None
    host: str = "127.0.0.1"
    port: int = 6379
    password_env: str = PASSWORD_ENV

    def __str__(self) -> str:
        return f"unix:{self.socket}" if self.socket else f"{self.host}:{self.port}"

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


def check_address(address: RedisAddress, allow_remote: bool = False) -> RedisAddress:
    """One clear error for an address that is insecure or unusable by default."""
    if address.socket is not None:
        if len(str(address.socket).encode()) > 100:
            raise B2txtError(f"{address.socket}: Unix socket path too long (Linux allows 107 bytes)")
        return address
    if not 0 < address.port < 65536:
        raise B2txtError(f"redis port {address.port}: out of range")
    if not allow_remote and not is_loopback(address.host):
        raise B2txtError(f"redis host {address.host}: not a loopback address; LM traffic would cross the network "
                         f"unauthenticated unless {address.password_env} is set. Pass --allow-remote to use it")
    return address


def connect(address: RedisAddress, timeout: float = 10.0) -> redis.Redis:
    """A client with no automatic retries; ``timeout`` must exceed any XREAD BLOCK it will issue."""
    common = dict(password=address.password, socket_timeout=timeout, socket_connect_timeout=timeout,
                  retry=Retry(NoBackoff(), 0), health_check_interval=0)
    if address.socket is not None:
        return redis.Redis(unix_socket_path=str(address.socket), **common)
    return redis.Redis(host=address.host, port=address.port, **common)


def server_time_ms(r: redis.Redis) -> int:
    """Redis's clock in ms: where a reader starts so that only later entries are seen (as published)."""
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000
