"""A spy at the one fd/ioctl choke point, with a small vhost-net and tun behind it.

For unit tests of the validation and struct building in vhost.py, tun.py and datapath.py on a
host without vhost-net.  :func:`install` replaces ``fcntl`` inside :mod:`vhostctl._fd` (so
``_fd.ioctl`` itself runs: its typed errors, hints and fault injection) and ``_fd.open_dev``
(device nodes become /dev/null fds), and watches ``_fd.call`` for kick-eventfd writes.  Every
ioctl is recorded as ``(name, fields)``, the argument's fields as the library built them.

Behind the spy, a device model in the shape of drivers/vhost/{vhost,net}.c: the ring state
set with SET_VRING_NUM/BASE/ADDR, a backend attach reads ``used->idx`` from memory and a
detach saves ``last_avail_idx`` for GET_VRING_BASE; a kick runs the ring at once (TX: every
available frame is "sent" and completed; RX: queued frames are written into the posted
buffers, with ``num_buffers`` under MRG_RXBUF), and the call eventfd is signalled when the
driver asked for it.  This is a fake for logic: the kernel tests are the proof.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
import types
from dataclasses import dataclass, field
from typing import Any

from tests.unit.test_vring import Device
from vhostctl import _fd
from vhostctl._uapi import if_tun as T
from vhostctl._uapi import ioctl_name
from vhostctl._uapi import vhost as V
from vhostctl._uapi.virtio_config import VIRTIO_F_VERSION_1
from vhostctl._uapi.virtio_net import VIRTIO_NET_F_MRG_RXBUF
from vhostctl._uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from vhostctl.vring import RingLayout

OFFERED = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_RING_F_EVENT_IDX
           | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << V.VHOST_NET_F_VIRTIO_NET_HDR)
BACKEND_OFFERED = 0x7


def fields(arg: Any) -> Any:
    """What the library passed: an int, a simple ctypes value, or a structure's fields."""
    if isinstance(arg, int):
        return arg
    if isinstance(arg, ctypes.Structure | ctypes.Union):
        out = {}
        for f in arg._fields_:
            name = f[0]
            if name in getattr(arg, "_anonymous_", ()):  # ifreq's union: ifr_name, ifr_flags
                if isinstance(arg, T.ifreq):
                    out["ifr_flags"] = arg.ifr_flags & 0xFFFF
            elif not name.startswith("_"):
                out[name] = fields(getattr(arg, name))
        return out
    if isinstance(arg, ctypes.Array):
        return [fields(x) for x in arg]
    return arg.value if isinstance(arg, ctypes._SimpleCData) else arg


@dataclass
class Vq:
    num: int = 0
    base: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    kick: int = -1
    call: int = -1
    err: int = -1
    busyloop: int = 0
    endian: int = 0
    worker: int = 0
    backend: int = -1
    features: int = 0
    dev: Device | None = None
    region: tuple[int, int, int] | None = None  # (gpa, size, hva)
    buf: Any = None
    rx_pending: list[bytes] = field(default_factory=list)


@dataclass
class VhostState:
    owner: bool = False
    features: int | None = None
    backend_features: int = 0
    regions: list[tuple[int, int, int]] = field(default_factory=list)
    vqs: list[Vq] = field(default_factory=lambda: [Vq(), Vq()])
    log_base: int | None = None
    log_fd: int | None = None
    workers: list[int] = field(default_factory=list)


@dataclass
class TapState:
    name: str = ""
    flags: int = 0
    vnet_hdr_sz: int = 10
    vnet_le: int = 0
    vnet_be: int = 0
    sndbuf: int = 0x7FFFFFFF
    persist: int = 0
    owner: int = -1
    group: int = -1
    offload: int = 0
    carrier: int = 1
    queue_enabled: bool = True
    sent: list[bytes] = field(default_factory=list)  # frames that reached the tap from TX


class FakeKernel:
    def __init__(self, offered: int = OFFERED) -> None:
        self.offered = offered
        self.calls: list[tuple[str, Any]] = []
        self.vhost: dict[int, VhostState] = {}
        self.taps: dict[int, TapState] = {}
        self.links: dict[str, list[int]] = {}  # tap name -> queue fds
        self.fail: dict[str, int] = {}  # ioctl name -> errno to fail it with
        self.fds: list[int] = []
        self.complete_tx = True  # False: TX frames are taken but not completed (a busy device)

    # -- what tests look at ------------------------------------------------------------------
    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def last(self, name: str) -> Any:
        return next(f for n, f in reversed(self.calls) if n == name)

    def sent(self, tap_name: str) -> list[bytes]:
        return [f for fd in self.links.get(tap_name, []) for f in self.taps[fd].sent]

    # -- the choke point -------------------------------------------------------------------------
    def open_dev(self, path: str, flags: int = os.O_RDWR) -> int:
        try:
            _fd.faults.check(f"open {path}")
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise _fd.OpenError(f"open {path}", e.errno or errno.EIO) from None
        self.fds.append(fd)
        if path == "/dev/net/tun":
            self.taps[fd] = TapState()
        else:
            self.vhost[fd] = VhostState()
        return fd

    def ioctl(self, fd: int, request: int, arg: Any = 0, mutate: bool = False) -> int:
        name = ioctl_name(request)
        self.calls.append((name, fields(arg)))
        if name in self.fail:
            raise OSError(self.fail[name], os.strerror(self.fail[name]))
        if fd in self.taps:
            return self._tun(self.taps[fd], fd, name, arg)
        if fd in self.vhost:
            return self._vhost(self.vhost[fd], name, arg)
        raise OSError(errno.ENOTTY, "not a device of ours")

    def call(self, real, op: str, fn, *args: Any, **kwargs: Any) -> Any:
        out = real(op, fn, *args, **kwargs)
        if op == "write(kick eventfd)":
            self.kicked(args[0])
        return out

    # -- tun ---------------------------------------------------------------------------------------
    def _tun(self, t: TapState, fd: int, name: str, arg: Any) -> int:
        if name == "TUNSETIFF":
            want = arg.ifr_name.decode() or "tap%d"
            if "%d" in want:
                n = 0
                while want.replace("%d", str(n)) in self.links:
                    n += 1
                want = want.replace("%d", str(n))
            if arg.ifr_flags & T.IFF_TUN_EXCL and want in self.links:
                raise OSError(errno.EBUSY, "exists")
            t.name, t.flags = want, arg.ifr_flags & ~T.IFF_TUN_EXCL & 0xFFFF
            self.links.setdefault(want, []).append(fd)
        elif name == "TUNGETIFF":
            if not t.name:
                raise OSError(errno.EBADFD, "no interface")
            arg.ifr_name = t.name.encode()
            arg.ifr_flags = t.flags | (T.IFF_PERSIST if t.persist else 0)
        elif name == "TUNSETVNETHDRSZ":
            if arg.value < 10:
                raise OSError(errno.EINVAL, "too small")
            t.vnet_hdr_sz = arg.value
        elif name in ("TUNGETVNETHDRSZ", "TUNGETVNETLE", "TUNGETVNETBE", "TUNGETSNDBUF"):
            arg.value = {"TUNGETVNETHDRSZ": t.vnet_hdr_sz, "TUNGETVNETLE": t.vnet_le,
                         "TUNGETVNETBE": t.vnet_be, "TUNGETSNDBUF": t.sndbuf}[name]
        elif name in ("TUNSETVNETLE", "TUNSETVNETBE", "TUNSETSNDBUF", "TUNSETCARRIER"):
            setattr(t, {"TUNSETVNETLE": "vnet_le", "TUNSETVNETBE": "vnet_be",
                        "TUNSETSNDBUF": "sndbuf", "TUNSETCARRIER": "carrier"}[name], arg.value)
        elif name in ("TUNSETPERSIST", "TUNSETOWNER", "TUNSETGROUP", "TUNSETOFFLOAD"):
            setattr(t, name[6:].lower(), arg)
        elif name == "TUNSETQUEUE":
            t.queue_enabled = bool(arg.ifr_flags & T.IFF_ATTACH_QUEUE)
        elif name == "TUNGETFEATURES":
            arg.value = T.IFF_TAP | T.IFF_TUN | T.IFF_NO_PI | T.IFF_VNET_HDR | T.IFF_MULTI_QUEUE
        return 0

    # -- vhost -------------------------------------------------------------------------------------
    def _vhost(self, d: VhostState, name: str, arg: Any) -> int:
        if name == "VHOST_GET_FEATURES":
            arg.value = self.offered
            return 0
        if name == "VHOST_GET_BACKEND_FEATURES":
            arg.value = BACKEND_OFFERED
            return 0
        if name == "VHOST_SET_OWNER":
            if d.owner:
                raise OSError(errno.EBUSY, "owned")
            d.owner = True
            return 0
        if not d.owner:
            raise OSError(errno.EPERM, "not the owner")
        if name == "VHOST_RESET_OWNER":
            d.owner = False
        elif name == "VHOST_SET_FEATURES":
            if arg.value & ~self.offered:
                raise OSError(errno.EOPNOTSUPP, "not offered")
            d.features = arg.value
        elif name == "VHOST_SET_BACKEND_FEATURES":
            d.backend_features = arg.value
        elif name == "VHOST_SET_MEM_TABLE":
            d.regions = [(r.guest_phys_addr, r.memory_size, r.userspace_addr)
                         for r in arg.regions[:arg.nregions]]
        elif name == "VHOST_SET_LOG_BASE":
            d.log_base = arg.value
        elif name == "VHOST_SET_LOG_FD":
            d.log_fd = arg.value
        elif name == "VHOST_NEW_WORKER":
            arg.worker_id = len(d.workers) + 1
            d.workers.append(arg.worker_id)
        elif name == "VHOST_FREE_WORKER":
            if arg.worker_id not in d.workers:
                raise OSError(errno.ENODEV, "no such worker")
            d.workers.remove(arg.worker_id)
        else:
            return self._vring(d, name, arg)
        return 0

    def _vring(self, d: VhostState, name: str, arg: Any) -> int:
        if arg.index >= len(d.vqs):
            raise OSError(errno.ENOBUFS, "vq index")
        vq = d.vqs[arg.index]
        busy = vq.backend >= 0
        if name in ("VHOST_SET_VRING_NUM", "VHOST_SET_VRING_BASE", "VHOST_SET_VRING_ENDIAN") \
                and busy:
            raise OSError(errno.EBUSY, "backend attached")
        if name == "VHOST_SET_VRING_NUM":
            vq.num = arg.num
        elif name == "VHOST_SET_VRING_BASE":
            vq.base = arg.num
        elif name == "VHOST_GET_VRING_BASE":
            arg.num = vq.base
        elif name == "VHOST_SET_VRING_ADDR":
            vq.desc, vq.avail, vq.used = arg.desc_user_addr, arg.avail_user_addr, \
                arg.used_user_addr
        elif name in ("VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL", "VHOST_SET_VRING_ERR"):
            setattr(vq, name.rsplit("_", 1)[1].lower(), arg.fd)
        elif name == "VHOST_SET_VRING_BUSYLOOP_TIMEOUT":
            vq.busyloop = arg.num
        elif name == "VHOST_GET_VRING_BUSYLOOP_TIMEOUT":
            arg.num = vq.busyloop
        elif name == "VHOST_SET_VRING_ENDIAN":
            vq.endian = arg.num
        elif name == "VHOST_GET_VRING_ENDIAN":
            arg.num = vq.endian
        elif name in ("VHOST_ATTACH_VRING_WORKER", "VHOST_GET_VRING_WORKER"):
            if name.startswith("VHOST_ATTACH"):
                if arg.worker_id not in d.workers:
                    raise OSError(errno.ENODEV, "no such worker")
                vq.worker = arg.worker_id
            else:
                arg.worker_id = vq.worker
        elif name == "VHOST_NET_SET_BACKEND":
            if arg.fd >= 0:
                self._attach(d, vq, arg.fd)
            else:
                self._detach(vq)
        else:
            raise OSError(errno.ENOTTY, name)
        return 0

    def _attach(self, d: VhostState, vq: Vq, tap_fd: int) -> None:
        """vhost_vq_init_access(): last_used_idx is read from used->idx in memory."""
        if tap_fd not in self.taps:
            raise OSError(errno.ENOTSOCK, "not a tap")
        for gpa, size, hva in d.regions:
            if hva <= vq.desc < hva + size:
                vq.region = (gpa, size, hva)
                break
        else:
            raise OSError(errno.EFAULT, "ring not mapped")
        gpa, size, hva = vq.region
        vq.buf = (ctypes.c_char * size).from_address(hva)
        lay = RingLayout(vq.num, vq.desc - hva, vq.avail - hva, vq.used - hva)
        ev = bool(d.features is not None and d.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        vq.dev = Device(vq.buf, lay, event_idx=ev, base=vq.base)
        vq.backend = tap_fd
        vq.features = d.features or 0

    def _detach(self, vq: Vq) -> None:
        """vhost_net_stop_vq(): the backend goes, last_avail_idx stays for GET_VRING_BASE."""
        if vq.dev is not None:
            vq.base = vq.dev.last_avail
            vq.dev.mv.release()
            vq.dev = None
        vq.buf = None
        vq.backend = -1

    # -- the worker ----------------------------------------------------------------------------
    def _find_vq(self, kick: int) -> tuple[int, Vq] | None:
        for d in self.vhost.values():
            for i, vq in enumerate(d.vqs):
                if vq.kick == kick:
                    return i, vq
        return None

    def kicked(self, kick: int) -> None:
        found = self._find_vq(kick)
        if found is None or found[1].dev is None:
            return
        i, vq = found
        if i == 1:
            self._run_tx(vq)
        else:
            self._run_rx(vq)

    def _hdr_len(self, vq: Vq) -> int:
        t = self.taps[vq.backend]
        if t.flags & T.IFF_VNET_HDR:
            return t.vnet_hdr_sz
        return 12 if vq.features >> VIRTIO_F_VERSION_1 & 1 or \
            vq.features >> VIRTIO_NET_F_MRG_RXBUF & 1 else 10

    def _signal(self, vq: Vq, interrupt: bool) -> None:
        if interrupt and vq.call >= 0:
            os.write(vq.call, (1).to_bytes(8, sys.byteorder))

    def _off(self, vq: Vq, gpa: int) -> int:
        base, size, _ = vq.region
        if not base <= gpa < base + size:
            raise OSError(errno.EFAULT, f"GPA {gpa:#x} outside the ring's region")
        return gpa - base

    def _run_tx(self, vq: Vq) -> None:
        dev, t = vq.dev, self.taps[vq.backend]
        hdr = self._hdr_len(vq)
        while True:
            dev.disable_notify()
            done = []
            while dev.available():
                head, chain = dev.pop()
                data = b"".join(bytes(dev.mv[self._off(vq, a):self._off(vq, a) + n])
                                for a, n, _ in chain)
                t.sent.append(data[hdr:])
                done.append((head, 0))
            if done and self.complete_tx:
                self._signal(vq, dev.push(done))
            if not dev.enable_notify():
                return

    def inject(self, tap_name: str, frames: list[bytes], queue: int = 0) -> None:
        """Frames from the host stack into the tap's ``queue``: the RX ring gets them now."""
        fd = self.links[tap_name][queue]
        for d in self.vhost.values():
            vq = d.vqs[0]
            if vq.backend == fd:
                vq.rx_pending += frames
                if vq.dev is not None:
                    self._run_rx(vq)
                return
        raise AssertionError(f"no RX ring on {tap_name} queue {queue}")

    def _run_rx(self, vq: Vq) -> None:
        dev = vq.dev
        hdr = self._hdr_len(vq)
        mrg = vq.features >> VIRTIO_NET_F_MRG_RXBUF & 1
        while vq.rx_pending:
            frame = vq.rx_pending[0]
            data = bytearray(hdr) + frame
            # Buffers this frame needs (vhost-net get_rx_bufs): all or none.
            bufs, need = [], len(data)
            last = dev.last_avail
            while need > 0 and dev.available():
                head, chain = dev.pop()
                a, n, _ = chain[0]
                bufs.append((head, self._off(vq, a), n))
                need -= n
                if not mrg:
                    break
            if need > 0:
                dev.last_avail = last  # vhost_discard_vq_desc()
                if not dev.enable_notify():
                    return
                continue
            vq.rx_pending.pop(0)
            if mrg:
                struct.pack_into("<H", data, 10, len(bufs))
            used, at = [], 0
            for head, off, n in bufs:
                piece = data[at:at + n]
                dev.mv[off:off + len(piece)] = piece
                used.append((head, len(piece)))
                at += n
            self._signal(vq, dev.push(used))


def install(monkeypatch, kernel: FakeKernel | None = None) -> FakeKernel:
    """Put the spy at the choke point for one test; returns the kernel behind it."""
    k = kernel or FakeKernel()
    monkeypatch.setattr(_fd, "fcntl", types.SimpleNamespace(ioctl=k.ioctl))
    monkeypatch.setattr(_fd, "open_dev", k.open_dev)
    real_call = _fd.call
    monkeypatch.setattr(_fd, "call", lambda op, fn, *a, **kw: k.call(real_call, op, fn, *a, **kw))
    return k
