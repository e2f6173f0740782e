"""vhostctl.bench without a kernel: statistics, worker discovery over fake /proc trees, frames,
the sample filter (run through a small classic-BPF interpreter), phases, config, chart."""

from __future__ import annotations

import os
import struct
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostctl.bench import (
    _CYCLES,
    MEASURE,
    PACKET_OUTGOING,
    STOP,
    WARMUP,
    BenchConfig,
    BenchReport,
    Latency,
    Phases,
    RunResult,
    Sampler,
    Verifier,
    _drain_calls,
    bench_frame,
    latency_summary,
    percentile,
    ratios,
    sample_filter,
    thread_cpu_ns,
    vhost_workers,
    zcopytx,
)
from vhostctl.errors import UnsupportedError, ValidationError
from vhostctl.render_bench import check_plot_path, svg_chart, write_plot

# -- statistics -----------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    v = list(range(1, 101))  # 1..100
    assert percentile(v, 50) == 50
    assert percentile(v, 99) == 99
    assert percentile(v, 99.9) == 100
    assert percentile(v, 100) == 100
    assert percentile(v, 0.5) == 1
    assert percentile([7], 50) == percentile([7], 99.9) == 7
    assert percentile([1, 2], 50) == 1 and percentile([1, 2], 51) == 2


@pytest.mark.parametrize("values, p", [([], 50), ([1], 0), ([1], 100.1), ([1], -5)])
def test_percentile_rejects(values: list[int], p: float) -> None:
    with pytest.raises(ValidationError):
        percentile(values, p)


@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=300),
       st.floats(0.01, 100, allow_nan=False))
def test_percentile_is_a_sample_with_at_least_p_percent_at_or_below(values: list[int],
                                                                   p: float) -> None:
    s = sorted(values)
    x = percentile(s, p)
    assert x in s
    assert sum(v <= x for v in s) >= p / 100 * len(s)
    assert sum(v < x for v in s) < p / 100 * len(s)


def test_latency_summary_in_microseconds() -> None:
    ns = [5_000] * 98 + [40_000, 1_000_000]
    lat = latency_summary(ns)
    assert lat == Latency(100, 5.0, 40.0, 1000.0, 5.0, (98 * 5 + 40 + 1000) / 100, 1000.0)


def _run(path: str, direction: str, size: int, pps: float, cpu: float, worker: float | None,
         p50: float | None = None) -> RunResult:
    lat = None if p50 is None else Latency(10, p50, p50, p50, p50, p50, p50)
    return RunResult(path, direction, size, 1, 1.0, int(pps), int(pps) * size, pps,
                     pps * size * 8 / 1e9, int(pps), 1, 0, 0, 0, 0, cpu, 0.0, 0.0, worker,
                     1 if worker is not None else 0, None, None, lat)


def test_ratios_pair_vhost_with_tap_by_direction_and_size() -> None:
    runs = [_run("vhost", "tx", 64, 300_000, 1.0, 3.0), _run("vhost", "rx", 64, 200_000, 1, 4),
            _run("vhost", "rr", 64, 1000, 10, 5, p50=100.0),
            _run("tap", "tx", 64, 100_000, 8, None),
            _run("tap", "rr", 64, 900, 20, None, p50=200.0), _run("vhost", "tx", 1514, 1, 1, 1)]
    got = {(r.direction, r.size): r for r in ratios(runs)}
    assert set(got) == {("tx", 64), ("rr", 64)}
    assert got["tx", 64].pps == pytest.approx(3.0) and got["tx", 64].cpu == pytest.approx(0.5)
    assert got["tx", 64].p50 is None
    assert got["rr", 64].p50 == pytest.approx(0.5)
    assert runs[0].total_cpu_us == 4.0 and runs[3].total_cpu_us == 8.0


# -- worker threads over fake /proc trees -------------------------------------------------------


def _stat(pid: int, comm: str, ppid: int, utime: int = 0, stime: int = 0) -> str:
    rest = ["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime)] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


def _proc(tmp: Path, entries: dict[str, str]) -> Path:
    for rel, text in entries.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp


def test_workers_as_threads_of_the_owner_since_6_4(tmp_path: Path) -> None:
    proc = _proc(tmp_path, {
        "100/stat": _stat(100, "python3", 1),
        "100/task/100/comm": "python3\n",
        "100/task/101/comm": "vhost-100\n",
        "100/task/102/comm": "vhost-100\n",
        "100/task/103/comm": "vhost-1000\n",  # someone else's, by name
        "100/task/101/schedstat": "123456789 5 6\n",
        "100/task/102/schedstat": "1000 5 6\n",
    })
    found = vhost_workers(100, proc)
    assert found == [proc / "100/task/101", proc / "100/task/102"]
    assert [thread_cpu_ns(p) for p in found] == [123456789, 1000]


def test_workers_as_kernel_threads_before_6_4(tmp_path: Path) -> None:
    proc = _proc(tmp_path, {
        "100/stat": _stat(100, "python3", 1),
        "100/task/100/comm": "python3\n",
        "2/stat": _stat(2, "kthreadd", 0),
        "7001/stat": _stat(7001, "vhost-100", 2, utime=3, stime=47),
        "7002/stat": _stat(7002, "vhost-100", 2),
        "7003/stat": _stat(7003, "vhost-100", 555),  # a user process named like one
        "7004/stat": _stat(7004, "vhost-10", 2),
        "7005/stat": _stat(7005, "we(ird) vhost-100", 2),
        "7006/comm": "vhost-100\n",  # vanished between listdir and reading its stat
        "self/stat": _stat(100, "python3", 1),
        "net/dev": "",
    })
    found = vhost_workers(100, proc)
    assert found == [proc / "7001", proc / "7002"]
    tick = os.sysconf("SC_CLK_TCK")
    assert thread_cpu_ns(proc / "7001") == 50 * 1_000_000_000 // tick  # no schedstat: ticks
    assert thread_cpu_ns(proc / "7999") == 0  # gone


def test_no_workers_and_unreadable_trees(tmp_path: Path) -> None:
    assert vhost_workers(100, tmp_path / "missing") == []
    proc = _proc(tmp_path, {"100/task/100/comm": "python3\n", "5/stat": "garbage"})
    assert vhost_workers(100, proc) == []


def test_zcopytx_param(tmp_path: Path) -> None:
    p = tmp_path / "experimental_zcopytx"
    assert zcopytx(p) is None
    p.write_text("1\n")
    assert zcopytx(p) == 1
    p.write_text("0\n")
    assert zcopytx(p) == 0


# -- frames and verification ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [60, 64, 512, 1514, 9000])
def test_bench_frame_layout(size: int) -> None:
    f = bench_frame(300, size)
    assert len(f) == size
    assert f[12:14] == b"\x08\x00" and f[0:6] == bytes.fromhex("fe0000000002")
    assert f[42:46] == b"VHCT" and struct.unpack_from("!II", f, 46) == (300, size)
    assert struct.unpack_from("!H", f, 16)[0] == size - 14  # IPv4 total length
    assert struct.unpack_from("!H", f, 38)[0] == size - 34  # UDP length
    assert bench_frame(300, size) == f and bench_frame(301, size) != f


def test_bench_frame_filler_depends_on_id() -> None:
    assert bench_frame(1, 512)[54:] != bench_frame(2, 512)[54:]
    with pytest.raises(ValidationError):
        bench_frame(0, 59)


def test_verifier_counts() -> None:
    t = [bench_frame(i, 128) for i in range(4)]
    v = Verifier(t)
    assert v.check(t[2]) is True
    assert v.check(bytearray(t[3])) is True
    corrupt = bytearray(t[1])
    corrupt[100] ^= 1
    assert v.check(corrupt) is False
    assert v.check(t[1][:-1]) is False  # truncated
    assert v.check(bench_frame(9, 128)) is False  # id beyond the templates
    assert v.check(b"\x33\x33" + bytes(80)) is False  # IPv6 multicast noise
    assert (v.ok, v.bad, v.foreign) == (2, 3, 1)


class _Ring:
    """A PACKET_RX_RING in a bytearray, filled the way tpacket_rcv() fills the real one."""

    def __init__(self, n: int = 8, fsz: int = 256) -> None:
        self.buf, self.n, self.fsz, self.head = bytearray(n * fsz), n, fsz, 0
        self.sampler = Sampler.__new__(Sampler)
        self.sampler._map(self.buf, n, fsz)

    def put(self, frame: bytes, mac: int = 66, status: int = 1) -> None:
        """struct tpacket2_hdr: tp_status u32 @0, tp_len/tp_snaplen u32 @4/@8, tp_mac u16 @12."""
        off = self.head * self.fsz
        self.buf[off + mac:off + mac + len(frame)] = frame
        struct.pack_into("IIIH", self.buf, off, status, len(frame), len(frame), mac)
        self.head = (self.head + 1) % self.n

    def owned_by_us(self) -> list[int]:
        return [i for i in range(self.n) if struct.unpack_from("I", self.buf, i * self.fsz)[0]]


def test_sampler_drain_checks_batches_across_the_wrap() -> None:
    t = [bench_frame(i, 64) for i in range(16)]
    v, r = Verifier(t), _Ring()
    assert r.sampler.drain(v) == 0
    for i in range(3):
        r.put(t[i])
    assert r.sampler.drain(v) == 3 and v.ok == 3 and r.owned_by_us() == []
    for i in range(7):  # frames 3..7, then 0 and 1 of the ring
        r.put(t[i + 8], status=1 | 0x80)  # TP_STATUS_CSUM_VALID beside TP_STATUS_USER
    assert r.sampler.drain(v) == 7 and (v.ok, v.bad, v.foreign) == (10, 0, 0)
    assert r.owned_by_us() == [] and r.sampler.drain(v) == 0
    for i in range(8):  # the whole ring at once
        r.put(t[i])
    assert r.sampler.drain(v) == 8 and v.ok == 18 and r.owned_by_us() == []


def test_sampler_drain_stops_at_the_first_frame_still_the_kernels() -> None:
    t = [bench_frame(i, 64) for i in range(4)]
    v, r = Verifier(t), _Ring()
    r.put(t[0])
    r.put(t[1], status=0)  # being copied: the kernel sets the status last
    r.put(t[2])
    assert r.sampler.drain(v) == 1 and r.owned_by_us() == [2]


def test_sampler_drain_tells_bad_and_foreign_frames_in_a_batch() -> None:
    t = [bench_frame(i, 128) for i in range(8)]
    v, r = Verifier(t), _Ring()
    corrupt = bytearray(t[1])
    corrupt[100] ^= 1
    for f in (t[0], bytes(corrupt), t[2], b"\x33\x33" + bytes(126), t[3]):
        r.put(f)
    assert r.sampler.drain(v) == 5 and (v.ok, v.bad, v.foreign) == (3, 1, 1)
    assert r.owned_by_us() == []


def test_sampler_drain_reads_each_frame_where_its_header_says() -> None:
    """Length and MAC offset come from each frame's header: the bytes a previous lap left in
    the ring frame (here, an intact copy of the same template) never count."""
    t = [bench_frame(i, 128) for i in range(8)]
    v, r = Verifier(t), _Ring()
    for f in t:
        r.put(f)
    assert r.sampler.drain(v) == 8 and v.ok == 8
    r.put(t[0])
    r.put(t[1][:-1])  # truncated, in a batch of whole frames: t[1]'s last byte lies behind
    r.put(t[2])
    assert r.sampler.drain(v) == 3 and (v.ok, v.bad) == (10, 1)
    r.put(t[3])
    r.put(t[4], mac=70)  # moved (e.g. by a VLAN tag), and intact
    r.put(t[5])
    assert r.sampler.drain(v) == 3 and (v.ok, v.bad) == (13, 1)
    r.put(t[6])
    r.put(t[7][4:] + b"tail", mac=70)  # not ours, yet bytes 66.. of the ring frame read as t[7]
    assert r.sampler.drain(v) == 2 and (v.ok, v.bad + v.foreign) == (14, 2)


@pytest.mark.parametrize(("every", "queues", "ring", "calls"), [
    (64, 1, 256, 4), (64, 2, 256, 2), (64, 4, 256, 1), (1, 1, 256, 1), (256, 1, 1024, 4),
    (8, 1, 64, 2),
])
def test_samples_are_drained_less_often_only_while_the_sample_ring_stays_small(
        every: int, queues: int, ring: int, calls: int) -> None:
    per_call = _CYCLES * ring * queues
    assert _drain_calls(every, per_call) == calls
    # Sampler sizes its ring for twice what may wait: never beyond its 512-frame minimum
    # unless one call alone needs more (then it drains after every call, as it always did).
    assert 2 * per_call * calls // every <= max(512, 2 * per_call // every)


def _run_cbpf(prog: bytes, pkt: bytes, pkttype: int) -> int:
    """A classic-BPF interpreter for the opcodes sample_filter uses (net/core/filter.c)."""
    insns = [struct.unpack_from("HBBI", prog, i) for i in range(0, len(prog), 8)]
    a, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            if k == 0xFFFFF004:
                a = pkttype
            elif k + 4 > len(pkt):
                return 0
            else:
                a = int.from_bytes(pkt[k:k + 4], "big")
        elif code == 0x54:
            a &= k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x}")


@pytest.mark.parametrize("every", [1, 2, 64])
def test_sample_filter_passes_one_in_every(every: int) -> None:
    prog = sample_filter(every)
    assert len(prog) == 9 * 8
    passed = [i for i in range(256) if _run_cbpf(prog, bench_frame(i, 64), 0)]
    assert passed == list(range(0, 256, every))
    assert not _run_cbpf(prog, bench_frame(0, 64), PACKET_OUTGOING)  # our own sends
    assert not _run_cbpf(prog, bytes(40), 0)  # short: the load fails, dropped
    assert not _run_cbpf(prog, b"\x33\x33" + bytes(100), 0)  # not ours


# -- phases, config ------------------------------------------------------------------------


def test_phases_flip_without_the_loop_reading_a_clock() -> None:
    seen = []
    with Phases(0.05, 0.05, tick=0.01) as ph:
        deadline = time.monotonic() + 5
        while ph.phase != STOP and time.monotonic() < deadline:
            if not seen or seen[-1] != ph.phase:
                seen.append(ph.phase)
            time.sleep(0.002)
        assert ph.phase == STOP
    assert seen[0] == WARMUP and MEASURE in seen
    assert Phases(0, 1).phase == MEASURE


def test_config_defaults_and_validation() -> None:
    c = BenchConfig()
    c.validate()
    assert c.frame_sizes == (64, 512, 1514) and c.paths == ("vhost",)
    assert BenchConfig(mtu=9000).frame_sizes == (64, 512, 1514, 9000)
    assert BenchConfig(path="both").paths == ("vhost", "tap")
    dc = BenchConfig(mtu=9000).datapath_config()
    assert dc.rx_buffer >= 12 + 9000 + 18 and dc.rx_buffer % 64 == 0
    assert BenchConfig().datapath_config().rx_buffer == 2048
    for bad in (dict(path="x"), dict(directions=()), dict(directions=("tx", "up")),
                dict(sizes=(59,)), dict(sizes=(1515,)), dict(duration=0), dict(warmup=-1),
                dict(batch=0), dict(batch=512), dict(verify_every=3),
                dict(verify_every=512), dict(ring_size=100), dict(queues=0)):
        with pytest.raises(ValidationError):
            BenchConfig(**bad).validate()


# -- chart ---------------------------------------------------------------------------------


def _report() -> BenchReport:
    runs = [_run("vhost", "tx", 64, 300_000, 1, 3), _run("tap", "tx", 64, 100_000, 8, None),
            _run("vhost", "tx", 1514, 150_000, 1, 3), _run("vhost", "rr", 64, 1, 1, 1, 50.0)]
    return BenchReport("6.1.0-test", "vhbench0", [], {}, None, runs, ratios(runs))


def test_svg_chart_is_well_formed_with_a_bar_per_run(tmp_path: Path) -> None:
    svg = svg_chart(_report())
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in root.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    assert len(bars) == 2 * 3  # two panels, three tx runs (rr is not plotted)
    assert all(float(b.get("height", "0")) >= 0 for b in bars)
    out = tmp_path / "b.svg"
    write_plot(_report(), str(out))
    assert out.read_text() == svg


def test_plot_file_checks(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"\.svg or \.png"):
        check_plot_path(str(tmp_path / "chart.gif"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(UnsupportedError, match="matplotlib"):
            check_plot_path(str(tmp_path / "chart.png"))
    empty = BenchReport("k", "t", [], {}, None, [_run("vhost", "rr", 64, 1, 1, 1, 5.0)])
    with pytest.raises(ValidationError, match="nothing to plot"):
        svg_chart(empty)
