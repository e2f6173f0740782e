"""``/dev/vhost-net``: a typed API over the vhost ioctls, validating before the kernel is asked.

Rules encoded here come from drivers/vhost/vhost.c and drivers/vhost/net.c:

- every mem-table, vring and backend ioctl needs the caller to be the owner (VHOST_SET_OWNER);
- vring NUM/BASE/ENDIAN return EBUSY while a backend is attached;
- num is a power of two no larger than 32768 (vhost_vring_set_num);
- avail must be 2-byte aligned and used 4-byte aligned (vhost_vring_set_addr); we also demand
  16-byte descriptor tables, which the kernel does not check but the virtio spec requires;
- vhost-net has two virtqueues: 0 = RX, 1 = TX (VHOST_NET_VQ_RX/TX).
"""

from __future__ import annotations

import ctypes
import itertools

from . import _fd
from ._uapi import ioctl_name
from ._uapi import vhost as V
from ._uapi.virtio_net import FEATURES
from .errors import UnsupportedError, ValidationError

VHOST_NET_PATH = "/dev/vhost-net"
VHOST_NET_VQ_RX = 0  # drivers/vhost/net.c
VHOST_NET_VQ_TX = 1
VHOST_NET_VQ_MAX = 2
# vhost_vring_set_num: "if (!s.num || s.num > 0xffff || (s.num & (s.num - 1)))": with the
# power-of-two rule, 32768 is the largest ring.
VRING_MAX_NUM = 32768


class VhostDevice(_fd.OwnedFd):
    """Generic vhost device ioctls (shared by vhost-net, -vsock, -scsi, -vdpa)."""

    nvqs = 0  # number of virtqueues of the concrete device; 0 means unknown

    def __init__(self, path: str, fd: int | None = None) -> None:
        super().__init__(_fd.open_dev(path) if fd is None else fd)
        self.path = path
        self._offered: int | None = None

    # -- checks done before the kernel sees a request ---------------------------------------
    def _vq(self, op: str, vq: int) -> int:
        if not isinstance(vq, int) or vq < 0 or (self.nvqs and vq >= self.nvqs):
            raise ValidationError(f"{op}(vq={vq})",
                                  f"virtqueue index out of range 0..{self.nvqs - 1}")
        return vq

    # -- plumbing for the table-shaped ioctls -------------------------------------------------
    def _u64_get(self, request: int) -> int:
        out = ctypes.c_uint64(0)
        _fd.ioctl(self.fileno(), request, out)
        return out.value

    def _u64_set(self, request: int, value: int) -> None:
        _fd.ioctl(self.fileno(), request, ctypes.c_uint64(value))

    def _state(self, request: int, vq: int, num: int = 0) -> int:
        s = V.vhost_vring_state(index=vq, num=num)
        _fd.ioctl(self.fileno(), request, s, vq=vq)
        return int(s.num)

    def _file(self, request: int, vq: int, fd: int) -> None:
        if fd < -1:
            raise ValidationError(f"{ioctl_name(request)}(vq={vq})", f"bad fd {fd}")
        _fd.ioctl(self.fileno(), request, V.vhost_vring_file(index=vq, fd=fd), vq=vq)

    # -- ownership ---------------------------------------------------------------------------
    def set_owner(self) -> None:
        _fd.ioctl(self.fileno(), V.VHOST_SET_OWNER)

    def reset_owner(self) -> None:
        _fd.ioctl(self.fileno(), V.VHOST_RESET_OWNER)

    # -- features ----------------------------------------------------------------------------
    def get_features(self) -> int:
        self._offered = self._u64_get(V.VHOST_GET_FEATURES)
        return self._offered

    def set_features(self, features: int) -> None:
        """Ack ``features``; bits the kernel does not offer are refused here by name."""
        offered = self._offered if self._offered is not None else self.get_features()
        extra = features & ~offered
        if extra:
            raise UnsupportedError(
                "VHOST_SET_FEATURES", "not offered by this kernel: "
                + ", ".join(FEATURES.decode(extra)))
        self._u64_set(V.VHOST_SET_FEATURES, features)

    def get_backend_features(self) -> int:
        return self._u64_get(V.VHOST_GET_BACKEND_FEATURES)

    def set_backend_features(self, features: int) -> None:
        self._u64_set(V.VHOST_SET_BACKEND_FEATURES, features)

    # -- memory ------------------------------------------------------------------------------
    def set_mem_table(self, table: ctypes.Structure) -> None:
        """VHOST_SET_MEM_TABLE with a ``vhost_memory`` built by GuestMemory.table()."""
        regions = [table.regions[i] for i in range(table.nregions)]
        for r in regions:
            if r.memory_size == 0 or r.guest_phys_addr + r.memory_size > 2**64:
                raise ValidationError("VHOST_SET_MEM_TABLE",
                                      f"bad region at GPA {r.guest_phys_addr:#x}")
        ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
        for a, b in itertools.pairwise(ordered):
            if a.guest_phys_addr + a.memory_size > b.guest_phys_addr:
                raise ValidationError("VHOST_SET_MEM_TABLE",
                                      f"regions at {a.guest_phys_addr:#x} and "
                                      f"{b.guest_phys_addr:#x} overlap")
        _fd.ioctl(self.fileno(), V.VHOST_SET_MEM_TABLE, table)

    def set_log_base(self, address: int) -> None:
        self._u64_set(V.VHOST_SET_LOG_BASE, address)

    def set_log_fd(self, fd: int) -> None:
        _fd.ioctl(self.fileno(), V.VHOST_SET_LOG_FD, ctypes.c_int(fd))

    # -- virtqueues --------------------------------------------------------------------------
    def set_vring_num(self, vq: int, num: int) -> None:
        self._vq("VHOST_SET_VRING_NUM", vq)
        if not 1 <= num <= VRING_MAX_NUM or num & (num - 1):
            raise ValidationError(f"VHOST_SET_VRING_NUM(vq={vq})",
                                  f"ring size {num}: must be a power of two, 1..{VRING_MAX_NUM}")
        self._state(V.VHOST_SET_VRING_NUM, vq, num)

    def set_vring_base(self, vq: int, base: int) -> None:
        self._vq("VHOST_SET_VRING_BASE", vq)
        if not 0 <= base <= 0xFFFF:
            raise ValidationError(f"VHOST_SET_VRING_BASE(vq={vq})", f"base {base}: 0..65535")
        self._state(V.VHOST_SET_VRING_BASE, vq, base)

    def get_vring_base(self, vq: int) -> int:
        """The device's last_avail_idx; the ring must be stopped (backend detached) first."""
        return self._state(V.VHOST_GET_VRING_BASE, self._vq("VHOST_GET_VRING_BASE", vq))

    def set_vring_addr(self, vq: int, desc: int, avail: int, used: int, *, log: int = 0,
                       flags: int = 0) -> None:
        """Ring addresses in THIS process's address space (not GPAs)."""
        op = f"VHOST_SET_VRING_ADDR(vq={vq})"
        self._vq("VHOST_SET_VRING_ADDR", vq)
        for what, addr, align in (("desc", desc, 16), ("avail", avail, 2), ("used", used, 4)):
            if addr <= 0 or addr % align:
                raise ValidationError(op, f"{what} address {addr:#x} must be non-zero and "
                                      f"{align}-byte aligned")
        # vhost_vring_set_addr(): "if (a.flags & ~(0x1 << VHOST_VRING_F_LOG))"; the constant
        # is a bit number, so only 1 << 0 is valid.
        if flags & ~(1 << V.VHOST_VRING_F_LOG):
            raise ValidationError(op, f"unknown flags {flags:#x}")
        ring = V.vhost_vring_addr(index=vq, flags=flags, desc_user_addr=desc,
                                  used_user_addr=used, avail_user_addr=avail, log_guest_addr=log)
        _fd.ioctl(self.fileno(), V.VHOST_SET_VRING_ADDR, ring, vq=vq)

    def set_vring_kick(self, vq: int, fd: int) -> None:
        self._file(V.VHOST_SET_VRING_KICK, self._vq("VHOST_SET_VRING_KICK", vq), fd)

    def set_vring_call(self, vq: int, fd: int) -> None:
        self._file(V.VHOST_SET_VRING_CALL, self._vq("VHOST_SET_VRING_CALL", vq), fd)

    def set_vring_err(self, vq: int, fd: int) -> None:
        self._file(V.VHOST_SET_VRING_ERR, self._vq("VHOST_SET_VRING_ERR", vq), fd)

    def set_vring_endian(self, vq: int, big: bool) -> None:
        value = V.VHOST_VRING_BIG_ENDIAN if big else V.VHOST_VRING_LITTLE_ENDIAN
        self._state(V.VHOST_SET_VRING_ENDIAN, self._vq("VHOST_SET_VRING_ENDIAN", vq), value)

    def get_vring_endian(self, vq: int) -> bool:
        """True for big-endian (legacy cross-endian rings; kernels without it say ENOIOCTLCMD)."""
        return self._state(V.VHOST_GET_VRING_ENDIAN,
                           self._vq("VHOST_GET_VRING_ENDIAN", vq)) == V.VHOST_VRING_BIG_ENDIAN

    def set_vring_busyloop_timeout(self, vq: int, usec: int) -> None:
        if not 0 <= usec <= 0xFFFFFFFF:
            raise ValidationError(f"VHOST_SET_VRING_BUSYLOOP_TIMEOUT(vq={vq})",
                                  f"{usec} µs out of range")
        self._state(V.VHOST_SET_VRING_BUSYLOOP_TIMEOUT,
                    self._vq("VHOST_SET_VRING_BUSYLOOP_TIMEOUT", vq), usec)

    def get_vring_busyloop_timeout(self, vq: int) -> int:
        return self._state(V.VHOST_GET_VRING_BUSYLOOP_TIMEOUT,
                           self._vq("VHOST_GET_VRING_BUSYLOOP_TIMEOUT", vq))

    # -- workers (Linux 6.4+) ------------------------------------------------------------------
    def new_worker(self) -> int:
        state = V.vhost_worker_state()
        _fd.ioctl(self.fileno(), V.VHOST_NEW_WORKER, state)
        return int(state.worker_id)

    def free_worker(self, worker_id: int) -> None:
        _fd.ioctl(self.fileno(), V.VHOST_FREE_WORKER, V.vhost_worker_state(worker_id=worker_id))

    def attach_vring_worker(self, vq: int, worker_id: int) -> None:
        w = V.vhost_vring_worker(index=self._vq("VHOST_ATTACH_VRING_WORKER", vq),
                                 worker_id=worker_id)
        _fd.ioctl(self.fileno(), V.VHOST_ATTACH_VRING_WORKER, w, vq=vq)

    def get_vring_worker(self, vq: int) -> int:
        w = V.vhost_vring_worker(index=self._vq("VHOST_GET_VRING_WORKER", vq))
        _fd.ioctl(self.fileno(), V.VHOST_GET_VRING_WORKER, w, vq=vq)
        return int(w.worker_id)


class VhostNet(VhostDevice):
    """``/dev/vhost-net``: two virtqueues (RX=0, TX=1) and a tap/socket backend per queue."""

    nvqs = VHOST_NET_VQ_MAX

    def __init__(self, path: str = VHOST_NET_PATH, fd: int | None = None) -> None:
        super().__init__(path, fd)

    def set_backend(self, vq: int, fd: int) -> None:
        """Attach a tap queue fd to a virtqueue; ``fd=-1`` detaches (stops the ring)."""
        self._file(V.VHOST_NET_SET_BACKEND, self._vq("VHOST_NET_SET_BACKEND", vq), fd)


def offered_features(path: str = VHOST_NET_PATH) -> tuple[int, int | None]:
    """(features, backend features or None) that this kernel's vhost-net offers.

    Neither ioctl needs ownership (vhost_net_ioctl), so this is safe to ask at any time.
    """
    with VhostNet(path) as dev:
        features = dev.get_features()
        try:
            backend = dev.get_backend_features()
        except OSError:
            backend = None
        return features, backend

