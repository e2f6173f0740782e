"""Tap devices through ``/dev/net/tun``: create/attach queues, read flags back, tune them.

No netlink here (links are brought up, enslaved or moved by :mod:`vhostctl.netlink`).  Every
queue is one fd; a non-persistent tap disappears when its last queue fd closes, which is what
makes failures here self-cleaning: close the fds and nothing is left behind.  Persistence is
therefore always set last, by the caller, once everything else worked.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket

from . import _fd
from ._uapi import if_tun as T
from ._uapi.virtio_net import virtio_net_hdr
from .errors import ValidationError

TUN_PATH = "/dev/net/tun"
MAX_TAP_QUEUES = 256  # drivers/net/tun.c: MAX_TAP_QUEUES

# The kernel keeps names in char[IFNAMSIZ] including the NUL (include/uapi/linux/if.h), and
# dev_valid_name() (net/core/dev.c) rejects "", ".", "..", '/', ':' and whitespace.  We are
# stricter: a safe ASCII set that needs no quoting in shells, udev rules or QEMU arguments.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# Flags that TUNSETIFF accepts and TUNGETIFF reports back (tun_flags() in drivers/net/tun.c).
_CHECKED_FLAGS = T.IFF_TUN | T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR | T.IFF_MULTI_QUEUE


def validate_ifname(name: str, *, template: bool = False, op: str = "interface name") -> str:
    """Reject a name the kernel would refuse or truncate, before any syscall.

    With ``template`` one ``%d`` is allowed (the kernel picks the number).
    """
    if not isinstance(name, str) or not name:
        raise ValidationError(op, "empty interface name")
    raw = name.replace("%d", "0", 1) if template else name
    if not raw.isascii():
        raise ValidationError(op, f"{name!r}: only ASCII letters, digits, '_', '.', '-' allowed")
    if len(name.encode()) > T.IFNAMSIZ - 1:
        raise ValidationError(
            op, f"{name!r} is {len(name.encode())} bytes; interface names have at most "
            f"{T.IFNAMSIZ - 1} (IFNAMSIZ - 1), and vhostctl never truncates")
    if name in (".", ".."):
        raise ValidationError(op, f"{name!r} is not a valid interface name")
    if "%" in raw:
        raise ValidationError(op, f"{name!r}: '%' is only allowed once, as '%d'"
                              if template else f"{name!r}: '%' is not allowed here")
    if not _NAME_RE.fullmatch(raw):
        raise ValidationError(
            op, f"{name!r}: use letters, digits, '_', '.', '-' (not leading '-'), "
            "no '/', ':', whitespace or shell characters")
    return name


def _ifreq(name: str = "", flags: int = 0) -> T.ifreq:
    req = T.ifreq()  # zero-initialised by ctypes
    req.ifr_name = name.encode()
    req.ifr_flags = flags
    return req


class Tap(_fd.OwnedFd):
    """One queue (fd) of a tun/tap interface."""

    def __init__(self, fd: int, name: str, flags: int) -> None:
        super().__init__(fd)
        self.name = name
        self.flags = flags

    @classmethod
    def open(cls, name: str, *, tap: bool = True, vnet_hdr: bool = True,
             multi_queue: bool = False, exclusive: bool = False, no_pi: bool = True) -> Tap:
        """Create the interface, or attach a queue to an existing one of the same kind.

        ``exclusive`` (IFF_TUN_EXCL) fails with EBUSY if the name exists: create without a
        check-then-create race.  The flags the kernel reports back are compared with those
        asked for, since it silently ignores unknown ones.
        """
        validate_ifname(name, template=True, op="TUNSETIFF")
        want = (T.IFF_TAP if tap else T.IFF_TUN) | (T.IFF_NO_PI if no_pi else 0) \
            | (T.IFF_VNET_HDR if vnet_hdr else 0) | (T.IFF_MULTI_QUEUE if multi_queue else 0)
        fd = _fd.open_dev(TUN_PATH)
        try:
            req = _ifreq(name, want | (T.IFF_TUN_EXCL if exclusive else 0))
            _fd.ioctl(fd, T.TUNSETIFF, req)
            got = cls._getiff(fd)
            self = cls(fd, got.ifr_name.decode(), got.ifr_flags & 0xFFFF)
        except BaseException:
            _fd.close(fd)
            raise
        if (self.flags & _CHECKED_FLAGS) != want:
            self.close()
            raise ValidationError(
                "TUNSETIFF", f"{name}: kernel reports flags "
                f"{T.IFF_FLAGS.decode(self.flags & _CHECKED_FLAGS)} but "
                f"{T.IFF_FLAGS.decode(want)} were asked",
                hint="an existing interface of that name has other flags")
        return self

    @classmethod
    def open_queues(cls, name: str, queues: int, **kw: bool) -> list[Tap]:
        """Open ``queues`` fds of one tap (multi-queue when more than one); all or nothing."""
        if not 1 <= queues <= MAX_TAP_QUEUES:
            raise ValidationError("tap queues", f"{queues}: must be 1..{MAX_TAP_QUEUES}")
        kw.setdefault("multi_queue", queues > 1)
        first = cls.open(name, **kw)
        taps = [first]
        try:
            kw.pop("exclusive", None)
            for _ in range(queues - 1):
                taps.append(cls.open(first.name, **kw))
        except BaseException:
            for t in taps:
                t.close()
            raise
        return taps

    @staticmethod
    def _getiff(fd: int) -> T.ifreq:
        req = _ifreq()
        _fd.ioctl(fd, T.TUNGETIFF, req)
        return req

    def refresh(self) -> int:
        """Re-read the flags the kernel holds for this queue (TUNGETIFF)."""
        self.flags = self._getiff(self.fileno()).ifr_flags & 0xFFFF
        return self.flags

    @property
    def ifindex(self) -> int:
        return _fd.call(f"if_nametoindex({self.name})", socket.if_nametoindex, self.name)

    def _set_value(self, request: int, value: int) -> None:
        _fd.ioctl(self.fileno(), request, value)

    def _set_ptr(self, request: int, value: int) -> None:
        _fd.ioctl(self.fileno(), request, ctypes.c_int(value))

    def _get_ptr(self, request: int) -> int:
        out = ctypes.c_int(0)
        _fd.ioctl(self.fileno(), request, out)
        return out.value

    # Value-vs-pointer per ioctl follows __tun_chr_ioctl() in drivers/net/tun.c.
    def set_persist(self, on: bool = True) -> None:
        self._set_value(T.TUNSETPERSIST, int(on))

    def set_owner(self, uid: int) -> None:
        self._set_value(T.TUNSETOWNER, uid)

    def set_group(self, gid: int) -> None:
        self._set_value(T.TUNSETGROUP, gid)

    def set_offload(self, offloads: int) -> None:
        """TUN_F_* offloads the reader of this tap accepts (needs a vnet header)."""
        self._set_value(T.TUNSETOFFLOAD, offloads)

    @property
    def vnet_hdr_sz(self) -> int:
        return self._get_ptr(T.TUNGETVNETHDRSZ)

    @vnet_hdr_sz.setter
    def vnet_hdr_sz(self, size: int) -> None:
        # tun.c: "if (vnet_hdr_sz < (int)sizeof(struct virtio_net_hdr)) return -EINVAL".
        if size < ctypes.sizeof(virtio_net_hdr):
            raise ValidationError("TUNSETVNETHDRSZ", f"{size}: the minimum is 10")
        self._set_ptr(T.TUNSETVNETHDRSZ, size)

    @property
    def sndbuf(self) -> int:
        return self._get_ptr(T.TUNGETSNDBUF)

    @sndbuf.setter
    def sndbuf(self, size: int) -> None:
        if size <= 0:
            raise ValidationError("TUNSETSNDBUF", f"{size}: must be positive")
        self._set_ptr(T.TUNSETSNDBUF, size)

    @property
    def vnet_le(self) -> bool:
        return bool(self._get_ptr(T.TUNGETVNETLE))

    @vnet_le.setter
    def vnet_le(self, on: bool) -> None:
        self._set_ptr(T.TUNSETVNETLE, int(on))

    @property
    def vnet_be(self) -> bool:
        return bool(self._get_ptr(T.TUNGETVNETBE))

    @vnet_be.setter
    def vnet_be(self, on: bool) -> None:
        self._set_ptr(T.TUNSETVNETBE, int(on))

    def set_carrier(self, on: bool) -> None:
        self._set_ptr(T.TUNSETCARRIER, int(on))

    def set_queue_enabled(self, enabled: bool) -> None:
        """Attach or detach this queue of a multi-queue tap (TUNSETQUEUE)."""
        flags = T.IFF_ATTACH_QUEUE if enabled else T.IFF_DETACH_QUEUE
        _fd.ioctl(self.fileno(), T.TUNSETQUEUE, _ifreq("", flags))

    def write(self, frame: bytes) -> int:
        """Write one frame into the kernel as if it came from the guest (plain-virtio path)."""
        return _fd.call(f"write({self.name})", os.write, self.fileno(), frame)

    def read(self, size: int = 65536) -> bytes:
        return _fd.call(f"read({self.name})", os.read, self.fileno(), size)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"Tap({self.name!r}, {T.IFF_FLAGS.decode(self.flags)}, {state})"


def tun_features() -> int:
    """IFF_* flags this kernel's tun driver supports (TUNGETFEATURES)."""
    fd = _fd.open_dev(TUN_PATH)
    try:
        out = ctypes.c_uint(0)
        _fd.ioctl(fd, T.TUNGETFEATURES, out)
        return out.value
    finally:
        _fd.close(fd)

