"""``vhostctl up`` on the real kernel: a network namespace pings the probe guest over a bridge.

    netns: eth0 10.213.0.1 ── veth ── bridge (MTU 1400) ── tap ── vhost-net ── our rings

The main case runs ``vhostctl up`` as a real process (signals, exit status, teardown at
exit); the others call it in-process, where fd leaks can be seen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from tests.kernel.conftest import ip, link_exists

NS_IP, PROBE_IP = "10.213.0.1", "10.213.0.2"
NS_IP6, PROBE_IP6 = "fd00:213::1", "fd00:213::2"
MTU = 1400
START_TIMEOUT = 300.0  # a Python start with pyroute2: 10-20 s under emulation, more under load


class Lan:
    def __init__(self, bridge: str, veth: str, netns: str) -> None:
        self.bridge, self.veth, self.netns = bridge, veth, netns

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, timeout=timeout)


@pytest.fixture
def lan(ifname):
    """A bridge (MTU 1400) with a veth whose peer is eth0 of a new namespace, addressed."""
    lan = Lan(f"{ifname}b", f"{ifname}v", f"{ifname}n")
    try:
        ip("netns", "add", lan.netns)
        ip("link", "add", lan.bridge, "type", "bridge")
        ip("link", "set", lan.bridge, "mtu", str(MTU), "up")
        ip("link", "add", lan.veth, "mtu", str(MTU), "type", "veth", "peer", "name", "eth0",
           "mtu", str(MTU), "netns", lan.netns)
        ip("link", "set", lan.veth, "master", lan.bridge, "up")
        ip("-n", lan.netns, "addr", "add", f"{NS_IP}/24", "dev", "eth0")
        ip("-n", lan.netns, "addr", "add", f"{NS_IP6}/64", "dev", "eth0", "nodad")
        ip("-n", lan.netns, "link", "set", "eth0", "up")
        ip("-n", lan.netns, "link", "set", "lo", "up")
        yield lan
    finally:
        subprocess.run(["ip", "netns", "del", lan.netns], capture_output=True)
        for name in (lan.veth, lan.bridge):
            if link_exists(name):
                subprocess.run(["ip", "link", "del", name], capture_output=True)


def sysfs(tap: str, attr: str) -> str:
    with open(f"/sys/class/net/{tap}/{attr}") as f:
        return f.read().strip()


def up_and_enslaved(tap: str, bridge: str) -> bool:
    try:
        master = os.path.basename(os.readlink(f"/sys/class/net/{tap}/master"))
        return master == bridge and int(sysfs(tap, "flags"), 16) & 1 == 1
    except OSError:
        return False


def vhost_workers(pid: int) -> list[str]:
    """Threads named vhost-PID anywhere (kernel threads before 6.4, ours since)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == f"vhost-{pid}":
                        found.append(entry)
            except OSError:
                continue
    return found


def wait_enslaved(tap: str, bridge: str, timeout: float,
                  gave_up: Callable[[], bool]) -> float | None:
    """Seconds until the tap is up in the bridge; None on timeout or once ``gave_up()``."""
    t0 = time.monotonic()
    while not up_and_enslaved(tap, bridge):
        if gave_up() or time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.2)
    return time.monotonic() - t0


def test_up_answers_ping_and_ping6_then_sigterm_removes_everything(lan, ifname):
    tap = ifname
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostctl", "up", tap, "--bridge", lan.bridge,
         "--ip", f"{PROBE_IP}/24", "--ip6", f"{PROBE_IP6}/64", "--json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[str, object] = {}
    try:
        seen["start"] = wait_enslaved(tap, lan.bridge, START_TIMEOUT,
                                      lambda: proc.poll() is not None)
        if seen["start"] is not None:
            seen["mtu"], seen["tap_mac"] = int(sysfs(tap, "mtu")), sysfs(tap, "address")
            seen["ping"] = lan.run("ping", "-c", "5", "-W", "2", PROBE_IP)
            seen["odd"] = lan.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "1001",
                                  "-p", "a5", PROBE_IP)
            seen["ping6"] = lan.run("ping", "-6", "-c", "5", "-W", "2", PROBE_IP6)
            seen["neigh"] = json.loads(lan.run("ip", "-j", "neigh", "show", "dev", "eth0").stdout)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)

    assert seen["start"] is not None, (
        f"{tap} not up in {lan.bridge} within {START_TIMEOUT:g}s; vhostctl exited "
        f"{proc.returncode}: {stderr}")
    print(f"vhostctl up started in {seen['start']:.1f}s")
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    facts = json.dumps(report)
    for key, count in (("ping", 5), ("odd", 3), ("ping6", 5)):
        r = seen[key]
        assert r.returncode == 0 and f" {count} received" in r.stdout, \
            f"{key}: {r.stdout}{r.stderr}\nprobe: {facts}"
        assert "wrong data" not in r.stdout, r.stdout  # iputils checks the echoed payload
    assert "1009 bytes from" in seen["odd"].stdout
    assert seen["mtu"] == MTU, "the tap takes the bridge's MTU"
    assert str(seen["tap_mac"]).startswith("fe:") and report["tap_mac"] == seen["tap_mac"]
    macs = {n["dst"]: n.get("lladdr") for n in seen["neigh"]}
    assert macs[PROBE_IP] == macs[PROBE_IP6] == report["mac"], (macs, facts)
    assert report["mac"].startswith("52:54:00:")
    assert report["stopped_by"] == "SIGTERM" and report["tap"] == tap
    assert report["mtu"] == MTU and report["bridge"] == lan.bridge
    t = report["totals"]
    assert t["echo_replies"] >= 8 and t["arp_replies"] >= 1, facts
    assert t["echo6_replies"] >= 5 and t["nd_adverts"] >= 1, facts
    assert t["dropped"] == 0 and t["tx_dropped"] == 0, facts
    assert t["tx_frames"] == (t["arp_replies"] + t["echo_replies"] + t["nd_adverts"]
                              + t["echo6_replies"] + 2), facts  # + the two announcements
    assert not link_exists(tap), "the tap must go with the probe"
    end = time.monotonic() + 5
    while vhost_workers(proc.pid) and time.monotonic() < end:
        time.sleep(0.1)
    assert vhost_workers(proc.pid) == [], "a vhost worker outlived the probe"
    assert link_exists(lan.bridge)


def test_up_in_process_two_queues_until_duration_leaves_no_fd(cli, lan, ifname, no_fd_leak):
    pings: list[subprocess.CompletedProcess] = []
    done = threading.Event()

    def ping_once_up() -> None:  # the CLI holds the main thread (signal handlers live there)
        if wait_enslaved(ifname, lan.bridge, START_TIMEOUT, done.is_set) is not None:
            pings.append(lan.run("ping", "-c", "5", "-i", "0.2", "-W", "2", PROBE_IP))

    pinger = threading.Thread(target=ping_once_up)
    pinger.start()
    try:
        r = cli("up", ifname, "--bridge", lan.bridge, "--ip", f"{PROBE_IP}/24", "--queues", "2",
                "--mac", "52:54:00:ab:cd:ef", "--duration", "15", "--json")
    finally:
        done.set()
        pinger.join(timeout=120)
    assert r.code == 0, r
    report = r.json()
    facts = json.dumps(report)
    assert pings and pings[0].returncode == 0 and " 5 received" in pings[0].stdout, \
        f"{pings[0].stdout if pings else 'no ping'}\nprobe: {facts}"
    assert report["stopped_by"] == "duration" and 15 <= report["seconds"] < 40, facts
    assert report["mac"] == "52:54:00:ab:cd:ef" and len(report["queues"]) == 2
    assert report["totals"]["echo_replies"] >= 5, facts
    assert not link_exists(ifname)


def test_up_live_view_without_json(cli, lan, ifname):
    r = cli("up", ifname, "--bridge", lan.bridge, "--ip", f"{PROBE_IP}/24", "--duration", "1")
    assert r.code == 0, r
    assert "probe guest 52:54:00:" in r.stdout and f"on {ifname}" in r.stdout
    assert "stopped by duration after" in r.stdout and f"{ifname} removed" in r.stdout
    assert not link_exists(ifname)


def test_up_refuses_bad_links_before_creating_anything(cli, lan, ifname, no_fd_leak):
    def links() -> set[str]:
        return {x["ifname"] for x in json.loads(ip("-j", "link", "show"))}

    before = links()
    base = ["--ip", f"{PROBE_IP}/24"]
    cases = [
        (["up", lan.veth, "--bridge", lan.bridge, *base], f"a link named {lan.veth} already"),
        (["up", ifname, "--bridge", lan.veth, *base], "is not a bridge (it is a veth link)"),
        (["up", ifname, "--bridge", "lo", *base], "lo is not a bridge"),
        (["up", ifname, "--bridge", f"{ifname}q", *base], "does not exist"),
        (["up", ifname, "--bridge", lan.bridge, "--ip", "10.213.0.255/24"], "broadcast"),
    ]
    for args, words in cases:
        r = cli(*args)
        assert r.code == 2, r
        assert r.stderr.startswith("vhostctl: ") and words in r.stderr, r
        assert "Traceback" not in r.stderr
    assert links() == before
