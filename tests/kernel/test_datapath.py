"""The datapath end to end on the real kernel: tap <-> vhost-net.ko <-> our rings, byte-exact.

Frames carry a magic, a sequence number and deterministic filler (vhostctl.selftest's probe
frames); an AF_PACKET socket on the tap is the host-side peer.  Every assertion compares whole
frames byte for byte with what was sent.
"""

from __future__ import annotations

import json
import os
import struct

import pytest

from tests.kernel.conftest import ip, link_exists, udev_settle
from vhostctl import _fd
from vhostctl.datapath import Datapath, DatapathConfig
from vhostctl.errors import ValidationError
from vhostctl.selftest import host_receive, host_socket, is_probe, probe_frame, ring_receive

TIMEOUT = 10.0
SIZES = [60, 64, 128, 512, 1000, 1514]


def seq_of(f: bytes) -> int:
    return struct.unpack_from("!I", f, 46)[0]


def roundtrip(dp: Datapath, sizes: list[int], count: int) -> None:
    """TX on every queue, then RX from the host side; every frame exactly once, byte-exact."""
    s = host_socket(dp.ifindex)
    try:
        for qi in range(len(dp.queues)):
            frames = [probe_frame(i, sizes[i % len(sizes)], flow=qi) for i in range(count)]
            dp.send_all(frames, queue=qi)
            got = host_receive(s, count, TIMEOUT)
            assert got == frames, f"TX queue {qi}: {len(got)}/{count} frames arrived intact"
        sent = [probe_frame(i, sizes[i % len(sizes)], flow=i) for i in range(count)]
        for f in sent:
            s.send(f)
        got = ring_receive(dp, count, TIMEOUT)
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


@pytest.mark.parametrize("queues, event_idx, mixed", [
    (1, True, False),  # the ring's fused cycle (SplitVring.pump)
    (1, True, True),  # frames of several sizes: resend() + wait_tx()
    (1, False, False),  # no EVENT_IDX: resend() + wait_tx()
    (2, True, False),
])
def test_tx_pump_sends_the_loaded_frames_round_and_round(ifname, no_fd_leak, queues, event_idx,
                                                         mixed):
    cfg = DatapathConfig(queues=queues, ring_size=64, event_idx=event_idx, tap_name=ifname)
    with Datapath(cfg) as dp:
        s = host_socket(dp.ifindex)
        try:
            loaded = []
            for q in range(queues):
                frames = [probe_frame(1000 * q + i, 60 + 97 * (i % 7) if mixed else 128, flow=q)
                          for i in range(64)]
                dp.load_tx(frames, q)
                loaded.append(frames)
            posted = [dp.tx_pump(16, cycles, TIMEOUT) for cycles in (1, 0, 39)]
            for q in range(queues):
                dp.flush(q)
            st = dp.stats()
            assert posted[1] == 0 and all(n % 16 == 0 for n in posted)
            assert sum(posted) >= 40 * 16  # every cycle at least a batch
            assert sum(x.tx_frames for x in st) == sum(posted)
            # What each queue sent: its 64 loaded frames, round and round, tx_frames of them.
            sent = [(frames * (x.tx_frames // 64 + 1))[:x.tx_frames]
                    for x, frames in zip(st, loaded, strict=True)]
            want = [f for frames in sent for f in frames]
            assert [x.tx_bytes for x in st] == [sum(map(len, frames)) for frames in sent]
            got = host_receive(s, len(want), TIMEOUT)
            if queues == 1:
                assert got == want  # every slot, in order, again and again
            else:
                assert sorted(got) == sorted(want)
        finally:
            s.close()


def test_tx_pump_refuses_unloaded_rings_and_bad_batches(ifname, no_fd_leak):
    with Datapath(DatapathConfig(ring_size=64, tap_name=ifname)) as dp:
        with pytest.raises(ValidationError, match="load_tx"):
            dp.tx_pump(16)
        dp.load_tx([probe_frame(i, 64) for i in range(64)])
        for batch in (0, 65):
            with pytest.raises(ValidationError, match="batch"):
                dp.tx_pump(batch)
        with pytest.raises(ValidationError, match="cycles"):
            dp.tx_pump(16, -1)


@pytest.mark.parametrize("sizes, opts", [
    ([128], {}),  # one size: counted in bulk (SplitVring.harvest_uniform)
    ([60, 128, 1000, 1514], {}),  # several sizes: listed (harvest_slots)
    ([300], dict(rx_buf_size=512)),  # MRG_RXBUF, every frame in one buffer: in bulk
    ([1514], dict(rx_buf_size=512)),  # MRG_RXBUF, frames over several buffers: merged
])
@pytest.mark.parametrize("every", [1, 3])
def test_rx_burst_counts_every_frame_and_samples_byte_exact(ifname, no_fd_leak, sizes, opts,
                                                            every):
    sent = [probe_frame(i, sizes[i % len(sizes)]) for i in range(300)]
    with Datapath(DatapathConfig(ring_size=128, tap_name=ifname, **opts)) as dp:
        s = host_socket(dp.ifindex)
        try:
            n = nbytes = 0
            samples: list[bytes] = []

            def take() -> None:
                nonlocal n, nbytes, samples
                k, b, got = dp.rx_burst(0, every)
                n, nbytes, samples = n + k, nbytes + b, samples + got

            for i in range(0, len(sent), 100):  # more than a ring: buffers must come back
                for f in sent[i:i + 100]:
                    s.send(f)
                while n < i + 100:
                    assert dp.wait_rx(TIMEOUT, 1), f"{n} frames counted, {i + 100} sent"
                    take()
            while dp.wait_rx(0.5, 1):  # the rest, if the host stack sent frames of its own
                take()
        finally:
            s.close()
        st = dp.stats()[0]
    assert (st.rx_frames, st.rx_bytes) == (n, nbytes)
    assert len(samples) == (n + every - 1) // every  # every every-th frame since open
    probes = [f for f in samples if is_probe(f)]
    if every == 1:
        assert probes == sent  # one flow, one queue: in order, byte-exact
        assert nbytes == sum(map(len, samples))
    else:
        assert all(f in sent for f in probes)
        assert len(probes) >= len(sent) // every - 1


def test_the_address_we_set_outlives_udev(ifname, no_fd_leak):
    """systemd-udevd gives a new link with a random address a persistent one a moment after it
    appears (MACAddressPolicy=persistent, on in the VM): the address we set must stay."""
    for i in range(3):
        mac = f"fe:00:5e:00:53:{i:02x}"
        with Datapath(DatapathConfig(mac=mac, tap_name=ifname)) as dp:
            udev_settle()
            with open(f"/sys/class/net/{dp.tap_name}/address") as f:
                assert f.read().strip() == mac, f"round {i}"


def test_multiqueue_rx_spreads_over_queues(ifname, no_fd_leak):
    with Datapath(DatapathConfig(queues=4, tap_name=ifname)) as dp:
        s = host_socket(dp.ifindex)
        try:
            sent = [probe_frame(i, 128, flow=i) for i in range(256)]
            for f in sent:
                s.send(f)
            got = ring_receive(dp, len(sent), TIMEOUT)
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
            tx = [probe_frame(i, 200) for i in range(300)]
            rx = [probe_frame(1000 + i, 200) for i in range(300)]
            got_tx: list[bytes] = []
            got_rx: list[bytes] = []
            for chunk in range(0, 300, 100):
                dp.send_all(tx[chunk:chunk + 100])
                for f in rx[chunk:chunk + 100]:
                    s.send(f)
                # stop with frames possibly still queued on both sides, then resume
                bases = dp.stop()
                dp.start(bases=bases)
                got_tx += host_receive(s, 100, TIMEOUT)
                got_rx += [f for _, f in ring_receive(dp, 100, TIMEOUT)]
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


def test_address_and_bridge_are_set_before_the_tap_goes_up(ifname, no_fd_leak, monkeypatch):
    """DatapathConfig.mac/master: applied before UP, so the link is never up with the
    kernel's random address or outside its bridge; frames still cross byte for byte."""
    from vhostctl.netlink import Netlink

    br = f"{ifname}b"
    ip("link", "add", br, "type", "bridge")
    order: list[str] = []
    real_set = Netlink._set

    def spy(self, name, step, **attrs):
        order.append(step.split(" ")[0] + " " + step.split(" ")[1])
        return real_set(self, name, step, **attrs)

    monkeypatch.setattr(Netlink, "_set", spy)
    try:
        cfg = DatapathConfig(tap_name=ifname, mac="fe:12:34:56:78:9a", master=br)
        with Datapath(cfg) as dp:
            link = json.loads(ip("-j", "-d", "link", "show", dp.tap_name))[0]
            assert link["address"] == "fe:12:34:56:78:9a" and link["master"] == br
            assert "UP" in link["flags"]
            assert order == ["set mac", "set master", "set up"], order
            s = host_socket(dp.ifindex)
            try:
                frame = probe_frame(0, 200)
                dp.send_all([frame], timeout=10)
                assert frame in host_receive(s, 1, timeout=10)
            finally:
                s.close()
        assert not link_exists(ifname)
    finally:
        ip("link", "del", br)


@pytest.mark.parametrize("field, value, words", [
    ("mac", "01:00:5e:00:00:01", "multicast"),
    ("mac", "fe:00:00", "MAC"),
    ("master", "x" * 16, "IFNAMSIZ"),
])
def test_bad_address_or_bridge_is_refused_before_any_kernel_call(ifname, monkeypatch, field,
                                                                 value, words):
    calls: list[str] = []
    monkeypatch.setattr(_fd.faults, "check", calls.append)
    with pytest.raises(ValidationError) as e:
        Datapath(DatapathConfig(tap_name=ifname, **{field: value})).open()
    assert calls == [] and not link_exists(ifname)
    assert words.lower() in str(e.value).lower(), e.value
