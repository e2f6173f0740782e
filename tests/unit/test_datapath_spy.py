"""datapath.py through the ioctl spy (tests/unit/fakekernel.py): the setup order and every
structure it builds, undo on a failure at every step, and the frame paths against the fake
device (which runs a ring when it is kicked).  The kernel tests prove the same on vhost-net.ko;
these pin the logic, also where the kernel cannot be made to misbehave."""

from __future__ import annotations

import errno
import os

import pytest

from tests.unit.fakekernel import FakeKernel, install
from vhostctl import _fd
from vhostctl import netlink as NL
from vhostctl._uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX
from vhostctl.datapath import Datapath, DatapathConfig
from vhostctl.errors import IntegrityError, UnsupportedError, ValidationError, VhostctlError
from vhostctl.selftest import probe_frame


class FakeNetlink:
    log: list[tuple] = []

    def __init__(self) -> None:
        pass

    def __enter__(self) -> FakeNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __getattr__(self, name: str):
        def record(*args):
            try:
                _fd.faults.check(f"RTM_NEWLINK({name})")
            except OSError as e:
                raise NL.NetlinkError(f"RTM_NEWLINK({name})", e.errno or errno.EIO) from None
            FakeNetlink.log.append((name, *args))
        return record


@pytest.fixture
def kernel(monkeypatch):
    FakeNetlink.log = []
    monkeypatch.setattr(NL, "Netlink", FakeNetlink)
    k = install(monkeypatch)
    yield k
    _fd.faults.disarm()


def frames(n: int, size: int = 200, start: int = 0) -> list[bytes]:
    return [probe_frame(start + i, size) for i in range(n)]


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


# -- setup ----------------------------------------------------------------------------------------

def test_setup_order_and_structures(kernel) -> None:
    cfg = DatapathConfig(ring_size=64, busyloop_usec=30, mtu=9000, mac="02:00:00:00:00:01",
                         master="br0", tap_name="vt%d")
    with Datapath(cfg) as dp:
        assert dp.tap_name == "vt0" and dp.offered == kernel.offered
        names = kernel.names()
        q = dp.queues[0]
        assert names[:2] == ["TUNSETIFF", "TUNGETIFF"]
        assert names[2:6] == ["VHOST_SET_OWNER", "VHOST_GET_FEATURES", "VHOST_SET_FEATURES",
                              "TUNSETVNETHDRSZ"]
        assert kernel.last("VHOST_SET_FEATURES") == cfg.features
        assert kernel.last("TUNSETVNETHDRSZ") == 12
        per_ring = ["VHOST_SET_VRING_NUM", "VHOST_SET_VRING_BASE", "VHOST_SET_VRING_ADDR",
                    "VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL", "VHOST_SET_VRING_ERR",
                    "VHOST_SET_VRING_BUSYLOOP_TIMEOUT"]
        assert names[6:] == ["VHOST_SET_MEM_TABLE", *per_ring, *per_ring,
                             "VHOST_NET_SET_BACKEND", "VHOST_NET_SET_BACKEND"]
        addrs = [f for n, f in kernel.calls if n == "VHOST_SET_VRING_ADDR"]
        r = q.region
        assert [(a["index"], a["desc_user_addr"], a["avail_user_addr"], a["used_user_addr"])
                for a in addrs] == [
            (0, r.hva + q.rx.layout.desc, r.hva + q.rx.layout.avail, r.hva + q.rx.layout.used),
            (1, r.hva + q.tx.layout.desc, r.hva + q.tx.layout.avail, r.hva + q.tx.layout.used)]
        files = {(n, f["index"]): f["fd"] for n, f in kernel.calls if n.startswith(
            "VHOST_SET_VRING_") and "fd" in f}
        assert files[("VHOST_SET_VRING_KICK", 0)] == q.rx_kick
        assert files[("VHOST_SET_VRING_CALL", 1)] == q.tx_call
        assert files[("VHOST_SET_VRING_ERR", 0)] == files[("VHOST_SET_VRING_ERR", 1)] == q.err
        assert [f["num"] for n, f in kernel.calls if n == "VHOST_SET_VRING_BUSYLOOP_TIMEOUT"
                ] == [30, 30]
        assert [f for n, f in kernel.calls if n == "VHOST_NET_SET_BACKEND"] == [
            {"index": 0, "fd": q.tap.fileno()}, {"index": 1, "fd": q.tap.fileno()}]
        table = kernel.last("VHOST_SET_MEM_TABLE")
        assert (table["regions"][0]["userspace_addr"], table["regions"][0]["memory_size"]) == (
            r.hva, r.size)
        # The link: MTU, then the address after udev, the bridge, and UP last.
        assert FakeNetlink.log == [("set_mtu", "vt0", 9000), ("wait_udev", "vt0"),
                                   ("set_mac", "vt0", "02:00:00:00:00:01"),
                                   ("set_master", "vt0", "br0"), ("set_up", "vt0")]
        assert dp.stats()[0].kicks == 1  # the RX ring, once its buffers are posted
    detach = [f for n, f in kernel.calls if n == "VHOST_NET_SET_BACKEND"][2:]
    assert detach == [{"index": 0, "fd": -1}, {"index": 1, "fd": -1}]  # backends go first


def test_no_busy_poll_no_mtu_call_and_vhost_header_mode(kernel) -> None:
    with Datapath(DatapathConfig(hdr_mode="vhost", event_idx=False, tap_name="vt0")):
        names = kernel.names()
        assert "VHOST_SET_VRING_BUSYLOOP_TIMEOUT" not in names and "TUNSETVNETHDRSZ" not in names
        assert not kernel.last("TUNSETIFF")["ifr_flags"] & 0x4000  # no IFF_VNET_HDR
        assert not kernel.last("VHOST_SET_FEATURES") >> VIRTIO_RING_F_EVENT_IDX & 1
    assert FakeNetlink.log == [("set_up", "vt0")]


def test_a_feature_the_kernel_lacks_is_named_before_set_features(monkeypatch) -> None:
    monkeypatch.setattr(NL, "Netlink", FakeNetlink)
    k = install(monkeypatch, FakeKernel(offered=1 << 32))
    before = open_fds()
    with pytest.raises(UnsupportedError, match="VIRTIO_NET_F_MRG_RXBUF"):
        Datapath(DatapathConfig(tap_name="vt0")).open()
    assert "VHOST_SET_FEATURES" not in k.names()
    assert open_fds() == before


def test_a_failure_at_every_step_undoes_everything(kernel) -> None:
    """The n-th kernel call fails, for every n: the same error comes out, and nothing stays
    open (fds, backends attached)."""
    cfg = DatapathConfig(queues=2, ring_size=16, busyloop_usec=5, mac="02:00:00:00:00:02",
                         tap_name="vt0")
    _fd.faults.arm(10**6)
    dp = Datapath(cfg).open()
    total = _fd.faults.calls  # the calls of open(), not of close()
    _fd.faults.disarm()
    dp.close()
    assert total > 30
    for n in range(1, total + 1):
        kernel.calls.clear()
        kernel.links.clear()
        before = open_fds()
        _fd.faults.arm(n, errno.EIO)
        with pytest.raises(VhostctlError) as e:
            Datapath(cfg).open()
        _fd.faults.disarm()
        assert e.value.errno == errno.EIO, (n, e.value)
        assert open_fds() == before, n
        attached = sum(1 for d in kernel.vhost.values() for vq in d.vqs if vq.backend >= 0)
        assert attached == 0, n


# -- TX -----------------------------------------------------------------------------------------

def test_send_and_flush_deliver_every_frame(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=16, tap_name="vt0")) as dp:
        out = frames(40)
        dp.send_all(out)
        dp.flush()
        assert kernel.sent("vt0") == out
        st = dp.stats()[0]
        assert (st.tx_frames, st.tx_bytes) == (40, 40 * 200)


def test_send_stops_at_a_full_ring_and_send_all_times_out(kernel) -> None:
    kernel.complete_tx = False
    with Datapath(DatapathConfig(ring_size=8, tap_name="vt0")) as dp:
        assert dp.send(frames(20)) == 8
        assert dp.send(frames(2)) == 0
        with pytest.raises(VhostctlError, match=r"TX ring still full after 0\.01s; 3 frames not"):
            dp.send_all(frames(3), timeout=0.01)
        with pytest.raises(VhostctlError, match=r"8 TX frames not consumed after 0\.01s"):
            dp.flush(timeout=0.01)
        with pytest.raises(ValidationError, match="8 TX frames still in flight"):
            dp.load_tx(frames(8))


@pytest.mark.parametrize("size, words", [(13, "frame of 13 bytes"), (1519, "frame of 1519")])
def test_send_refuses_bad_frames_but_sends_what_came_before(kernel, size, words) -> None:
    with Datapath(DatapathConfig(ring_size=8, tap_name="vt0")) as dp:
        good = frames(2)
        with pytest.raises(ValidationError, match=words):
            dp.send([*good, b"x" * size])
        dp.flush()
        assert kernel.sent("vt0") == good


def test_load_tx_resend_and_tx_pump(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=8, tap_name="vt0")) as dp:
        with pytest.raises(ValidationError, match="no frames loaded"):
            dp.resend(4)
        with pytest.raises(ValidationError, match="no frames loaded"):
            dp.tx_pump(4)
        with pytest.raises(ValidationError, match="7 frames for 8 TX slots"):
            dp.load_tx(frames(7))
        loaded = frames(8)
        dp.load_tx(loaded)
        with pytest.raises(ValidationError, match="batch 0"):
            dp.resend(0)
        assert dp.resend(3) == 6  # whole batches only
        assert dp.tx_pump(4, cycles=5) == 5 * 8
        assert kernel.sent("vt0") == (loaded * 6)[:46]  # slot after slot, round the ring
        assert dp.stats()[0].tx_bytes == 46 * 200
        for bad, words in ((0, "batch 0"), (9, "at most the ring size 8")):
            with pytest.raises(ValidationError, match=words):
                dp.tx_pump(bad)
        with pytest.raises(ValidationError, match="cycles -1"):
            dp.tx_pump(1, cycles=-1)
        dp.send(frames(1))  # overwrites a slot: load_tx() again before resend()
        with pytest.raises(ValidationError, match="no frames loaded"):
            dp.resend(1)


def test_tx_pump_of_mixed_sizes_and_several_queues_takes_separate_cycles(kernel) -> None:
    with Datapath(DatapathConfig(queues=2, ring_size=8, tap_name="vt0")) as dp:
        for q in range(2):
            dp.load_tx([probe_frame(i, 100 + 10 * (i % 2)) for i in range(8)], q)
        assert dp.tx_pump(2, cycles=3) == 2 * 3 * 8
        assert dp.stats()[0].tx_bytes == 3 * (4 * 100 + 4 * 110)
        assert len(kernel.sent("vt0")) == 48


def test_tx_pump_raises_when_no_completion_comes(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=8, tap_name="vt0")) as dp:
        dp.load_tx(frames(8))
        kernel.complete_tx = False
        with pytest.raises(VhostctlError, match=r"no TX completion for 0\.01s"):
            dp.tx_pump(8, cycles=2, timeout=0.01)


def test_wait_tx_and_the_error_eventfd(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=8, tap_name="vt0")) as dp:
        dp.suppress_interrupts()
        assert dp.wait_tx(0.01) is False  # nothing in flight, nothing signalled
        os.write(dp.queues[0].err, (1).to_bytes(8, "little"))
        with pytest.raises(IntegrityError, match="vhost signalled an error"):
            dp.wait_rx(0.01)
        with pytest.raises(IntegrityError, match="vhost signalled an error"):
            dp.recv_any(timeout=0.01)
    closed = Datapath(DatapathConfig())
    with pytest.raises(ValidationError, match="not open"):
        closed.wait_tx(0.01)
    with pytest.raises(ValidationError, match="not open"):
        closed.tx_pump(1)


# -- RX -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, {"mrg_rxbuf": False}, {"hdr_mode": "vhost"},
                                  {"version_1": False, "mrg_rxbuf": False},
                                  {"event_idx": False}])
def test_recv_returns_every_injected_frame_exactly(kernel, opts) -> None:
    with Datapath(DatapathConfig(ring_size=16, tap_name="vt0", **opts)) as dp:
        sent = [probe_frame(i, s) for i, s in enumerate([60, 512, 1514] * 10)]
        got = []
        for k in range(0, 30, 5):
            kernel.inject("vt0", sent[k:k + 5])
            got += dp.recv(timeout=1.0)
        assert got == sent
        assert dp.recv(timeout=0.01) == []
        st = dp.stats()[0]
        assert (st.rx_frames, st.rx_bytes) == (30, sum(map(len, sent)))


def test_mrg_rxbuf_frames_over_several_buffers(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=16, rx_buf_size=256, tap_name="vt0")) as dp:
        sent = [probe_frame(i, s) for i, s in enumerate([60, 244, 245, 600, 1514, 100])]
        kernel.inject("vt0", sent)
        got = []
        for _ in range(10):
            got += dp.recv(timeout=0.01)
        assert got == sent


def test_a_frame_whose_last_buffer_is_not_used_yet_waits(kernel) -> None:
    """MRG_RXBUF: the used ring holds the first buffers of a frame only; recv() returns
    nothing of it and keeps them until the rest arrives."""
    with Datapath(DatapathConfig(ring_size=16, rx_buf_size=256, tap_name="vt0")) as dp:
        q = dp.queues[0]
        real_push = type(kernel.vhost[q.dev.fileno()].vqs[0].dev).push
        big = probe_frame(1, 700)  # 712 bytes with the header: three 256-byte buffers
        held = []

        def push(self, elems):
            if len(elems) == 3 and not held:
                held.append(elems[2])
                return real_push(self, elems[:2])
            return real_push(self, elems)

        dev = kernel.vhost[q.dev.fileno()].vqs[0].dev
        dev.push = push.__get__(dev)
        kernel.inject("vt0", [big])
        assert dp.recv(timeout=0.01) == [] and q.rx_partial is not None
        dev.push = real_push.__get__(dev)
        dev.push([held[0]])
        assert dp.recv(timeout=0.01) == [big] and q.rx_partial is None


def test_rx_burst_counts_and_samples(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=16, tap_name="vt0")) as dp:
        sent = frames(12, 300)
        kernel.inject("vt0", sent)
        assert dp.wait_rx(0.01, after=12) is True
        n, nbytes, samples = dp.rx_burst(0, sample_every=4)
        assert (n, nbytes) == (12, 12 * 300) and samples == [sent[0], sent[4], sent[8]]
        mixed = [probe_frame(20 + i, 100 + i) for i in range(6)]
        kernel.inject("vt0", mixed)
        n, nbytes, samples = dp.rx_burst(0, sample_every=4)
        assert n == 6 and nbytes == sum(map(len, mixed)) and samples == [mixed[0], mixed[4]]
        assert dp.rx_burst(0) == (0, 0, [])
        with pytest.raises(ValidationError, match="queue 3"):
            dp.rx_burst(3)


def test_rx_burst_over_merged_buffers(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=16, rx_buf_size=256, tap_name="vt0")) as dp:
        sent = [probe_frame(i, 600) for i in range(3)]
        kernel.inject("vt0", sent)
        n, nbytes, samples = dp.rx_burst(0, sample_every=1)
        assert (n, nbytes, samples) == (3, 1800, sent)


def test_recv_any_over_queues(kernel) -> None:
    with Datapath(DatapathConfig(queues=2, ring_size=16, tap_name="vt0")) as dp:
        kernel.inject("vt0", frames(3), queue=1)
        kernel.inject("vt0", frames(2, start=10), queue=0)
        got = dp.recv_any(timeout=1.0)
        assert sorted(got) == sorted([(1, f) for f in frames(3)]
                                     + [(0, f) for f in frames(2, start=10)])
        assert dp.recv_any(timeout=0.01) == []


def test_bad_used_entries_are_integrity_errors(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=16, tap_name="vt0")) as dp:
        q = dp.queues[0]
        dev = kernel.vhost[q.dev.fileno()].vqs[0].dev
        head, _ = dev.pop()
        dev.push([(head, 4)])  # shorter than the 12-byte header
        with pytest.raises(IntegrityError, match="used length 4 is shorter than the header"):
            dp.recv(timeout=0.01)


def test_num_buffers_out_of_range(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=16, rx_buf_size=256, tap_name="vt0")) as dp:
        q = dp.queues[0]
        dev = kernel.vhost[q.dev.fileno()].vqs[0].dev
        head, chain = dev.pop()
        off = chain[0][0] - q.region.gpa
        q.mv[off + 10:off + 12] = (99).to_bytes(2, "little")
        dev.push([(head, 256)])  # a full buffer: MRG_RXBUF reads num_buffers
        with pytest.raises(IntegrityError, match="num_buffers 99 in RX header is out of range"):
            dp.recv(timeout=0.01)


def test_collect_interrupts_reads_what_waits_left(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=16, tap_name="vt0")) as dp:
        dp.queues[0].rx.enable_interrupts()
        kernel.inject("vt0", frames(1))
        dp.collect_interrupts()
        assert dp.stats()[0].interrupts == 1


# -- stop / start -----------------------------------------------------------------------------

def test_stop_returns_the_bases_and_start_resumes_there(kernel) -> None:
    with Datapath(DatapathConfig(ring_size=8, tap_name="vt0")) as dp:
        dp.send_all(frames(5))
        kernel.inject("vt0", frames(3, start=50))
        assert len(dp.recv(timeout=1.0)) == 3
        assert dp.stop() == (3, 5)
        dp.start(bases=(3, 5))
        assert [f["num"] for n, f in kernel.calls if n == "VHOST_SET_VRING_BASE"][-2:] == [3, 5]
        with pytest.raises(ValidationError, match="queue is running; stop it first"):
            dp.start()
        dp.send_all(frames(4, start=5))
        dp.flush()
        assert kernel.sent("vt0") == frames(9)
        assert dp.stats()[0].restarts == 1
        dp.stop()
        dp.start()  # without bases: the device keeps its own
        assert dp.stats()[0].restarts == 2


@pytest.mark.parametrize("vq", [0, 1])
def test_stop_detects_a_used_index_that_disagrees_with_the_device(kernel, vq) -> None:
    with Datapath(DatapathConfig(ring_size=8, tap_name="vt0")) as dp:
        q = dp.queues[0]
        ring = q.rx if vq == 0 else q.tx
        at = ring.layout.used + 2
        q.mv[at:at + 2] = (1).to_bytes(2, "little")  # one completion nobody consumed
        with pytest.raises(IntegrityError, match=rf"stop\(queue=0, vq={vq}\): device consumed "
                           "up to avail index 0 but its used index is 1"):
            dp.stop()


def test_queue_index_and_ifindex(kernel, monkeypatch) -> None:
    import socket

    monkeypatch.setattr(socket, "if_nametoindex", lambda name: 7)
    with Datapath(DatapathConfig(tap_name="vt0")) as dp:
        assert dp.ifindex == 7
        for call in (lambda: dp.recv(1), lambda: dp.send([], 1), lambda: dp.stop(-1)):
            with pytest.raises(ValidationError, match=r"queue .*: have 1 queues"):
                call()
    dp.close()  # idempotent
