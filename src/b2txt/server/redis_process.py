"""A private ``redis-server``: Unix socket in a run directory, no persistence, dies with its parent.

Measured pitfalls this module handles (FIELD-NOTES, Redis):

- a child survives a SIGKILLed parent unless it asks the kernel for ``PR_SET_PDEATHSIG``
  (:func:`b2txt.ground.procs.die_with_parent`, run between fork and exec). The signal fires when the *thread*
  that started the child exits, so start services from a long-lived thread (the main one);
- ``SHUTDOWN NOSAVE`` takes seconds through a retrying client: :meth:`RedisServer.stop` uses a
  client without retries and falls back to SIGTERM/SIGKILL;
- the password (when the environment gives one) goes into a mode-600 config file, never onto
  the command line where ``ps`` shows it;
- for workers on other hosts it may listen on a network address (``bind``): refused without a
  password, and optionally TLS-only on that port (``tls``). Local clients keep the Unix socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from ..ground.errors import B2txtError
from ..ground.procs import die_with_parent
from .connection import CONNECTION_ERRORS, PASSWORD_ENV, RedisAddress, TlsFiles, connect, require_password


def _preexec() -> None:
    die_with_parent(signal.SIGKILL)


def tail(path: Path, n_bytes: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n_bytes:].decode(errors="replace").strip()


class RedisServer:
    """Start, restart and stop one private ``redis-server`` process.

    ``port`` 0 (the default) means no TCP at all, only the Unix socket ``run_dir/redis.sock``;
    with a port it binds to the loopback interfaces only, unless ``bind`` names another address
    (then a password is required, see :meth:`check_bind`). With ``tls`` (server certificate and
    key; a CA makes client certificates mandatory) the TCP port speaks only TLS. With ``bind``
    or ``tls`` this process's own clients (:attr:`address`) use the Unix socket.
    """

    def __init__(self, run_dir: str | os.PathLike[str], port: int = 0, socket_name: str = "redis.sock",
                 password_env: str = PASSWORD_ENV, executable: str = "redis-server", bind: str | None = None,
                 tls: TlsFiles | None = None):
        self.run_dir = Path(run_dir)
        self.port = port
        self.socket = self.run_dir / socket_name
        self.password_env = password_env
        self.executable = executable
        self.bind = bind
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.run_dir / "redis.log"

    @property
    def address(self) -> RedisAddress:
        if self.port and self.bind is None and self.tls is None:
            return RedisAddress(host="127.0.0.1", port=self.port, password_env=self.password_env)
        return RedisAddress(socket=self.socket, password_env=self.password_env)

    @property
    def network_address(self) -> str | None:
        """Where other hosts connect (``HOST:PORT``), or None without TCP."""
        if not self.port:
            return None
        return f"{self.bind or '127.0.0.1'}:{self.port}"

    def check_bind(self) -> None:
        """Refuse, before starting anything, a network address without a password, or TLS without a port."""
        if (self.bind is not None or self.tls is not None) and not 0 < self.port < 65536:
            raise B2txtError(f"redis port {self.port}: --bind and TLS need a TCP port (1-65535)")
        if self.bind is not None:
            require_password(self.bind, self.password_env, f"--bind {self.bind}")
        if self.tls is not None:
            self.tls.check()
            if self.tls.cert is None:
                raise B2txtError("--tls-cert and --tls-key: the server needs its certificate and key for TLS")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> Path:
        binding = "127.0.0.1 -::1" if self.bind is None else self.bind
        lines = [
            f"port {0 if self.tls else self.port}",
            f"unixsocket {self.socket}",
            "unixsocketperm 700",
            f"bind {binding}",
            "protected-mode yes",
            'save ""',
            "appendonly no",
            "daemonize no",
            f"dir {self.run_dir}",
            f"logfile {self.log_path}",
            "databases 1",
        ]
        password = os.environ.get(self.password_env)
        if password:
            if any(c in password for c in '"\n\r\\'):
                raise B2txtError(f"{self.password_env}: the password must not contain quotes, backslashes or newlines")
            lines.append(f'requirepass "{password}"')
        if self.tls is not None:
            t = self.tls
            lines += [f"tls-port {self.port}", f'tls-cert-file "{t.cert}"', f'tls-key-file "{t.key}"']
            if t.ca is not None:
                lines += [f'tls-ca-cert-file "{t.ca}"', "tls-auth-clients yes"]
            else:
                lines.append("tls-auth-clients no")
        conf = self.run_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> RedisAddress:
        """Start the server and wait until it answers PING; one clear error if it cannot start."""
        if self.alive():
            return self.address
        self.check_bind()
        exe = shutil.which(self.executable)
        if exe is None:
            raise B2txtError(f"{self.executable}: not found on PATH (install it, e.g. apt-get install redis-server)")
        if len(str(self.socket).encode()) > 100:
            raise B2txtError(f"{self.socket}: Unix socket path too long; use a shorter run directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():
            self.socket.unlink()
        conf = self._write_config()
        self.proc = subprocess.Popen([exe, str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_preexec, close_fds=True)
        self._wait_ready(timeout)
        return self.address

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise B2txtError(f"redis-server exited with status {self.proc.returncode} at start:\n"
                                 f"{tail(self.log_path)}")
            if self.port or self.socket.exists():
                try:
                    r = connect(self.address, timeout=1.0)
                    try:
                        if r.ping():
                            return
                    finally:
                        r.close()
                except redis.AuthenticationError as exc:
                    raise B2txtError(f"redis-server at {self.address}: {exc}") from None
                except CONNECTION_ERRORS:
                    pass
            if time.monotonic() > deadline:
                self.kill()
                raise B2txtError(f"redis-server did not answer within {timeout:.0f} s:\n{tail(self.log_path)}")
            time.sleep(delay)  # start-up only: bounded, backing off
            delay = min(delay * 2, 0.1)

    def stop(self, timeout: float = 5.0) -> None:
        """SHUTDOWN NOSAVE through a client without retries (33 ms), else SIGTERM, else SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                r = connect(self.address, timeout=1.0)
                try:
                    r.shutdown(nosave=True)
                finally:
                    r.close()
            except (redis.RedisError, OSError):
                pass  # a shutdown closes the connection: an error is the normal answer
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 10.0) -> RedisAddress:
        """Start again after the process died (same socket, empty database)."""
        if self.proc is not None and self.proc.poll() is not None:
            self.proc = None
        return self.start(timeout)

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
