"""Prove the in-kernel datapath on this host: frames both ways through vhost-net, byte-exact.

The host side is an AF_PACKET socket bound to the datapath's tap: what a bridge or the stack
would see.  Frames are IPv4/UDP with per-flow source ports (so tun spreads them over queues),
a magic, a sequence number and deterministic filler, and are compared byte for byte.  The
kernel sends IPv6 ND/MLD out of a new tap on its own; those are recognised and ignored.
"""

from __future__ import annotations

import platform
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _fd
from ._uapi.if_tun import IFF_FLAGS, IFF_VNET_HDR
from ._uapi.virtio_net import FEATURES
from .datapath import Datapath, DatapathConfig
from .errors import ValidationError
from .vhost import VHOST_NET_VQ_RX, VHOST_NET_VQ_TX

MAGIC = b"VHCT"
PACKET_OUTGOING = 4  # include/uapi/linux/if_packet.h
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # include/uapi/asm-generic/socket.h
_SRC = bytes.fromhex("fe0000000001")
_DST = bytes.fromhex("fe0000000002")
_PAYLOAD_AT = 14 + 20 + 8  # Ethernet + IPv4 + UDP
MIN_FRAME = _PAYLOAD_AT + 12


def probe_frame(seq: int, size: int, flow: int = 0) -> bytes:
    """A valid-looking IPv4/UDP frame of exactly ``size`` bytes carrying ``seq``."""
    if size < MIN_FRAME:
        raise ValidationError("selftest", f"frame size {size}: at least {MIN_FRAME}")
    head = frame_head(seq, size, flow)
    fill = bytes((seq * 7 + i) & 0xFF for i in range(size - len(head)))
    return head + fill


def frame_head(seq: int, size: int, flow: int) -> bytes:
    """Ethernet + IPv4 + UDP headers for a ``size``-byte frame, then MAGIC, ``seq`` and
    ``size``: the part of a probe frame before its filler (the bench's frames share it).
    The UDP source port follows ``flow``, so tun's flow hash picks the queue."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, seq & 0xFFFF, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", 1024 + (flow & 0x7FFF), 4789, size - 34, 0)
    return _DST + _SRC + b"\x08\x00" + ip + udp + MAGIC + struct.pack("!II", seq, size)


def is_probe(frame: bytes) -> bool:
    return frame[_PAYLOAD_AT:_PAYLOAD_AT + 4] == MAGIC


def host_socket(ifindex: int) -> socket.socket:
    """AF_PACKET socket on the tap with buffers big enough for a burst of jumbo frames."""
    s = _fd.packet_socket(ifindex)
    try:
        _fd.call("setsockopt(SO_RCVBUFFORCE)", s.setsockopt, socket.SOL_SOCKET, SO_RCVBUFFORCE,
                 16 << 20)
        _fd.call("setsockopt(SO_SNDBUFFORCE)", s.setsockopt, socket.SOL_SOCKET, SO_SNDBUFFORCE,
                 16 << 20)
    except BaseException:
        s.close()
        raise
    return s


def host_receive(s: socket.socket, want: int, timeout: float) -> list[bytes]:
    """Probe frames that arrived on the tap from vhost (not our own outgoing ones)."""
    got: list[bytes] = []
    end = time.monotonic() + timeout
    while len(got) < want:
        left = end - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data, addr = s.recvfrom(65536)
        if addr[2] != PACKET_OUTGOING and is_probe(data):
            got.append(data)
    return got


def ring_receive(dp: Datapath, want: int, timeout: float) -> list[tuple[int, bytes]]:
    """Probe frames that arrived in our RX rings, as (queue, frame)."""
    got: list[tuple[int, bytes]] = []
    end = time.monotonic() + timeout
    while len(got) < want:
        left = end - time.monotonic()
        if left <= 0:
            break
        got.extend((q, f) for q, f in dp.recv_any(timeout=left) if is_probe(f))
    return got


@dataclass
class QueueResult:
    queue: int
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_verified: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_verified: int = 0
    seconds: float = 0.0
    # Read back from the kernel after setup, not copied from the config: TUNGETIFF's flags,
    # TUNGETVNETHDRSZ (None when the tap carries no header) and
    # VHOST_GET_VRING_BUSYLOOP_TIMEOUT of RX and TX.
    tap_flags: list[str] = field(default_factory=list)
    tap_vnet_hdr_sz: int | None = None
    busyloop_usec: list[int] = field(default_factory=list)


@dataclass
class SelftestReport:
    kernel: str
    tap: str
    features: list[str]
    hdr_len: int
    hdr_mode: str
    frames_per_queue: int
    sizes: list[int]
    queues: list[QueueResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # VHOST_GET_FEATURES: what this kernel offers.  vhost-net has no query for the acked set
    # (vhost_net_ioctl answers VHOST_GET_FEATURES with VHOST_NET_FEATURES), so ``features``
    # is what VHOST_SET_FEATURES accepted.
    offered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def run_selftest(config: DatapathConfig, frames: int = 256, sizes: Sequence[int] = (60, 512, 1514),
                 timeout: float = 10.0) -> SelftestReport:
    """Stand up the datapath, push ``frames`` each way per queue, verify, tear down."""
    config.validate()  # first: a bad MTU must be named as such, not as a frame size
    if frames < 1:
        raise ValidationError("selftest", f"--frames {frames}: at least 1")
    limit = config.mtu + 14
    for size in sizes:
        if not MIN_FRAME <= size <= limit:
            raise ValidationError("selftest", f"frame size {size}: must be {MIN_FRAME}..{limit} "
                                  f"(MTU {config.mtu} + 14)")
    sizes = list(sizes)
    with Datapath(config) as dp:
        report = SelftestReport(platform.release(), dp.tap_name,
                                FEATURES.decode(config.features), config.hdr_len,
                                config.hdr_mode, frames, sizes,
                                offered=FEATURES.decode(dp.offered))
        s = host_socket(dp.ifindex)
        try:
            for q in dp.queues:
                res = _tx_queue(dp, s, q.index, frames, sizes, timeout, report)
                _read_back(dp, res, report)
                report.queues.append(res)
            _rx_all(dp, s, frames, sizes, timeout, report)
        finally:
            s.close()
    return report


def _tx_queue(dp: Datapath, s: socket.socket, qi: int, count: int, sizes: list[int],
              timeout: float, report: SelftestReport) -> QueueResult:
    res = QueueResult(qi)
    sent = [probe_frame(i, sizes[i % len(sizes)], flow=qi) for i in range(count)]
    t0 = time.monotonic()
    dp.send_all(sent, queue=qi, timeout=timeout)
    got = host_receive(s, count, timeout)
    res.seconds = time.monotonic() - t0
    res.tx_frames, res.tx_bytes = len(sent), sum(map(len, sent))
    res.tx_verified = sum(a == b for a, b in zip(got, sent, strict=False))
    if len(got) != count:
        report.problems.append(f"queue {qi} TX: {len(got)} of {count} frames reached the tap")
    elif res.tx_verified != count:
        report.problems.append(f"queue {qi} TX: {count - res.tx_verified} frames corrupted "
                               "or out of order")
    return res


def _read_back(dp: Datapath, res: QueueResult, report: SelftestReport) -> None:
    """What the kernel holds for one queue pair, and a problem where it is not what we set."""
    q = dp.queues[res.queue]
    flags = q.tap.refresh()
    res.tap_flags = IFF_FLAGS.decode(flags)
    cfg = dp.config
    if flags & IFF_VNET_HDR:
        res.tap_vnet_hdr_sz = q.tap.vnet_hdr_sz
    want_sz = cfg.hdr_len if cfg.hdr_mode == "tap" else None
    if res.tap_vnet_hdr_sz != want_sz:
        report.problems.append(f"queue {res.queue}: the tap's vnet header is "
                               f"{res.tap_vnet_hdr_sz} bytes, {want_sz} were set")
    res.busyloop_usec = [q.dev.get_vring_busyloop_timeout(vq) for vq in (VHOST_NET_VQ_RX,
                                                                  VHOST_NET_VQ_TX)]
    if res.busyloop_usec != [cfg.busyloop_usec] * 2:
        report.problems.append(f"queue {res.queue}: busy-poll timeouts {res.busyloop_usec} "
                               f"µs, {cfg.busyloop_usec} was set")


def _rx_all(dp: Datapath, s: socket.socket, count: int, sizes: list[int], timeout: float,
            report: SelftestReport) -> None:
    """Host -> rings: tun picks the queue by flow hash, so verify the union over queues."""
    total = count * len(dp.queues)
    sent = [probe_frame(i, sizes[i % len(sizes)], flow=i) for i in range(total)]
    expected = {f[_PAYLOAD_AT + 4:_PAYLOAD_AT + 8]: f for f in sent}
    t0 = time.monotonic()
    for f in sent:
        _fd.call("send(AF_PACKET)", s.send, f)
    got = ring_receive(dp, total, timeout)
    took = time.monotonic() - t0
    seen: set[bytes] = set()
    for qi, f in got:
        r = report.queues[qi]
        r.rx_frames += 1
        r.rx_bytes += len(f)
        key = f[_PAYLOAD_AT + 4:_PAYLOAD_AT + 8]
        if expected.get(key) == f and key not in seen:
            r.rx_verified += 1
        seen.add(key)
    for r in report.queues:
        r.seconds += took / len(report.queues)
    verified = sum(r.rx_verified for r in report.queues)
    if len(got) != total:
        report.problems.append(f"RX: {len(got)} of {total} frames reached the rings")
    elif verified != total:
        report.problems.append(f"RX: {total - verified} frames corrupted or duplicated")
