"""The Prometheus exporter against the real kernel, scraped by a real Prometheus server.

- ``vhostctl serve`` runs as its own process (one per module); Debian's ``prometheus`` scrapes
  it every 2 s and its HTTP API answers the issue's queries; ``promtool check metrics`` lints
  every exposition taken here.
- The rates are proven with a running guest as the traffic source (test_guest.py hands a
  :class:`TrafficNic` to :func:`assert_prometheus_rates`, in the guest's boot): the tap, the
  ``domain`` label it is expected under, and start/stop of traffic both ways.
- A paused QEMU given vhost=on through ``vhostctl exec`` shows vhost active with one worker
  series per queue pair.  Debian 12's QEMU 7.2 aborts (net_client_init1: Assertion 'nc')
  instead of falling back to userspace when it cannot open /dev/vhost-net, so "requested,
  not active" is a process with QEMU's command line (vhost=on) holding the tap's queue fds
  and no vhost-net fd: exactly what the survey sees of a QEMU that fell back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kernel.conftest import ip, stop_process, wait_until

pytestmark = pytest.mark.kernel

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
START_TIMEOUT = 180.0  # a Python start with prometheus_client, or Prometheus, under TCG
SCRAPE_INTERVAL = 2  # seconds
RATE_WINDOW = 30  # seconds, the rate(...[30s])


def promtool_check(text: str) -> None:
    """``promtool check metrics`` on one exposition: clean means exit 0 and no output."""
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), \
        f"promtool check metrics: {r.returncode} {r.stdout} {r.stderr}"


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def pick(series: dict, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [(lab, v) for lab, v in series.get(name, [])
            if all(lab.get(k) == x for k, x in labels.items())]


# -- the exporter, as its own process ---------------------------------------------------------

@dataclass
class Exporter:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT/metrics

    @property
    def target(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url, timeout=120) as r:
            assert r.status == 200
            return r.read().decode()


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    d = Path(tempfile.mkdtemp(prefix="vhm"))
    log = d / "serve.log"
    with open(log, "w") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "vhostctl", "serve", "--listen",
                                 "127.0.0.1:0"], stdin=subprocess.DEVNULL, stdout=errf,
                                stderr=errf)
    try:
        m = wait_until("vhostctl serve says where it listens",
                       lambda: re.search(r"serving (http://\S+/metrics)", log.read_text()),
                       START_TIMEOUT, [proc], [log])
        yield Exporter(proc, m[1])  # type: ignore[index]
        # SIGTERM is a clean stop (exit 0) for systemd.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        stop_process(proc, 15)
        shutil.rmtree(d, ignore_errors=True)


# -- the traffic source ------------------------------------------------------------------------

@dataclass
class TrafficNic:
    """What a Prometheus test needs of a traffic source: the tap, the domain label the
    exporter shows it under, and traffic both ways between ``start()`` and ``stop()``."""

    tap: str
    domain: str
    start: Callable[[], None]
    stop: Callable[[], None]
    moved: dict[str, int] = field(default_factory=dict)


def tap_counters(tap: str) -> dict[str, int]:
    base = f"/sys/class/net/{tap}/statistics"
    return {k: int(Path(base, k).read_text()) for k in
            ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}


# -- Prometheus ---------------------------------------------------------------------------------

@dataclass
class Prometheus:
    url: str

    def query(self, q: str, at: float | None = None) -> list[dict]:
        args = {"query": q, **({"time": f"{at:.3f}"} if at is not None else {})}
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(args)}",
                                    timeout=60) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prometheus(exporter: Exporter) -> Iterator[Prometheus]:
    """Debian's Prometheus scraping the exporter every 2 s, from a throw-away directory."""
    d = Path(tempfile.mkdtemp(prefix="vhp"))
    port = free_port()
    (d / "prometheus.yml").write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL}s\n"
        f"  scrape_timeout: {SCRAPE_INTERVAL}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL}s\n"
        "scrape_configs:\n"
        "  - job_name: vhostctl\n"
        "    static_configs:\n"
        f"      - targets: ['{exporter.target}']\n")
    log = d / "prometheus.log"
    with open(log, "w") as errf:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={d / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={d / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, cwd=d)
    prom = Prometheus(f"http://127.0.0.1:{port}")

    def ready() -> bool:
        try:
            return bool(prom.query('up{job="vhostctl"} == 1'))
        except OSError:
            return False

    try:
        wait_until("Prometheus up and scraping vhostctl serve", ready, START_TIMEOUT, [proc],
                   [log])
        yield prom
    finally:
        stop_process(proc, 15)
        shutil.rmtree(d, ignore_errors=True)


def record(scrape: str | None = None, **facts: object) -> None:
    """Keep what was measured (and a scrape, for the README) in $VHOSTCTL_RESULTS."""
    out = os.environ.get("VHOSTCTL_RESULTS")
    if out:
        with open(Path(out) / "metrics_facts.jsonl", "a") as f:
            f.write(json.dumps({"kernel": os.uname().release, **facts}) + "\n")
        if scrape is not None:
            Path(out, f"scrape-{facts['test']}.prom").write_text(scrape)


class CounterLog:
    """The tap's sysfs counters sampled every 0.25 s (monotonic -> wall clock), to compare
    with Prometheus over the same window."""

    def __init__(self, tap: str) -> None:
        self.tap, self.rows = tap, []
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.halt.is_set():
            self.rows.append((time.time(), tap_counters(self.tap)))
            self.halt.wait(0.25)

    def close(self) -> None:
        self.halt.set()
        self.thread.join(10)

    def at(self, t: float, key: str) -> float:
        """The counter at wall time ``t``, linear between the two samples around it."""
        before = [r for r in self.rows if r[0] <= t]
        after = [r for r in self.rows if r[0] >= t]
        assert before and after, f"no counter samples around {t}"
        (t0, a), (t1, b) = before[-1], after[0]
        if t1 == t0:
            return a[key]
        return a[key] + (b[key] - a[key]) * (t - t0) / (t1 - t0)


def assert_prometheus_rates(exporter: Exporter, prometheus: Prometheus, nic: TrafficNic,
                            queues: set[str]) -> None:
    """The issue's proof over 30 s of ``nic``'s traffic: Prometheus answers
    ``rate(vhostctl_vhost_worker_cpu_seconds_total[30s]) > 0`` for a worker of each of
    ``queues``, and the guest-perspective packet and byte rates within 10 % of the tap's
    counters over the same window; ``promtool check metrics`` passes on the scrapes."""
    promtool_check(exporter.scrape())  # idle first
    counters = CounterLog(nic.tap)
    t_start = time.time()
    nic.start()
    try:
        # Enough scrapes inside the traffic for a full 30 s window, and 2 s of slack.
        wait_until("30 s of traffic", lambda: time.time() > t_start + RATE_WINDOW + 3 *
                   SCRAPE_INTERVAL, RATE_WINDOW + 60)
        text = exporter.scrape()
        at = time.time() - SCRAPE_INTERVAL  # inside the traffic, with a scrape after it
        time.sleep(2 * SCRAPE_INTERVAL)
    finally:
        nic.stop()
        counters.close()
    promtool_check(text)
    sel = f'target_device="{nic.tap}"'
    cpu = prometheus.query(f"rate(vhostctl_vhost_worker_cpu_seconds_total{{{sel}}}"
                           f"[{RATE_WINDOW}s]) > 0", at)
    assert cpu, "no vhost worker of the tap burned CPU in Prometheus's view"
    assert {r["metric"]["domain"] for r in cpu} == {nic.domain}
    assert {r["metric"]["queue"] for r in cpu} == queues, cpu
    info = prometheus.query(f"vhostctl_nic_info{{{sel}}}", at)
    assert [(r["metric"]["device"], r["metric"]["backend"]) for r in info] == \
        [(nic.tap, "vhost-net")]
    rates = {}
    # Guest perspective: receive = the tap's tx, transmit = the tap's rx.
    for ours, tap_key in (("receive_packets", "tx_packets"), ("transmit_packets", "rx_packets"),
                          ("receive_bytes", "tx_bytes"), ("transmit_bytes", "rx_bytes")):
        got = prometheus.query(f"rate(vhostctl_nic_{ours}_total{{{sel}}}[{RATE_WINDOW}s])", at)
        assert len(got) == 1, got
        prom_rate = float(got[0]["value"][1])
        tap_rate = (counters.at(at, tap_key) - counters.at(at - RATE_WINDOW, tap_key)) / \
            RATE_WINDOW
        rates[ours] = (round(prom_rate, 1), round(tap_rate, 1))
        assert tap_rate > 0, f"no {tap_key} traffic on {nic.tap}"
        assert abs(prom_rate - tap_rate) <= 0.10 * tap_rate, \
            f"{ours}: Prometheus {prom_rate:.1f}/s, tap {tap_key} {tap_rate:.1f}/s"
    record(text, test="prometheus-rates", queues=sorted(queues), rates=rates, moved=nic.moved,
           cpu=[(r["metric"]["mode"], r["value"][1]) for r in cpu])


# -- a paused QEMU on vhost-net via vhostctl exec ----------------------------------------------

def test_paused_qemu_from_exec_is_vhost_active_with_a_worker_per_queue(exporter, ifname):
    from tests.kernel.test_vm import BASE, QEMU, qmp_ready, vhostctl_exec

    ip("tuntap", "add", "dev", ifname, "mode", "tap", "multi_queue", "vnet_hdr")
    d = Path(tempfile.mkdtemp(prefix="vq", dir="/tmp"))
    d.chmod(0o777)
    sock, log = str(d / "m.qmp"), d / "m.log"
    argv = vhostctl_exec(
        "--tap", ifname, "--queues", "2", "--", QEMU, *BASE, "-name", "guest=metricsvm",
        "-qmp", f"unix:{sock},server=on,wait=off",
        "-netdev", "tap,id=n0,fds={tapfds},vhostfds={vhostfds},vhost=on",
        "-device", "virtio-net-pci,netdev=n0,mq=on,vectors=6,mac=52:54:00:19:19:01")
    with open(log, "w") as errf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf)
    try:
        wait_until("QMP of the handed-off QEMU", lambda: qmp_ready(sock), START_TIMEOUT,
                   [proc], [log])
        text = exporter.scrape()
    finally:
        stop_process(proc, 15)
        ip("link", "del", ifname)
        shutil.rmtree(d, ignore_errors=True)
    promtool_check(text)
    s = parse(text)
    key = {"domain": "metricsvm", "target_device": ifname}
    (labels, _), = pick(s, "vhostctl_nic_info", **key)
    assert labels == {**key, "device": ifname, "netdev": "n0", "backend": "vhost-net",
                      "interface_type": "tun", "model_type": "virtio-net-pci",
                      "mac_address": "52:54:00:19:19:01", "queues_configured": "2",
                      "qemu_pid": str(proc.pid)}
    assert pick(s, "vhostctl_nic_vhost_requested", **key)[0][1] == 1
    assert pick(s, "vhostctl_nic_vhost_active", **key)[0][1] == 1
    enabled = pick(s, "vhostctl_nic_queues_enabled", **key)[0][1]
    disabled = pick(s, "vhostctl_nic_queues_disabled", **key)[0][1]
    assert enabled + disabled == 2 and enabled >= 1
    workers = pick(s, "vhostctl_vhost_worker_cpu_seconds_total", **key)
    assert sorted((lab["queue"], lab["mode"]) for lab, _ in workers) == \
        [("0", "system"), ("0", "user"), ("1", "system"), ("1", "user")]
    waits = pick(s, "vhostctl_vhost_worker_runqueue_wait_seconds_total", **key)
    assert sorted(lab["queue"] for lab, _ in waits) == ["0", "1"]
    assert pick(s, "vhostctl_vhost_workers", domain="metricsvm")[0][1] == 2
    record(text, test="paused-qemu", queues_enabled=enabled, queues_disabled=disabled)


# -- vhost requested, not active ----------------------------------------------------------------

def test_vhost_requested_but_no_vhost_fd_shows_requested_1_active_0(exporter, ifname):
    from vhostctl.tun import Tap

    ip("tuntap", "add", "dev", ifname, "mode", "tap", "multi_queue", "vnet_hdr")
    taps = Tap.open_queues(ifname, 2, vnet_hdr=True)
    taps[1].set_queue_enabled(False)  # as QEMU does for queue pairs the guest has not enabled
    fds = [t.fileno() for t in taps]
    # What a QEMU that fell back to userspace looks like: argv[0] qemu-system-x86_64, vhost=on,
    # the tap's queue fds, no /dev/vhost-net.  bash (not dash, which moves fds 3-9 up) waits
    # for a sleep that does not get the fds; the arguments after its command are QEMU's.
    child = subprocess.Popen(
        ["bash", "-c", "exec -a qemu-system-x86_64 bash -c "
         f"'sleep 600 {fds[0]}<&- {fds[1]}<&-; exit 0' \"$@\"",
         "bash", "-name", "guest=novhost", "-netdev",
         f"tap,id=n0,fds={fds[0]}:{fds[1]},vhost=on,queues=2",
         "-device", "virtio-net-pci,netdev=n0,mq=on"], pass_fds=fds,
        stdin=subprocess.DEVNULL)
    for t in taps:
        t.close()
    try:
        def seen() -> dict | None:
            s = parse(exporter.scrape())
            return s if pick(s, "vhostctl_nic_info", domain="novhost") else None

        s = wait_until("the fallen-back VMM in a scrape", seen, 60)
        key = {"domain": "novhost", "target_device": ifname}
        assert pick(s, "vhostctl_nic_vhost_requested", **key)[0][1] == 1
        assert pick(s, "vhostctl_nic_vhost_active", **key)[0][1] == 0
        (labels, _), = pick(s, "vhostctl_nic_info", **key)
        assert (labels["backend"], labels["qemu_pid"]) == ("userspace", str(child.pid))
        assert pick(s, "vhostctl_nic_queues_enabled", **key)[0][1] == 1
        assert pick(s, "vhostctl_nic_queues_disabled", **key)[0][1] == 1
        assert not pick(s, "vhostctl_vhost_worker_cpu_seconds_total", **key)
    finally:
        stop_process(child, 15)
        ip("link", "del", ifname)


# -- churn ------------------------------------------------------------------------------------

def test_vmms_exiting_during_scrapes_never_fail_one(exporter, ifname):
    """QEMU-looking processes holding a tap queue and a vhost-net fd start and exit all the
    time while ``serve`` is scraped: every scrape answers 200 with a valid exposition, and
    the scrapes did meet processes that vanished under them (their skipped reads)."""
    from vhostctl.tun import Tap
    from vhostctl.vhost import VhostNet

    ip("tuntap", "add", "dev", ifname, "mode", "tap", "vnet_hdr")
    (tap,) = Tap.open_queues(ifname, 1, vnet_hdr=True)
    vh = VhostNet()
    fds = [tap.fileno(), vh.fileno()]
    halt = threading.Event()
    started = [0]

    def churn() -> None:
        live: list[subprocess.Popen] = []
        while not halt.is_set():
            live = [c for c in live if c.poll() is None]
            while len(live) < 6:
                ms = 50 + (started[0] * 37) % 250
                live.append(subprocess.Popen(
                    ["bash", "-c", f"exec -a qemu-system-x86_64 bash -c 'sleep 0.{ms:03d}' "
                     '"$@"', "bash", "-name", f"guest=churn{started[0]}", "-netdev",
                     f"tap,id=n0,fd={fds[0]},vhost=on,vhostfd={fds[1]}",
                     "-device", "virtio-net-pci,netdev=n0"], pass_fds=fds,
                    stdin=subprocess.DEVNULL))
                started[0] += 1
            halt.wait(0.02)
        for c in live:
            stop_process(c, 15)

    th = threading.Thread(target=churn, daemon=True)
    th.start()
    skipped, seen = 0.0, set()
    try:
        wait_until("the first churning VMMs", lambda: started[0] >= 6, 60)
        for _ in range(15):
            text = exporter.scrape()  # asserts HTTP 200
            s = parse(text)
            skipped += sum(v for _, v in s["vhostctl_scrape_skipped_reads"])
            seen |= {lab["domain"] for lab, _ in s.get("vhostctl_nic_info", [])
                     if lab.get("domain", "").startswith("churn")}
        promtool_check(text)
    finally:
        halt.set()
        th.join(60)
        vh.close()
        tap.close()
        ip("link", "del", ifname)
    record(test="churn", started=started[0], scrapes=15, skipped_reads=skipped,
           churners_seen=len(seen))
    assert seen, "no scrape saw a churning VMM"
    assert skipped > 0, f"{started[0]} VMMs came and went, yet no scrape met a vanished one"
