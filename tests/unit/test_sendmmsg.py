"""_fd.sendmmsg against the real syscall, on a datagram socketpair (no vhost needed)."""

from __future__ import annotations

import ctypes
import errno
import socket
from typing import Any

import pytest

from vhostctl import _fd
from vhostctl._uapi.socket import iovec, mmsghdr
from vhostctl.errors import SyscallError


def _messages(payloads: list[bytes]) -> tuple[Any, Any, Any]:
    bufs = [ctypes.create_string_buffer(p, len(p)) for p in payloads]
    iov = (iovec * len(bufs))()
    msgs = (mmsghdr * len(bufs))()
    for i, b in enumerate(bufs):
        iov[i].iov_base, iov[i].iov_len = ctypes.addressof(b), len(payloads[i])
        msgs[i].msg_hdr.msg_iov, msgs[i].msg_hdr.msg_iovlen = ctypes.addressof(iov[i]), 1
    return bufs, iov, msgs


def test_a_batch_arrives_as_separate_datagrams_in_order() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        keep = _messages([b"one", b"second", b"3"])
        msgs = keep[2]
        assert _fd.sendmmsg(a.fileno(), ctypes.addressof(msgs), 3) == 3
        assert [b.recv(64) for _ in range(3)] == [b"one", b"second", b"3"]
        assert [msgs[i].msg_len for i in range(3)] == [3, 6, 1]


def test_a_full_socket_sends_nothing_and_says_so_with_zero() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.setblocking(False)
        while True:  # fill the peer's queue
            try:
                a.send(b"x" * 512)
            except BlockingIOError:
                break
        keep = _messages([b"y"])
        assert _fd.sendmmsg(a.fileno(), ctypes.addressof(keep[2]), 1, socket.MSG_DONTWAIT) == 0


def test_an_error_is_typed_and_named_after_the_operation() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    keep = _messages([b"z"])
    fd = a.fileno()
    a.close()
    b.close()
    with pytest.raises(SyscallError) as e:
        _fd.sendmmsg(fd, ctypes.addressof(keep[2]), 1, op="sendmmsg(test)", hint="why")
    assert e.value.errno == errno.EBADF and "sendmmsg(test)" in str(e.value)
