"""``vhostctl apply`` on the real kernel: create, idempotence (no rtnetlink event on the second
run), check mode, prune by the device's own mark, drift with a held tap, bad specs, and a
fault at every step.

The "no netlink write" proof is a NETLINK_ROUTE socket bound to RTMGRP_LINK (what ``ip monitor
link`` listens to) opened before the second apply; after it a sentinel change is made, so the
listener is shown to work, and nothing may have arrived before the sentinel's event.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from tests.kernel.conftest import gone, ip, link_snapshot, run_cli, udev_settle
from tests.kernel.test_bad_input import _plain_link
from tests.kernel.test_faults import counted_run, distinct, names_step, one_line_error, record
from tests.unit.test_apply import BAD as UNIT_BAD
from vhostctl import _fd
from vhostctl import apply as A
from vhostctl.netlink import Netlink
from vhostctl.tun import Tap, scan_holders

P = f"a{os.getpid() % 10000}"  # + up to 10 bytes: names stay within 15

RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME = 3


class LinkMonitor:
    """What ``ip monitor link`` sees: RTM_NEWLINK/DELLINK multicast on RTMGRP_LINK."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK))
        self.sock.settimeout(30)

    def quiet(self, seconds: float = 2.0, bound: float = 60.0) -> None:
        """Drain until nothing arrives for ``seconds`` (linkwatch reports carrier and
        operstate changes up to a second late), within ``bound``."""
        import time

        deadline = time.monotonic() + bound
        self.sock.settimeout(seconds)
        try:
            while time.monotonic() < deadline:
                try:
                    self.sock.recv(1 << 16)
                except TimeoutError:
                    return
            raise AssertionError(f"link events did not stop within {bound}s")
        finally:
            self.sock.settimeout(30)

    def events_until(self, sentinel: str) -> list[tuple[int, str]]:
        """Every (type, name) received before the first event for ``sentinel``."""
        seen: list[tuple[int, str]] = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                name = ""
                a = off + 16 + 16  # nlmsghdr, ifinfomsg
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", data, a)
                    if atype == IFLA_IFNAME:
                        name = data[a + 4:a + alen].split(b"\0")[0].decode()
                    a += (alen + 3) & ~3
                if kind in (RTM_NEWLINK, RTM_DELLINK):
                    if name == sentinel:
                        return seen
                    seen.append((kind, name))
                off += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()


def write_spec(text: str) -> str:
    fd, path = tempfile.mkstemp(prefix="vhapply", suffix=".yaml", dir="/tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def details(name: str) -> dict:
    return json.loads(ip("-j", "-d", "link", "show", name))[0]


@pytest.fixture
def names():
    n = {k: f"{P}{k}" for k in ("br", "mq", "sq", "hand", "new", "dm")}
    try:
        yield n
    finally:
        gone(*n.values())
        udev_settle()  # leave udev idle: later tests' fresh links must not wait behind ours


def spec_text(n: dict, *, mtu: int = 9000, with_sq: bool = True) -> str:
    sq = (f"  - name: {n['sq']}\n    owner: nobody\n    mac: fe:00:00:00:5e:01\n"
          f"    txqueuelen: 321\n") if with_sq else ""
    return (f"id: t{os.getpid() % 10000}\nbridges:\n  - name: {n['br']}\n    managed: true\n"
            f"    mtu: {mtu}\ntaps:\n  - name: {n['mq']}\n    queues: 2\n    owner: 0\n"
            f"    bridge: {n['br']}\n    mtu: {{inherit: bridge}}\n"
            f"    offloads: [csum, tso4]\n{sq}")


def test_apply_creates_then_writes_nothing_then_checks_then_prunes(names):
    """First run creates (exit 2 under --detailed-exitcode), the second is silent on
    rtnetlink and exits 0, --check reports a change and makes none, --prune removes only a
    tap this spec's id marked."""
    n = names
    path = write_spec(spec_text(n))
    r = run_cli("apply", "-f", path, "--json", "--detailed-exitcode")
    assert r.code == 2, r
    got = {i["name"]: i["status"] for i in r.json()["items"]}
    assert got == {n["br"]: "created", n["mq"]: "created", n["sq"]: "created"}, got
    mq, sq, br = details(n["mq"]), details(n["sq"]), details(n["br"])
    assert mq["mtu"] == 9000 and mq["master"] == n["br"] and "UP" in mq["flags"]
    assert mq["linkinfo"]["info_data"]["multi_queue"] is True
    assert mq["ifalias"] == f"vhostctl-apply:t{os.getpid() % 10000}"
    assert sq["address"] == "fe:00:00:00:5e:01" and sq["txqlen"] == 321
    assert sq["linkinfo"]["info_data"]["user"] == "nobody"
    assert br["mtu"] == 9000 and br["linkinfo"]["info_kind"] == "bridge"
    udev_settle(n["br"], n["mq"], n["sq"])

    mon = LinkMonitor()
    try:
        mon.quiet()
        before = link_snapshot()
        r = run_cli("apply", "-f", path, "--detailed-exitcode")
        assert r.code == 0, r
        assert "3 unchanged" in r.stdout, r
        ip("link", "set", n["br"], "txqueuelen", "77")  # the sentinel
        events = mon.events_until(n["br"])
    finally:
        mon.close()
    assert events == [], f"the second apply caused link events: {events}"
    ip("link", "set", n["br"], "txqueuelen", "1000")
    assert link_snapshot() == before

    # --check with a changed MTU: reported per attribute, nothing done
    path2 = write_spec(spec_text(n, mtu=4000))
    snap = link_snapshot()
    r = run_cli("apply", "-f", path2, "--check", "--diff", "--detailed-exitcode")
    assert r.code == 2, r
    assert f"~ bridge {n['br']}: would update" in r.stdout and "mtu: 9000 -> 4000" in r.stdout
    assert f"~ tap {n['mq']}: would update" in r.stdout, r.stdout
    assert link_snapshot() == snap

    # prune: sq leaves the spec; a tap made by hand (unmarked) is never pruned
    with Tap.open(n["hand"], exclusive=True) as t:
        t.set_persist(True)
    path3 = write_spec(spec_text(n, with_sq=False))
    r = run_cli("apply", "-f", path3, "--json")
    assert r.code == 0 and {i["name"] for i in r.json()["items"]} == {n["br"], n["mq"]}, r
    assert os.path.exists(f"/sys/class/net/{n['sq']}"), "pruned without --prune"
    r = run_cli("apply", "-f", path3, "--prune", "--json", "--detailed-exitcode")
    assert r.code == 2, r
    assert {i["name"]: i["status"] for i in r.json()["items"]}[n["sq"]] == "deleted"
    assert not os.path.exists(f"/sys/class/net/{n['sq']}")
    assert os.path.exists(f"/sys/class/net/{n['hand']}"), "an unmarked tap was pruned"
    for p in (path, path2, path3):
        os.unlink(p)


def test_drift_on_a_held_tap_touches_nothing_and_names_the_holder(names):
    """vnet_hdr drift needs a recreate; the tap is held by a process that looks like QEMU
    (argv[0] qemu-system-x86_64, -name web1): refused, holder named, host unchanged.  Once
    the holder is gone the same spec recreates it."""
    n = names
    path = write_spec(f"taps:\n  - name: {n['sq']}\n    owner: 0\n    vnet_hdr: false\n")
    with Tap.open(n["sq"], exclusive=True) as t:
        t.set_owner(0)
        t.set_persist(True)
        udev_settle(n["sq"])
        holder = subprocess.Popen(
            ["qemu-system-x86_64", "-c", "sleep 3600; :", "-name", "web1"],
            executable="/bin/bash", pass_fds=[t.fileno()], start_new_session=True)
    try:
        before = link_snapshot()
        r = run_cli("apply", "-f", path, "--check", "--json")
        assert r.code == 0, r
        (item,) = r.json()["items"]
        assert item["action"] == "blocked" and f"pid {holder.pid} (web1)" in item["reason"]
        r = run_cli("apply", "-f", path)
        line = one_line_error(r.stderr)
        assert r.code == 1 and f"pid {holder.pid} (web1)" in line and "vnet_hdr" in line, r
        assert "changed: nothing" in line
        assert link_snapshot() == before
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # bash and its sleep: both hold the queue
        holder.wait()
    deadline = time.monotonic() + 30
    while scan_holders().by_name.get(n["sq"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    r = run_cli("apply", "-f", path, "--json")
    assert r.code == 0 and r.json()["items"][0]["status"] == "recreated", r
    assert details(n["sq"])["linkinfo"]["info_data"]["vnet_hdr"] is False
    os.unlink(path)


BAD_ON_KERNEL = [
    # (spec, line, text): every one fails before any change, the tap listed first included
    ("taps:\n  - name: {new}\n  - name: {new}2\n    bridge: {dm}\n", 3, "not a bridge"),
    ("taps:\n  - name: {new}\n  - name: {dm}\n", 3, "not a tap"),
    ("bridges:\n  - name: {dm}\n    managed: true\ntaps:\n  - name: {new}\n", 2,
     "not a bridge"),
    ("taps:\n  - name: {new}\n  - name: {new}2\n    bridge: {new}nobr\n", 3, "does not exist"),
    ("taps:\n  - name: {new}\n  - name: {new}\n", 3, "listed twice"),
    ("taps:\n  - name: {new}\n  - name: {new}abcdefghijk\n", 3, "IFNAMSIZ"),
]


def test_bad_specs_change_nothing(names):
    """A dummy (or ifb) link stands in for "exists but is not a bridge/tap"; the first tap of
    each spec is valid and new, and must not be created."""
    n = names
    _plain_link(n["dm"])
    udev_settle(n["dm"])  # udev gives a new dummy its own address a moment later
    before, ipj = link_snapshot(), ip("-j", "link")
    for text, line, needle in BAD_ON_KERNEL:
        path = write_spec(text.format(**n))
        try:
            r = run_cli("apply", "-f", path)
        finally:
            os.unlink(path)
        err = one_line_error(r.stderr)
        assert r.code == 2 and err.startswith(f"vhostctl: {path}:{line}: ") and needle in err, r
        assert link_snapshot() == before, text
    assert ip("-j", "link") == ipj


def test_bad_specs_of_the_unit_table_fail_the_same_on_the_kernel():
    """The parser's table (tests/unit/test_apply.py) through the CLI here: each refused with
    its line, exit 2, and the host as it was."""
    before = link_snapshot()
    for case, text, line, needle in UNIT_BAD:
        path = write_spec(text)
        try:
            r = run_cli("apply", "-f", path)
        finally:
            os.unlink(path)
        err = one_line_error(r.stderr)
        assert r.code == 2 and err.startswith(f"vhostctl: {path}:{line}: "), (case, r)
        assert needle in err, (case, err)
    assert link_snapshot() == before
    assert len(UNIT_BAD) + len(BAD_ON_KERNEL) >= 15


# -- a fault at every step --------------------------------------------------------------------


def _reset(n: dict, mark: str) -> None:
    """The start state: mq exists (MTU 1500, to be updated), sq exists marked (to be
    pruned), new does not (to be created)."""
    gone(n["new"])
    with Netlink() as nl:
        for name in (n["mq"], n["sq"]):
            link = nl.find(name)
            if link is None:
                spec = A.taplib.TapSpec(name=name, queues=2 if name == n["mq"] else 1, owner=0)
                A._create_tap(spec, nl, mtu=None, txqlen=None,
                              alias=mark if name == n["sq"] else None, bridge_mac=None)
                udev_settle(name)  # before the step's snapshot: udev gives it an address
            elif link.mtu != 1500 or link.txqlen != 1000:
                nl.set_mtu(name, 1500)
                nl.set_txqlen(name, 1000)


def test_a_fault_at_every_step_leaves_each_tap_as_it_was_or_as_specified(names, monkeypatch):
    n = names
    spec_id = f"f{os.getpid() % 10000}"
    mark = A.MARK_PREFIX + spec_id
    path = write_spec(f"id: {spec_id}\ntaps:\n  - name: {n['new']}\n    queues: 2\n"
                      f"    owner: 0\n    mtu: 4000\n    txqueuelen: 50\n"
                      f"  - name: {n['mq']}\n    queues: 2\n    owner: 0\n    mtu: 9000\n"
                      f"    txqueuelen: 500\n")
    args = ("apply", "-f", path, "--prune", "--json")
    spec = A.read_spec(path)
    _reset(n, mark)
    r, calls = counted_run(lambda: run_cli(*args), monkeypatch)
    assert r.code == 0, r
    assert [i["status"] for i in r.json()["items"]] == ["created", "updated", "deleted"], r
    steps = distinct(calls)
    seen = []
    for step in steps:
        _reset(n, mark)
        before = link_snapshot()
        _fd.faults.arm(step)
        try:
            r = run_cli(*args)
        finally:
            _fd.faults.disarm()
        what = calls[step - 1]
        assert r.code == 1 and names_step(r.stderr, what), (step, what, r)
        report = json.loads(r.stdout) if r.stdout.strip() else {}  # failed while planning
        status = {i["name"]: i["status"] for i in report.get("items", [])}
        with Netlink() as nl:
            now = A.make_plan(spec, nl, prune=True)
        after = link_snapshot()
        as_specified = {i.name for i in now.items if i.action == "none"} | \
            {x for x in (n["sq"],) if x not in after}
        for name in (n["new"], n["mq"], n["sq"]):
            changed = status.get(name) in ("created", "updated", "deleted")
            if changed:
                assert name in as_specified, (step, what, name, status)
                assert f"{name} ({status[name]})" in r.stderr, (step, r.stderr)
            else:
                assert after.get(name) == before.get(name), (step, what, name, status)
        seen.append(what)
    record(test="apply-faults", calls=len(calls), failed=len(steps), names=seen)
    assert len(steps) >= 15
    os.unlink(path)
