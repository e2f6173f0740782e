"""The datapath's checkers, made to fail on the real kernel: a checker that never failed proves
nothing.

Faults are put in by the test, on our side of the rings, while vhost-net.ko does the real work:
a byte flipped in a TX buffer after the frame was copied in (vhost sends the corrupted frame), a
byte flipped in an RX buffer the kernel filled, a completion dropped or taken twice by the
driver, the used index moved so it no longer matches what the device consumed.  Each test
asserts that selftest, bench or ``Datapath.stop()`` fails, and with which message; the
neighbouring test without the fault passes, so the message is the fault's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vhostctl import bench as B
from vhostctl.datapath import Datapath, DatapathConfig
from vhostctl.errors import IntegrityError
from vhostctl.selftest import host_receive, host_socket, is_probe, probe_frame, run_selftest

TIMEOUT = 10.0
FLIP_AT = 56  # a filler byte of every probe/bench frame (payload header ends at 54)


def flip(mv: memoryview, at: int) -> None:
    mv[at] ^= 0xFF


def used_idx_shift(dp: Datapath, queue: int, vq: int, delta: int) -> None:
    """Move ``used->idx`` in our memory by ``delta``, as if the device had written one used
    entry more (duplicated) or one fewer (dropped) than it consumed."""
    q = dp.queues[queue]
    ring = q.rx if vq == 0 else q.tx
    at = ring.layout.used + 2  # struct vring_used { __virtio16 flags; __virtio16 idx; ... }
    old = int.from_bytes(q.mv[at:at + 2], "little")
    q.mv[at:at + 2] = ((old + delta) & 0xFFFF).to_bytes(2, "little")


@pytest.fixture
def no_ipv6():
    """New links without IPv6: the kernel's own ND/MLD frames out of a fresh tap would land in
    the RX ring at any moment, and vhost rewrites used->idx from its own count when one does."""
    knob = Path("/proc/sys/net/ipv6/conf/default/disable_ipv6")
    if not knob.exists():
        yield
        return
    old = knob.read_text()
    knob.write_text("1")
    try:
        yield
    finally:
        knob.write_text(old)


def quiet(dp: Datapath) -> None:
    """Traffic both ways, then nothing in flight: every completion harvested."""
    s = host_socket(dp.ifindex)
    try:
        frames = [probe_frame(i, 200) for i in range(20)]
        dp.send_all(frames)
        assert host_receive(s, 20, TIMEOUT) == frames
        dp.flush()
        for f in frames:
            s.send(f)
        got: list[bytes] = []
        for _ in range(50):
            got += [f for f in dp.recv(timeout=1.0) if is_probe(f)]
            if len(got) >= 20:
                break
        assert got == frames
    finally:
        s.close()


# -- Datapath.stop(): the device's ring base against the used index -------------------------------

def test_stop_mid_stream_without_a_fault_passes(ifname, no_fd_leak, no_ipv6):
    with Datapath(DatapathConfig(tap_name=ifname, ring_size=64)) as dp:
        quiet(dp)
        s = host_socket(dp.ifindex)
        try:
            frames = [probe_frame(i, 300) for i in range(200)]
            n = dp.send(frames)  # a full ring, vhost still at it
            assert n == 64
            rx, tx = dp.stop()
            assert tx == dp.queues[0].tx.used_idx and rx == dp.queues[0].rx.used_idx
            dp.start(bases=(rx, tx))
            dp.send_all(frames[n:])
            got = host_receive(s, 200, TIMEOUT)
        finally:
            s.close()
        assert got == frames


@pytest.mark.parametrize("vq", [0, 1], ids=["rx", "tx"])
@pytest.mark.parametrize("delta, what", [(1, "duplicated"), (-1, "dropped")])
def test_stop_fails_when_the_used_index_disagrees_with_the_device(ifname, no_fd_leak, no_ipv6,
                                                                  vq, delta, what):
    with Datapath(DatapathConfig(tap_name=ifname, ring_size=64)) as dp:
        quiet(dp)
        used_idx_shift(dp, 0, vq, delta)
        with pytest.raises(IntegrityError) as e:
            dp.stop()
    msg = str(e.value)
    m = re.search(rf"stop\(queue=0, vq={vq}\).*device consumed up to avail index (\d+) but "
                  r"its used index is (\d+)", msg)
    assert m, (what, msg)
    assert (int(m[2]) - int(m[1])) & 0xFFFF == delta & 0xFFFF, (what, msg)


# -- selftest ---------------------------------------------------------------------------------

def test_selftest_reports_what_the_kernel_holds(ifname, no_fd_leak):
    rep = run_selftest(DatapathConfig(tap_name=ifname, queues=2, busyloop_usec=25), frames=16)
    assert rep.ok, rep.problems
    assert "VIRTIO_F_VERSION_1" in rep.offered and "VIRTIO_NET_F_MRG_RXBUF" in rep.offered
    for q in rep.queues:
        assert {"IFF_TAP", "IFF_NO_PI", "IFF_VNET_HDR", "IFF_MULTI_QUEUE"} <= set(q.tap_flags)
        assert q.tap_vnet_hdr_sz == 12  # VERSION_1: virtio_net_hdr_mrg_rxbuf
        assert q.busyloop_usec == [25, 25]
    vh = run_selftest(DatapathConfig(tap_name=ifname, hdr_mode="vhost"), frames=8)
    assert vh.ok, vh.problems
    assert "IFF_VNET_HDR" not in vh.queues[0].tap_flags and vh.queues[0].tap_vnet_hdr_sz is None
    assert vh.queues[0].busyloop_usec == [0, 0]


def corrupt_tx(monkeypatch, seq: int) -> None:
    """Flip a byte of the TX frame carrying ``seq`` in its slot, after send() copied it in."""
    real = Datapath._put_tx

    def put(self, q, slot, frame):
        size = real(self, q, slot, frame)
        if is_probe(frame) and frame[46:50] == seq.to_bytes(4, "big"):
            flip(q.mv, q.tx_slots + slot * q.tx_slot + self._hdr + FLIP_AT)
        return size

    monkeypatch.setattr(Datapath, "_put_tx", put)


def test_selftest_fails_on_a_tx_byte_corrupted_after_posting(ifname, no_fd_leak, monkeypatch):
    corrupt_tx(monkeypatch, 5)
    rep = run_selftest(DatapathConfig(tap_name=ifname), frames=16)
    assert not rep.ok
    assert rep.problems == ["queue 0 TX: 1 frames corrupted or out of order"]
    q = rep.queues[0]
    assert (q.tx_frames, q.tx_verified) == (16, 15)
    assert q.rx_verified == 16  # RX was not touched


def test_selftest_cli_exits_1_and_names_the_corruption(cli, ifname, no_fd_leak, monkeypatch):
    corrupt_tx(monkeypatch, 0)
    r = cli("selftest", "--json", "--tap", ifname, "--frames", "8")
    assert r.code == 1, r
    rep = r.json()
    assert rep["ok"] is False and rep["problems"] == ["queue 0 TX: 1 frames corrupted or out of "
                                                      "order"]


def _patch_rx(monkeypatch, change):
    """Apply ``change(frames, probe)`` to the first RX harvest that holds a probe frame (the
    kernel's own IPv6 frames may come first and pass untouched); returns the list of harvests
    changed (one at most)."""
    real = Datapath._harvest_rx
    done: list[bool] = []

    def harvest(self, q):
        frames = real(self, q)
        probes = [f for f in frames if is_probe(f)]
        if done or not probes:
            return frames
        done.append(True)
        return change(frames, probes[0])

    monkeypatch.setattr(Datapath, "_harvest_rx", harvest)
    return done


def test_selftest_fails_on_an_rx_byte_corrupted_in_the_ring(ifname, no_fd_leak, monkeypatch):
    """The byte is flipped in the RX buffer vhost filled, before the driver copies it out."""
    real_take = Datapath._rx_take
    flipped = []

    def take(self, q):
        ids, lens = real_take(self, q)
        for b, ln in zip(ids, lens, strict=True):
            off = q.rx_bufs + b * self._bufsz + self._hdr
            if not flipped and ln - self._hdr > FLIP_AT and is_probe(bytes(q.mv[off:off + 60])):
                flip(q.mv, off + FLIP_AT)
                flipped.append(b)
        return ids, lens

    monkeypatch.setattr(Datapath, "_rx_take", take)
    rep = run_selftest(DatapathConfig(tap_name=ifname), frames=16)
    assert flipped
    assert rep.problems == ["RX: 1 frames corrupted or duplicated"]
    assert sum(q.rx_verified for q in rep.queues) == 15 and rep.queues[0].tx_verified == 16


def test_selftest_fails_on_a_dropped_rx_completion(ifname, no_fd_leak, monkeypatch):
    done = _patch_rx(monkeypatch, lambda frames, probe: [f for f in frames if f is not probe])
    rep = run_selftest(DatapathConfig(tap_name=ifname), frames=16, timeout=3.0)
    assert done
    assert rep.problems == ["RX: 15 of 16 frames reached the rings"]


def test_selftest_fails_on_an_rx_completion_taken_twice(ifname, no_fd_leak, monkeypatch):
    done = _patch_rx(monkeypatch, lambda frames, probe: [*frames, probe])
    rep = run_selftest(DatapathConfig(tap_name=ifname), frames=16, timeout=3.0)
    assert done
    assert len(rep.problems) == 1 and rep.problems[0].startswith("RX: "), rep.problems
    assert rep.problems[0] in ("RX: 17 of 16 frames reached the rings",
                               "RX: 1 frames corrupted or duplicated")


def test_selftest_fails_on_a_lost_tx_frame(ifname, no_fd_leak, monkeypatch):
    real = Datapath.send_all

    def send_all(self, frames, queue=0, timeout=5.0):
        return real(self, [*frames[:3], *frames[4:]], queue, timeout)

    monkeypatch.setattr(Datapath, "send_all", send_all)
    rep = run_selftest(DatapathConfig(tap_name=ifname), frames=16, timeout=3.0)
    assert rep.problems == ["queue 0 TX: 15 of 16 frames reached the tap"]


# -- bench ------------------------------------------------------------------------------------

SHORT = ["--duration", "0.5", "--warmup", "0", "--verify-every", "1", "--size", "128"]


def test_bench_tx_fails_on_a_corrupted_loaded_frame(cli, ifname, no_fd_leak, monkeypatch):
    """Slot 0 of the loaded TX ring corrupted once: every resend of it arrives corrupted."""
    real = Datapath.load_tx

    def load_tx(self, frames, queue=0):
        real(self, frames, queue)
        q = self.queues[queue]
        flip(q.mv, q.tx_slots + self._hdr + FLIP_AT)

    monkeypatch.setattr(Datapath, "load_tx", load_tx)
    r = cli("bench", "--json", "--tap", ifname, "--direction", "tx", *SHORT)
    assert r.code == 1, r
    rep = r.json()
    run = rep["runs"][0]
    assert run["bad"] > 0 and run["verified"] > 0, run
    assert rep["problems"] == [f"vhost tx 128 B: {run['bad']} frames arrived corrupted"]


def test_bench_rx_fails_on_a_byte_corrupted_in_the_ring(cli, ifname, no_fd_leak, monkeypatch):
    real = Datapath._rx_uniform
    flipped = []

    def rx_uniform(self, q, first, n, length, sample_every):
        off = q.rx_bufs + (first & (q.rx.num - 1)) * self._bufsz + self._hdr
        if n and not flipped and length - self._hdr > FLIP_AT and \
                q.mv[off + B._MAGIC_AT:off + B._ID_AT] == B.MAGIC:
            flip(q.mv, off + FLIP_AT)
            flipped.append(first)
        return real(self, q, first, n, length, sample_every)

    monkeypatch.setattr(Datapath, "_rx_uniform", rx_uniform)
    r = cli("bench", "--json", "--tap", ifname, "--direction", "rx", *SHORT)
    assert r.code == 1, r
    rep = r.json()
    assert flipped
    assert rep["runs"][0]["bad"] == 1, rep["runs"][0]
    assert rep["problems"] == ["vhost rx 128 B: 1 frames arrived corrupted"]
