"""Tap devices through ``/dev/net/tun``: create/attach queues, read flags back, tune them.

No netlink here (links are brought up, enslaved or moved by :mod:`vhostctl.netlink`).  Every
queue is one fd; a non-persistent tap disappears when its last queue fd closes, which is what
makes failures here self-cleaning: close the fds and nothing is left behind.  Persistence is
therefore always set last, by the caller, once everything else worked.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
import stat
from dataclasses import dataclass

from . import _fd
from ._uapi import if_tun as T
from ._uapi.virtio_net import virtio_net_hdr
from .errors import IoctlError, ValidationError, VhostctlError

TUN_PATH = "/dev/net/tun"
TUN_RDEV = (10, 200)  # MISC_MAJOR, TUN_MINOR (include/linux/miscdevice.h)
MAX_TAP_QUEUES = 256  # drivers/net/tun.c: MAX_TAP_QUEUES
SYS_NET = "/sys/class/net"

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
            try:
                _fd.ioctl(fd, T.TUNSETIFF, req)
            except IoctlError as e:
                e.hint = explain_setiff(name, want, e.errno or 0, exclusive=exclusive) or e.hint
                raise
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

    @classmethod
    def adopt(cls, fd: int, name: str | None = None) -> Tap:
        """Own an fd that came from outside (another process, an inherited number), after
        asking the kernel what it is: the tun character device (fstat rdev 10:200) attached
        to an interface (TUNGETIFF), called ``name`` when given.  Anything else is closed
        and refused, so no TUN ioctl ever reaches another driver that reuses its number.
        """
        try:
            st = _fd.call(f"fstat({fd})", os.fstat, fd)
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if not stat.S_ISCHR(st.st_mode) or rdev != TUN_RDEV:
                raise ValidationError(f"fd {fd}", "is not a tun/tap queue (not /dev/net/tun "
                                      f"{TUN_RDEV[0]}:{TUN_RDEV[1]})")
            got = cls._getiff(fd)
            have = got.ifr_name.decode()
            if name is not None and have != name:
                raise ValidationError(f"fd {fd}", f"is a queue of {have!r}, not of {name!r}")
        except BaseException:
            _fd.close(fd)
            raise
        return cls(fd, have, got.ifr_flags & 0xFFFF)

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



# -- why TUNSETIFF failed --------------------------------------------------------------------


def _sys_read(name: str, attr: str) -> str | None:
    try:
        with open(os.path.join(SYS_NET, name, attr), encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def explain_setiff(name: str, flags: int, err: int, *, exclusive: bool = False) -> str:
    """A precise hint for a refused TUNSETIFF, from what sysfs and procfs say about ``name``.

    tun_set_iff() in drivers/net/tun.c: EBUSY for an existing name with IFF_TUN_EXCL or a
    single-queue tap whose queue is held; EINVAL for a link that is not a tun/tap or differs
    in tun/tap or multi-queue; EPERM without CAP_NET_ADMIN over the tap's namespace unless
    owner/group match.  "" when there is nothing better than the generic hint.
    """
    exists = os.path.exists(os.path.join(SYS_NET, name))
    tun_flags = _sys_read(name, "tun_flags")
    if err == errno.EBUSY:
        if exclusive:
            return f"a link named {name} already exists: choose another name"
        holders = scan_holders().by_name.get(name, [])
        if holders:
            who = ", ".join(f"pid {h.pid} ({h.comm}) fd {h.fd}" for h in holders)
            return f"{name} is a single-queue tap and its queue is held by {who}"
        return (f"{name} is a single-queue tap and its queue is held (by a vhost backend or "
                "a process this user cannot inspect)")
    if err == errno.EINVAL and exists:
        if tun_flags is None:
            return f"{name} exists and is not a tun/tap device: choose another name"
        try:
            have = int(tun_flags, 16)
        except ValueError:
            return ""
        if (have & T.IFF_MULTI_QUEUE) != (flags & T.IFF_MULTI_QUEUE):
            if have & T.IFF_MULTI_QUEUE:
                return (f"{name} is a multi-queue tap; attach it with multi-queue "
                        "(more than one queue)")
            return (f"{name} is a single-queue tap: it takes exactly one queue "
                    "(recreate it with several queues to use more)")
        if (have & T.TUN_TYPE_MASK) != (flags & T.TUN_TYPE_MASK):
            kind = "tun" if have & T.IFF_TUN else "tap"
            return f"{name} is a {kind} device, not the kind asked for"
        return ""
    if err == errno.EPERM:
        if not exists:
            return ("creating a tap needs CAP_NET_ADMIN over this network namespace "
                    "(run as root; a user namespace of its own does not give it)")
        owner, group = _sys_read(name, "owner"), _sys_read(name, "group")
        parts = [f"{what} {value}" for what, value in (("owner", owner), ("group", group))
                 if value not in (None, "-1")]
        return (f"attaching {name} needs CAP_NET_ADMIN, or to match its "
                + (" and ".join(parts) if parts else "owner/group (it has none)"))
    return ""


# -- who holds a tap ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A process holding one queue fd of a tap."""

    pid: int
    comm: str
    fd: int


@dataclass(frozen=True)
class HolderScan:
    """Who holds which tap; ``unreadable`` processes could not be inspected (not root)."""

    by_name: dict[str, list[Holder]]
    unreadable: int = 0


def _is_tun_fd(target: str) -> bool:
    return target.endswith("net/tun")


def scan_holders(proc: str = "/proc") -> HolderScan:
    """Every process fd attached to a tun/tap, by interface name.

    Holders of tap queues are found in ``/proc/PID/fdinfo/FD`` (``iff:\\t<name>``, written
    by tun_chr_show_fdinfo() in drivers/net/tun.c).  A process or fd may vanish at any
    point: a vanished fd is skipped; a process is checked once after its fds were read and
    dropped if it is gone (psutil's rule).
    """
    found: dict[str, list[Holder]] = {}
    unreadable = 0
    try:
        pids = [int(d) for d in os.listdir(proc) if d.isdigit()]
    except OSError as e:
        raise VhostctlError(f"list {proc}", e.errno or errno.EIO) from None
    for pid in sorted(pids):
        base = f"{proc}/{pid}"
        try:
            fds = os.listdir(f"{base}/fd")
        except PermissionError:
            unreadable += 1
            continue
        except OSError:  # gone, or a kernel thread's fd dir
            continue
        mine: list[tuple[str, int]] = []
        for entry in fds:
            if not entry.isdigit():
                continue
            try:
                if not _is_tun_fd(os.readlink(f"{base}/fd/{entry}")):
                    continue
                with open(f"{base}/fdinfo/{entry}", encoding="utf-8", errors="replace") as f:
                    info = f.read()
            except OSError:
                continue
            for line in info.splitlines():
                key, _, value = line.partition(":")
                if key == "iff" and value.strip():
                    mine.append((value.strip(), int(entry)))
        if not mine:
            continue
        try:
            with open(f"{base}/comm", encoding="utf-8", errors="replace") as f:
                comm = f.read().strip()
        except OSError:
            continue  # exited while we looked: its fds are closed now
        for name, fd in mine:
            found.setdefault(name, []).append(Holder(pid, comm, fd))
    return HolderScan(found, unreadable)
