"""The in-kernel virtio-net datapath, stood up in our own process.

    our rings (guest memory)  <->  vhost-net.ko worker  <->  tap  <->  host network stack

Per queue pair: one tap queue fd, one ``/dev/vhost-net`` fd (vhost-net serves exactly one
RX/TX pair per fd), one memory region holding both rings and their buffers, and kick/call/err
eventfds.  Setup follows the order QEMU, DPDK and tools/virtio agree on (DESIGN.md §3):
SET_OWNER -> features -> MEM_TABLE -> per ring NUM, BASE, ADDR, KICK, CALL, ERR -> BACKEND.
Every step registers its undo on an ExitStack, so a failure anywhere unwinds in reverse order
and leaves no tap and no fd behind.

Both rings run in slot mode (:meth:`SplitVring.use_slots`): RX buffer ``i`` and TX frame slot
``i`` are pinned to descriptor ``i``, so a batch costs a few bulk operations, not Python work
per frame.  :meth:`Datapath.send`/:meth:`Datapath.recv` copy frames in and out;
:meth:`Datapath.resend`/:meth:`Datapath.rx_burst` are the zero-copy throughput path the
benchmark drives, with :meth:`Datapath.wait_tx`/:meth:`Datapath.wait_rx` sleeping once per
batch (delayed interrupts) instead of once per frame.

The virtio-net header (10 or 12 bytes, :func:`vnet_hdr_len`) precedes every frame in our
buffers.  Either the tap carries it (IFF_VNET_HDR with TUNSETVNETHDRSZ = header length:
``hdr_mode="tap"``) or vhost adds/strips it itself (VHOST_NET_F_VIRTIO_NET_HDR acked, tap
without vnet_hdr: ``hdr_mode="vhost"``).  A mismatch misframes every RX frame silently, which is
why both modes are tested for RX, not only TX.
"""

from __future__ import annotations

import contextlib
import itertools
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
from .netlink import validate_mac
from .tun import Tap, validate_ifname
from .vhost import VHOST_NET_VQ_RX, VHOST_NET_VQ_TX, VhostNet
from .vring import RingLayout, SplitVring

ETH_HLEN = 14  # include/uapi/linux/if_ether.h
VLAN_HLEN = 4
MIN_MTU, MAX_MTU = 68, 65521  # drivers/net/tun.c: MAX_MTU 65535 - (ETH_HLEN + VLAN_HLEN)
_EV = 8  # an eventfd counter is one u64
_ONE = (1).to_bytes(_EV, sys.byteorder)


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
    mac: str | None = None  # the tap's address, set before it goes UP (None: the kernel's)
    master: str | None = None  # a bridge to enslave the tap to, before it goes UP

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
        if self.mac is not None:
            validate_mac(self.mac)
        if self.master is not None:
            validate_ifname(self.master, op="bridge name")

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
    # Frame size per TX slot as load_tx() left them (None: send() has overwritten slots since);
    # tx_uniform is their common size, 0 when they differ.
    tx_sizes: list[int] | None = None
    tx_uniform: int = 0
    # RX buffers (slots, lens) of a frame whose last buffer was not in the used ring yet.
    rx_partial: tuple[list[int], list[int]] | None = None
    stats: QueueStats = field(default_factory=QueueStats)
    running: bool = False


def _err_signalled(q: _Queue) -> IntegrityError:
    return IntegrityError(f"vhost-net queue {q.index}", "vhost signalled an error on the error "
                          "eventfd (bad descriptor or address; see dmesg)")


def _short_header(op: str, length: int) -> IntegrityError:
    return IntegrityError(op, f"used length {length} is shorter than the header")


def _tx_stalled(timeout: float) -> WaitTimeout:
    return WaitTimeout("tx_pump", f"no TX completion for {timeout}s (vhost worker stuck? see "
                       "dmesg)")


class Datapath:
    """tap <-> vhost-net <-> our split virtqueues, N queue pairs; a context manager.

    ``send()`` puts frames on TX rings (the kernel writes them into the tap); ``recv()`` returns
    frames the kernel took from the tap and wrote into our RX rings.  Frames are bytes without
    the virtio-net header.
    """

    def __init__(self, config: DatapathConfig | None = None) -> None:
        self.config = config or DatapathConfig()
        self.config.validate()
        # Derived sizes, computed once: the per-batch paths read them (the config's are
        # properties recomputed from the feature bits on every access).
        self._hdr = self.config.hdr_len
        self._bufsz = self.config.rx_buffer
        self._maxf = self.config.max_frame
        self._mrg = self.config.mrg_rxbuf
        self.queues: list[_Queue] = []
        self.offered = 0
        self.tap_name = ""
        self._stack = contextlib.ExitStack()
        self._memory: GuestMemory | None = None
        self._tx_rings: list[SplitVring] = []
        self._rx_rings: list[SplitVring] = []
        self._tx_ep: select.epoll | None = None
        self._rx_ep: select.epoll | None = None
        self._by_fd: dict[int, _Queue] = {}

    # -- setup and teardown ----------------------------------------------------------------
    def open(self) -> Datapath:
        cfg = self.config
        try:
            taps = Tap.open_queues(cfg.tap_name, cfg.queues, vnet_hdr=cfg.hdr_mode == "tap",
                                   exclusive=True)
            for t in taps:
                self._stack.callback(t.close)
            self.tap_name = taps[0].name
            mem = self._memory = self._stack.enter_context(GuestMemory())
            for i, tap in enumerate(taps):
                self.queues.append(self._open_queue(i, tap, mem))
            self._configure_link()
            for q in self.queues:
                self._start(q)
            # What wait_tx/wait_rx sleep on, built once: they run once per batch, and an
            # epoll set costs one syscall per wait where select() rebuilds its fd sets.
            qs = self.queues
            self._tx_rings, self._rx_rings = [q.tx for q in qs], [q.rx for q in qs]
            errs = [q.err for q in qs]
            self._tx_ep = self._epoll([q.tx_call for q in qs] + errs)
            self._rx_ep = self._epoll([q.rx_call for q in qs] + errs)
            self._by_fd = {fd: q for q in qs for fd in (q.rx_call, q.tx_call, q.err)}
        except BaseException:
            self.close()
            raise
        return self

    def _epoll(self, fds: list[int]) -> select.epoll:
        """An epoll set (close-on-exec, as Python makes them) watching ``fds`` for input.

        Edge-triggered: every eventfd write is a new event (eventfd_signal wakes the waitqueue
        each time), so a wake-up needs no read() to re-arm; the count of signals stays in the
        eventfd until :meth:`collect_interrupts` reads it.
        """
        ep: select.epoll = _fd.call("epoll_create1", select.epoll)
        self._stack.callback(ep.close)
        for fd in fds:
            _fd.call("epoll_ctl(EPOLL_CTL_ADD)", ep.register, fd, select.EPOLLIN | select.EPOLLET)
        return ep

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

    def _open_queue(self, index: int, tap: Tap, mem: GuestMemory) -> _Queue:
        cfg, st = self.config, self._stack
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
                   rx_bufs, tx_slots, tx_slot)
        bufsz = cfg.rx_buffer
        rx.use_slots([(region.gpa + rx_bufs + b * bufsz, bufsz) for b in range(num)],
                     writable=True)
        rx.post(num)
        rx.publish()
        tx.use_slots([(region.gpa + tx_slots + s * tx_slot, tx_slot) for s in range(num)])
        # Nobody waits for TX completions unless the ring is full (_wait re-enables them).
        tx.disable_interrupts()
        # Registered last, so it runs first: backends go before the fds and memory they use.
        st.callback(self._detach, q)
        return q

    def _configure_link(self) -> None:
        """MTU, address, bridge, then UP through rtnetlink (a down tap drops what vhost sends
        it).  UP comes last so the link never carries traffic with the kernel's random
        address or outside its bridge."""
        from .netlink import Netlink

        cfg = self.config
        with Netlink() as nl:
            if cfg.mtu != 1500:
                nl.set_mtu(self.tap_name, cfg.mtu)
            if cfg.mac is not None:
                nl.wait_udev(self.tap_name)  # else udev may replace the address afterwards
                nl.set_mac(self.tap_name, cfg.mac)
            if cfg.master is not None:
                nl.set_master(self.tap_name, cfg.master)
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
        self._tx_rings, self._rx_rings, self._by_fd = [], [], {}
        self._tx_ep = self._rx_ep = None
        self._stack.close()
        self._memory = None

    def __enter__(self) -> Datapath:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- notifications -------------------------------------------------------------------------
    def _kick(self, q: _Queue, fd: int) -> None:
        _fd.call("write(kick eventfd)", os.write, fd, _ONE)
        q.stats.kicks += 1

    def _wait(self, q: _Queue, ring: SplitVring, call: int, deadline: float) -> bool:
        """Sleep until ``ring`` has completions or the deadline passes; False on timeout.

        Re-enables interrupts first and re-checks (a completion that landed before the
        device saw the re-enable is never signalled: virtqueue_enable_cb() contract).
        """
        try:
            return self._wait_enabled(q, ring, call, deadline)
        finally:
            if ring is q.tx:
                ring.disable_interrupts()

    def _wait_enabled(self, q: _Queue, ring: SplitVring, call: int, deadline: float) -> bool:
        if ring.enable_interrupts():
            return True
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ring.has_used()
            ready, _, _ = select.select([call, q.err], [], [], left)
            if q.err in ready:
                raise _err_signalled(q)
            if call in ready:
                with contextlib.suppress(BlockingIOError):
                    q.stats.interrupts += int.from_bytes(os.read(call, _EV), sys.byteorder)
                if ring.has_used():
                    return True

    # -- TX: our ring -> tap -------------------------------------------------------------------
    def _reclaim_tx(self, q: _Queue) -> None:
        q.tx.harvest_slots()

    def _put_tx(self, q: _Queue, slot: int, frame: bytes) -> int:
        """Copy one frame into a free TX slot behind a zero virtio-net header; its size."""
        size = len(frame)
        if not ETH_HLEN <= size <= self._maxf:
            raise ValidationError("send", f"frame of {size} bytes: must be "
                                  f"{ETH_HLEN}..{self._maxf} (MTU {self.config.mtu})")
        hdr = self._hdr
        off = q.tx_slots + slot * q.tx_slot
        q.mv[off + hdr:off + hdr + size] = frame  # the header stays zero: no offloads
        q.tx.set_len(slot, hdr + size)
        return size

    def send(self, frames: Iterable[bytes], queue: int = 0) -> int:
        """Queue as many frames as there are free TX slots; one kick per batch.

        Returns how many were queued; the caller retries the rest (see :meth:`send_all`).
        """
        q = self._queue(queue)
        tx = q.tx
        self._reclaim_tx(q)
        slots = tx.next_slots(tx.num_free)
        q.tx_sizes = None  # slots are overwritten: resend() needs load_tx() again
        n = nbytes = 0
        try:
            for frame in frames:
                if n == len(slots):
                    break
                nbytes += self._put_tx(q, slots[n], frame)
                n += 1
        finally:  # what was copied before a bad frame still goes out
            if n:
                tx.post(n)
                q.stats.tx_frames += n
                q.stats.tx_bytes += nbytes
                if tx.publish():
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

    def load_tx(self, frames: Sequence[bytes], queue: int = 0) -> None:
        """Write ``frames[i]`` into TX slot ``i``, one per slot, for :meth:`resend`.

        Needs an idle TX ring (:meth:`flush` first).
        """
        q = self._queue(queue)
        op = f"load_tx(queue={queue})"
        self._reclaim_tx(q)
        if q.tx.outstanding:
            raise ValidationError(op, f"{q.tx.outstanding} TX frames still in flight; flush() "
                                  "first")
        if len(frames) != q.tx.num:
            raise ValidationError(op, f"{len(frames)} frames for {q.tx.num} TX slots: one each")
        sizes = [self._put_tx(q, slot, f) for slot, f in enumerate(frames)]
        q.tx_sizes = sizes
        q.tx_uniform = sizes[0] if len(set(sizes)) == 1 else 0

    def resend(self, batch: int, queue: int = 0) -> int:
        """Hand loaded TX slots to vhost again as they are, whole batches only, in one go.

        The throughput path (a NIC driver's TX ring of prebuilt frames): reclaims completions,
        then posts as many whole batches of ``batch`` slots as are free with one avail-index
        update, and kicks only if vhost asked for it (EVENT_IDX).  Fewer than ``batch`` free:
        posts nothing and returns 0 (sleep in :meth:`wait_tx`), instead of trickling out the
        one or two slots that just completed.  The slots hold what :meth:`load_tx` wrote.
        """
        queues = self.queues
        q = queues[queue] if 0 <= queue < len(queues) else self._queue(queue)
        sizes = q.tx_sizes
        if sizes is None:
            raise ValidationError(f"resend(queue={queue})", "no frames loaded: load_tx() first")
        if batch <= 0:
            raise ValidationError(f"resend(queue={queue})", f"batch {batch}: at least 1")
        tx = q.tx
        tx.reclaim()
        n = tx.num_free // batch * batch
        if not n:
            return 0
        st = q.stats
        st.tx_bytes += n * q.tx_uniform if q.tx_uniform else sum(
            sizes[i] for i in tx.next_slots(n))
        tx.post(n)
        st.tx_frames += n
        if tx.publish():
            self._kick(q, q.tx_kick)
        return n

    def tx_pump(self, batch: int, cycles: int = 1, timeout: float = 5.0) -> int:
        """Re-post what :meth:`load_tx` left on every TX ring, ``cycles`` times; frames posted.

        The throughput loop of a NIC driver with prebuilt frames: each cycle takes the
        completions, posts every whole ``batch`` that fits (one avail-index update, a kick only
        when vhost asks), then sleeps until ~3/4 of the frames in flight are done.  One queue
        with frames of one size runs the ring's fused cycle (:meth:`SplitVring.pump`), the
        cycles driven from C (``itertools.islice``), so no Python runs between them; otherwise
        each cycle is :meth:`resend` per queue and one :meth:`wait_tx`.  Raises WaitTimeout
        when no completion comes for ``timeout`` seconds.
        """
        op = "tx_pump"
        if batch <= 0:
            raise ValidationError(op, f"batch {batch}: at least 1")
        if cycles < 0:
            raise ValidationError(op, f"cycles {cycles}: not negative")
        ep = self._tx_ep
        if ep is None:
            raise ValidationError(op, "the datapath is not open")
        for q in self.queues:
            if q.tx_sizes is None:
                raise ValidationError(f"{op}(queue={q.index})", "no frames loaded: load_tx() "
                                      "first")
            if batch > q.tx.num:
                raise ValidationError(op, f"batch {batch}: at most the ring size {q.tx.num}")
        q = self.queues[0]
        if len(self.queues) > 1 or not q.tx_uniform or not q.tx.event_idx:
            return sum(self._tx_cycle(batch, timeout) for _ in range(cycles))
        # maxevents: the set's two fds (call, err), so poll() sizes no 1023-entry buffer.
        poll, woken = ep.poll, [(q.tx_call, select.EPOLLIN)]

        def kick() -> None:
            self._kick(q, q.tx_kick)

        def sleep() -> None:
            woke = poll(timeout, 2)
            if woke != woken and not self._woke(woke):  # a timeout or the error eventfd
                raise _tx_stalled(timeout)

        n = sum(itertools.islice(q.tx.pump(batch, kick, sleep), cycles))
        st = q.stats
        st.tx_frames += n
        st.tx_bytes += n * q.tx_uniform
        return n

    def _tx_cycle(self, batch: int, timeout: float) -> int:
        moved = 0
        for i in range(len(self.queues)):
            moved += self.resend(batch, i)
        if not self.wait_tx(timeout) and not moved:
            raise _tx_stalled(timeout)
        return moved

    # -- RX: tap -> our ring -------------------------------------------------------------------
    def _rx_take(self, q: _Queue) -> tuple[list[int], list[int]]:
        """Harvested RX buffers, after those of a frame left incomplete last time."""
        ids, lens = q.rx.harvest_slots()
        if q.rx_partial:
            pids, plens = q.rx_partial
            q.rx_partial = None
            ids, lens = pids + ids, plens + lens
        return ids, lens

    def _rx_single(self, lens: list[int]) -> bool:
        """Does every buffer hold one whole frame?  Checked once per batch, not per frame.

        Without MRG_RXBUF always; with it, vhost fills a buffer before it starts the next, so
        a frame spans several only if its first buffer is full.
        """
        if self._mrg and max(lens) >= self._bufsz:
            return False
        if min(lens) < self._hdr:
            raise _short_header("recv", min(lens))
        return True

    def _rx_merge(self, q: _Queue, ids: list[int], lens: list[int]) -> tuple[list[bytes], int]:
        """Frames spread over several buffers (MRG_RXBUF): (frames, buffers consumed)."""
        hdr, bufsz, mv, base = self._hdr, self._bufsz, q.mv, q.rx_bufs
        frames: list[bytes] = []
        i, n = 0, len(ids)
        while i < n:
            off = base + ids[i] * bufsz
            # num_buffers, the u16 after virtio_net_hdr (virtio 1.2 §5.1.6.3.2).
            count = int.from_bytes(mv[off + 10:off + 12], "little")
            if not 1 <= count <= q.rx.num:
                raise IntegrityError(f"recv(queue={q.index})",
                                     f"num_buffers {count} in RX header is out of range")
            if i + count > n:
                break  # the rest of this frame's buffers is not in used yet
            if lens[i] < hdr:
                raise _short_header(f"recv(queue={q.index})", lens[i])
            parts = [mv[off + hdr:off + lens[i]]]
            for b2, l2 in zip(ids[i + 1:i + count], lens[i + 1:i + count], strict=True):
                o2 = base + b2 * bufsz
                parts.append(mv[o2:o2 + l2])
            frames.append(b"".join(parts))
            i += count
        return frames, i

    def _rx_refill(self, q: _Queue, ids: list[int], lens: list[int], done: int) -> None:
        """Give the first ``done`` buffers back in one post; keep the rest of a partial frame."""
        if done < len(ids):
            q.rx_partial = (ids[done:], lens[done:])
        if done:
            q.rx.post(done)
            if q.rx.publish():
                self._kick(q, q.rx_kick)

    def _harvest_rx(self, q: _Queue) -> list[bytes]:
        ids, lens = self._rx_take(q)
        if not ids:
            return []
        if self._rx_single(lens):
            hdr, bufsz, mv, base = self._hdr, self._bufsz, q.mv, q.rx_bufs
            frames = [bytes(mv[base + b * bufsz + hdr:base + b * bufsz + ln])
                      for b, ln in zip(ids, lens, strict=True)]
            done = len(ids)
        else:
            frames, done = self._rx_merge(q, ids, lens)
        self._rx_refill(q, ids, lens, done)
        q.stats.rx_frames += len(frames)
        q.stats.rx_bytes += sum(map(len, frames))
        return frames

    def rx_burst(self, queue: int = 0, sample_every: int = 0) -> tuple[int, int, list[bytes]]:
        """Count every frame waiting on one RX ring without copying it out; refill in bulk.

        The throughput path: returns ``(frames, bytes, samples)``, where ``samples`` are copies
        of every ``sample_every``-th frame of this queue (counted since open; 0 for none), so
        a caller can verify content without paying for every frame.
        """
        queues = self.queues
        q = queues[queue] if 0 <= queue < len(queues) else self._queue(queue)
        st = q.stats
        # Frames of one size, in order (the common case), are counted without listing them;
        # with MRG_RXBUF only if no buffer is full (a full one may start a longer frame).
        got = None if q.rx_partial else q.rx.harvest_uniform(
            self._bufsz - 1 if self._mrg else None)
        if got is not None:
            return self._rx_uniform(q, *got, sample_every)
        ids, lens = self._rx_take(q) if q.rx_partial else q.rx.harvest_slots()
        if not ids:
            return 0, 0, []
        if self._rx_single(lens):
            n = len(ids)
            hdr, bufsz, mv, base = self._hdr, self._bufsz, q.mv, q.rx_bufs
            nbytes = sum(lens) - n * hdr
            samples = []
            if sample_every > 0:
                first = -st.rx_frames % sample_every
                samples = [bytes(mv[base + b * bufsz + hdr:base + b * bufsz + ln])
                           for b, ln in zip(ids[first::sample_every], lens[first::sample_every],
                                            strict=True)]
            self._rx_repost(q, n)
        else:
            frames, done = self._rx_merge(q, ids, lens)
            self._rx_refill(q, ids, lens, done)
            n = len(frames)
            nbytes = sum(map(len, frames))
            samples = frames[-st.rx_frames % sample_every::sample_every] if sample_every > 0 else []
        st.rx_frames += n
        st.rx_bytes += nbytes
        return n, nbytes, samples

    def _rx_uniform(self, q: _Queue, first: int, n: int, length: int, sample_every: int
                    ) -> tuple[int, int, list[bytes]]:
        """:meth:`rx_burst` for ``n`` frames of ``length`` bytes (header included) in slots
        ``first``, ``first + 1``, ... (mod ring size)."""
        if not n:
            return 0, 0, []
        hdr = self._hdr
        if length < hdr:
            raise _short_header("recv", length)
        st = q.stats
        samples = []
        if sample_every > 0:
            bufsz, mv, base, mask = self._bufsz, q.mv, q.rx_bufs, q.rx.num - 1
            offs = [base + ((first + k) & mask) * bufsz
                    for k in range(-st.rx_frames % sample_every, n, sample_every)]
            samples = [bytes(mv[o + hdr:o + length]) for o in offs]
        self._rx_repost(q, n)
        nbytes = n * (length - hdr)
        st.rx_frames += n
        st.rx_bytes += nbytes
        return n, nbytes, samples

    def _rx_repost(self, q: _Queue, n: int) -> None:
        """The ``n`` buffers just harvested, back in one go (slot mode re-posts them in
        completion order)."""
        rx = q.rx
        rx.post(n)
        if rx.publish():
            self._kick(q, q.rx_kick)

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
                    raise _err_signalled(errs[fd])
                with contextlib.suppress(BlockingIOError):
                    calls[fd].stats.interrupts += int.from_bytes(os.read(fd, _EV), sys.byteorder)

    # -- batch waits for the throughput path --------------------------------------------------
    def suppress_interrupts(self) -> None:
        """Ask vhost not to signal any ring: the caller polls, or sleeps in wait_tx/wait_rx."""
        for q in self.queues:
            q.rx.disable_interrupts()
            q.tx.disable_interrupts()

    def wait_tx(self, timeout: float = 1.0) -> bool:
        """Sleep until ~3/4 of a TX ring's frames are done: one wake-up per few batches.

        For callers that keep TX rings full (:meth:`resend`); False on timeout.
        """
        return self._sleep(self._tx_rings, self._tx_ep, timeout)

    def wait_rx(self, timeout: float = 1.0, after: int = 1) -> bool:
        """Sleep until an RX ring holds ``after`` new buffers (one wake-up per burst).

        Returns at once, without a syscall, when they are already there.
        """
        return self._sleep(self._rx_rings, self._rx_ep, timeout, after)

    def _sleep(self, rings: list[SplitVring], ep: select.epoll | None, timeout: float,
               after: int | None = None) -> bool:
        """One epoll_wait over the call and error eventfds; interrupts off again afterwards.

        No clock is read (a syscall under emulation): a spurious wake-up returns True and
        the caller's loop looks at the rings again.
        """
        if ep is None:
            raise ValidationError("wait", "the datapath is not open")
        ready = False
        for ring in rings:
            ready = ring.enable_interrupts_delayed(after) or ready
        try:
            if not ready:
                ready = self._woke(ep.poll(timeout, 2 * len(rings)))  # call + err each
        finally:
            for ring in rings:
                ring.disable_interrupts()
        return ready

    def _woke(self, woke: list[tuple[int, int]]) -> bool:
        """What one epoll_wait returned: raise on an error eventfd; False on a timeout."""
        for fd, _ in woke:
            q = self._by_fd[fd]
            if fd == q.err:
                raise _err_signalled(q)
        return bool(woke)

    def collect_interrupts(self) -> None:
        """Add the call-eventfd counts nobody has read yet to the stats.

        The batch waits (:meth:`wait_tx`, :meth:`wait_rx`, :meth:`tx_pump`) leave the counts
        there, so ``stats().interrupts`` is exact after this call.
        """
        for q in self.queues:
            for call in (q.rx_call, q.tx_call):
                with contextlib.suppress(BlockingIOError):
                    q.stats.interrupts += int.from_bytes(os.read(call, _EV), sys.byteorder)

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
