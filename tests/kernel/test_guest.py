"""Running guests on vhost-net handed over by ``vhostctl exec``, and hot-plug into them.

Each guest (the Debian 6.1 kernel running virtio_net, see tests/kernel/guest.py) boots once
per module and serves every test of its group.  Scenario 1 (issue 16): with 1 and 2 queue
pairs the guest and the host ping each other with no loss; a pktgen flow from the guest is
then seen by ``inspect`` (vhost-net, the tap, the queue count, one worker per queue pair
with CPU time) and by ``top --json`` at the tap's own rate.  Scenario 2: a NIC hot-plugged
into the running guest is found, brought up and pinged through by the guest, and unplugged
while a flow runs: the guest lets it go, QEMU keeps running, the host keeps nothing of it.

When scripts/vmtest runs both kernels, the 1-queue-pair guest runs on 6.1 and the 2-queue-pair
guest on 6.12 (``one_kernel``): a group is a nested boot plus its flows, and each kernel still
proves every scenario on a running guest.  Alone, either kernel runs both.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kernel import test_metrics as tm
from tests.kernel.conftest import fds_but_sockets, ip, link_exists, scratch_dir, wait_until
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
from vhostctl.selftest import host_socket, probe_frame
from vhostctl.survey import expected_worker_model, parse_info_network

pytestmark = pytest.mark.kernel

EXPECTED_MODEL = expected_worker_model(os.uname().release)
FLOW_SECONDS = 3.0
TOP_INTERVAL = "3"
HOTPLUG_PORT = ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
                # native PCIe hotplug (pciehp in the guest): the guest powers the slot
                # down on device_del, after the attention button's 5 s grace period.
                "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
UNPLUG_WAIT = "120"
HOST_TO_GUEST_PPS = 500  # frames the host sends into the guest while it transmits

# The exporter (one `vhostctl serve` for this module) and Debian's Prometheus scraping it.
exporter = tm.exporter
prometheus = tm.prometheus


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    yield from scratch_dir("vg")


def exec_guest(workdir: Path, name: str, tap: str, queues: int, subnet: str,
               extra: list[str] = ()) -> Iterator[tuple[Guest, str, str]]:
    """Boot a guest whose eth0 is handed over by ``vhostctl exec --tap``; yield it with the
    tap and the host's address, then stop it (the tap, made by exec, vanishes with QEMU)."""
    host, guest_cidr = f"{subnet}.1", f"{subnet}.2/24"
    mq = f",mq=on,vectors={2 * queues + 2}" if queues > 1 else ""
    argv = vhostctl_exec(
        "--tap", tap, "--queues", str(queues), "--",
        *qemu_args(name, workdir, {"eth0": guest_cidr}, smp=queues),
        "-netdev", "tap,id=n0,fds={tapfds},vhostfds={vhostfds},vhost=on",
        "-device", f"virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:16:{queues:02x}:02{mq}",
        *extra)
    t0 = time.monotonic()
    g = start(name, workdir, argv, {"eth0": guest_cidr})
    try:
        wait_link(g, tap)
        ip("addr", "add", f"{host}/24", "dev", tap)
        wait_booted(g, addr_of(guest_cidr), t0)
        record(test="boot", guest=name, queues=queues, boot_seconds=round(g.boot_seconds, 1))
        yield g, tap, host
    finally:
        g.stop()
    wait_until(f"tap {tap} gone with QEMU", lambda: not link_exists(tap), 30)


@pytest.fixture(scope="module", params=[pytest.param(1, marks=pytest.mark.one_kernel("6.1")),
                                        pytest.param(2, marks=pytest.mark.one_kernel("6.12"))],
                ids=["1qp", "2qp"])
def booted(request, workdir) -> Iterator[tuple[Guest, str, str, int]]:
    """A guest with 1 or 2 queue pairs (and as many vCPUs: virtio_net uses min(queue pairs,
    CPUs) of them), q35 with an empty root port for hot-plug; booted once for the group."""
    q = request.param
    for g, tap, host in exec_guest(workdir, f"g{q}", f"vg{os.getpid() % 10000}q{q}", q,
                                   f"10.16{q}.1", HOTPLUG_PORT):
        yield g, tap, host, q


def inspect_one(cli, g: Guest) -> dict:
    r = cli("inspect", "--json", str(g.pid))
    assert r.code == 0, r
    (proc,) = r.json()["processes"]
    assert proc["pid"] == g.pid
    return proc


def top_samples(stdout: str) -> list[dict]:
    """``top --json`` output: one JSON object per line (NDJSON), one per sample."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def find_nic_rows(obj, tap: str) -> list[dict]:
    """Every NIC row for ``tap`` anywhere in a top sample (rows carry ``nic`` or ``tap``
    and ``from_guest_pps``)."""
    out = []
    if isinstance(obj, dict):
        if tap in (obj.get("nic"), obj.get("tap")) and "from_guest_pps" in obj:
            out.append(obj)
        for v in obj.values():
            out.extend(find_nic_rows(v, tap))
    elif isinstance(obj, list):
        for v in obj:
            out.extend(find_nic_rows(v, tap))
    return out


# -- scenario 1 -------------------------------------------------------------------------------

def test_guest_and_host_ping_each_other(booted, cli):
    g, _tap, host, queues = booted
    guest_addr = addr_of(g.addrs["eth0"])
    out = g.ping(host, count=10)
    assert out["loss"] == 0 and out["sent"] == 10, out
    back = host_ping(guest_addr, count=10)
    assert back["loss"] == 0 and back["sent"] == 10, back
    flood = g.ping(host, count=200, flood=True)
    assert flood["loss"] == 0, flood
    record(test="ping", guest=g.name, queues=queues, guest_to_host_rtt_ms=out.get("rtt_avg"),
           host_to_guest_rtt_ms=back.get("rtt_avg"), flood_rtt_ms=flood.get("rtt_avg"))


def test_flow_shows_vhost_workers_with_cpu(booted, cli):
    g, tap, host, queues = booted
    before = inspect_one(cli, g)
    cpu0 = {w["tid"]: w["cpu_seconds"] for w in before["workers"]}
    rx0 = tap_counter(tap, "rx_packets")
    g.pktgen_start("eth0", host, tap_mac(tap), queues=queues)
    try:
        time.sleep(FLOW_SECONDS)
        p = inspect_one(cli, g)
    finally:
        sent = g.pktgen_stop("eth0")
    rx = tap_counter(tap, "rx_packets") - rx0
    assert p["kind"] == "qemu" and p["name"] == g.name
    (nic,) = p["nics"]
    assert (nic["path"], nic["tap"], nic["queues"]) == ("vhost-net", tap, queues), nic
    assert len(nic["tap_fds"]) == queues and len(nic["vhost_fds"]) == queues
    workers = p["workers"]
    assert len(workers) == queues, workers
    assert {w["name"] for w in workers} == {f"vhost-{g.pid}"}
    assert {w["model"] for w in workers} == {EXPECTED_MODEL}
    assert all(w["cpu_seconds"] > 0 for w in workers), workers
    assert all(w["cpu_seconds"] > cpu0.get(w["tid"], 0) for w in workers), (cpu0, workers)
    assert rx > 1000 and sent.get("sent", 0) >= rx * 0.9, (rx, sent)
    spent = sum(w["cpu_seconds"] for w in workers) - sum(cpu0.values())
    record(test="flow", guest=g.name, queues=queues, tap_rx_packets=rx, pktgen=sent,
           worker_cpu_s=[w["cpu_seconds"] for w in workers],
           worker_us_per_packet=round(1e6 * spent / rx, 2), model=workers[0]["model"])


class CounterLog:
    """The tap's rx_packets read every 50 ms in a thread, so a rate can be taken over exactly
    the window ``top`` measured (its sample's end time and interval): a window around the whole
    ``top`` call would also count the start-up and the final scan, whose CPU the nested guest
    loses, and read a lower rate than top's.  ``read`` counts something else instead (a
    vhost-user backend's own RX count), every ``step`` seconds."""

    def __init__(self, tap: str | None, read: Callable[[], float] | None = None,
                 step: float = 0.05) -> None:
        self.points, self._stop, self.step = [], threading.Event(), step
        self.read = read or (lambda: tap_counter(tap, "rx_packets"))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.points.append((time.time(), self.read()))
            self._stop.wait(self.step)

    def __enter__(self) -> CounterLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def at(self, when: float) -> float:
        """The counter at ``when``, interpolated between the two reads around it."""
        for (t0, c0), (t1, c1) in itertools.pairwise(self.points):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * (when - t0) / (t1 - t0 or 1.0)
        raise AssertionError(f"{when} outside the counter log {self.points[0][0]}.."
                             f"{self.points[-1][0]}")


def test_top_json_rate_matches_tap_counters(booted, cli):
    g, tap, host, queues = booted
    g.pktgen_start("eth0", host, tap_mac(tap), queues=queues)
    try:
        time.sleep(1.0)  # past the start-up
        with CounterLog(tap) as log:
            r = cli("top", "--json", "--iterations", "1", "--interval", TOP_INTERVAL)
            time.sleep(0.2)  # one more read after top's end
    finally:
        g.pktgen_stop("eth0")
    assert r.code == 0, r
    samples = top_samples(r.stdout)
    assert len(samples) == 1, r.stdout
    (row,) = find_nic_rows(samples[0], tap)
    end, interval = samples[0]["time"], samples[0]["interval"]
    tap_pps = (log.at(end) - log.at(end - interval)) / interval
    top_pps = row["from_guest_pps"]
    record(test="top", guest=g.name, queues=queues, top_pps=round(top_pps),
           tap_pps=round(tap_pps), window_s=interval, sample=samples[0])
    assert tap_pps > 100, tap_pps
    assert abs(top_pps - tap_pps) <= 0.1 * tap_pps, (top_pps, tap_pps)


# -- doctor (issue 17): the healthy counterparts that need a running guest -------------------

def doctor_json(cli, g: Guest, *extra: str) -> tuple[int, dict]:
    r = cli("doctor", "--json", "--qmp", g.qmp_path, "--timeout", "30", *extra, str(g.pid))
    assert r.code in (0, 1), r
    return r.code, r.json()


def test_doctor_finds_nothing_wrong_with_the_running_guest_under_traffic(booted, cli):
    """The guest's driver set DRIVER_OK, vhost started, every queue pair is enabled, and
    traffic both ways over --watch's window shows no drops and no saturated, starved or lone
    worker: nothing above info (tests/kernel/test_doctor.py provokes each of these)."""
    g, tap, host, queues = booted
    traffic = guest_traffic(g, tap, host, queues)
    traffic.start()
    try:
        code, rep = doctor_json(cli, g, "--watch", "3")
    finally:
        traffic.stop()
    record(test="doctor-healthy", guest=g.name, queues=queues, report=rep, moved=traffic.moved)
    assert code == 0 and [f for f in rep["findings"] if f["severity"] != "info"] == [], rep
    assert rep["not_run"] == [], rep["not_run"]  # QMP answered, the rates were measured
    assert rep["subjects"] == [f"{g.name} [{g.pid}]"]


def test_doctor_sees_one_busy_worker_when_the_guest_sends_on_one_queue(booted, cli):
    """pktgen on TX queue 0 only: with two queue pairs the first one's worker moves
    everything; with one, that is simply its only worker and nothing is wrong."""
    g, tap, host, queues = booted
    g.pktgen_start("eth0", host, tap_mac(tap), queues=1)
    try:
        time.sleep(1.0)
        code, rep = doctor_json(cli, g, "--watch", "3")
    finally:
        g.pktgen_stop("eth0")
    record(test="doctor-one-busy-worker", guest=g.name, queues=queues, report=rep)
    lone = [x for x in rep["findings"] if x["id"] == "mq-one-busy-worker"]
    if queues == 1:
        assert code == 0 and lone == [], rep
        return
    (f,) = lone
    assert code == 1 and f["severity"] == "warning", rep
    assert len(f["evidence"]) == 2, f


# -- metrics (issue 19) with the running guest as the traffic source ---------------------------

def guest_traffic(g: Guest, tap: str, host: str, queues: int) -> tm.TrafficNic:
    """Guest -> host: pktgen over every TX queue (the tap's rx); host -> guest: UDP frames on
    every flow of the tap's queues from an AF_PACKET socket (the tap's tx)."""
    halt = threading.Event()
    threads: list[threading.Thread] = []
    moved = {"host_sent": 0}

    def send() -> None:
        s = host_socket(int(Path(f"/sys/class/net/{tap}/ifindex").read_text()))
        try:
            frames = [probe_frame(i, 512, flow=i % queues) for i in range(50)]
            while not halt.is_set():
                for f in frames:
                    s.send(f)
                moved["host_sent"] += len(frames)
                halt.wait(len(frames) / HOST_TO_GUEST_PPS)
        finally:
            s.close()

    def start() -> None:
        g.pktgen_start("eth0", host, tap_mac(tap), queues=queues)
        threads.append(threading.Thread(target=send, daemon=True))
        threads[-1].start()

    def stop() -> None:
        halt.set()
        for t in threads:
            t.join(30)
        moved.update(g.pktgen_stop("eth0"))

    return tm.TrafficNic(tap, g.name, start, stop, moved)


def test_prometheus_sees_the_running_guests_worker_cpu_and_traffic(booted, exporter,
                                                                    prometheus):
    g, tap, host, queues = booted
    tm.assert_prometheus_rates(exporter, prometheus, guest_traffic(g, tap, host, queues),
                               {str(q) for q in range(queues)})


# -- scenario 2: hot-plug into the running guest ----------------------------------------------

def netdev_ids(g: Guest) -> set[str]:
    text = g.qmp("human-monitor-command", {"command-line": "info network"})
    return {p["id"] for e in parse_info_network(text) for p in e.get("peers", [e])}


def snapshot(g: Guest) -> dict:
    devices = sorted(c["name"] for c in g.qmp("qom-list", {"path": "/machine/peripheral"})
                     if c["type"].startswith("child<"))
    return {"devices": devices, "netdevs": sorted(netdev_ids(g)), "fds": fds_but_sockets(g.pid),
            "links": sorted(os.listdir("/sys/class/net"))}


def test_hotplug_into_running_guest_then_unplug_under_flow(booted, cli):
    g, tap0, host0, queues = booted
    tap = tap0 + "h"
    mac, subnet = f"52:54:00:16:0a:{queues:02x}", f"10.16{queues}.2"
    before = snapshot(g)
    t0 = time.monotonic()
    r = cli("hotplug", "--qmp", g.qmp_path, "--tap", tap, "--queues", str(queues), "--bus",
            "rp1", "--id", "hp0",
            "--mac", mac, "--timeout", "30", "--json")
    assert r.code == 0, r
    assert r.json()["created"] is True
    try:
        ip("addr", "add", f"{subnet}.1/24", "dev", tap)
        # The guest's pciehp finds the device and virtio_net probes it: a new ethN.
        dev = wait_until("the guest sees the hot-plugged NIC", lambda: g.sh(
            f"grep -l {mac} /sys/class/net/*/address || true").strip(), 180, step=1.0)
        dev = dev.split("/")[-2]
        seen_s = time.monotonic() - t0
        g.sh(f"ip addr add {subnet}.2/24 dev {dev} && ip link set {dev} up")
        out = g.ping(f"{subnet}.1", count=10, iface=dev)
        assert out["loss"] == 0, out
        back = host_ping(f"{subnet}.2", count=5)
        assert back["loss"] == 0, back
        p = inspect_one(cli, g)
        nic = next(n for n in p["nics"] if n["tap"] == tap)
        assert (nic["path"], nic["queues"]) == ("vhost-net", queues), nic
        # A flow through the new NIC, running while it is taken away.
        g.sh(f"ping -q -A -w 300 -I {dev} {subnet}.1 >/tmp/hp.out 2>&1 &")
        rx0 = tap_counter(tap, "rx_packets")
        wait_until("flow on the plugged NIC", lambda: tap_counter(tap, "rx_packets") > rx0 + 50,
                   60)
        t1 = time.monotonic()
        r = cli("unplug", "--qmp", g.qmp_path, "--id", "hp0", "--timeout", "30", "--wait",
                UNPLUG_WAIT, "--json")
        assert r.code == 0, r
        unplug_s = time.monotonic() - t1
        assert r.json() == {"id": "hp0", "device_removed": True, "netdev_removed": True}
    finally:
        cli("unplug", "--qmp", g.qmp_path, "--id", "hp0", "--timeout", "30")
    wait_until("the guest released the NIC", lambda: g.sh(
        f"[ ! -e /sys/class/net/{dev} ] && echo gone || true").strip() == "gone", 60, step=1.0)
    assert g.running()
    assert g.ping(host0, count=3)["loss"] == 0  # eth0 still works
    wait_until(f"tap {tap} gone", lambda: not link_exists(tap), 30)
    assert snapshot(g) == before
    record(test="hotplug", guest=g.name, queues=queues, seen_after_s=round(seen_s, 1),
           unplug_s=round(unplug_s, 1), ping_rtt_ms=out.get("rtt_avg"))
