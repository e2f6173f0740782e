"""Soak: frames each way across 4 queue pairs, nothing lost, corrupted or reordered.

Frames carry (stream, sequence, CRC-32 of the payload) and random sizes; streams are checked
for exact sequence order (a TX stream is one queue; an RX stream is one flow, which tun's flow
hash keeps on one queue).  RX flows use other UDP ports than the TX streams: tun steers a flow
to the queue its frames last came from (tun_flow_update() in tun_get_user()) until that entry
ages out (TUN_FLOW_EXPIRE, 3 s), so a flow that had been a TX stream would move to its hash's
queue in the middle of the RX phase, and frames still waiting on the old queue would arrive
after newer ones.  Every 100,000 frames all queues are stopped (SET_BACKEND -1 +
GET_VRING_BASE checked against the used index) and restarted from the saved bases.  The error
eventfds are wired and any signal fails the run.  At the end the tap's own counters must
reconcile with what the rings counted.

Size: ``VHOSTCTL_SOAK_FRAMES`` per direction.  The default, 200,000, keeps CI (two kernels under
software emulation, where this loop moves a few thousand frames a second) inside its time
limit; the issue's million is ``scripts/vmtest --soak 1000000``.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

from vhostctl.datapath import Datapath, DatapathConfig
from vhostctl.selftest import host_socket

QUEUES = 4
RESTART_EVERY = 100_000
BATCH = 128
FLOWS = 16
MAGIC = b"SOAK"
# Ethernet (14) + IPv4 (20) + UDP (8), then MAGIC, stream u16, seq u32, crc u32.
_HDR = struct.Struct("!4sHII")
_AT = 42
_SRC, _DST = bytes.fromhex("fe00000000aa"), bytes.fromhex("fe00000000bb")


def soak_frames() -> int:
    return int(os.environ.get("VHOSTCTL_SOAK_FRAMES", "200000"))


class Streams:
    """Builds and checks the frames of many independent, ordered streams."""

    def __init__(self, seed: int, port: int) -> None:
        rnd = random.Random(seed)
        self.port = port  # UDP source port of stream 0
        self.pool = rnd.randbytes(1 << 16)
        self.sizes = [rnd.randrange(60, 1515) for _ in range(4096)]
        self.next_tx: dict[int, int] = {}
        self.next_rx: dict[int, int] = {}
        self.checked = 0

    def build(self, stream: int, count: int) -> list[bytes]:
        seq0 = self.next_tx.get(stream, 0)
        self.next_tx[stream] = seq0 + count
        out = []
        for seq in range(seq0, seq0 + count):
            size = self.sizes[(seq * 31 + stream) & 4095]
            body_len = size - _AT - _HDR.size
            off = (seq * 131) & 0x7FFF
            body = self.pool[off:off + body_len]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, seq & 0xFFFF, 0, 64, 17, 0,
                             b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02")
            udp = struct.pack("!HHHH", self.port + stream, 9, size - 34, 0)
            out.append(_DST + _SRC + b"\x08\x00" + ip + udp
                       + _HDR.pack(MAGIC, stream, seq, zlib.crc32(body)) + body)
        return out

    def check(self, frame: bytes) -> bool:
        """True for a soak frame that is intact and next in its stream; False for others."""
        if frame[_AT:_AT + 4] != MAGIC:
            return False
        _, stream, seq, crc = _HDR.unpack_from(frame, _AT)
        body = frame[_AT + _HDR.size:]
        if zlib.crc32(body) != crc:
            raise AssertionError(f"stream {stream} seq {seq}: payload corrupted")
        want = self.next_rx.get(stream, 0)
        if seq != want:
            raise AssertionError(f"stream {stream}: got seq {seq}, expected {want} "
                                 f"({'duplicate/reordered' if seq < want else 'lost frames'})")
        self.next_rx[stream] = want + 1
        self.checked += 1
        return True


def counters(tap: str) -> dict[str, int]:
    base = Path(f"/sys/class/net/{tap}/statistics")
    return {k: int((base / k).read_text()) for k in
            ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped", "rx_errors", "tx_errors")}


def restart_all(dp: Datapath) -> None:
    for q in range(len(dp.queues)):
        bases = dp.stop(q)
        dp.start(q, bases)


def test_soak_both_directions(ifname, no_fd_leak):
    total = soak_frames()
    per_queue = total // QUEUES
    cfg = DatapathConfig(queues=QUEUES, ring_size=256, tap_name=ifname)
    with Datapath(cfg) as dp:
        # Keep the kernel's own IPv6 ND/MLD off this tap so the counters are only ours.
        Path(f"/proc/sys/net/ipv6/conf/{dp.tap_name}/disable_ipv6").write_text("1")
        s = host_socket(dp.ifindex)
        s.settimeout(10)  # every wait below is bounded
        try:
            while dp.recv_any(timeout=0.3):
                pass
            c0 = counters(dp.tap_name)
            r0 = sum(x.rx_frames for x in dp.stats())
            # TX: queue q is stream q; the host socket must see each stream in order.
            tx = Streams(seed=1, port=2000)
            moved = 0
            while moved < per_queue * QUEUES:
                for q in range(QUEUES):
                    dp.send_all(tx.build(q, BATCH), queue=q, timeout=10)
                want = tx.checked + BATCH * QUEUES
                while tx.checked < want:
                    data, addr = s.recvfrom(65536)  # blocking: the socket has a timeout
                    if addr[2] != 4:
                        tx.check(data)
                moved += BATCH * QUEUES
                if moved % RESTART_EVERY < BATCH * QUEUES:
                    restart_all(dp)
            for q in range(QUEUES):
                dp.flush(q)
            # RX: FLOWS streams from the host; tun keeps a flow on one queue.
            rx = Streams(seed=2, port=3000)
            sent = 0
            while sent < per_queue * QUEUES:
                for flow in range(FLOWS):
                    for f in rx.build(flow, BATCH // FLOWS * 2):
                        s.send(f)
                sent += BATCH * 2
                want = sent
                while rx.checked < want:
                    got = dp.recv_any(timeout=10)
                    if not got:
                        raise AssertionError(f"RX stalled at {rx.checked} of {want} frames")
                    for _, f in got:
                        rx.check(f)
                if sent % RESTART_EVERY < BATCH * 2:
                    restart_all(dp)
            # Drain stragglers (the kernel's own IPv6 frames) so the counters settle.
            while dp.recv_any(timeout=0.5):
                pass
            c1 = counters(dp.tap_name)
        finally:
            s.close()
        stats = dp.stats()
    d = {k: c1[k] - c0[k] for k in c0}
    ring_tx = sum(x.tx_frames for x in stats)
    ring_rx = sum(x.rx_frames for x in stats) - r0
    assert tx.checked == ring_tx >= total, (tx.checked, ring_tx)
    assert rx.checked >= total
    assert d["rx_packets"] == ring_tx, f"tap received {d['rx_packets']}, rings sent {ring_tx}"
    assert d["tx_packets"] == ring_rx, f"tap sent {d['tx_packets']}, rings received {ring_rx}"
    assert d["tx_dropped"] == d["rx_dropped"] == d["rx_errors"] == d["tx_errors"] == 0, d
    assert sum(x.restarts for x in stats) >= QUEUES * (2 * total // RESTART_EVERY - 1)
