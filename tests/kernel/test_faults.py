"""Faults on the real kernel: a failure at every setup step, and real signals at random points.

``_fd.faults`` makes the n-th kernel call fail (every ioctl, open, eventfd, socket call and,
since netlink.py reports its requests there too, every rtnetlink request).  Each command is
run once to count its calls, then once per call with that call failing.  Afterwards nothing
the command created may remain (no tap, no bridge port, nothing persistent: the rtnetlink
dump of every link equals the one from before), no fd may be left open, and the command must
have failed with one line naming the failed step.

Signals are real: the command runs in a forked child (the test process, already warmed up:
a fresh Python start costs seconds in the VM) and is killed either exactly before its n-th
kernel call, or after a seeded random delay.  What is found is appended to
``$VHOSTCTL_RESULTS/faults.jsonl``.

Size: every create/destroy of a tap costs the emulated VM about 1.5 s (the kernel's
unregister), so CI fails the first call of each kind (queue, vq and fd numbers aside: every
failure site in the code once), only setup steps (``selftest``: through the host socket;
``up``: its own steps plus the first and last of the datapath, which the selftest loop
covers), and signals at a few points.  ``VHOSTCTL_FAULTS_FULL=1`` fails every single call of
every command, traffic and teardown included, kills before every step, and adds ``hotplug``
against a real QEMU (tens of minutes under emulation).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kernel.conftest import (
    fds_but_sockets,
    fork_call,
    gone,
    ip,
    link_snapshot,
    open_fds,
    run_cli,
    udev_settle,
)
from vhostctl import _fd
from vhostctl.datapath import Datapath
from vhostctl.errors import VhostctlError
from vhostctl.netlink import Netlink
from vhostctl.qmp import QmpClient

SEED = 20240607
FULL = os.environ.get("VHOSTCTL_FAULTS_FULL") == "1"
MUTATING = re.compile(r"^(TUNSET|RTM_NEWLINK|RTM_DELLINK|VHOST_SET|VHOST_NET_SET)")


def record(**facts: object) -> None:
    out = os.environ.get("VHOSTCTL_RESULTS")
    if out:
        with open(Path(out) / "faults.jsonl", "a") as f:
            f.write(json.dumps({"kernel": os.uname().release, **facts}) + "\n")


def one_line_error(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip() and "warning:" not in x]
    assert len(lines) == 1 and lines[0].startswith("vhostctl: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")


def names_step(stderr: str, step: str) -> bool:
    """The one error line names the kernel call that failed, and the injected errno (a
    random MAC in the step's name differs from run to run)."""
    line = MAC.sub("MAC", one_line_error(stderr))
    return MAC.sub("MAC", step) in line and "Input/output error" in line


def distinct(calls: list[str]) -> list[int]:
    """1-based numbers of the first call of each kind (queue and vq numbers, fds and MACs
    ignored): every failure site in the code once.  VHOSTCTL_FAULTS_FULL fails every call."""
    if FULL:
        return list(range(1, len(calls) + 1))
    seen: dict[str, int] = {}
    for n, c in enumerate(calls, 1):
        seen.setdefault(re.sub(r"\d+", "N", MAC.sub("MAC", c)), n)
    return sorted(seen.values())


def counted_run(run: Callable[[], object], monkeypatch) -> tuple[object, list[str]]:
    """Run once with nothing failing; return its result and the kernel calls it made."""
    calls: list[str] = []
    real = _fd.faults.check

    def spy(what: str) -> None:
        calls.append(what)
        real(what)

    monkeypatch.setattr(_fd.faults, "check", spy)
    try:
        result = run()
    finally:
        monkeypatch.setattr(_fd.faults, "check", real)
    return result, calls


def fail_each(steps: list[int], run: Callable[[], object],
              check: Callable[[int, object], None]) -> None:
    """Run once per step number with that kernel call failing; check what is left."""
    for n in steps:
        _fd.faults.arm(n)
        try:
            result = run()
        finally:
            _fd.faults.disarm()
        check(n, result)


@pytest.fixture
def bridge(ifname) -> Iterator[str]:
    br = f"{ifname}b"
    ip("link", "add", br, "type", "bridge")
    ip("link", "set", br, "up")
    udev_settle()
    try:
        yield br
    finally:
        gone(br)


@pytest.fixture
def netns(ifname) -> Iterator[str]:
    ns = f"{ifname}n"
    ip("netns", "add", ns)
    try:
        yield ns
    finally:
        ip("netns", "del", ns)


def ns_links(ns: str) -> list[str]:
    with Netlink(netns=ns) as nl:
        return sorted(x.name for x in nl.links())


# -- tap add ----------------------------------------------------------------------------------


def test_tap_add_into_netns_fails_cleanly_at_every_step(ifname, netns, monkeypatch):
    """Every kernel call of ``tap add --netns`` (queues, owner, MTU, MAC, the move, persist,
    the read-back) made to fail: nothing in either namespace, no fd left; persistence last."""
    name = ifname
    args = ("tap", "add", name, "--netns", netns, "--owner", "nobody", "--mtu", "9000",
            "--mac", "fe:00:00:00:12:34", "--json")
    before, ns_before, fds = link_snapshot(), ns_links(netns), open_fds()
    r, calls = counted_run(lambda: run_cli(*args), monkeypatch)
    assert r.code == 0, r
    assert name in ns_links(netns)
    ip("-n", netns, "link", "del", name)
    mutating = [c for c in calls if MUTATING.match(c)]
    assert mutating[-1] == "TUNSETPERSIST", f"persistence must be set last: {mutating}"
    assert mutating.count("TUNSETPERSIST") == 1

    failed = []

    def check(n: int, r) -> None:
        assert r.code == 1, (n, calls[n - 1], r)
        assert names_step(r.stderr, calls[n - 1]), (n, calls[n - 1], r)
        assert ns_links(netns) == ns_before, f"step {n} ({calls[n - 1]}) left a link there"
        assert link_snapshot() == before, f"step {n} ({calls[n - 1]}) changed the host"
        assert open_fds() == fds, f"step {n} ({calls[n - 1]}) leaked fds"
        failed.append(calls[n - 1])

    steps = distinct(calls)
    fail_each(steps, lambda: run_cli(*args), check)
    record(test="tap-add-netns", calls=len(calls), failed=len(steps), names=calls)
    assert len(failed) == len(steps) >= 10


def test_tap_add_to_a_bridge_leaves_the_bridge_as_it_was(ifname, monkeypatch):
    """``tap add --bridge`` failing at every step: no tap, no port, and the bridge keeps its
    address.  A bridge without an address of its own takes its only port's, and on 6.12
    keeps a zero one when that port goes: the failure path puts the old one back, so the
    bridge is re-made with a random address before every step that could disturb it."""
    name, br = ifname, f"{ifname}c"

    def random_bridge() -> None:
        if os.path.exists(f"/sys/class/net/{br}"):
            with open(f"/sys/class/net/{br}/addr_assign_type") as f:
                if f.read().strip() == "1":  # NET_ADDR_RANDOM: still follows its ports
                    return
            ip("link", "del", br)
        ip("link", "add", br, "type", "bridge")
        ip("link", "set", br, "up")
        udev_settle()

    try:
        random_bridge()
        args = ("tap", "add", name, "--bridge", br, "--owner", "nobody")
        r, calls = counted_run(lambda: run_cli(*args), monkeypatch)
        assert r.code == 0, r
        gone(name)
        fds = open_fds()
        for n in distinct(calls):
            random_bridge()
            before = link_snapshot()
            _fd.faults.arm(n)
            try:
                r = run_cli(*args)
            finally:
                _fd.faults.disarm()
            assert r.code == 1, (n, calls[n - 1], r)
            assert names_step(r.stderr, calls[n - 1]), (n, calls[n - 1], r)
            assert link_snapshot() == before, f"step {n} ({calls[n - 1]}) changed the host"
            assert open_fds() == fds, f"step {n} ({calls[n - 1]}) leaked fds"
        record(test="tap-add-bridge", calls=len(calls), failed=len(distinct(calls)))
    finally:
        gone(name, br)


# -- selftest ---------------------------------------------------------------------------------


def test_selftest_fails_cleanly_at_every_step(ifname, monkeypatch):
    """Every setup call of a selftest (with VHOSTCTL_FAULTS_FULL, traffic and teardown too):
    no tap, no fd left."""
    args = ("selftest", "--tap", ifname, "--frames", "2", "--size", "60", "--ring-size", "16",
            "--json")
    before, fds = link_snapshot(), open_fds()
    r, calls = counted_run(lambda: run_cli(*args), monkeypatch)
    assert r.code == 0 and r.json()["ok"], r
    assert link_snapshot() == before and open_fds() == fds

    def check(n: int, r) -> None:
        assert r.code == 1, (n, calls[n - 1], r)
        assert names_step(r.stderr, calls[n - 1]), (n, calls[n - 1], r)
        assert link_snapshot() == before, f"step {n} ({calls[n - 1]}) left {ifname} behind"
        assert open_fds() == fds, f"step {n} ({calls[n - 1]}) leaked fds"

    setup = max(i for i, c in enumerate(calls) if c.startswith("setsockopt")) + 1
    steps = distinct(calls if FULL else calls[:setup])
    fail_each(steps, lambda: run_cli(*args), check)
    record(test="selftest", calls=len(calls), setup_calls=setup, failed=len(steps))
    assert setup > 35 and len(steps) > 20


# -- up ---------------------------------------------------------------------------------------


def test_up_fails_cleanly_at_every_step(ifname, bridge, monkeypatch):
    """Every kernel call of ``up`` (datapath with its MAC, bridge port and up, announcements,
    teardown):
    no tap, no bridge port, no fd left.  The bridge gets an address of its own first: one
    without follows its only port and, on 6.12, is left with a zero address when ``up``
    ends -- even a successful run changes it (reported; tap add restores it on failure)."""
    ip("link", "set", bridge, "address", "02:00:00:00:77:01")
    args = ("up", ifname, "--bridge", bridge, "--ip", "10.77.0.2/24", "--duration", "0.2",
            "--json")
    before, fds = link_snapshot(), open_fds()
    span: list[int] = []
    real_open = Datapath.open

    def spanned(self):
        span.append(_fd.faults.calls)
        try:
            return real_open(self)
        finally:
            span.append(_fd.faults.calls)

    monkeypatch.setattr(Datapath, "open", spanned)
    _fd.faults.arm(10**9)  # counts calls, never fires
    r, calls = counted_run(lambda: run_cli(*args), monkeypatch)
    _fd.faults.disarm()
    monkeypatch.setattr(Datapath, "open", real_open)
    assert r.code == 0, r
    assert "RTM_NEWLINK set master " + bridge + " on " + ifname in calls
    assert link_snapshot() == before and open_fds() == fds
    first, last = span[0] + 1, span[1]  # 1-based numbers of the datapath's calls
    steps = distinct(calls)
    if not FULL:  # the datapath's vhost/tun calls are failed one by one by the selftest
        # loop above; its link steps (MAC, bridge port, up) are up's own and stay in
        steps = [n for n in steps
                 if not first + 1 < n < last - 1 or calls[n - 1].startswith("RTM_")]

    def check(n: int, r) -> None:
        assert r.code == 1, (n, calls[n - 1], r)
        assert names_step(r.stderr, calls[n - 1]), (n, calls[n - 1], r)
        assert link_snapshot() == before, f"step {n} ({calls[n - 1]}) left a tap or port"
        assert open_fds() == fds, f"step {n} ({calls[n - 1]}) leaked fds"

    fail_each(steps, lambda: run_cli(*args), check)
    record(test="up", calls=len(calls), datapath=[first, last], failed=len(steps))
    assert len(steps) >= 8


# -- exec -------------------------------------------------------------------------------------


class Exec(BaseException):
    """Raised instead of execv: the hand-off got to the end."""


def exec_child(argv: tuple[str, ...], fail_at: int | None) -> Callable[[], dict]:
    def child() -> dict:
        def fake_execv(path: str, args: list[str]) -> None:
            raise Exec(path)

        os.execv = fake_execv  # the forked child only
        before = open_fds()
        if fail_at is not None:
            _fd.faults.arm(fail_at)
        calls: list[str] = []
        real = _fd.faults.check

        def spy(what: str) -> None:
            calls.append(what)
            real(what)

        _fd.faults.check = spy
        try:
            r = run_cli(*argv)
        except Exec:
            return {"exec": True, "calls": calls}
        return {"exec": False, "code": r.code, "stderr": r.stderr, "calls": calls,
                "leaked": sorted(open_fds() - before)}

    return child


def test_exec_fails_cleanly_at_every_step(bridge):
    """Every kernel call of ``exec --bridge`` up to the execv: the child exits 1 with no fd
    left open in it, and the host keeps no tap and no bridge port."""
    argv = ("exec", "--bridge", bridge, "--queues", "2" if FULL else "1", "--", "true",
            "{tapfds}", "{vhostfds}")
    before = link_snapshot()
    status, out = fork_call(exec_child(argv, None))
    assert status == 0 and out["exec"], out
    calls = out["calls"]
    assert calls[-1].startswith("execv "), calls
    assert link_snapshot() == before
    steps = distinct(calls)
    for n in steps:
        status, out = fork_call(exec_child(argv, n))
        assert status == 0 and not out["exec"], (n, calls[n - 1], out)
        assert out["code"] == 1, (n, calls[n - 1], out)
        assert names_step(out["stderr"], calls[n - 1]), (n, calls[n - 1], out)
        assert out["leaked"] == [], (n, calls[n - 1], out)
        assert link_snapshot() == before, f"step {n} ({calls[n - 1]}) left a tap or port"
    record(test="exec", calls=len(calls), failed=len(steps), names=calls)
    assert len(steps) >= 10


# -- signals ----------------------------------------------------------------------------------


def tap_state(name: str, bridge: str) -> str:
    """'absent', 'complete' (exactly as asked; then deleted) or what is half done."""
    with Netlink() as nl:
        link = nl.find(name)
        if link is None:
            return "absent"
        nl.delete(name)
    t = link.tun
    got = {"persist": t and t.persist, "owner": t and t.owner, "master": link.master,
           "up": link.up, "multi_queue": t and t.multi_queue}
    want = {"persist": True, "owner": 65534, "master": bridge, "up": True,
            "multi_queue": False}
    return "complete" if got == want else f"half-configured: {got}"


def add_child(name: str, bridge: str, kill_at: int | None = None,
              sig: int = signal.SIGKILL) -> Callable[[], dict]:
    def child() -> dict:
        if kill_at is not None:
            count = [0]
            real = _fd.faults.check

            def bomb(what: str) -> None:
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), sig)
                    time.sleep(5)  # SIGINT is delivered between bytecodes, here
                real(what)

            _fd.faults.check = bomb
        r = run_cli("tap", "add", name, "--owner", "nobody", "--bridge", bridge)
        return {"code": r.code, "stderr": r.stderr}

    return child


def test_tap_add_killed_before_every_step_is_absent_or_complete(ifname, bridge, monkeypatch):
    """SIGKILL/SIGTERM/SIGINT just before a kernel call of ``tap add`` (CI: the first and
    the ones around TUNSETPERSIST; VHOSTCTL_FAULTS_FULL: every one):
    before the TUNSETPERSIST the tap vanishes with the process, after it it is complete."""
    name = ifname
    r, calls = counted_run(lambda: add_child(name, bridge)(), monkeypatch)
    assert r["code"] == 0, r
    assert tap_state(name, bridge) == "complete"
    persist_at = calls.index("TUNSETPERSIST") + 1
    steps = set(range(1, len(calls) + 1))
    if not FULL:
        steps = {1, persist_at - 1, persist_at, persist_at + 1}
    sigs = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
    seen = []
    for n in sorted(steps):
        sig = sigs[n % 3]
        status, out = fork_call(add_child(name, bridge, n, sig), timeout=120)
        state = tap_state(name, bridge)
        seen.append((n, calls[n - 1], sig.name, status, state))
        if sig == signal.SIGINT:
            assert status == 0 and out["code"] == 130, (n, calls[n - 1], out)
        else:
            assert status == -sig, (n, calls[n - 1], status)
        want = "absent" if n <= persist_at else "complete"
        if sig == signal.SIGINT and n > persist_at:
            want = "absent"  # interrupted during the read-back: the new tap is taken back
        assert state == want, (n, calls[n - 1], sig.name, state)
    record(test="tap-add-signal-at-step", calls=len(calls), persist_at=persist_at,
           outcomes=seen)


def test_tap_add_signalled_at_random_points(ifname, bridge):
    """Seeded random delays: whatever the moment, the tap is absent or complete."""
    name = ifname
    t0 = time.monotonic()
    status, out = fork_call(add_child(name, bridge))
    took = time.monotonic() - t0
    assert status == 0 and out["code"] == 0, out
    assert tap_state(name, bridge) == "complete"
    rng = random.Random(SEED)
    outcomes = []
    for i in range(12 if FULL else 3):
        delay = rng.uniform(0, took * 1.2)
        sig = (signal.SIGKILL, signal.SIGTERM)[i % 2]
        pid = os.fork()
        if pid == 0:
            try:
                add_child(name, bridge)()
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, sig)
        _, st = os.waitpid(pid, 0)
        state = tap_state(name, bridge)
        outcomes.append((round(delay, 3), sig.name, os.waitstatus_to_exitcode(st), state))
        assert state in ("absent", "complete"), outcomes[-1]
    record(test="tap-add-signal-random", seed=SEED, full_run_s=round(took, 3),
           outcomes=outcomes)


def test_selftest_signalled_at_random_points(ifname):
    """SIGKILL or SIGTERM at seeded random moments of a selftest: its tap (not persistent)
    and every fd go with the process; nothing is left on the host."""
    before = link_snapshot()
    args = ("selftest", "--tap", ifname, "--queues", "2", "--frames", "16", "--json")

    def child() -> dict:
        r = run_cli(*args)
        return {"code": r.code}

    t0 = time.monotonic()
    status, out = fork_call(child)
    took = time.monotonic() - t0
    assert status == 0 and out["code"] == 0, out
    rng = random.Random(SEED + 1)
    outcomes = []
    for i in range(12 if FULL else 3):
        delay = rng.uniform(0, took)
        sig = (signal.SIGKILL, signal.SIGTERM)[i % 2]
        pid = os.fork()
        if pid == 0:
            try:
                child()
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, sig)
        _, st = os.waitpid(pid, 0)
        outcomes.append((round(delay, 3), sig.name, os.waitstatus_to_exitcode(st)))
        assert link_snapshot() == before, f"{outcomes[-1]}: the host changed"
    record(test="selftest-signal-random", seed=SEED + 1, full_run_s=round(took, 3),
           outcomes=outcomes)


# -- hotplug (VHOSTCTL_FAULTS_FULL only: a real QEMU, minutes under emulation) -----------------

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


@pytest.fixture
def paused_qemu() -> Iterator[tuple[subprocess.Popen, str]]:
    """QEMU with -S (no guest code runs) and a PCIe root port that takes hot-plugged NICs."""
    d = tempfile.mkdtemp(prefix="vf", dir="/tmp")
    sock = f"{d}/q.sock"
    proc = subprocess.Popen(
        [QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "q35", "-accel", "tcg",
         "-m", "64", "-qmp", f"unix:{sock},server=on,wait=off",
         "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
         "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, "QEMU exited"
            assert time.monotonic() < deadline, "QEMU's QMP did not come up"
            try:
                with QmpClient.connect(sock, 30):
                    break
            except VhostctlError:
                time.sleep(0.5)
        yield proc, sock
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def qemu_state(proc: subprocess.Popen, sock: str) -> dict:
    """What a failed hot-plug must leave as it was: PCI devices, netdevs, QEMU's fds."""
    with QmpClient.connect(sock, 60) as q:
        buses = q.execute("query-pci")
        net = q.execute("human-monitor-command", {"command-line": "info network"})
    fds = fds_but_sockets(proc.pid)
    devices = sorted(d.get("qdev_id", "") for b in buses for d in b["devices"])
    bridged = sorted(d.get("qdev_id", "") for b in buses for p in b["devices"]
                     for d in (p.get("pci_bridge") or {}).get("devices", []))
    return {"devices": devices + bridged, "network": net, "fds": fds}


def test_hotplug_fails_cleanly_at_every_step(ifname, paused_qemu, monkeypatch):
    proc, sock = paused_qemu
    args = ("hotplug", "--qmp", sock, "--tap", ifname, "--queues", "2", "--bus", "rp1",
            "--id", "hp0", "--timeout", "60")
    before_q, before, fds = qemu_state(proc, sock), link_snapshot(), open_fds()
    r, calls = counted_run(lambda: run_cli(*args), monkeypatch)
    assert r.code == 0, r
    assert run_cli("unplug", "--qmp", sock, "--id", "hp0", "--timeout", "60").code == 0
    assert qemu_state(proc, sock) == before_q and link_snapshot() == before

    def check(n: int, r) -> None:
        assert r.code == 1, (n, calls[n - 1], r)
        assert names_step(r.stderr, calls[n - 1]), (n, calls[n - 1], r)
        assert qemu_state(proc, sock) == before_q, f"step {n} ({calls[n - 1]}) changed QEMU"
        assert link_snapshot() == before, f"step {n} ({calls[n - 1]}) left a tap"
        assert open_fds() == fds, f"step {n} ({calls[n - 1]}) leaked fds"

    fail_each(distinct(calls), lambda: run_cli(*args), check)
    record(test="hotplug", calls=len(calls), names=calls)
