"""Every command against bad input on the real kernel: a documented exit code, one clear line
on stderr naming what was wrong, no traceback, and no change to the host.

One table drives every case.  The host state is an rtnetlink dump of every link (and the
named network namespaces) taken before the table and compared after each case; ``ip -j
link`` is compared once over the whole table as well (a process start costs seconds in the
VM).  Fixtures are real: a bridge, a dummy link, a single-queue and a multi-queue persistent
tap, a single-queue tap whose queue a ``sleep`` process holds, a regular file, a directory,
and three unix sockets: one that is not QMP, one that never greets, and a minimal QMP server
that answers every command with success (so ``hotplug`` gets as far as opening the tap).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.kernel.conftest import ip, link_snapshot, run_cli, udev_settle
from vhostctl.tun import Tap

P = f"b{os.getpid() % 10000}"  # 5 bytes: every name below stays within 15


@dataclass
class World:
    br: str
    dm: str
    dmkind: str
    sq: str
    mq: str
    bz: str
    holder: int
    file: str
    dir: str
    notqmp: str
    silent: str
    qmp: str
    fresh: str  # a name nobody uses (never created: every case that could create it fails)

    def fill(self, arg: str) -> str:
        return arg.format(**{k: v for k, v in vars(self).items()})


def _serve(path: str, handler) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return  # closed at teardown
            with conn, contextlib.suppress(OSError):
                handler(conn)

    threading.Thread(target=loop, daemon=True).start()
    return srv


def _not_qmp(conn: socket.socket) -> None:
    conn.sendall(b"QEMU 8.2.0 monitor - type 'help' for more information\r\n(qemu) ")
    conn.recv(4096)


def _silent(conn: socket.socket) -> None:
    conn.settimeout(30)
    conn.recv(4096)  # until the client gives up and closes


def _fake_qmp(conn: socket.socket) -> None:
    """Greeting, then success for every command: enough for hotplug to reach the tap."""
    conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 8, "minor": 2, "micro": 0}}, '
                 b'"capabilities": []}}\r\n')
    buf = b""
    conn.settimeout(30)
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            conn.sendall(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\r\n")


def _plain_link(name: str) -> str:
    """A link that is not a tap: a dummy, or an ifb where the dummy module is missing."""
    for kind in ("dummy", "ifb"):
        if subprocess.run(["ip", "link", "add", name, "type", kind],
                          capture_output=True).returncode == 0:
            return kind
    raise AssertionError("cannot create a dummy or ifb link")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    tmp = tempfile.mkdtemp(prefix="vbi", dir="/tmp")
    names = {k: f"{P}{k}" for k in ("br", "dm", "sq", "mq", "bz")}
    servers: list[socket.socket] = []
    holder = None
    try:
        ip("link", "add", names["br"], "type", "bridge")
        dmkind = _plain_link(names["dm"])
        for key, mq in (("sq", False), ("mq", True)):
            with Tap.open(names[key], multi_queue=mq, exclusive=True) as t:
                t.set_owner(0)
                t.set_persist(True)
        with Tap.open(names["bz"], exclusive=True) as t:  # held by sleep, vanishes with it
            holder = subprocess.Popen(["sleep", "3600"], pass_fds=[t.fileno()],
                                      stdin=subprocess.DEVNULL)
        file = os.path.join(tmp, "file")
        open(file, "w").close()
        os.mkdir(os.path.join(tmp, "dir"))
        socks = {}
        for key, handler in (("notqmp", _not_qmp), ("silent", _silent), ("qmp", _fake_qmp)):
            socks[key] = os.path.join(tmp, key)
            servers.append(_serve(socks[key], handler))
        yield World(**names, dmkind=dmkind, holder=holder.pid, file=file,
                    dir=os.path.join(tmp, "dir"), fresh=f"{P}new", **socks)
    finally:
        for s in servers:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the accept() of its thread
            s.close()
        if holder is not None:
            holder.kill()
            holder.wait()
        for name in names.values():
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def baseline(world: World) -> Iterator[dict]:
    """The host as it is before any case ran (links, netns) and ``ip -j link``'s view, and
    the rtnetlink socket every case's snapshot reuses."""
    from pyroute2 import IPRoute

    # udev rewrites a new link's address a moment after it appears (the dummy's and the
    # bridge's): the baseline is taken once it has, or the first case sees udev's change
    udev_settle(world.br, world.dm, world.sq, world.mq, world.bz)
    with IPRoute() as ipr:
        yield {"links": link_snapshot(ipr), "ip": json.loads(ip("-j", "link")), "ipr": ipr}


@pytest.fixture(autouse=True)
def no_exec(monkeypatch):
    """A case of ``exec`` that wrongly succeeded must not replace the test process."""

    def refuse(path, argv):
        raise RuntimeError(f"execv {path} reached: the command was accepted")

    monkeypatch.setattr(os, "execv", refuse)


FDS = ("{{tapfds}}", "{{vhostfds}}")
EXEC = ("exec", "--")
IPARG = ("--ip", "10.77.0.2/24")
A16 = "abcdefghijklmnop"

# (id, argv, exit code, words the message must contain (case-insensitive)
#  [, why it fails for now: a bug in a module this suite does not own, fix described])
CASES: list[tuple] = [
    # -- interface names --
    ("name-empty", ("tap", "add", ""), 2, ("empty interface name",)),
    ("name-16-bytes", ("tap", "add", A16), 2, ("16 bytes", "never truncates")),
    ("name-slash", ("tap", "add", "a/b"), 2, ("'a/b'", "no '/'")),
    ("name-colon", ("tap", "add", "a:b"), 2, ("'a:b'", "':'")),
    ("name-space", ("tap", "add", "a b"), 2, ("'a b'", "whitespace")),
    ("name-tab", ("tap", "add", "a\tb"), 2, ("whitespace",)),
    ("name-percent-d", ("tap", "add", "a%d"), 2, ("'%' is not allowed",)),
    ("name-percent-s", ("tap", "add", "x%s"), 2, ("'%'",)),
    ("name-leading-dash", ("tap", "add", "--", "-x"), 2, ("not leading '-'",)),
    ("name-non-ascii", ("tap", "add", "tä0"), 2, ("only ascii",)),
    ("name-shell-semicolon", ("tap", "add", "a;id"), 2, ("shell characters",)),
    ("name-shell-subst", ("tap", "add", "$(id)"), 2, ("shell characters",)),
    ("name-dot", ("tap", "add", "."), 2, ("'.' is not a valid interface name",)),
    ("name-dotdot", ("tap", "add", ".."), 2, ("'..' is not a valid interface name",)),
    ("del-name-pipe", ("tap", "del", "a|b"), 2, ("'a|b'",)),
    ("show-name-dotdot-slash", ("tap", "show", "../x"), 2, ("'../x'",)),
    ("selftest-name-16", ("selftest", "--tap", A16), 2, ("16 bytes",)),
    ("selftest-two-percent-d", ("selftest", "--tap", "vh%d%d"), 2, ("only allowed once",)),
    ("exec-name-space", ("exec", "--tap", "a b", "--", "true", *FDS), 2, ("'a b'",)),
    ("hotplug-name-colon", ("hotplug", "--qmp", "{qmp}", "--tap", "a:b"), 2, ("'a:b'",)),
    ("up-name-16", ("up", A16, "--bridge", "{br}", *IPARG), 2, ("16 bytes",)),
    # -- queue counts --
    ("add-queues-0", ("tap", "add", "{fresh}", "--queues", "0"), 2, ("--queues",)),
    ("add-queues-257", ("tap", "add", "{fresh}", "--queues", "257"), 2, ("--queues",)),
    ("selftest-queues-0", ("selftest", "--queues", "0"), 2, ("queues 0", "1..256")),
    ("selftest-queues-257", ("selftest", "--queues", "257"), 2, ("queues 257", "1..256")),
    ("exec-queues-257", ("exec", "--queues", "257", "--", "true", *FDS), 2, ("1..256",)),
    ("exec-more-queues-than-tap", ("exec", "--tap", "{sq}", "--queues", "2", "--", "true",
                                   *FDS), 1, ("single-queue tap", "exactly one queue")),
    ("hotplug-queues-0", ("hotplug", "--qmp", "{qmp}", "--tap", "{fresh}", "--queues", "0"),
     2, ("--queues",)),
    ("up-queues-0", ("up", "{fresh}", "--bridge", "{br}", *IPARG, "--queues", "0"), 2,
     ("--queues", "1..256")),
    # -- ring sizes --
    ("ring-0", ("selftest", "--ring-size", "0"), 2, ("ring size 0", "power of two")),
    ("ring-not-power-of-two", ("selftest", "--ring-size", "100"), 2, ("ring size 100",)),
    ("ring-65536", ("selftest", "--ring-size", "65536"), 2, ("1..32768",)),
    # -- MTU --
    ("add-mtu-67", ("tap", "add", "{fresh}", "--mtu", "67"), 2, ("67", "68..65521")),
    ("add-mtu-65522", ("tap", "add", "{fresh}", "--mtu", "65522"), 2, ("68..65521",)),
    ("selftest-mtu-67", ("selftest", "--mtu", "67"), 2, ("mtu 67", "68..65521")),
    ("selftest-mtu-70000", ("selftest", "--mtu", "70000"), 2, ("mtu 70000",)),
    # -- MAC --
    ("mac-short", ("tap", "add", "{fresh}", "--mac", "fe:00:00:00:00"), 2,
     ("six hex pairs",)),
    ("mac-multicast", ("tap", "add", "{fresh}", "--mac", "01:00:5e:00:00:01"), 2,
     ("multicast",)),
    ("mac-zero", ("tap", "add", "{fresh}", "--mac", "00:00:00:00:00:00"), 2, ("all-zero",)),
    ("up-mac-garbage", ("up", "{fresh}", "--bridge", "{br}", *IPARG, "--mac", "zz"), 2,
     ("'zz'", "six hex pairs")),
    ("hotplug-mac-multicast", ("hotplug", "--qmp", "{qmp}", "--tap", "{fresh}", "--mac",
                               "03:00:00:00:00:01"), 2, ("multicast",)),
    # -- offloads, features, modes --
    ("offload-unknown", ("tap", "add", "{fresh}", "--offload", "csum,bogus"), 2, ("bogus",)),
    ("offload-bit-spelling", ("tap", "add", "{fresh}", "--offload", "csum,bit40"), 2,
     ("not offloads",)),
    ("offload-without-csum", ("tap", "add", "{fresh}", "--offload", "tso4"), 2,
     ("needs csum",)),
    ("offload-without-vnet-hdr", ("tap", "add", "{fresh}", "--no-vnet-hdr", "--offload",
                                  "csum"), 2, ("vnet header",)),
    ("hdr-mode-unknown", ("selftest", "--hdr-mode", "bogus"), 2, ("'bogus'", "'tap' or")),
    ("frame-size-too-small", ("selftest", "--size", "10"), 2, ("frame size 10",)),
    ("frame-size-not-a-number", ("selftest", "--size", "abc"), 2, ("'abc'",)),
    ("hotplug-device-not-virtio", ("hotplug", "--qmp", "{qmp}", "--tap", "{fresh}",
                                   "--device", "e1000"), 2, ("'e1000'", "virtio-net")),
    ("ip-not-an-address", ("up", "{fresh}", "--bridge", "{br}", "--ip", "10.0.0.300/24"), 2,
     ("--ip",)),
    # -- users and groups --
    ("owner-unknown", ("tap", "add", "{fresh}", "--owner", "no-such-user-x"), 2,
     ("no such user 'no-such-user-x'",)),
    ("group-unknown", ("tap", "add", "{fresh}", "--group", "no-such-group-x"), 2,
     ("no such group",)),
    ("owner-uid-minus-one", ("tap", "add", "{fresh}", "--owner", "4294967295"), 2,
     ("out of range",)),
    ("owner-not-ascii-digits", ("tap", "add", "{fresh}", "--owner", "²"), 2,
     ("no such user '²'",)),
    ("exec-user-not-ascii-digits", ("exec", "--user", "²", "--", "true", *FDS), 2,
     ("no user '²'",)),
    ("exec-user-unknown", ("exec", "--user", "no-such-user-x", "--", "true", *FDS), 2,
     ("no user 'no-such-user-x'",)),
    ("exec-group-without-user", ("exec", "--group", "root", "--", "true", *FDS), 2,
     ("needs --user",)),
    ("exec-user-root", ("exec", "--user", "root", "--", "true", *FDS), 2, ("is root",)),
    # -- bridges --
    ("bridge-missing", ("tap", "add", "{fresh}", "--bridge", "nosuchbr0"), 2,
     ("does not exist", "ip link add nosuchbr0 type bridge")),
    ("bridge-is-dummy", ("tap", "add", "{fresh}", "--bridge", "{dm}"), 2,
     ("not a bridge",)),
    ("exec-bridge-is-dummy", ("exec", "--bridge", "{dm}", "--", "true", *FDS), 2,
     ("not a bridge",)),
    ("up-bridge-missing", ("up", "{fresh}", "--bridge", "nosuchbr0", *IPARG), 2,
     ("does not exist",)),
    ("up-bridge-is-dummy", ("up", "{fresh}", "--bridge", "{dm}", *IPARG), 2,
     ("not a bridge",)),
    ("bridge-and-netns", ("tap", "add", "{fresh}", "--bridge", "{br}", "--netns", "x"), 2,
     ("exclude each other",)),
    ("exec-tap-and-bridge", ("exec", "--tap", "{fresh}", "--bridge", "{br}", "--", "true",
                             *FDS), 2, ("exclude each other",)),
    # -- network namespaces --
    ("netns-missing", ("tap", "add", "{fresh}", "--netns", "nosuchns-x"), 2,
     ("does not exist", "ip netns add nosuchns-x")),
    ("netns-path", ("tap", "add", "{fresh}", "--netns", "../etc"), 2,
     ("not a namespace name",)),
    # -- QMP sockets --
    ("qmp-absent", ("hotplug", "--qmp", "/nonexistent/qmp.sock", "--tap", "{fresh}"), 1,
     ("no such file", "-qmp unix:")),
    ("qmp-regular-file", ("hotplug", "--qmp", "{file}", "--tap", "{fresh}"), 2,
     ("not a unix socket",)),
    ("qmp-directory", ("unplug", "--qmp", "{dir}", "--id", "nic0"), 2,
     ("not a unix socket",)),
    ("qmp-not-qmp", ("hotplug", "--qmp", "{notqmp}", "--tap", "{fresh}", "--timeout", "5"), 1,
     ("not a qmp monitor", "hmp")),
    ("qmp-never-greets", ("hotplug", "--qmp", "{silent}", "--tap", "{fresh}", "--timeout",
                          "0.5"), 1, ("no greeting", "one client at a time")),
    ("unplug-qmp-absent", ("unplug", "--qmp", "/nonexistent/qmp.sock", "--id", "nic0"), 1,
     ("no such file",)),
    ("inspect-qmp-not-a-socket", ("inspect", "--qmp", "{file}"), 2, ("not a unix socket",)),
    ("unplug-bad-id", ("unplug", "--qmp", "{qmp}", "--id", "9bad"), 2, ("'9bad'",)),
    # -- exec command lines --
    ("exec-no-placeholders", (*EXEC, "true"), 2, ("{{tapfds}} appears 0 times",)),
    ("exec-placeholder-twice", (*EXEC, "true", "{{tapfds}}", *FDS), 2,
     ("{{tapfds}} appears 2 times",)),
    ("exec-misspelt-placeholder", (*EXEC, "true", *FDS, "{{tapfd}}"), 2,
     ("unknown placeholder {{tapfd}}",)),
    ("exec-no-such-program", (*EXEC, "no-such-vmm-x", *FDS), 2, ("not in path",)),
    ("exec-queues-disagree", ("exec", "--queues", "2", "--", "true",
                              "tap,id=n0,fds={{tapfds}},vhostfds={{vhostfds}},queues=4"), 2,
     ("queues=4", "--queues is 2")),
    # -- existing links that are not (such) taps --
    ("add-over-dummy", ("tap", "add", "{dm}"), 1, ("not a tap", "kind is {dmkind}",
                                                   "choose another name")),
    ("add-exist-ok-over-bridge", ("tap", "add", "{br}", "--exist-ok"), 1,
     ("kind is bridge",)),
    ("del-dummy", ("tap", "del", "{dm}"), 2, ("not a tun/tap",)),
    ("show-bridge", ("tap", "show", "{br}"), 2, ("not a tun/tap",)),
    ("exec-tap-is-dummy", ("exec", "--tap", "{dm}", "--", "true", *FDS), 1,
     ("not a tun/tap device",)),
    ("hotplug-tap-is-dummy", ("hotplug", "--qmp", "{qmp}", "--tap", "{dm}"), 1,
     ("not a tun/tap device",)),
    ("selftest-tap-exists", ("selftest", "--tap", "{sq}"), 1, ("already exists",)),
    ("up-tap-exists", ("up", "{sq}", "--bridge", "{br}", *IPARG), 2, ("already exists",)),
    ("add-existing-tap", ("tap", "add", "{sq}"), 1, ("file exists", "--exist-ok")),
    # -- multi-queue flag mismatch --
    ("exec-multiqueue-tap-as-single", ("exec", "--tap", "{mq}", "--", "true", *FDS), 1,
     ("multi-queue tap",)),
    ("hotplug-multiqueue-tap-as-single", ("hotplug", "--qmp", "{qmp}", "--tap", "{mq}"), 1,
     ("multi-queue tap",)),
    ("add-exist-ok-multiqueue-differs", ("tap", "add", "{mq}", "--owner", "0",
                                         "--exist-ok"), 1,
     ("multi_queue is true, want false",)),
    # -- a busy single-queue tap: the holder is named --
    ("exec-busy-tap", ("exec", "--tap", "{bz}", "--", "true", *FDS), 1,
     ("held by pid {holder} (sleep)",)),
    ("hotplug-busy-tap", ("hotplug", "--qmp", "{qmp}", "--tap", "{bz}"), 1,
     ("held by pid {holder} (sleep)",)),
    ("del-busy-tap", ("tap", "del", "{bz}"), 1, ("in use", "pid {holder} (sleep)")),
]


def message_line(stderr: str) -> str:
    """The one line that explains the failure: ``vhostctl: ...``, or click's ``Error: ...``
    (argument parsing, before any vhostctl code ran, comes with click's usage lines)."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    ours = [x for x in lines if x.startswith("vhostctl: ") and "warning:" not in x]
    clicks = [x for x in lines if x.startswith("Error: ")]
    assert len(ours) + len(clicks) == 1, f"want exactly one error line, got {lines}"
    if clicks:
        assert all(x.startswith(("Usage: ", "Try ", "Error: ")) for x in lines), lines
    return (ours or clicks)[0]


def test_table_has_at_least_40_cases_over_every_command():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1][0] if c[1][0] != "tap" else " ".join(c[1][:2]) for c in CASES}
    assert commands >= {"tap add", "tap del", "tap show", "selftest", "exec", "hotplug",
                        "unplug", "inspect", "up"}


def _params() -> list:
    return [pytest.param(*c[1:4], id=c[0]) for c in CASES]


@pytest.mark.parametrize(("args", "code", "needles"), _params())
def test_bad_input(world, baseline, args, code, needles):
    argv = [world.fill(a) for a in args]
    r = run_cli(*argv)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r
    assert r.code == code, r
    assert r.stdout == "", r
    line = message_line(r.stderr)
    text = " ".join(line.lower().split())
    for n in needles:
        assert world.fill(n).lower() in text, f"{n!r} not in {line!r}"
    assert link_snapshot(baseline["ipr"]) == baseline["links"], f"{argv} changed the host"


def test_ip_link_unchanged_after_the_table(world, baseline):
    assert json.loads(ip("-j", "link")) == baseline["ip"]
    with open(f"/proc/{world.holder}/comm") as f:
        assert f.read().strip() == "sleep", "the busy tap's holder must still be there"
