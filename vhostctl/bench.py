"""``vhostctl bench``: what vhost-net buys a VM NIC on this host, measured.

Two I/O paths run the same workloads.  ``vhost``: our split virtqueues <-> vhost-net.ko <-> tap
(the datapath of :mod:`vhostctl.datapath`); the kernel's worker thread moves every frame.
``tap``: our process reads and writes the tap fd itself, one syscall per frame, which is what a
VMM without vhost does (QEMU's plain virtio-net path).  Per run: packets/s, Gbit/s (frame bytes,
no FCS or preamble), frames verified byte for byte, CPU per packet of the driving thread and of
the vhost workers, kicks and interrupts per packet.

Workloads, chosen so that the kernel, not Python, is what is measured:

- TX, ring -> vhost -> tap.  Frames are built once into the TX slots and re-posted
  (:meth:`Datapath.tx_pump`: one avail-index update and at most one kick per batch, one sleep
  per ~3/4 ring).  They are addressed to a foreign MAC, so the host stack drops them right
  after the tap (``ip_rcv``, PACKET_OTHERHOST).  A packet socket on the tap verifies them: its
  classic-BPF filter passes only frames whose id is a multiple of ``verify_every``, in the
  kernel, so the others are never cloned, and the sampled ones land in a mapped
  PACKET_RX_RING that is checked without a syscall (:class:`Sampler`).  The thread CPU spent
  on those checks is measured apart (``verify_us``): ``driver_us`` is the driver's own cost.
- RX, tap -> vhost -> ring, injected from the host side by :class:`Injector`: prebuilt linear
  frames on an AF_PACKET socket, a batch per ``sendmmsg(2)`` (through ctypes: Python has no
  ``sendmmsg``), no Python per frame.  A ``send()`` per frame would measure Python's call cost;
  an AF_PACKET TX ring (PACKET_MMAP) is one syscall too, but its page-backed skbs cost the kernel
  about twice as much per frame; a second tap queue does not help (frames written into a tap go
  up the host stack, not out of another queue).  At most ``window`` frames
  are in flight, below the tap's ``tx_queue_len``, so tun never drops.  The ring side harvests in
  bulk (:meth:`Datapath.rx_burst`) and sleeps once per burst (delayed interrupts).
- RR, request/response latency: one frame in flight, ring -> vhost -> tap -> packet socket,
  echoed back -> tap -> vhost -> ring; p50/p99/p99.9 of the round trip.

CPU is ``RUSAGE_THREAD`` of the driving thread: since Linux 6.4 the vhost workers are threads
of our own process, so process totals would include them.  Workers are found by name
(:func:`vhost_workers`) and read from ``schedstat`` (ns).  No clock is read on the hot paths (a
clock read is a syscall under emulation): a timer thread flips the phases (warm-up, measure,
stop) and the loops look at a flag.
"""

from __future__ import annotations

import array
import ctypes
import math
import mmap
import os
import platform
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import _fd
from ._uapi.socket import iovec, mmsghdr
from ._uapi.virtio_net import FEATURES
from .datapath import ETH_HLEN, VLAN_HLEN, Datapath, DatapathConfig
from .errors import IntegrityError, SyscallError, ValidationError, WaitTimeout
from .selftest import MAGIC, frame_head
from .tun import Tap

PATHS = ("vhost", "tap")
DIRECTIONS = ("tx", "rx", "rr")
DEFAULT_SIZES = (64, 512, 1514)
JUMBO_SIZE = 9000
MIN_SIZE = 60  # Ethernet minimum without FCS; our frames need 54
ZCOPYTX_PARAM = Path("/sys/module/vhost_net/parameters/experimental_zcopytx")
KTHREADD_PID = 2

# include/uapi/linux/if_packet.h, include/uapi/asm-generic/socket.h, include/uapi/linux/filter.h
SOL_PACKET = 263
PACKET_RX_RING, PACKET_STATISTICS, PACKET_VERSION = 5, 6, 10
TPACKET_V2 = 1
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE, as the u32 the kernel sees
BPF_LD_W_ABS, BPF_ALU_AND_K, BPF_JMP_JEQ_K, BPF_RET_K = 0x20, 0x54, 0x15, 0x06

_MAGIC_AT, _ID_AT = 42, 46  # Ethernet + IPv4 + UDP, then MAGIC, then the frame id (u32 BE)
_PATTERN = bytes(range(256)) * 2
_WAIT = 2.0  # seconds a frame may take under heavy emulation before we call it lost
_STALL = 10.0  # seconds without any progress before a run fails
_CYCLES = 16  # TX cycles per Datapath.tx_pump() call: between calls, the phase
_DRAIN_CALLS, _DRAIN_SAMPLES = 4, 256  # see _drain_calls()
# After an RX run: how long the rings must stay silent before the next run may start.  Frames
# counted as received include the kernel's own IPv6 ND/MLD (unsampled ones cannot be told
# apart), so "received == injected" can come a few frames early.
_QUIET = 0.3

Progress = Callable[[str, float], None]


# -- configuration -------------------------------------------------------------------------------

def _pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


@dataclass(frozen=True)
class BenchConfig:
    """One bench invocation: every path x direction x size is a run."""

    directions: tuple[str, ...] = ("tx", "rx")
    sizes: tuple[int, ...] = ()  # () -> DEFAULT_SIZES, plus 9000 with an MTU of 9000
    path: str = "vhost"  # "vhost", "tap" or "both"
    queues: int = 1
    duration: float = 2.0
    warmup: float = 0.5
    ring_size: int = 256
    batch: int = 64
    event_idx: bool = True
    busyloop_usec: int = 0
    mtu: int = 1500
    verify_every: int = 64
    tap_name: str = "vhbench%d"

    @property
    def frame_sizes(self) -> tuple[int, ...]:
        if self.sizes:
            return self.sizes
        return DEFAULT_SIZES + ((JUMBO_SIZE,) if self.mtu >= JUMBO_SIZE else ())

    @property
    def paths(self) -> tuple[str, ...]:
        return PATHS if self.path == "both" else (self.path,)

    def validate(self) -> None:
        op = "bench"
        if self.path not in (*PATHS, "both"):
            raise ValidationError(op, f"path {self.path!r}: 'vhost', 'tap' or 'both'")
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad or not self.directions:
            raise ValidationError(op, f"direction {','.join(bad) or '(none)'}: use "
                                  + ", ".join(DIRECTIONS))
        limit = self.mtu + ETH_HLEN
        for size in self.frame_sizes:
            if not MIN_SIZE <= size <= limit:
                raise ValidationError(op, f"frame size {size}: must be {MIN_SIZE}..{limit} "
                                      f"(MTU {self.mtu} + 14)",
                                      hint="--mtu 9000 for jumbo frames")
        if not self.duration > 0 or self.warmup < 0:
            raise ValidationError(op, "duration must be > 0 and warm-up >= 0 seconds")
        if not 1 <= self.batch <= self.ring_size:
            raise ValidationError(op, f"batch {self.batch}: must be 1..ring size "
                                  f"({self.ring_size})")
        if not _pow2(self.verify_every) or self.verify_every > self.ring_size:
            raise ValidationError(op, f"verify every {self.verify_every}: a power of two up to "
                                  f"the ring size ({self.ring_size})")
        self.datapath_config().validate()

    def datapath_config(self) -> DatapathConfig:
        """The datapath every vhost run uses: one RX buffer holds one whole frame."""
        hdr = 12
        rx = max(2048, -(-(hdr + self.mtu + ETH_HLEN + VLAN_HLEN) // 64) * 64)
        return DatapathConfig(queues=self.queues, ring_size=self.ring_size, mtu=self.mtu,
                              event_idx=self.event_idx, busyloop_usec=self.busyloop_usec,
                              rx_buf_size=rx, tap_name=self.tap_name)


# -- results ----------------------------------------------------------------------------------

@dataclass
class Latency:
    """Round-trip times of the RR workload, in microseconds."""

    count: int
    p50_us: float
    p99_us: float
    p999_us: float
    min_us: float
    mean_us: float
    max_us: float


@dataclass
class RunResult:
    """One path x direction x size.  Per-packet figures are over the measured window only."""

    path: str
    direction: str
    size: int
    queues: int
    seconds: float
    packets: int
    bytes: int
    pps: float
    gbps: float
    total_packets: int  # the whole run: warm-up, measured window and the drain at the end
    verified: int  # frames compared byte for byte and equal
    bad: int  # frames compared and different
    foreign: int  # frames that were not ours (the kernel's IPv6 ND/MLD on a fresh tap)
    lost: int  # injected (RX) or sent (RR) and never seen
    sample_drops: int  # TX samples the packet socket had no room for
    cpu_user_us: float  # per packet, driving thread
    cpu_sys_us: float
    verify_us: float  # per packet, the part of cpu_us spent checking TX samples (not driving)
    worker_us: float | None  # per packet, vhost worker threads (None on the tap path)
    workers: int
    kicks: float | None  # per packet
    interrupts: float | None
    latency: Latency | None = None

    @property
    def cpu_us(self) -> float:
        return self.cpu_user_us + self.cpu_sys_us

    @property
    def driver_us(self) -> float:
        """The driving thread's CPU per packet without the sample checks: the driver's cost."""
        return self.cpu_us - self.verify_us

    @property
    def total_cpu_us(self) -> float:
        """Driver plus worker: what the host pays per packet on this path."""
        return self.cpu_us + (self.worker_us or 0.0)


@dataclass
class Ratio:
    """vhost path against tap path for one direction and size (``--path both``)."""

    direction: str
    size: int
    pps: float | None  # vhost / tap packets per second
    cpu: float | None  # vhost / tap total CPU per packet
    p50: float | None  # vhost / tap median round trip (RR)


@dataclass
class BenchReport:
    kernel: str
    tap: str
    features: list[str]
    config: dict[str, Any]
    zcopytx: int | None
    runs: list[RunResult] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for run, out in zip(self.runs, d["runs"], strict=True):
            out["cpu_us"] = run.cpu_us
            out["driver_us"] = run.driver_us
            out["total_cpu_us"] = run.total_cpu_us
        d["ok"] = self.ok
        return d


# -- statistics ---------------------------------------------------------------------------------

def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in (0, 100])."""
    if not ordered:
        raise ValidationError("percentile", "no samples")
    if not 0 < p <= 100:
        raise ValidationError("percentile", f"p {p}: must be in (0, 100]")
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def latency_summary(samples_ns: Sequence[int]) -> Latency:
    """p50/p99/p99.9 (nearest rank), min, mean and max of round trips given in ns."""
    s = sorted(samples_ns)
    us = 1e-3
    return Latency(len(s), percentile(s, 50) * us, percentile(s, 99) * us,
                   percentile(s, 99.9) * us, s[0] * us, sum(s) / len(s) * us, s[-1] * us)


def ratios(runs: Sequence[RunResult]) -> list[Ratio]:
    """vhost/tap for every direction and size that ran on both paths."""
    by = {(r.path, r.direction, r.size): r for r in runs}
    out = []
    for r in runs:
        t = by.get(("tap", r.direction, r.size))
        if r.path != "vhost" or t is None:
            continue
        p50 = None
        if r.latency is not None and t.latency is not None and t.latency.p50_us:
            p50 = r.latency.p50_us / t.latency.p50_us
        out.append(Ratio(r.direction, r.size, r.pps / t.pps if t.pps else None,
                         r.total_cpu_us / t.total_cpu_us if t.total_cpu_us else None, p50))
    return out


# -- vhost worker threads -------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, ValueError):  # gone mid-scan, or not readable: skip it
        return ""


def _stat_fields(text: str) -> tuple[str, list[str]]:
    """``/proc/PID/stat``: (comm, fields after it).  comm may hold spaces and ')'."""
    lp, rp = text.find("("), text.rfind(")")
    if lp < 0 or rp < lp:
        return "", []
    return text[lp + 1:rp], text[rp + 1:].split()


def vhost_workers(pid: int, proc: str | Path = "/proc") -> list[Path]:
    """Directories under ``proc`` of the vhost worker threads serving process ``pid``.

    Named ``vhost-<pid>``: threads of the owner itself since Linux 6.4 (``PID/task/TID``),
    kernel threads with kthreadd as parent before (``/proc/TID``).  Both are looked for, so
    one binary works on either kernel; entries vanishing mid-scan are skipped.
    """
    root = Path(proc)
    name = f"vhost-{pid}"
    found = []
    task = root / str(pid) / "task"
    for tid in sorted(_listdir(task), key=_numeric):
        if _read(task / tid / "comm").strip() == name:
            found.append(task / tid)
    for entry in sorted(_listdir(root), key=_numeric):
        if not entry.isdigit() or entry == str(pid):
            continue
        comm, rest = _stat_fields(_read(root / entry / "stat"))
        if comm == name and len(rest) > 1 and rest[1] == str(KTHREADD_PID):
            found.append(root / entry)
    return found


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _numeric(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (-1, name)


def thread_cpu_ns(path: Path) -> int:
    """CPU time of one thread: ``schedstat`` (ns), else ``stat`` utime+stime (clock ticks).

    0 when the thread is gone.
    """
    sched = _read(path / "schedstat").split()
    if sched and sched[0].isdigit():
        return int(sched[0])
    _, rest = _stat_fields(_read(path / "stat"))
    if len(rest) > 12:
        return (int(rest[11]) + int(rest[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return 0


def zcopytx(param: Path = ZCOPYTX_PARAM) -> int | None:
    """vhost_net's ``experimental_zcopytx`` (zero-copy TX for large frames), if readable."""
    text = _read(param).strip()
    return int(text) if text.lstrip("-").isdigit() else None


# -- frames, host-side sockets -------------------------------------------------------------------

def bench_frame(ident: int, size: int) -> bytes:
    """An IPv4/UDP frame of ``size`` bytes to a foreign MAC, carrying ``ident``.

    The UDP source port follows ``ident`` so tun's flow hash spreads frames over queues; the
    filler is a rotation of 0..255 that depends on ``ident``, so a frame delivered into the
    wrong slot or truncated does not compare equal.
    """
    if size < MIN_SIZE:
        raise ValidationError("bench", f"frame size {size}: at least {MIN_SIZE}")
    head = frame_head(ident, size, ident)
    n = size - len(head)
    r = (ident * 7) & 0xFF
    fill = (_PATTERN[r:r + 256] * (n // 256 + 1))[:n]
    return head + fill


class Verifier:
    """Byte-for-byte check of sampled frames against the templates they were built from."""

    def __init__(self, templates: Sequence[bytes]) -> None:
        self.templates = templates
        self.known = frozenset(templates)
        self.ok = self.bad = self.foreign = 0

    def check(self, frame: bytes | bytearray) -> bool:
        """True if ``frame`` is one of ours and intact."""
        if frame[_MAGIC_AT:_ID_AT] != MAGIC:
            self.foreign += 1
            return False
        i = int.from_bytes(frame[_ID_AT:_ID_AT + 4], "big")
        if i < len(self.templates) and self.templates[i] == frame:
            self.ok += 1
            return True
        self.bad += 1
        return False


def sample_filter(every: int) -> bytes:
    """Classic BPF: pass our frames whose id is a multiple of ``every``, not our own sends."""
    insns = [
        (BPF_LD_W_ABS, 0, 0, _MAGIC_AT),
        (BPF_JMP_JEQ_K, 0, 6, int.from_bytes(MAGIC, "big")),
        (BPF_LD_W_ABS, 0, 0, _ID_AT),
        (BPF_ALU_AND_K, 0, 0, every - 1),
        (BPF_JMP_JEQ_K, 0, 3, 0),
        (BPF_LD_W_ABS, 0, 0, SKF_AD_PKTTYPE),
        (BPF_JMP_JEQ_K, 1, 0, PACKET_OUTGOING),
        (BPF_RET_K, 0, 0, 0x40000),
        (BPF_RET_K, 0, 0, 0),
    ]
    return b"".join(struct.pack("HBBI", *i) for i in insns)


def _filtered_socket(ifname: str, every: int,
                     ring: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """A packet socket on the tap passing only :func:`sample_filter`'s frames.

    ``ring`` sets up a PACKET_MMAP ring before the bind; bound last, with the filter in place,
    so nothing unfiltered queues up.
    """
    s = _fd.call("socket(AF_PACKET)", socket.socket, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        prog = ctypes.create_string_buffer(sample_filter(every))
        fprog = struct.pack("HxxxxxxQ", len(prog.raw) // 8, ctypes.addressof(prog))
        _fd.call("setsockopt(SO_ATTACH_FILTER)", s.setsockopt, socket.SOL_SOCKET,
                 SO_ATTACH_FILTER, fprog)
        _fd.call("setsockopt(SO_RCVBUFFORCE)", s.setsockopt, socket.SOL_SOCKET,
                 SO_RCVBUFFORCE, 32 << 20)
        if ring is not None:
            ring(s)
        _fd.call("bind(AF_PACKET)", s.bind, (ifname, ETH_P_ALL))
    except BaseException:
        s.close()
        raise
    return s


_R = TypeVar("_R", bound="_MappedRing")


class _MappedRing:
    """A packet socket with a PACKET_MMAP ring mapped here: closes views, mapping, socket."""

    _VIEWS: tuple[str, ...] = ()
    sock: socket.socket
    _mm: mmap.mmap | None = None

    def close(self) -> None:
        for name in self._VIEWS:
            view = getattr(self, name, None)
            if view is not None:
                view.release()
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self.sock.close()

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain_calls(every: int, per_call: int) -> int:
    """tx_pump() calls between two drains of the TX samples, taking ``per_call`` frames at most.

    Up to _DRAIN_CALLS, as long as at most _DRAIN_SAMPLES samples can be waiting, so the
    sample ring is no larger than with a drain per call.  Under emulation a drain costs about
    0.5 ms beyond its frames (first runs of its code after the TX cycles): the default run
    (1 queue, every 64th frame) drains every 64 cycles, not 16.
    """
    return max(1, min(_DRAIN_CALLS, _DRAIN_SAMPLES * every // per_call))


class Sampler(_MappedRing):
    """The host side of a TX run: sampled frames land in a PACKET_RX_RING mapped here.

    tpacket_rcv() copies every frame the filter passes into the next free frame of a
    TPACKET_V2 ring and flips its status to TP_STATUS_USER; :meth:`drain` checks the frames
    straight from the mapping and hands them back (TP_STATUS_KERNEL), so taking a sample costs
    no system call, where a ``recv()`` per frame cost the driver about as much as its whole
    ring work.  Status words are read before the frame they cover and written after it
    (program order; the vring module's memory-ordering notes apply).
    """

    _VIEWS = ("_u32", "_u16", "_mv")

    def __init__(self, ifname: str, every: int, frame_max: int, between: int) -> None:
        """``between``: at most how many frames go out between two drains (so none is lost)."""
        # tp_mac = TPACKET_ALIGN(TPACKET2_HDRLEN + 16) - ETH_HLEN (tpacket_rcv); 128 covers it.
        fsz = 1 << (128 + frame_max - 1).bit_length()
        block = max(mmap.PAGESIZE, fsz)
        n = max(512, 1 << (2 * between // every - 1).bit_length(), block // fsz)

        def ring(s: socket.socket) -> None:
            _fd.call("setsockopt(PACKET_VERSION)", s.setsockopt, SOL_PACKET, PACKET_VERSION,
                     TPACKET_V2)
            req = struct.pack("IIII", block, n * fsz // block, fsz, n)  # struct tpacket_req
            _fd.call("setsockopt(PACKET_RX_RING)", s.setsockopt, SOL_PACKET, PACKET_RX_RING,
                     req)

        self.sock = _filtered_socket(ifname, every, ring)
        try:
            self._mm = _fd.call("mmap(PACKET_RX_RING)", mmap.mmap, self.sock.fileno(), n * fsz,
                                mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.sock.close()
            raise
        self._map(self._mm, n, fsz)

    def _map(self, buf: Any, n: int, fsz: int) -> None:
        """Views on a ring of ``n`` frames of ``fsz`` bytes (a struct tpacket2_hdr at each)."""
        self._mv = memoryview(buf)
        self._u32 = self._mv.cast("I")
        self._u16 = self._mv.cast("H")
        # Per ring frame, from where drain() may start, twice over: (index, tp_status and
        # tp_snaplen as u32 indices, tp_mac as a u16 index, offset) of struct tpacket2_hdr
        # (tp_status u32 @0, tp_snaplen u32 @8, tp_mac u16 @12): no arithmetic per frame.
        self._frames = [(i, off >> 2, (off >> 2) + 2, (off >> 1) + 6, off)
                        for i, off in enumerate(range(0, n * fsz, fsz))] * 2
        self._n, self._cursor = n, 0

    def drain(self, verifier: Verifier) -> int:
        """Check every frame waiting in the ring and give it back; how many."""
        u32, u16, mv, n = self._u32, self._u16, self._mv, self._n
        known, check = verifier.known, verifier.check
        c = self._cursor
        checked = 0
        # One set lookup per frame (templates carry their id, so equal to one means equal to
        # its own); anything else goes through check(), which tells bad from foreign.
        for i, status, snaplen, mac, off in self._frames[c:c + n]:
            if not u32[status] & TP_STATUS_USER:
                got = (i - c) % n
                break
            at = off + u16[mac]
            if bytes(mv[at:at + u32[snaplen]]) not in known:
                check(bytes(mv[at:at + u32[snaplen]]))
                checked += 1
            u32[status] = TP_STATUS_KERNEL
        else:
            i, got = c, n  # the whole ring, once round
        verifier.ok += got - checked
        self._cursor = i
        return got

    def drops(self) -> int:
        """Frames that passed the filter but found the ring full (PACKET_STATISTICS)."""
        raw = _fd.call("getsockopt(PACKET_STATISTICS)", self.sock.getsockopt, SOL_PACKET,
                       PACKET_STATISTICS, 8)
        return int(struct.unpack("II", raw)[1])


class HostSocket:
    """A packet socket on the tap that receives and echoes frames (the RR runs)."""

    def __init__(self, ifname: str, every: int = 1) -> None:
        self.sock = _filtered_socket(ifname, every)

    def receive(self, timeout: float) -> bytes:
        """The next frame; WaitTimeout if none within ``timeout``."""
        if not select.select([self.sock], [], [], timeout)[0]:
            raise WaitTimeout("bench rr", f"no frame reached the tap within {timeout}s")
        return self.sock.recv(65536)

    def send(self, frame: bytes) -> None:
        _fd.call("send(AF_PACKET)", self.sock.send, frame)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HostSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Injector:
    """Host -> tap: linear frames sent by ``sendmmsg(2)``, one syscall per batch.

    ``frames`` (a power-of-two count) are copied once into one buffer, each with its iovec and
    message header; :meth:`send` hands the kernel the next ``count`` headers.  Measured in the
    VM, this moves about twice the frames of a PACKET_TX_RING (docs in the README): tpacket_snd
    builds each skb on the ring's pages (tpacket_fill_skb: page frags, a destructor that writes
    the status back), packet_snd one small linear skb that tun and vhost copy in one piece.
    QDISC_BYPASS bought nothing measurable, so frames take the tap's qdisc like anyone's.  The
    socket is bound with protocol 0, so it never receives anything.
    """

    def __init__(self, ifname: str, frames: Sequence[bytes]) -> None:
        n = len(frames)
        if not _pow2(n):
            raise ValidationError("injector", f"{n} frames: a power of two")
        self.sock = _fd.call("socket(AF_PACKET)", socket.socket, socket.AF_PACKET,
                             socket.SOCK_RAW, 0)
        try:
            _fd.call("bind(AF_PACKET)", self.sock.bind, (ifname, 0))
        except BaseException:
            self.sock.close()
            raise
        step = max(map(len, frames))
        self._buf = ctypes.create_string_buffer(n * step)
        self._iov = (iovec * n)()
        # Twice the headers, so that a batch that wraps around the frames is still one call.
        self._msgs = (mmsghdr * (2 * n))()
        base = ctypes.addressof(self._buf)
        for i, f in enumerate(frames):
            ctypes.memmove(base + i * step, f, len(f))
            self._iov[i].iov_base, self._iov[i].iov_len = base + i * step, len(f)
        for j in range(2 * n):
            self._msgs[j].msg_hdr.msg_iov = ctypes.addressof(self._iov[j % n])
            self._msgs[j].msg_hdr.msg_iovlen = 1
        self.frames = n
        self._at, self._size = ctypes.addressof(self._msgs), ctypes.sizeof(mmsghdr)
        self._cursor = 0

    def send(self, count: int) -> int:
        """Transmit the next ``count`` frames (at most all of them); how many went."""
        c = self._cursor
        k = _fd.sendmmsg(self.sock.fileno(), self._at + c * self._size, min(count, self.frames),
                         socket.MSG_DONTWAIT, op="sendmmsg(AF_PACKET)",
                         hint="tun's queue overflowed (ENOBUFS) or the tap went down")
        self._cursor = (c + k) % self.frames
        return k

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- measurement scaffolding ----------------------------------------------------------------------

WARMUP, MEASURE, STOP = 0, 1, 2


class Phases:
    """Warm-up -> measure -> stop, flipped by a timer thread: hot loops read a flag, no clock."""

    def __init__(self, warmup: float, duration: float, tick: float = 0.25) -> None:
        self.phase = WARMUP if warmup > 0 else MEASURE
        self.tick = False  # set every ``tick`` seconds; the loop clears it (progress)
        self.elapsed = 0.0
        self._marks = ((warmup, MEASURE), (warmup + duration, STOP))
        self._every = tick
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vhostctl-bench-clock",
                                        daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while self.phase != STOP:
            nxt = min(at for at, ph in self._marks if ph > self.phase)
            left = nxt - (time.monotonic() - start)
            if self._quit.wait(max(0.0, min(self._every, left))):
                return
            self.elapsed = time.monotonic() - start
            for at, ph in self._marks:
                if self.elapsed >= at and self.phase < ph:
                    self.phase = ph
            self.tick = True

    def __enter__(self) -> Phases:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._quit.set()
        self._thread.join()


@dataclass
class _Mark:
    t: float
    user: float
    sys: float
    worker_ns: int
    kicks: int
    irqs: int
    packets: int
    nbytes: int
    verify_ns: int


class _Run:
    """Counters and the two marks (start and end of the measured window) of one run."""

    def __init__(self, bench: _Bench, path: str, direction: str, size: int) -> None:
        self.bench, self.path, self.direction, self.size = bench, path, direction, size
        self.phases = Phases(bench.cfg.warmup, bench.cfg.duration)
        self.seen = WARMUP  # the phase step() last acted on: loops call it only on a change
        self.start: _Mark | None = None
        self.end: _Mark | None = None
        self.packets = self.nbytes = 0
        self.verify_ns = 0  # thread CPU spent in check(), not in driving
        # Where packets/bytes come from when the loop does not count them itself.
        self.counter: Callable[[], tuple[int, int]] | None = None
        self.lost = self.sample_drops = 0
        self.latencies: array.array[int] = array.array("q")

    def mark(self) -> _Mark:
        dp = self.bench.dp
        kicks = irqs = 0
        if dp is not None:
            dp.collect_interrupts()
            kicks = sum(s.kicks for s in dp.stats())
            irqs = sum(s.interrupts for s in dp.stats())
        if self.counter is not None:
            self.packets, self.nbytes = self.counter()
        ru = resource.getrusage(resource.RUSAGE_THREAD)
        worker = sum(thread_cpu_ns(w) for w in self.bench.workers)
        return _Mark(time.monotonic(), ru.ru_utime, ru.ru_stime, worker, kicks, irqs,
                     self.packets, self.nbytes, self.verify_ns)

    def check(self, sampler: Sampler, verifier: Verifier) -> None:
        """Drain the sampler, timing it (thread CPU), so it can be told apart from driving."""
        t = time.thread_time_ns()
        sampler.drain(verifier)
        self.verify_ns += time.thread_time_ns() - t

    def step(self) -> bool:
        """Between batches: phase changes and progress; False once it is time to stop."""
        ph = self.phases
        if ph.tick:
            ph.tick = False
            self.bench.report_progress(self, ph.elapsed)
        self.seen = phase = ph.phase
        if phase == MEASURE and self.start is None:
            self.start = self.mark()
        elif phase == STOP:
            if self.start is None:
                self.start = self.mark()
            self.end = self.mark()
            return False
        return True

    def result(self, verifier: Verifier, total: int) -> RunResult:
        a, b = self.start, self.end
        if a is None or b is None:
            raise IntegrityError("bench", "run ended before its measured window")
        pk = b.packets - a.packets
        secs = b.t - a.t
        per = 1e6 / pk if pk else 0.0
        vhost = self.path == "vhost"
        return RunResult(
            self.path, self.direction, self.size, self.bench.cfg.queues, secs, pk,
            b.nbytes - a.nbytes, pk / secs if secs > 0 else 0.0,
            (b.nbytes - a.nbytes) * 8 / secs / 1e9 if secs > 0 else 0.0, total,
            verifier.ok, verifier.bad, verifier.foreign, self.lost, self.sample_drops,
            (b.user - a.user) * per, (b.sys - a.sys) * per,
            (b.verify_ns - a.verify_ns) / 1e3 / pk if pk else 0.0,
            (b.worker_ns - a.worker_ns) / 1e3 / pk if vhost and pk else None,
            len(self.bench.workers) if vhost else 0,
            (b.kicks - a.kicks) / pk if vhost and pk else None,
            (b.irqs - a.irqs) / pk if vhost and pk else None,
            latency_summary(self.latencies) if self.latencies else None)


def _stalled(what: str) -> WaitTimeout:
    return WaitTimeout(f"bench {what}", f"no progress for {_STALL}s (vhost worker stuck? see "
                       "dmesg)")


# -- the bench ------------------------------------------------------------------------------------

class _Bench:
    """State shared by the runs of one invocation: config, datapath or taps, progress."""

    def __init__(self, cfg: BenchConfig, progress: Progress | None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.dp: Datapath | None = None
        self.taps: list[Tap] = []
        self.tap_name = ""
        self.workers: list[Path] = []
        self.window = 0
        plan = len(cfg.paths) * len(cfg.directions) * len(cfg.frame_sizes)
        self.plan, self.done = plan, 0

    def report_progress(self, run: _Run, elapsed: float) -> None:
        if self.progress is not None:
            c = self.cfg
            frac = min(1.0, elapsed / (c.warmup + c.duration))
            self.progress(f"{run.path} {run.direction} {run.size} B",
                          (self.done + frac) / self.plan)

    def set_window(self) -> None:
        """Frames in flight host -> ring: below tun's queue (tx_queue_len), so it never drops."""
        qlen = _read(Path("/sys/class/net", self.tap_name, "tx_queue_len")).strip()
        cap = int(qlen) if qlen.isdigit() else 500
        c = self.cfg
        self.window = max(1, min(2 * c.ring_size * c.queues, cap - c.batch))

    def inject_frames(self, size: int) -> list[bytes]:
        n = 1 << (self.window + self.cfg.batch).bit_length()
        return [bench_frame(i, size) for i in range(n)]

    # -- vhost path ------------------------------------------------------------------------------
    def tx_vhost(self, size: int) -> RunResult:
        dp, c = self.dp, self.cfg
        if dp is None:
            raise ValidationError("bench", "no datapath")
        num = c.ring_size
        templates = [bench_frame(i, size) for i in range(num * c.queues)]
        for q in range(c.queues):
            dp.flush(q)
            dp.load_tx(templates[q * num:(q + 1) * num], q)
        ver = Verifier(templates)
        run = _Run(self, "vhost", "tx", size)
        stats = dp.stats
        before = sum(s.tx_frames for s in stats())

        def counter() -> tuple[int, int]:
            n = sum(s.tx_frames for s in stats()) - before
            return n, n * size

        run.counter = counter
        # One cycle: reclaim + post every whole batch that fits (one avail-index update, a
        # kick only if vhost sleeps), then sleep until ~3/4 of the ring is done.  The phase
        # after every _CYCLES cycles (at most a ring per queue each), a drain of the samples
        # after every ``drain`` calls.
        pump, batch = dp.tx_pump, c.batch
        per_call = _CYCLES * num * c.queues
        drain = _drain_calls(c.verify_every, per_call)
        with Sampler(self.tap_name, c.verify_every, size, per_call * drain) as hs, run.phases:
            ph = run.phases
            calls = drain
            try:
                while True:
                    pump(batch, _CYCLES, _STALL)
                    calls -= 1
                    if not calls:
                        run.check(hs, ver)
                        calls = drain
                    if (ph.tick or ph.phase != run.seen) and not run.step():
                        break
            except WaitTimeout:
                raise _stalled("tx") from None
            for q in range(c.queues):
                dp.flush(q, timeout=_STALL)
            run.check(hs, ver)
            run.sample_drops = hs.drops()
        return run.result(ver, counter()[0])

    def rx_vhost(self, size: int) -> RunResult:
        dp, c = self.dp, self.cfg
        if dp is None:
            raise ValidationError("bench", "no datapath")
        frames = self.inject_frames(size)
        ver = Verifier(frames)
        run = _Run(self, "vhost", "rx", size)
        burst, every, queues = dp.rx_burst, c.verify_every, range(c.queues)
        window, batch, ring, nq = self.window, c.batch, c.ring_size, c.queues
        injected = received = lost = nbytes = 0
        dp.suppress_interrupts()
        self._quiet_rings(dp)
        wait_rx = dp.wait_rx
        with Injector(self.tap_name, frames) as inj, run.phases:
            ph, inject = run.phases, inj.send
            running = True
            idle = 0
            while True:
                if running and (ph.tick or ph.phase != run.seen):
                    running = run.step()
                out = injected - received - lost
                if not running and out <= 0:
                    break
                if running and (window - out >= batch or out <= 0):
                    injected += inject(window - max(out, 0))
                    out = injected - received - lost
                # A burst at a time: returns at once (no syscall) when it is already there.
                ready = out <= 0 or wait_rx(_WAIT, max(1, min(out // nq, ring) * 3 // 4))
                got = 0
                for q in queues:
                    n, b, samples = burst(q, every)
                    if n:
                        got += n
                        nbytes += b
                        for f in samples:
                            ver.check(f)
                if got:
                    received += got
                    run.packets, run.nbytes = received, nbytes
                    idle = 0
                elif not ready:
                    idle += 1
                    if not running or idle * _WAIT >= _STALL:
                        lost += injected - received - lost  # never coming
            received += self._quiet_rings(dp, ver, every)
        run.lost = lost
        return run.result(ver, received)

    def _quiet_rings(self, dp: Datapath, ver: Verifier | None = None, every: int = 0) -> int:
        """Take what is still arriving until the RX rings stay silent for a moment."""
        n = 0
        while True:
            for q in range(self.cfg.queues):
                k, _, samples = dp.rx_burst(q, every if ver else 0)
                n += k
                if ver:
                    for f in samples:
                        ver.check(f)
            if not dp.wait_rx(_QUIET, 1):
                return n

    def rr_vhost(self, size: int) -> RunResult:
        dp, c = self.dp, self.cfg
        if dp is None:
            raise ValidationError("bench", "no datapath")
        templates = [bench_frame(i, size) for i in range(c.ring_size)]
        mask = c.ring_size - 1
        dp.flush(0)
        ver = Verifier(templates)
        run = _Run(self, "vhost", "rr", size)
        queues = range(c.queues)
        dp.suppress_interrupts()
        self._quiet_rings(dp)
        lat = run.latencies
        clock = time.perf_counter_ns
        trips = 0
        with HostSocket(self.tap_name, 1) as hs, run.phases:
            prev = clock()
            while run.step():
                # One frame in flight: send() posts exactly one slot (resend() would post
                # every free slot again).
                if dp.send((templates[trips & mask],), 0) != 1:
                    raise IntegrityError("bench rr", "TX ring full with one frame in flight")
                trips += 1
                frame = hs.receive(_STALL)
                hs.send(frame)
                while not self._ring_frame(dp, queues, ver):
                    if not dp.wait_rx(_STALL, 1):
                        raise WaitTimeout("bench rr", f"echo not back in the ring within "
                                          f"{_STALL}s")
                now = clock()
                if run.start is not None:
                    lat.append(now - prev)
                    run.packets += 1
                    run.nbytes += size
                prev = now
        return run.result(ver, trips)

    @staticmethod
    def _ring_frame(dp: Datapath, queues: range, ver: Verifier) -> bool:
        """Harvest every RX ring; True once one of our frames was there (checked)."""
        mine = False
        for q in queues:
            for f in dp.rx_burst(q, 1)[2]:
                mine = ver.check(f) or mine
        return mine

    # -- tap path (the VMM reads and writes the tap itself) ------------------------------------
    def _tap_frames(self, size: int) -> tuple[list[bytes], list[bytes]]:
        """Templates by id, and the same with the zero virtio-net header a VMM writes."""
        templates = [bench_frame(i, size) for i in range(self.cfg.ring_size)]
        hdr = bytes(12)
        return templates, [hdr + t for t in templates]

    def tx_tap(self, size: int) -> RunResult:
        c = self.cfg
        templates, frames = self._tap_frames(size)
        cyc = frames * 2
        num, batch = len(frames), c.batch
        fds = [t.fileno() for t in self.taps]
        ver = Verifier(templates)
        run = _Run(self, "tap", "tx", size)
        write = os.write
        sent = i = 0
        with Sampler(self.tap_name, c.verify_every, size, batch * len(fds)) as hs, run.phases:
            try:
                while run.step():
                    for fd in fds:
                        for f in cyc[i:i + batch]:
                            write(fd, f)
                        sent += batch
                    i = (i + batch) % num
                    run.packets, run.nbytes = sent, sent * size
                    run.check(hs, ver)
            except OSError as e:
                raise SyscallError(f"write({self.tap_name})", e.errno or 0) from None
            run.check(hs, ver)
            run.sample_drops = hs.drops()
        return run.result(ver, sent)

    def rx_tap(self, size: int) -> RunResult:
        c = self.cfg
        frames = self.inject_frames(size)
        ver = Verifier(frames)
        run = _Run(self, "tap", "rx", size)
        fds = [t.fileno() for t in self.taps]
        for fd in fds:
            _fd.call("set O_NONBLOCK", os.set_blocking, fd, False)
        buf = bytearray(65536)
        bufs = [buf]
        readv, every, window, batch = os.readv, c.verify_every, self.window, c.batch
        injected = received = lost = nbytes = 0
        self._quiet_taps(fds, buf)
        with Injector(self.tap_name, frames) as inj, run.phases:
            ph = run.phases
            running = True
            idle = 0
            try:
                while True:
                    if running and (ph.tick or ph.phase != run.seen):
                        running = run.step()
                    out = injected - received - lost
                    if not running and out <= 0:
                        break
                    if running and (window - out >= batch or out <= 0):
                        injected += inj.send(window - max(out, 0))
                    got = 0
                    for fd in fds:
                        while True:
                            try:
                                n = readv(fd, bufs)
                            except BlockingIOError:
                                break
                            if not (received + got) % every:
                                ver.check(buf[12:n])
                            got += 1
                            nbytes += n - 12
                    if got:
                        received += got
                        run.packets, run.nbytes = received, nbytes
                        idle = 0
                    elif injected - received - lost > 0 and not select.select(fds, [], [],
                                                                             _WAIT)[0]:
                        idle += 1
                        if not running or idle * _WAIT >= _STALL:
                            lost += injected - received - lost
                received += self._quiet_taps(fds, buf, ver, every, received)
            except OSError as e:
                raise SyscallError(f"read({self.tap_name})", e.errno or 0) from None
        run.lost = lost
        return run.result(ver, received)

    @staticmethod
    def _quiet_taps(fds: list[int], buf: bytearray, ver: Verifier | None = None,
                    every: int = 1, seen: int = 0) -> int:
        """Read what is still arriving until the tap stays silent for a moment."""
        n = 0
        while True:
            for fd in fds:
                while True:
                    try:
                        got = os.readv(fd, [buf])
                    except BlockingIOError:
                        break
                    if ver is not None and not (seen + n) % every:
                        ver.check(buf[12:got])
                    n += 1
            if not select.select(fds, [], [], _QUIET)[0]:
                return n

    def rr_tap(self, size: int) -> RunResult:
        templates, frames = self._tap_frames(size)
        ver = Verifier(templates)
        run = _Run(self, "tap", "rr", size)
        fds = [t.fileno() for t in self.taps]
        for fd in fds:
            _fd.call("set O_NONBLOCK", os.set_blocking, fd, False)
        lat = run.latencies
        clock = time.perf_counter_ns
        buf = bytearray(65536)
        self._quiet_taps(fds, buf)
        k = trips = 0
        with HostSocket(self.tap_name, 1) as hs, run.phases:
            try:
                prev = clock()
                while run.step():
                    trips += 1
                    os.write(fds[0], frames[k])
                    k = (k + 1) % len(frames)
                    hs.send(hs.receive(_STALL))
                    while not self._tap_frame(fds, buf, ver):
                        if not select.select(fds, [], [], _STALL)[0]:
                            raise WaitTimeout("bench rr", f"echo not back on the tap within "
                                              f"{_STALL}s")
                    now = clock()
                    if run.start is not None:
                        lat.append(now - prev)
                        run.packets += 1
                        run.nbytes += len(templates[0])
                    prev = now
            except OSError as e:
                raise SyscallError(f"tap {self.tap_name}", e.errno or 0) from None
        return run.result(ver, trips)

    @staticmethod
    def _tap_frame(fds: list[int], buf: bytearray, ver: Verifier) -> bool:
        mine = False
        for fd in fds:
            while True:
                try:
                    n = os.readv(fd, [buf])
                except BlockingIOError:
                    break
                mine = ver.check(buf[12:n]) or mine
        return mine

    # -- driving ---------------------------------------------------------------------------------
    def run_path(self, path: str, report: BenchReport) -> None:
        c = self.cfg
        runners = {("vhost", "tx"): self.tx_vhost, ("vhost", "rx"): self.rx_vhost,
                   ("vhost", "rr"): self.rr_vhost, ("tap", "tx"): self.tx_tap,
                   ("tap", "rx"): self.rx_tap, ("tap", "rr"): self.rr_tap}
        for direction in c.directions:
            for size in c.frame_sizes:
                r = runners[path, direction](size)
                report.runs.append(r)
                report.problems.extend(_problems(r))
                self.done += 1

    def open_vhost(self) -> Datapath:
        dp = Datapath(self.cfg.datapath_config()).open()
        self.dp, self.tap_name = dp, dp.tap_name
        self.workers = vhost_workers(os.getpid())
        self.set_window()
        return dp

    def open_tap(self) -> list[Tap]:
        from .netlink import Netlink

        c = self.cfg
        taps = Tap.open_queues(c.tap_name, c.queues, vnet_hdr=True, exclusive=True)
        try:
            for t in taps:
                t.vnet_hdr_sz = 12
            with Netlink() as nl:
                if c.mtu != 1500:
                    nl.set_mtu(taps[0].name, c.mtu)
                nl.set_up(taps[0].name)
        except BaseException:
            for t in taps:
                t.close()
            raise
        self.taps, self.tap_name, self.workers = taps, taps[0].name, []
        self.set_window()
        return taps

    def close(self) -> None:
        if self.dp is not None:
            self.dp.close()
            self.dp = None
        for t in self.taps:
            t.close()
        self.taps = []


def _problems(r: RunResult) -> list[str]:
    where = f"{r.path} {r.direction} {r.size} B"
    out = []
    if r.bad:
        out.append(f"{where}: {r.bad} frames arrived corrupted")
    if r.lost:
        out.append(f"{where}: {r.lost} frames lost")
    if r.sample_drops:
        out.append(f"{where}: {r.sample_drops} sampled frames dropped by the verifying socket")
    if not r.total_packets:
        out.append(f"{where}: no frame went through")
    elif not r.verified:
        out.append(f"{where}: no frame could be verified")
    if r.path == "vhost" and r.direction != "rr" and not r.workers:
        out.append(f"{where}: no vhost worker thread found (CPU per packet unknown)")
    return out


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Run every path x direction x size of ``cfg``; taps and fds are gone afterwards.

    ``progress(label, fraction)`` is called from this thread a few times a second.
    """
    cfg.validate()
    dcfg = cfg.datapath_config()
    report = BenchReport(platform.release(), "", FEATURES.decode(dcfg.features),
                         {**asdict(cfg), "sizes": list(cfg.frame_sizes)}, zcopytx())
    bench = _Bench(cfg, progress)
    try:
        for path in cfg.paths:
            if path == "vhost":
                bench.open_vhost()
            else:
                bench.open_tap()
            report.tap = bench.tap_name
            bench.run_path(path, report)
            bench.close()
    finally:
        bench.close()
    report.ratios = ratios(report.runs)
    return report
