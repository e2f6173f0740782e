"""A small synchronous QMP client: greeting, capabilities, commands with fds, events.

Why not ``qemu.qmp`` from PyPI (QEMU's own library)?  It is asyncio-first; its synchronous API
is the ``qemu.qmp.legacy`` wrapper kept for QEMU's in-tree scripts, the package is still 0.0.x,
and vhostctl needs four commands, SCM_RIGHTS on the command itself and hard deadlines.  This
client is one blocking socket, one deadline per call, and the project's typed errors.

Protocol facts encoded here (QEMU docs/interop/qmp-spec.rst, monitor/qmp.c):

- the server speaks first: ``{"QMP": {"version": ..., "capabilities": [...]}}``, and accepts
  nothing but ``qmp_capabilities`` until it is sent;
- one JSON object per line (QEMU ends them with CRLF); asynchronous events may arrive between
  a command and its reply; a reply echoes the command's ``id``;
- an fd sent with SCM_RIGHTS is kept by the monitor and claimed by the *next* ``getfd``
  (qmp_getfd() calls qemu_chr_fe_get_msgfd()), so each fd travels on its own getfd command;
- a QMP socket serves one client at a time: a second client connects but gets no greeting.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import time
from typing import Any

from . import _fd
from .errors import SyscallError, ValidationError, VhostctlError, WaitTimeout

DEFAULT_TIMEOUT = 5.0
MAX_MESSAGE = 16 << 20  # a QMP reply larger than this is not one we asked for


class QmpError(VhostctlError):
    """The peer is not (or stopped being) a QMP server we can talk to."""

    def __init__(self, op: str, detail: str, *, hint: str = "") -> None:
        super().__init__(op, errno.EPROTO, detail, hint=hint)
        self.detail = detail


class QmpCommandError(VhostctlError):
    """QEMU answered a command with ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}", errno.EIO, f"{error_class}: {desc}")
        self.detail = f"{error_class}: {desc}"
        self.command = command
        self.error_class = error_class
        self.desc = desc


def _timed(fn: Any) -> Any:
    """Socket timeouts carry no errno; give them ETIMEDOUT so the choke point keeps it."""

    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)) from None

    return run


def check_socket_path(path: str) -> str:
    """Fail early and clearly: absent path, not a socket (before any connect)."""
    if not path:
        raise ValidationError("QMP socket", "empty path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VhostctlError(f"QMP socket {path}", errno.ENOENT,
                            hint="start QEMU with -qmp unix:PATH,server=on,wait=off "
                            "(libvirt: /var/lib/libvirt/qemu/domain-*/monitor.sock)") from None
    except OSError as e:
        raise SyscallError(f"stat {path}", e.errno or errno.EIO) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValidationError(f"QMP socket {path}", "not a unix socket",
                              hint="give the path of QEMU's -qmp unix: socket")
    return path


class QmpClient:
    """One connection to a QMP monitor.  Use :meth:`connect` (it negotiates capabilities)."""

    def __init__(self, sock: socket.socket, path: str, timeout: float) -> None:
        self._sock = sock
        self.path = path
        self.timeout = timeout
        self._buf = b""
        self._next_id = 0
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: str, timeout: float = DEFAULT_TIMEOUT) -> QmpClient:
        """Connect, read the greeting, leave capabilities negotiation mode."""
        if not timeout or timeout <= 0:
            raise ValidationError("QMP timeout", f"{timeout!r}: must be a positive number")
        check_socket_path(path)
        sock = _fd.call("socket(AF_UNIX)", socket.socket, socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            try:
                _fd.call(f"connect {path}", _timed(sock.connect), path)
            except SyscallError as e:
                if e.errno == errno.ECONNREFUSED:
                    e.hint = "nothing listens there: QEMU exited and left its socket behind"
                raise
            self = cls(sock, path, timeout)
            self._greet()
            self.execute("qmp_capabilities")
        except BaseException:
            sock.close()
            raise
        return self

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- wire ----------------------------------------------------------------------------------
    def _send(self, what: str, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        op = f"send {what} to {self.path}"
        if fds:
            sent = _fd.call(op, _timed(socket.send_fds), self._sock, [data], list(fds))
            data = data[sent:]
        if data:
            _fd.call(op, _timed(self._sock.sendall), data)

    def _recv_line(self, what: str, deadline: float) -> bytes:
        """The next non-empty line from the server, or a clear error at the deadline."""
        while True:
            line, nl, rest = self._buf.partition(b"\n")
            if nl:
                self._buf = rest
                if line.strip():
                    return line.strip()
                continue
            if len(self._buf) > MAX_MESSAGE:
                raise QmpError(f"QMP {what}", f"over {MAX_MESSAGE} bytes without a newline: "
                               "not a QMP server")
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"QMP {what}", f"no answer from {self.path} within "
                                  f"{self.timeout:g}s")
            ready, _, _ = _fd.call("poll QMP socket", select.select, [self._sock], [], [], left)
            if not ready:
                continue
            chunk = _fd.call(f"recv from {self.path}", _timed(self._sock.recv), 65536)
            if not chunk:
                raise QmpError(f"QMP {what}", f"{self.path} closed the connection",
                               hint="QEMU exited, or another client took the monitor")
            self._buf += chunk

    def _recv_message(self, what: str, deadline: float) -> dict[str, Any]:
        line = self._recv_line(what, deadline)
        try:
            msg = json.loads(line)
        except ValueError:
            hint = ("this is a human monitor (HMP): use -qmp, or -mon mode=control"
                    if line.startswith(b"QEMU ") or b"(qemu)" in line else "")
            raise QmpError(f"QMP {what}", f"{self.path} is not a QMP monitor: it sent "
                           f"{line[:60]!r}", hint=hint) from None
        if not isinstance(msg, dict):
            raise QmpError(f"QMP {what}", f"expected a JSON object, got {line[:60]!r}")
        return msg

    def _greet(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            msg = self._recv_message("greeting", deadline)
        except WaitTimeout:
            raise QmpError("QMP greeting", f"{self.path} accepted the connection but sent no "
                           f"greeting within {self.timeout:g}s",
                           hint="a QMP socket serves one client at a time: another client "
                           "(libvirt, another vhostctl) may hold it") from None
        if not isinstance(msg.get("QMP"), dict):
            raise QmpError("QMP greeting", f"{self.path} is not a QMP monitor: first message "
                           f"was {json.dumps(msg)[:80]}")
        self.greeting = msg["QMP"]

    # -- API -----------------------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                fds: list[int] | tuple[int, ...] = ()) -> Any:
        """Run one command; return its ``return`` value or raise :class:`QmpCommandError`.

        ``fds`` travel with the command's bytes in one sendmsg (SCM_RIGHTS), as ``getfd``
        expects.
        """
        self._next_id += 1
        ident = f"vhostctl-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        self._send(command, json.dumps(msg).encode() + b"\n", fds)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._recv_message(command, deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            # A reply without id answers a request QEMU could not parse: ours.
            if reply.get("id", ident) != ident:
                continue
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise QmpCommandError(command, str(err.get("class", "GenericError")),
                                      str(err.get("desc", reply["error"])))
            if "return" not in reply:
                raise QmpError(f"QMP {command}", f"reply without return or error: "
                               f"{json.dumps(reply)[:80]}")
            return reply["return"]

    def wait_event(self, name: str, timeout: float | None = None,
                   **match: Any) -> dict[str, Any]:
        """The first event ``name`` whose ``data`` has the ``match`` items (seen or coming)."""

        def fits(ev: dict[str, Any]) -> bool:
            data = ev.get("data") or {}
            return ev.get("event") == name and all(data.get(k) == v for k, v in match.items())

        for i, ev in enumerate(self.events):
            if fits(ev):
                return self.events.pop(i)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            try:
                ev = self._recv_message(f"wait for {name}", deadline)
            except WaitTimeout:
                raise WaitTimeout(f"QMP wait for {name}", f"no {name} event within {wait:g}s"
                                  ) from None
            if "event" not in ev:
                continue
            if fits(ev):
                return ev
            self.events.append(ev)

    def try_execute(self, command: str, arguments: dict[str, Any] | None = None) -> str | None:
        """Best effort (undo paths): None on success, else what went wrong."""
        try:
            self.execute(command, arguments)
        except VhostctlError as e:
            return str(e)
        return None
