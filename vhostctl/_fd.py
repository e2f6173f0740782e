"""The one choke point between vhostctl and the kernel's file-descriptor calls.

Every ``open``/``ioctl``/``eventfd``/``socket`` the library makes passes here, so that

- every fd is created ``O_CLOEXEC`` (handing one to a child is an explicit, separate step);
- every ``OSError`` becomes a typed error naming the operation, the queue and a likely cause;
- a test can make the n-th kernel call fail (:data:`faults`) to prove that every caller undoes
  what it did.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._uapi import ioctl_name
from .errors import IoctlError, OpenError, SyscallError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+

_P = ParamSpec("_P")
_R = TypeVar("_R")


class FaultInjector:
    """Make the ``n``-th kernel call from now fail with ``err`` (test hook; off by default).

    ``VHOSTCTL_FAULT_AT=N`` in the environment arms it at import, for subprocess tests.
    """

    def __init__(self) -> None:
        self.countdown = 0
        self.err = errno.EIO
        self.calls = 0
        env = os.environ.get("VHOSTCTL_FAULT_AT", "")
        if env.isdigit() and int(env) > 0:
            self.arm(int(env))

    def arm(self, n: int, err: int = errno.EIO) -> None:
        self.countdown, self.err, self.calls = n, err, 0

    def disarm(self) -> None:
        self.countdown = 0

    def check(self, what: str) -> None:
        self.calls += 1
        if self.countdown:
            self.countdown -= 1
            if self.countdown == 0:
                raise OSError(self.err, f"{os.strerror(self.err)} [injected at {what}]")


faults = FaultInjector()

# Likely causes by (operation prefix, errno), from drivers/vhost/{vhost,net}.c and
# drivers/net/tun.c.  The longest matching prefix wins.
_HINTS: dict[tuple[str, int], str] = {
    ("VHOST", errno.EPERM): "this process is not the owner: VHOST_SET_OWNER was not called, "
    "or was called by another process",
    ("VHOST_SET_OWNER", errno.EBUSY): "the device already has an owner",
    ("VHOST_SET_VRING_NUM", errno.EBUSY): "a backend is attached; detach it with "
    "VHOST_NET_SET_BACKEND(-1) first",
    ("VHOST_SET_VRING_BASE", errno.EBUSY): "a backend is attached; detach it with "
    "VHOST_NET_SET_BACKEND(-1) first",
    ("VHOST_SET_VRING_ENDIAN", errno.EBUSY): "a backend is attached; detach it first",
    ("VHOST", errno.EFAULT): "no memory table set, or a ring address is not mapped",
    ("VHOST_SET_MEM_TABLE", errno.E2BIG): "more regions than vhost.max_mem_regions allows",
    ("VHOST_NET_SET_BACKEND", errno.ENOTSOCK): "the backend fd is not a tap/tun/macvtap queue",
    ("VHOST_NET_SET_BACKEND", errno.ENOBUFS): "vhost-net has two queues: 0 (RX) and 1 (TX)",
    ("VHOST_NET_SET_BACKEND", errno.EFAULT): "no memory table set, or the used ring is not "
    "readable",
    ("VHOST", errno.ENOBUFS): "virtqueue index out of range: vhost-net has 0 (RX) and 1 (TX)",
    ("VHOST_SET_FEATURES", errno.EOPNOTSUPP): "a requested feature is not offered by the kernel",
    ("VHOST", errno.ENOTTY): "ioctl not supported by this kernel's vhost driver",
    ("TUN", errno.EPERM): "needs CAP_NET_ADMIN, or to be the tap's owner/group",
    ("TUNSETIFF", errno.EBUSY): "the tap's queue is held by another process "
    "(single-queue tap), or the name exists and exclusive create was asked",
    ("TUNSETIFF", errno.EINVAL): "an interface of that name exists with other flags "
    "(tun vs tap, multi-queue), or is not a tun/tap",
    ("TUNSETIFF", errno.ENFILE): "too many queues on this multi-queue tap",
    ("TUNSETQUEUE", errno.EINVAL): "queue is not detached/attached, or the tap is not "
    "multi-queue",
    ("TUN", errno.ENOTTY): "ioctl not supported by this kernel's tun driver",
    ("TUN", errno.EBADFD): "the tun fd has no interface attached yet (TUNSETIFF first)",
}


def _hint(op: str, err: int) -> str:
    matches = [(len(p), text) for (p, e), text in _HINTS.items() if e == err and op.startswith(p)]
    return max(matches)[1] if matches else ""


def _open_hint(path: str, err: int) -> str:
    if path == "/dev/vhost-net":
        if err == errno.ENOENT:
            return "load the module: modprobe vhost_net"
        if err in (errno.EACCES, errno.EPERM):
            return "needs root, or access to /dev/vhost-net (group kvm on most distributions); " \
                "a device cgroup may also deny it"
    if path == "/dev/net/tun":
        if err == errno.ENOENT:
            return "load the module: modprobe tun"
        if err in (errno.EACCES, errno.EPERM):
            return "needs access to /dev/net/tun; a device cgroup may deny it"
    if err == errno.ENODEV:
        return "the node exists but no driver backs it: load the module"
    return ""


def open_dev(path: str, flags: int = os.O_RDWR) -> int:
    """Open a device node, always close-on-exec."""
    try:
        faults.check(f"open {path}")
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise OpenError(f"open {path}", e.errno or errno.EIO, hint=_open_hint(path, e.errno or 0)
                        ) from None


def ioctl(fd: int, request: int, arg: Any = 0, *, vq: int | None = None,
          op: str | None = None) -> int:
    """``fcntl.ioctl`` with typed errors.

    ``arg`` is an int (passed by value) or a writable buffer such as a ctypes object, which
    the kernel reads and may fill in place.  Returns the ioctl's int result.
    """
    name = op or ioctl_name(request)
    try:
        faults.check(name)
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        # A buffer the kernel may fill in place (mutate_flag): the result is still an int.
        result: int = fcntl.ioctl(fd, request, arg, True)
        return result
    except OSError as e:
        err = e.errno or errno.EIO
        raise IoctlError(name, err, vq=vq, hint=_hint(name, err)) from None


def call(op: str, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """Run any other system call through the choke point (errors named after ``op``)."""
    try:
        faults.check(op)
        return fn(*args, **kwargs)
    except OSError as e:
        raise SyscallError(op, e.errno or errno.EIO) from None


def eventfd(flags: int = 0) -> int:
    """A close-on-exec, non-blocking eventfd for kick/call/err signalling."""
    return call("eventfd", os.eventfd, 0, flags | os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def packet_socket(ifindex: int, protocol: int = 0x0003) -> socket.socket:
    """An AF_PACKET raw socket bound to one interface (default ETH_P_ALL).

    Created with protocol 0 and bound afterwards, so nothing from other interfaces queues up
    before the bind.  socket() wants the protocol in network order, bind() in host order.
    """
    s = call("socket(AF_PACKET)", socket.socket, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        call("bind(AF_PACKET)", s.bind, (_ifname_of(ifindex), protocol))
    except BaseException:
        s.close()
        raise
    return s


@cache
def _sendmmsg() -> Any:
    fn = ctypes.CDLL(None, use_errno=True).sendmmsg
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def sendmmsg(fd: int, msgs: int, count: int, flags: int = 0, *, op: str = "sendmmsg",
             hint: str = "") -> int:
    """``sendmmsg(2)`` of ``count`` messages from the address ``msgs`` (an array of
    :class:`~vhostctl._uapi.socket.mmsghdr`): one syscall for a batch, which Python's
    ``socket`` cannot do.  Returns how many were sent; 0 when the socket would block."""
    try:
        faults.check(op)
    except OSError as e:
        raise SyscallError(op, e.errno or errno.EIO, hint=hint) from None
    n: int = _sendmmsg()(fd, msgs, count, flags)
    if n >= 0:
        return n
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EINTR):
        return 0
    raise SyscallError(op, err, hint=hint)


def _ifname_of(ifindex: int) -> str:
    return call("if_indextoname", socket.if_indextoname, ifindex)


def close(fd: int) -> None:
    """Close, ignoring EBADF (already closed); other errors still surface."""
    try:
        os.close(fd)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise SyscallError("close", e.errno or errno.EIO) from None


class OwnedFd:
    """An fd this object owns: ``fileno()``, idempotent ``close()``, context manager."""

    _fd: int = -1

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort against leaks; normal code closes explicitly.
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
