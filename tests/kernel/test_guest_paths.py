"""Scenario 3 of issue 16: three packet paths in one running guest, measured.

One guest (the Debian 6.1 kernel running virtio_net, see tests/kernel/guest.py), booted once
for the module, has three NICs:

- eth0, path A: vhost-net on the tap and vhost fd ``vhostctl exec`` opened;
- eth1, path B: ``-netdev tap,...,vhost=off``: QEMU reads and writes the tap itself;
- eth2, path C: vhost-user, the backend ``dpdk-testpmd`` (``net_vhost0``, rxonly), which
  nobody here wrote; the guest's memory is a shared memfd so that testpmd can map it.

``inspect`` must name each path (A's vhost worker, B without a vhost fd, C's backend pid and
socket).  Then a pktgen flow runs from the guest through each NIC in turn, and one ``top
--json`` window must charge its CPU to the thread that moves the packets: the vhost worker
(A), QEMU's own threads (B), the testpmd process (C), while the others stay idle.  The rate
comes from the tap's counter (A, B) or testpmd's own RX count (C: no tap), both logged over
top's exact window; the per-thread CPU over the same run says where the CPU went.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kernel.conftest import ip, link_exists, scratch_dir, stop_process, wait_until
from tests.kernel.guest import (
    Guest,
    addr_of,
    host_ping,
    qemu_args,
    record,
    start,
    tap_counter,
    tap_mac,
    vhostctl_exec,
    wait_booted,
    wait_link,
)
from tests.kernel.test_guest import CounterLog, inspect_one, top_samples
from vhostctl.survey import (
    PATH_VHOST_NET,
    PATH_VHOST_USER,
    PATH_VIRTIO,
    expected_worker_model,
    parse_stat,
)

pytestmark = pytest.mark.kernel

TESTPMD = shutil.which("dpdk-testpmd") or "/usr/bin/dpdk-testpmd"
STDBUF = shutil.which("stdbuf") or "/usr/bin/stdbuf"
EXPECTED_MODEL = expected_worker_model(os.uname().release)
TOP_INTERVAL = "3"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATHS = (PATH_VHOST_NET, PATH_VIRTIO, PATH_VHOST_USER)
DEV = {PATH_VHOST_NET: "eth0", PATH_VIRTIO: "eth1", PATH_VHOST_USER: "eth2"}
MAC = {PATH_VHOST_NET: "52:54:00:16:03:0a", PATH_VIRTIO: "52:54:00:16:03:0b",
       PATH_VHOST_USER: "52:54:00:16:03:0c"}
SUBNET = {PATH_VHOST_NET: "10.165.1", PATH_VIRTIO: "10.165.2", PATH_VHOST_USER: "10.165.3"}
PMD_STEP = 0.5  # testpmd's RX count is asked for this often (its main lcore answers)


class PmdBackend:
    """``dpdk-testpmd -i`` as the vhost-user server, driven over its stdin: forwarding
    (``rxonly``: count and free what the guest sends) runs only while a test says ``start``,
    so its polling lcore does not eat the nested guest's CPU the rest of the time.
    ``stdbuf -o0``: testpmd prints with stdio, which a pipe would buffer past its prompt."""

    PROMPT = b"testpmd> "

    def __init__(self, sock: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            # Two lcores: testpmd forwards on a worker lcore, never on the main one.
            [STDBUF, "-o0", TESTPMD, "--no-huge", "-m", "256", "--no-pci", "--no-shconf",
             "-l", "0-1", f"--vdev=net_vhost0,iface={sock},queues=1", "--", "-i",
             "--no-mlockall", "--total-num-mbufs=2048", "--forward-mode=rxonly"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._out = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            wait_until("testpmd's prompt", lambda: self.PROMPT in self._out, 120,
                       [self.proc], [self.log])
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        with open(self.log, "wb") as f:
            while chunk := self.proc.stdout.read1(65536):
                f.write(chunk)
                f.flush()
                self._out.extend(chunk)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cmd(self, line: str, timeout: float = 60.0) -> str:
        """One command; its output, up to the next prompt."""
        with self._lock:
            mark = len(self._out)
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            end = wait_until(f"testpmd: {line}", lambda: self._out.find(
                self.PROMPT, mark + len(line)) + 1, timeout, [self.proc], [self.log],
                step=0.02)
            return self._out[mark:end - 1].decode(errors="replace")

    def rx_packets(self) -> int:
        out = self.cmd("show port stats 0")
        m = re.search(r"RX-packets:\s+(\d+)", out)
        if not m:
            raise AssertionError(f"no RX-packets in testpmd's stats: {out!r}")
        return int(m[1])

    def stop(self) -> None:
        stop_process(self.proc)
        self._reader.join(10)


@dataclass
class PathsVm:
    guest: Guest
    taps: dict[str, str]  # path -> tap (A, B)
    pmd: PmdBackend
    sock: str


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    yield from scratch_dir("vp")


@pytest.fixture(scope="module")
def paths_vm(workdir) -> Iterator[PathsVm]:
    tag = os.getpid() % 10000
    taps = {PATH_VHOST_NET: f"vp{tag}a", PATH_VIRTIO: f"vp{tag}b"}
    sock = str(workdir / "vu.sock")
    addrs = {DEV[p]: f"{SUBNET[p]}.2/24" for p in PATHS}
    pmd = PmdBackend(sock, workdir / "testpmd.log")
    g = None
    try:
        wait_until("testpmd's vhost-user socket", lambda: os.path.exists(sock), 120,
                   [pmd.proc], [pmd.log])
        argv = vhostctl_exec(
            "--tap", taps[PATH_VHOST_NET], "--queues", "1", "--",
            *qemu_args("paths", workdir, addrs),
            # vhost-user: testpmd maps the guest's memory, so it must be a shared fd.
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa", "node,memdev=mem",
            "-netdev", "tap,id=na,fds={tapfds},vhostfds={vhostfds},vhost=on",
            "-device", f"virtio-net-pci,netdev=na,id=nica,mac={MAC[PATH_VHOST_NET]}",
            "-netdev", f"tap,id=nb,ifname={taps[PATH_VIRTIO]},script=no,downscript=no,"
                       "vhost=off",
            "-device", f"virtio-net-pci,netdev=nb,id=nicb,mac={MAC[PATH_VIRTIO]}",
            "-chardev", f"socket,id=vu,path={sock}",
            "-netdev", "vhost-user,id=nc,chardev=vu",
            # vectors=0 (INTx): QEMU 7.2 under TCG (no irqfd) dies with SIGSEGV in
            # msix_set_vector_notifiers() from vhost_net_start() when the guest starts an
            # MSI-X vhost-user device.
            "-device", f"virtio-net-pci,netdev=nc,id=nicc,mac={MAC[PATH_VHOST_USER]},"
                       "vectors=0")
        t0 = time.monotonic()
        g = start("paths", workdir, argv, addrs)
        for p, tap in taps.items():
            wait_link(g, tap)
            ip("link", "set", tap, "up")
            ip("addr", "add", f"{SUBNET[p]}.1/24", "dev", tap)
        wait_booted(g, addr_of(addrs[DEV[PATH_VHOST_NET]]), t0)
        record(test="boot", guest=g.name, boot_seconds=round(g.boot_seconds, 1),
               style="three paths")
        print(f"guest {g.name} booted in {g.boot_seconds:.1f} s")
        for p in PATHS:  # the NICs came up in command-line order
            assert g.sh(f"cat /sys/class/net/{DEV[p]}/address").strip() == MAC[p], p
        yield PathsVm(guest=g, taps=taps, pmd=pmd, sock=sock)
    finally:
        if g is not None:
            g.stop()
        pmd.stop()
    for tap in taps.values():
        wait_until(f"tap {tap} gone with QEMU", lambda t=tap: not link_exists(t), 30)


def test_inspect_names_each_path(paths_vm, cli):
    vm, g = paths_vm, paths_vm.guest
    p = inspect_one(cli, g)
    assert (p["kind"], p["name"]) == ("qemu", g.name)
    nics = {n["path"]: n for n in p["nics"]}
    assert sorted(nics) == sorted(PATHS), p["nics"]
    a, b, c = (nics[x] for x in PATHS)
    (w,) = p["workers"]
    assert (w["name"], w["model"]) == (f"vhost-{g.pid}", EXPECTED_MODEL), w
    assert (a["tap"], len(a["tap_fds"]), len(a["vhost_fds"])) == \
        (vm.taps[PATH_VHOST_NET], 1, 1), a
    assert a["queue_pairs"] == [{"tap_fd": a["tap_fds"][0], "vhost_fd": a["vhost_fds"][0],
                                 "worker_tid": w["tid"]}], a
    assert (b["tap"], len(b["tap_fds"]), b["vhost_fds"]) == (vm.taps[PATH_VIRTIO], 1, []), b
    assert b["vhost_requested"] is False, b
    assert (c["tap"], c["socket"]) == (None, vm.sock), c
    be = c["backend"]
    assert be is not None, c
    assert (be["pid"], be["comm"], be["socket"]) == (vm.pmd.pid, "dpdk-testpmd", vm.sock), be
    r = cli("inspect", str(g.pid))
    assert r.code == 0 and f"backend dpdk-testpmd pid {vm.pmd.pid}" in r.stdout, r


def test_guest_and_host_ping_each_other_on_the_tap_paths(paths_vm):
    g = paths_vm.guest
    rtts = {}
    for p in (PATH_VHOST_NET, PATH_VIRTIO):
        host, guest_addr = f"{SUBNET[p]}.1", f"{SUBNET[p]}.2"
        out = g.ping(host, count=10, iface=DEV[p])
        assert out["loss"] == 0 and out["sent"] == 10, (p, out)
        back = host_ping(guest_addr, count=10)
        assert back["loss"] == 0 and back["sent"] == 10, (p, back)
        rtts[p] = (out.get("rtt_avg"), back.get("rtt_avg"))
        record(test="ping", guest=g.name, path=p, guest_to_host_rtt_ms=rtts[p][0],
               host_to_guest_rtt_ms=rtts[p][1])
    print("ping RTT ms (guest->host, host->guest):", rtts)


def ticks(stat_path: str) -> int:
    st = parse_stat(Path(stat_path).read_text())
    return st.utime + st.stime


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """Every thread of ``pid``: its name and CPU time so far (utime + stime, clock ticks)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        st = parse_stat(Path(f"/proc/{pid}/task/{tid}/stat").read_text())
        out[st.pid] = (st.comm, st.utime + st.stime)
    return out


def cpu_split(vm: PathsVm, worker_tid: int) -> dict[str, int]:
    """Host CPU so far (ticks), by who spends it: the guest's vCPU thread (TCG: the guest's
    own work, pktgen and virtio_net), QEMU's main thread (its main loop moves a vhost=off
    NIC's packets), QEMU's other threads, the vhost worker (a thread of QEMU since 6.4, a
    kthread before) and testpmd (every thread)."""
    qpid = vm.guest.pid
    q = thread_ticks(qpid)
    return {
        "vcpu": sum(t for name, t in q.values() if name.startswith("CPU ")),
        "qemu_main": q[qpid][1],
        "qemu_other": sum(t for tid, (name, t) in q.items()
                          if tid not in (qpid, worker_tid) and not name.startswith("CPU ")),
        "vhost_worker": q[worker_tid][1] if worker_tid in q else ticks(
            f"/proc/{worker_tid}/stat"),
        "testpmd": sum(t for _, t in thread_ticks(vm.pmd.pid).values()),
    }


def nic_row(sample: dict, pid: int, path: str) -> dict:
    (proc,) = [p for p in sample["processes"] if p["pid"] == pid]
    (row,) = [n for n in proc["nics"] if n["path"] == path]
    return row


def test_idle_guest_baseline(paths_vm, cli):
    """No flow: what the running guest costs anyway (the table's reference row)."""
    vm = paths_vm
    (w,) = inspect_one(cli, vm.guest)["workers"]
    t0, split0 = time.time(), cpu_split(vm, w["tid"])
    time.sleep(float(TOP_INTERVAL))
    t1, split1 = time.time(), cpu_split(vm, w["tid"])
    pct = {k: round(100 * (split1[k] - split0[k]) / CLK_TCK / (t1 - t0), 1) for k in split0}
    record(test="idle", guest=vm.guest.name, cpu_pct=pct)
    print("idle guest, host CPU %:", pct)
    assert pct["vhost_worker"] <= 1.0 and pct["testpmd"] <= 1.0, pct


@pytest.mark.parametrize("path", PATHS)
def test_flow_is_charged_to_the_thread_that_moves_it(paths_vm, path, cli):
    vm, g = paths_vm, paths_vm.guest
    (w,) = inspect_one(cli, g)["workers"]
    dev = DEV[path]
    if path == PATH_VHOST_USER:
        vm.pmd.cmd("start")
        log = CounterLog(None, read=vm.pmd.rx_packets, step=PMD_STEP)
        dst, dst_mac = f"{SUBNET[path]}.1", "02:00:00:00:00:01"  # nobody: testpmd frees all
    else:
        tap = vm.taps[path]
        log = CounterLog(tap)
        dst, dst_mac = f"{SUBNET[path]}.1", tap_mac(tap)
    others = {p: tap_counter(t, "rx_packets") for p, t in vm.taps.items() if p != path}
    g.pktgen_start(dev, dst, dst_mac)
    try:
        time.sleep(1.0)  # past the start-up
        with log:
            t0, split0 = time.time(), cpu_split(vm, w["tid"])
            r = cli("top", "--json", "--iterations", "1", "--interval", TOP_INTERVAL)
            t1, split1 = time.time(), cpu_split(vm, w["tid"])
            time.sleep(log.step + 0.2)  # one more read after top's end
    finally:
        sent = g.pktgen_stop(dev)
        if path == PATH_VHOST_USER:
            vm.pmd.cmd("stop")
    assert r.code == 0, r
    (sample,) = top_samples(r.stdout)
    end, interval = sample["time"], sample["interval"]
    pps = (log.at(end) - log.at(end - interval)) / interval
    rows = {p: nic_row(sample, g.pid, p) for p in PATHS}
    row, mover = rows[path], rows[path]["mover"]
    # Where the CPU went over the same run, per packet moved (µs).
    moved = log.at(t1) - log.at(t0)
    split = {k: split1[k] - split0[k] for k in split0}
    us = {k: round(1e6 * v / CLK_TCK / moved, 1) if moved else None for k, v in split.items()}
    pct = {k: round(100 * v / CLK_TCK / (t1 - t0), 1) for k, v in split.items()}
    facts = dict(test="path", guest=g.name, path=path, pps=round(pps), window_s=interval,
                 top_pps=row["from_guest_pps"], mover=mover,
                 mover_us_per_packet=round(1e4 * mover["cpu_pct"] / pps, 1) if pps else None,
                 cpu_pct=pct, us_per_packet=us, pktgen=sent,
                 idle_paths_cpu_pct={p: rows[p]["mover"]["cpu_pct"] for p in PATHS
                                     if p != path})
    record(**facts)
    print(facts)
    assert pps > 100, facts
    assert mover["cpu_pct"] > 0, facts
    if path == PATH_VHOST_NET:
        assert (mover["by"], mover["tids"]) == ("vhost workers", [w["tid"]]), mover
        assert split["vhost_worker"] > 0, facts
    elif path == PATH_VIRTIO:
        assert (mover["by"], mover["pid"]) == ("vmm threads", g.pid), mover
        assert split["qemu_main"] > 0, facts  # QEMU's main loop writes the tap
    else:
        assert (mover["by"], mover["pid"], mover["comm"]) == \
            ("vhost-user backend", vm.pmd.pid, "dpdk-testpmd"), mover
        assert split["testpmd"] > 0, facts
    if path != PATH_VHOST_NET:  # the vhost worker only works for A's packets
        assert rows[PATH_VHOST_NET]["mover"]["cpu_pct"] <= 1.0, facts
        assert split["vhost_worker"] <= 1, facts
    if path != PATH_VHOST_USER:  # testpmd is not forwarding: idle
        assert rows[PATH_VHOST_USER]["mover"]["cpu_pct"] <= 1.0, facts
    if path in vm.taps:  # top's rate is the tap's
        assert abs(row["from_guest_pps"] - pps) <= 0.1 * pps, facts
    for p, before in others.items():  # and the flow went through this NIC only
        assert tap_counter(vm.taps[p], "rx_packets") - before < 100, (p, facts)
