"""The datapath end to end on the real kernel: tap <-> vhost-net.ko <-> our rings, byte-exact.

Frames carry a magic, a sequence number and deterministic filler; an AF_PACKET socket on the
tap is the host-side peer (what a bridge or the stack would see).  The kernel itself sends
IPv6 ND/MLD out of a fresh tap, so both directions filter on our magic.
"""

from __future__ import annotations

import os
import select
import socket
import struct

import pytest

from tests.kernel.conftest import link_exists
from vhostctl import _fd
from vhostctl.datapath import Datapath, DatapathConfig

MAGIC = b"VHCT"
PACKET_OUTGOING = 4
SRC = bytes.fromhex("fe0000000001")
DST = bytes.fromhex("fe0000000002")


def frame(seq: int, size: int, flow: int = 0) -> bytes:
    """An IPv4/UDP frame (so tun's flow hash spreads queues) with a checkable payload."""
    head = DST + SRC + b"\x08\x00"
    udp_len = size - 14 - 20
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, seq & 0xFFFF, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", 1024 + flow, 4789, udp_len, 0)
    body = MAGIC + struct.pack("!II", seq, size)
    fill = bytes((seq * 7 + i) & 0xFF for i in range(size - len(head) - 28 - len(body)))
    out = head + ip + udp + body + fill
    if len(out) != size:
        raise ValueError(size)
    return out


def is_ours(f: bytes) -> bool:
    return f[42:46] == MAGIC


def seq_of(f: bytes) -> int:
    return struct.unpack_from("!I", f, 46)[0]


SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # include/uapi/asm-generic/socket.h


def host_socket(ifindex: int) -> socket.socket:
    s = _fd.packet_socket(ifindex)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 16 << 20)
    except BaseException:
        s.close()
        raise
    return s


def host_collect(s: socket.socket, want: int, timeout: float = 10.0) -> list[bytes]:
    """Our frames arriving on the tap from vhost (not our own outgoing ones)."""
    got: list[bytes] = []
    end = _now() + timeout
    while len(got) < want:
        left = end - _now()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data, addr = s.recvfrom(65536)
        if addr[2] != PACKET_OUTGOING and is_ours(data):
            got.append(data)
    return got


def _now() -> float:
    import time

    return time.monotonic()


def ring_collect(dp: Datapath, want: int, timeout: float = 10.0) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    end = _now() + timeout
    while len(got) < want and _now() < end:
        got.extend((q, f) for q, f in dp.recv_any(timeout=max(0.0, end - _now())) if is_ours(f))
    return got


SIZES = [60, 64, 128, 512, 1000, 1514]


def roundtrip(dp: Datapath, sizes: list[int], count: int) -> None:
    """TX on every queue, then RX from the host side; every frame exactly once, byte-exact."""
    s = host_socket(dp.ifindex)
    try:
        for qi in range(len(dp.queues)):
            frames = [frame(i, sizes[i % len(sizes)], flow=qi) for i in range(count)]
            dp.send_all(frames, queue=qi)
            got = host_collect(s, count)
            assert got == frames, f"TX queue {qi}: {len(got)}/{count} frames arrived intact"
        sent = [frame(i, sizes[i % len(sizes)], flow=i) for i in range(count)]
        for f in sent:
            s.send(f)
        got = ring_collect(dp, count)
        assert sorted(f for _, f in got) == sorted(sent), \
            f"RX: {len(got)}/{count} frames, intact={sum(f in sent for _, f in got)}"
        by_queue = {}
        for q, f in got:
            by_queue.setdefault(q, []).append(seq_of(f))
        for q, seqs in by_queue.items():  # within one flow and one queue, order is kept
            assert len(seqs) == len(set(seqs)), f"duplicates on queue {q}"
    finally:
        s.close()


@pytest.mark.parametrize("queues", [1, 2, 4])
def test_both_directions_byte_exact(ifname, no_fd_leak, queues):
    cfg = DatapathConfig(queues=queues, tap_name=ifname)
    with Datapath(cfg) as dp:
        assert dp.tap_name == ifname
        roundtrip(dp, SIZES, 64)
        st = dp.stats()
        assert sum(x.tx_frames for x in st) == 64 * queues
    assert not link_exists(ifname)


def test_multiqueue_rx_spreads_over_queues(ifname, no_fd_leak):
    with Datapath(DatapathConfig(queues=4, tap_name=ifname)) as dp:
        s = host_socket(dp.ifindex)
        try:
            sent = [frame(i, 128, flow=i) for i in range(256)]
            for f in sent:
                s.send(f)
            got = ring_collect(dp, len(sent))
        finally:
            s.close()
    assert sorted(f for _, f in got) == sorted(sent)
    assert len({q for q, _ in got}) > 1, "tun's flow hash should use more than one queue"


@pytest.mark.parametrize(
    "opts",
    [
        dict(event_idx=False),
        dict(mrg_rxbuf=False),
        dict(mrg_rxbuf=False, version_1=False),
        dict(hdr_mode="vhost"),
        dict(hdr_mode="vhost", mrg_rxbuf=False, version_1=False),
        dict(indirect_desc=True, ring_size=64),
        dict(ring_size=1024, busyloop_usec=50),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_feature_and_header_modes(ifname, no_fd_leak, opts):
    with Datapath(DatapathConfig(tap_name=ifname, **opts)) as dp:
        roundtrip(dp, SIZES, 48)


def test_mrg_rxbuf_with_buffers_smaller_than_the_frame(ifname, no_fd_leak):
    with Datapath(DatapathConfig(tap_name=ifname, rx_buf_size=256)) as dp:
        roundtrip(dp, [60, 255, 256, 300, 1000, 1514], 48)


def test_jumbo_frames_mtu_9000(ifname, no_fd_leak):
    for mrg in (True, False):
        cfg = DatapathConfig(tap_name=ifname, mtu=9000, mrg_rxbuf=mrg, ring_size=128)
        with Datapath(cfg) as dp:
            roundtrip(dp, [60, 1514, 4000, 9014], 16)


def test_stop_restart_mid_stream_loses_and_duplicates_nothing(ifname, no_fd_leak):
    with Datapath(DatapathConfig(tap_name=ifname, ring_size=64)) as dp:
        s = host_socket(dp.ifindex)
        try:
            tx = [frame(i, 200) for i in range(300)]
            rx = [frame(1000 + i, 200) for i in range(300)]
            got_tx: list[bytes] = []
            got_rx: list[bytes] = []
            for chunk in range(0, 300, 100):
                dp.send_all(tx[chunk:chunk + 100])
                for f in rx[chunk:chunk + 100]:
                    s.send(f)
                # stop with frames possibly still queued on both sides, then resume
                bases = dp.stop()
                dp.start(bases=bases)
                got_tx += host_collect(s, 100)
                got_rx += [f for _, f in ring_collect(dp, 100)]
            dp.flush()
        finally:
            s.close()
        assert got_tx == tx, "TX across restarts: lost, duplicated or reordered"
        assert got_rx == rx, "RX across restarts: lost, duplicated or reordered"
        assert dp.stats()[0].restarts == 3


def test_failure_at_every_setup_step_leaves_nothing(ifname):
    """Fail the n-th kernel call of Datapath.open() for every n: no tap, no fd left."""
    before = {int(x) for x in os.listdir("/proc/self/fd")}
    n = 0
    while True:
        n += 1
        _fd.faults.arm(n)
        try:
            with Datapath(DatapathConfig(tap_name=ifname, queues=2)):
                pass
        except OSError as e:
            assert "injected" in str(e) or e.errno == 5, e
        else:
            break
        finally:
            _fd.faults.disarm()
        assert not link_exists(ifname), f"tap left behind after failing call {n}"
        assert {int(x) for x in os.listdir("/proc/self/fd")} == before, f"fd leak at call {n}"
        assert n < 500
    assert n > 30, f"only {n} calls: the datapath setup should pass through _fd"
