"""The in-kernel virtio-net datapath, stood up in our own process.

    our rings (guest memory)  <->  vhost-net.ko worker  <->  tap  <->  host network stack

Per queue pair: one tap queue fd, one ``/dev/vhost-net`` fd (vhost-net serves exactly one
RX/TX pair per fd), one memory region holding both rings and their buffers, and kick/call/err
eventfds.  Setup follows the order QEMU, DPDK and tools/virtio agree on (DESIGN.md §3):
SET_OWNER -> features -> MEM_TABLE -> per ring NUM, BASE, ADDR, KICK, CALL, ERR -> BACKEND.
Every step registers its undo on an ExitStack, so a failure anywhere unwinds in reverse order
and leaves no tap and no fd behind.

The virtio-net header (10 or 12 bytes, :func:`vnet_hdr_len`) precedes every frame in our
buffers.  Either the tap carries it (IFF_VNET_HDR with TUNSETVNETHDRSZ = header length:
``hdr_mode="tap"``) or vhost adds/strips it itself (VHOST_NET_F_VIRTIO_NET_HDR acked, tap
without vnet_hdr: ``hdr_mode="vhost"``).  A mismatch misframes every RX frame silently, which is
why both modes are tested for RX, not only TX.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import _fd
from ._uapi import vhost as V
from ._uapi import virtio_config as C
from ._uapi import virtio_net as N
from ._uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from .errors import IntegrityError, UnsupportedError, ValidationError, WaitTimeout
from .memory import PAGE, GuestMemory, Region
from .tun import Tap
from .vhost import VHOST_NET_VQ_RX, VHOST_NET_VQ_TX, VhostNet
from .vring import RingLayout, SplitVring

ETH_HLEN = 14  # include/uapi/linux/if_ether.h
VLAN_HLEN = 4
MIN_MTU, MAX_MTU = 68, 65521  # drivers/net/tun.c: MAX_MTU 65535 - (ETH_HLEN + VLAN_HLEN)
_EV = 8  # an eventfd counter is one u64


def _bit(n: int) -> int:
    return 1 << n


@dataclass(frozen=True)
class DatapathConfig:
    """What to negotiate and how big to make things; validated before any syscall."""

    queues: int = 1
    ring_size: int = 256
    mtu: int = 1500
    version_1: bool = True
    mrg_rxbuf: bool = True
    event_idx: bool = True
    indirect_desc: bool = False
    hdr_mode: str = "tap"  # "tap": tap has IFF_VNET_HDR; "vhost": VHOST_NET_F_VIRTIO_NET_HDR
    rx_buf_size: int = 0  # 0: 2048 with MRG_RXBUF, else a whole frame plus header
    busyloop_usec: int = 0
    tap_name: str = "vhc%d"

    def validate(self) -> None:
        op = "datapath"
        if not 1 <= self.queues <= 256:
            raise ValidationError(op, f"queues {self.queues}: must be 1..256")
        n = self.ring_size
        if not 1 <= n <= 32768 or n & (n - 1):
            raise ValidationError(op, f"ring size {n}: must be a power of two, 1..32768")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValidationError(op, f"MTU {self.mtu}: must be {MIN_MTU}..{MAX_MTU}")
        if self.hdr_mode not in ("tap", "vhost"):
            raise ValidationError(op, f"hdr_mode {self.hdr_mode!r}: 'tap' or 'vhost'")
        if self.rx_buf_size and not self.mrg_rxbuf and self.rx_buf_size < self.max_frame + 12:
            raise ValidationError(
                op, f"RX buffers of {self.rx_buf_size} bytes cannot hold a {self.max_frame}-byte "
                "frame without MRG_RXBUF", hint="enable mrg_rxbuf or grow rx_buf_size")
        if self.rx_buf_size and self.rx_buf_size < 64:
            raise ValidationError(op, f"RX buffer size {self.rx_buf_size}: at least 64")
        if self.busyloop_usec < 0:
            raise ValidationError(op, "busy-poll timeout must be >= 0")

    @property
    def features(self) -> int:
        """The feature bits this configuration acks with VHOST_SET_FEATURES."""
        f = 0
        if self.version_1:
            f |= _bit(C.VIRTIO_F_VERSION_1)
        if self.mrg_rxbuf:
            f |= _bit(N.VIRTIO_NET_F_MRG_RXBUF)
        if self.event_idx:
            f |= _bit(VIRTIO_RING_F_EVENT_IDX)
        if self.indirect_desc:
            f |= _bit(VIRTIO_RING_F_INDIRECT_DESC)
        if self.hdr_mode == "vhost":
            f |= _bit(V.VHOST_NET_F_VIRTIO_NET_HDR)
        return f

    @property
    def hdr_len(self) -> int:
        return N.vnet_hdr_len(self.features)

    @property
    def max_frame(self) -> int:
        return self.mtu + ETH_HLEN + VLAN_HLEN

    @property
    def rx_buffer(self) -> int:
        if self.rx_buf_size:
            return self.rx_buf_size
        return 2048 if self.mrg_rxbuf else _round(self.hdr_len + self.max_frame, 64)


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass
class QueueStats:
    """Counters for one queue pair, as our side saw them."""

    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    kicks: int = 0
    interrupts: int = 0
    restarts: int = 0


@dataclass
class _Queue:
    index: int
    tap: Tap
    dev: VhostNet
    region: Region
    rx: SplitVring
    tx: SplitVring
    mv: memoryview
    rx_kick: int
    rx_call: int
    tx_kick: int
    tx_call: int
    err: int
    rx_bufs: int  # region offset of the first RX buffer
    tx_slots: int  # region offset of the first TX slot
    tx_slot: int  # bytes per TX slot
    tx_free: list[int] = field(default_factory=list)
    rx_partial: list[tuple[int, int]] = field(default_factory=list)
    stats: QueueStats = field(default_factory=QueueStats)
    running: bool = False


class Datapath:
    """tap <-> vhost-net <-> our split virtqueues, N queue pairs; a context manager.

    ``send()`` puts frames on TX rings (the kernel writes them into the tap); ``recv()`` returns
    frames the kernel took from the tap and wrote into our RX rings.  Frames are bytes without
    the virtio-net header.
    """

    def __init__(self, config: DatapathConfig | None = None) -> None:
        self.config = config or DatapathConfig()
        self.config.validate()
        self.queues: list[_Queue] = []
        self.offered = 0
        self.tap_name = ""
        self._stack = contextlib.ExitStack()
        self._memory: GuestMemory | None = None

    # -- setup and teardown ----------------------------------------------------------------
    def open(self) -> Datapath:
        cfg = self.config
        try:
            taps = Tap.open_queues(cfg.tap_name, cfg.queues, vnet_hdr=cfg.hdr_mode == "tap",
                                   exclusive=True)
            for t in taps:
                self._stack.callback(t.close)
            self.tap_name = taps[0].name
            self._memory = self._stack.enter_context(GuestMemory())
            for i, tap in enumerate(taps):
                self.queues.append(self._open_queue(i, tap))
            self._configure_link()
            for q in self.queues:
                self._start(q)
        except BaseException:
            self.close()
            raise
        return self

    def _negotiate(self, dev: VhostNet, tap: Tap) -> None:
        cfg = self.config
        offered = dev.get_features()
        self.offered = offered
        missing = cfg.features & ~offered
        if missing:
            raise UnsupportedError("VHOST_SET_FEATURES", "this kernel's vhost-net does not offer "
                                   + ", ".join(N.FEATURES.decode(missing)))
        dev.set_features(cfg.features)
        if cfg.hdr_mode == "tap":
            tap.vnet_hdr_sz = cfg.hdr_len
            if cfg.version_1 and sys.byteorder == "big":
                tap.vnet_le = True  # VERSION_1 headers are little-endian (virtio 1.2 §5.1.6)

    def _open_queue(self, index: int, tap: Tap) -> _Queue:
        cfg, mem, st = self.config, self._memory, self._stack
        dev = VhostNet()
        st.callback(dev.close)
        dev.set_owner()
        self._negotiate(dev, tap)

        num = cfg.ring_size
        rx_lay = RingLayout.compute(num, 0, event_idx=True)
        tx_base = _round(rx_lay.end, PAGE)
        tx_lay = RingLayout.compute(num, tx_base, event_idx=True)
        tx_slot = _round(cfg.hdr_len + cfg.max_frame, 64)
        tx_slots = _round(tx_lay.end, PAGE)
        rx_bufs = _round(tx_slots + num * tx_slot, PAGE)
        region = mem.add_region(rx_bufs + num * cfg.rx_buffer)
        mv = memoryview(region.mm)
        st.callback(mv.release)
        rx = SplitVring(region.mm, rx_lay, event_idx=cfg.event_idx, vq=VHOST_NET_VQ_RX)
        st.callback(rx.close)
        tx = SplitVring(region.mm, tx_lay, event_idx=cfg.event_idx, vq=VHOST_NET_VQ_TX)
        st.callback(tx.close)
        dev.set_mem_table(mem.table())

        fds = []
        for _ in range(5):
            fd = _fd.eventfd()
            st.callback(_fd.close, fd)
            fds.append(fd)
        rx_kick, rx_call, tx_kick, tx_call, err = fds
        for vq, ring, kick, call in ((VHOST_NET_VQ_RX, rx, rx_kick, rx_call),
                                     (VHOST_NET_VQ_TX, tx, tx_kick, tx_call)):
            lay = ring.layout
            dev.set_vring_num(vq, num)
            dev.set_vring_base(vq, 0)
            dev.set_vring_addr(vq, region.hva + lay.desc, region.hva + lay.avail,
                               region.hva + lay.used)
            dev.set_vring_kick(vq, kick)
            dev.set_vring_call(vq, call)
            dev.set_vring_err(vq, err)
            if cfg.busyloop_usec:
                dev.set_vring_busyloop_timeout(vq, cfg.busyloop_usec)
        q = _Queue(index, tap, dev, region, rx, tx, mv, rx_kick, rx_call, tx_kick, tx_call, err,
                   rx_bufs, tx_slots, tx_slot, tx_free=list(range(num - 1, -1, -1)))
        for b in range(num):
            rx.add_buf(region.gpa + rx_bufs + b * cfg.rx_buffer, cfg.rx_buffer, b, writable=True)
        rx.publish()
        # Registered last, so it runs first: backends go before the fds and memory they use.
        st.callback(self._detach, q)
        return q

    def _configure_link(self) -> None:
        """MTU and UP through rtnetlink (a down tap drops what vhost sends it)."""
        from .netlink import Netlink

        with Netlink() as nl:
            if self.config.mtu != 1500:
                nl.set_mtu(self.tap_name, self.config.mtu)
            nl.set_up(self.tap_name)

    def _start(self, q: _Queue) -> None:
        q.running = True  # so a failure between the two attaches still detaches both
        for vq in (VHOST_NET_VQ_RX, VHOST_NET_VQ_TX):
            q.dev.set_backend(vq, q.tap.fileno())
        self._kick(q, q.rx_kick)

    def _detach(self, q: _Queue) -> None:
        if q.running and not q.dev.closed:
            q.running = False
            for vq in (VHOST_NET_VQ_RX, VHOST_NET_VQ_TX):
                q.dev.set_backend(vq, -1)

    def close(self) -> None:
        """Tear everything down in reverse order of setup (idempotent)."""
        self.queues = []
        self._stack.close()
        self._memory = None

    def __enter__(self) -> Datapath:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- notifications -------------------------------------------------------------------------
    def _kick(self, q: _Queue, fd: int) -> None:
        _fd.call("write(kick eventfd)", os.write, fd, (1).to_bytes(_EV, sys.byteorder))
        q.stats.kicks += 1

    def _wait(self, q: _Queue, ring: SplitVring, call: int, deadline: float) -> bool:
        """Sleep until ``ring`` has completions or the deadline passes; False on timeout.

        Re-enables interrupts first and re-checks (a completion that landed before the
        device saw the re-enable is never signalled: virtqueue_enable_cb() contract).
        """
        if ring.enable_interrupts():
            return True
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ring.has_used()
            ready, _, _ = select.select([call, q.err], [], [], left)
            if q.err in ready:
                raise IntegrityError(f"vhost-net queue {q.index}",
                                     "vhost signalled an error on the error eventfd "
                                     "(bad descriptor or address; see dmesg)")
            if call in ready:
                with contextlib.suppress(BlockingIOError):
                    q.stats.interrupts += int.from_bytes(os.read(call, _EV), sys.byteorder)
                if ring.has_used():
                    return True

    # -- TX: our ring -> tap -------------------------------------------------------------------
    def _reclaim_tx(self, q: _Queue) -> None:
        for slot, _ in q.tx.harvest():
            q.tx_free.append(slot)

    def send(self, frames: Iterable[bytes], queue: int = 0) -> int:
        """Queue as many frames as there are free TX slots; one kick per batch.

        Returns how many were queued; the caller retries the rest (see :meth:`send_all`).
        """
        q = self._queue(queue)
        self._reclaim_tx(q)
        hdr, maxf, mv, base = self.config.hdr_len, self.config.max_frame, q.mv, q.tx_slots
        gpa = q.region.gpa
        free, add, stats = q.tx_free, q.tx.add_buf, q.stats
        n = 0
        for frame in frames:
            if not free:
                break
            size = len(frame)
            if not ETH_HLEN <= size <= maxf:
                raise ValidationError("send", f"frame of {size} bytes: must be "
                                      f"{ETH_HLEN}..{maxf} (MTU {self.config.mtu})")
            slot = free.pop()
            off = base + slot * q.tx_slot
            mv[off + hdr:off + hdr + size] = frame  # the header stays zero: no offloads
            add(gpa + off, hdr + size, slot)
            n += 1
            stats.tx_bytes += size
        stats.tx_frames += n
        if q.tx.publish():
            self._kick(q, q.tx_kick)
        return n

    def send_all(self, frames: Sequence[bytes], queue: int = 0, timeout: float = 5.0) -> None:
        """Send every frame, waiting for TX completions when the ring is full."""
        q = self._queue(queue)
        deadline = time.monotonic() + timeout
        done = 0
        while done < len(frames):
            done += self.send(frames[done:], queue)
            if done < len(frames) and not self._wait(q, q.tx, q.tx_call, deadline):
                raise WaitTimeout(f"send(queue={queue})", f"TX ring still full after {timeout}s; "
                                  f"{len(frames) - done} frames not sent")

    def flush(self, queue: int = 0, timeout: float = 5.0) -> None:
        """Wait until the kernel has consumed every frame put on the TX ring."""
        q = self._queue(queue)
        deadline = time.monotonic() + timeout
        self._reclaim_tx(q)
        while q.tx.outstanding:
            if not self._wait(q, q.tx, q.tx_call, deadline):
                raise WaitTimeout(f"flush(queue={queue})",
                                  f"{q.tx.outstanding} TX frames not consumed after {timeout}s")
            self._reclaim_tx(q)

    # -- RX: tap -> our ring -------------------------------------------------------------------
    def _harvest_rx(self, q: _Queue) -> list[bytes]:
        cfg = self.config
        hdr, bufsz, mv, base = cfg.hdr_len, cfg.rx_buffer, q.mv, q.rx_bufs
        used = q.rx_partial + q.rx.harvest()
        frames: list[bytes] = []
        i, n = 0, len(used)
        refill: list[int] = []
        while i < n:
            buf, length = used[i]
            off = base + buf * bufsz
            count = 1
            if cfg.mrg_rxbuf:
                # num_buffers, the u16 after virtio_net_hdr (virtio 1.2 §5.1.6.3.2).
                count = int.from_bytes(mv[off + 10:off + 12], "little")
                if not 1 <= count <= q.rx.num:
                    raise IntegrityError(f"recv(queue={q.index})",
                                         f"num_buffers {count} in RX header is out of range")
                if i + count > n:
                    break  # the rest of this frame's buffers is not in used yet
            if length < hdr:
                raise IntegrityError(f"recv(queue={q.index})",
                                     f"used length {length} is shorter than the header")
            if count == 1:
                frames.append(bytes(mv[off + hdr:off + length]))
            else:
                parts = [mv[off + hdr:off + length]]
                for b2, l2 in used[i + 1:i + count]:
                    o2 = base + b2 * bufsz
                    parts.append(mv[o2:o2 + l2])
                frames.append(b"".join(parts))
            refill.extend(b for b, _ in used[i:i + count])
            i += count
        q.rx_partial = used[i:]
        gpa = q.region.gpa
        for b in refill:
            q.rx.add_buf(gpa + base + b * bufsz, bufsz, b, writable=True)
        if refill and q.rx.publish():
            self._kick(q, q.rx_kick)
        q.stats.rx_frames += len(frames)
        q.stats.rx_bytes += sum(map(len, frames))
        return frames

    def recv(self, queue: int = 0, timeout: float = 1.0) -> list[bytes]:
        """Frames received on one queue; waits up to ``timeout`` for the first one."""
        q = self._queue(queue)
        deadline = time.monotonic() + timeout
        while True:
            frames = self._harvest_rx(q)
            if frames or not self._wait(q, q.rx, q.rx_call, deadline):
                return frames

    def recv_any(self, timeout: float = 1.0) -> list[tuple[int, bytes]]:
        """Frames from every queue as (queue, frame); waits up to ``timeout`` for any."""
        deadline = time.monotonic() + timeout
        while True:
            got = [(q.index, f) for q in self.queues for f in self._harvest_rx(q)]
            if got:
                return got
            for q in self.queues:
                q.rx.enable_interrupts()
            calls = {q.rx_call: q for q in self.queues}
            errs = {q.err: q for q in self.queues}
            if any(q.rx.has_used() for q in self.queues):
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            ready, _, _ = select.select([*calls, *errs], [], [], left)
            for fd in ready:
                if fd in errs:
                    raise IntegrityError(f"vhost-net queue {errs[fd].index}",
                                         "vhost signalled an error on the error eventfd")
                with contextlib.suppress(BlockingIOError):
                    calls[fd].stats.interrupts += int.from_bytes(os.read(fd, _EV), sys.byteorder)

    # -- stop / restart ------------------------------------------------------------------------
    def stop(self, queue: int = 0) -> tuple[int, int]:
        """Detach the backends and return (rx, tx) ring bases from VHOST_GET_VRING_BASE.

        Checked against what we harvested: vhost-net flushes its used entries when a backend
        is detached (vhost_net_stop_vq + flush), so the device's last_avail_idx must equal the
        used index we have seen; anything else means a frame would be lost or duplicated.
        """
        q = self._queue(queue)
        self._detach(q)
        bases = []
        for vq, ring in ((VHOST_NET_VQ_RX, q.rx), (VHOST_NET_VQ_TX, q.tx)):
            base = q.dev.get_vring_base(vq)
            if base != ring.used_idx:
                raise IntegrityError(f"stop(queue={queue}, vq={vq})",
                                     f"device consumed up to avail index {base} but its used "
                                     f"index is {ring.used_idx}")
            bases.append(base)
        return bases[0], bases[1]

    def start(self, queue: int = 0, bases: tuple[int, int] | None = None) -> None:
        """Re-attach a stopped queue pair, resuming from ``bases`` (from :meth:`stop`)."""
        q = self._queue(queue)
        if q.running:
            raise ValidationError(f"start(queue={queue})", "queue is running; stop it first")
        if bases is not None:
            q.dev.set_vring_base(VHOST_NET_VQ_RX, bases[0])
            q.dev.set_vring_base(VHOST_NET_VQ_TX, bases[1])
        self._start(q)
        q.stats.restarts += 1
        self._kick(q, q.tx_kick)

    # -- helpers -------------------------------------------------------------------------------
    def _queue(self, index: int) -> _Queue:
        if not 0 <= index < len(self.queues):
            raise ValidationError("datapath", f"queue {index}: have {len(self.queues)} queues")
        return self.queues[index]

    def stats(self) -> list[QueueStats]:
        return [q.stats for q in self.queues]

    @property
    def ifindex(self) -> int:
        return self.queues[0].tap.ifindex
