"""inspect and top see every user of vhost-net and taps, not only QEMU (issue 22).

Holders here: this test process standing up a Datapath; a separate Python program (renamed
with prctl, so no rule can key on its name) pumping frames through its own tap and vhost fd;
a worker whose owner passed its fds on and closed them; macvtap and ipvtap queues held with
a vhost fd; and a real vhost-user backend (dpdk-testpmd) behind a paused QEMU.  Every wait
is bounded; every process started here is killed in a finally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.conftest import ip, link_exists, stop_process, wait_until
from vhostctl.datapath import Datapath, DatapathConfig
from vhostctl.selftest import probe_frame
from vhostctl.survey import expected_worker_model
from vhostctl.vhost import VhostNet

pytestmark = pytest.mark.kernel

MODEL = expected_worker_model(os.uname().release)
START_TIMEOUT = 120.0
REPO = Path(__file__).resolve().parents[2]

# The holder program: a datapath of its own, frames sent until stdin closes.  With "orphan"
# it forks after VHOST_SET_OWNER: the child keeps the fds, the owner closes its copies and
# stays, so the worker's owner holds no vhost fd any more.
HOLDER = r'''
import ctypes, os, sys, time
from vhostctl.datapath import Datapath, DatapathConfig
from vhostctl.selftest import probe_frame
name, tap, mode = sys.argv[1:4]
ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME
dp = Datapath(DatapathConfig(queues=1, tap_name=tap)).open()
if mode == "orphan":
    pid = os.fork()
    if pid == 0:
        ctypes.CDLL(None).prctl(15, b"fdkeeper", 0, 0, 0)
        print("ready", os.getpid(), flush=True)
        sys.stdin.read()
        os._exit(0)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target in ("/dev/vhost-net", "/dev/net/tun"):
            os.close(int(fd))
    sys.stdin.read()
    os._exit(0)
print("ready", os.getpid(), flush=True)
frames = [probe_frame(i, 128) for i in range(32)]
os.set_blocking(0, False)
while True:
    try:
        if os.read(0, 1) == b"":
            break
    except BlockingIOError:
        pass
    dp.send_all(frames)
dp.close()
'''


def start_holder(name: str, tap: str, mode: str = "pump") -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, name, tap, mode], cwd=REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = [""]
    t = threading.Thread(target=lambda: line.__setitem__(0, p.stdout.readline()), daemon=True)
    t.start()
    t.join(START_TIMEOUT)
    if not line[0].startswith("ready"):
        stop_process(p)
        pytest.fail(f"holder {name} did not come up: {line[0]!r}, rc {p.poll()}")
    return p, int(line[0].split()[1])


def inspect(cli, *select: str) -> dict:
    r = cli("inspect", "--json", *select)
    assert r.code == 0, r
    return r.json()


def top_samples(cli, n: int = 2, interval: float = 1.0) -> list[dict]:
    r = cli("top", "--json", "--iterations", str(n), "--interval", str(interval))
    assert r.code == 0, r
    lines = r.stdout.splitlines()
    assert len(lines) == n, r.stdout  # NDJSON: one object per sample and line
    return [json.loads(x) for x in lines]


def top_nic(samples: list[dict], pid: int) -> dict:
    (proc,) = [p for p in samples[-1]["processes"] if p["pid"] == pid]
    (nic,) = proc["nics"]
    return proc, nic


def check_holder(p: dict, pid: int, tap: str) -> dict:
    assert p["pid"] == pid and p["kind"] == "other" and p["view"] == ["procfs", "sysfs"]
    (nic,) = p["nics"]
    assert (nic["path"], nic["tap"], nic["tap_kind"], nic["pairing"]) == \
        ("vhost-net", tap, "tun", "fd order")
    (w,) = p["workers"]
    assert w["name"] == f"vhost-{pid}" and w["model"] == MODEL
    ((tap_fd, name),) = p["tun_fds"].items()
    assert name == tap
    assert nic["queue_pairs"] == [{"tap_fd": int(tap_fd), "vhost_fd": p["vhost_fds"][0],
                                   "worker_tid": w["tid"]}]
    return w


def test_our_own_datapath_is_listed_with_tap_worker_and_rate(ifname, cli):
    with Datapath(DatapathConfig(queues=1, tap_name=ifname)) as dp:
        stopping = threading.Event()

        def pump() -> None:
            frames = [probe_frame(i, 128) for i in range(32)]
            while not stopping.is_set():
                dp.send_all(frames)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        try:
            (p,) = inspect(cli, str(os.getpid()))["processes"]
            check_holder(p, os.getpid(), ifname)
            samples = top_samples(cli)
            proc, nic = top_nic(samples, os.getpid())
        finally:
            stopping.set()
            t.join(30)
    assert proc["kind"] == "other" and nic["tap"] == ifname
    assert nic["from_guest_pps"] > 0, nic
    assert nic["mover"]["by"] == "vhost workers" and nic["mover"]["tids"] == \
        [nic["queues"][0]["worker_tid"]]
    assert nic["queues"][0]["worker_cpu_pct"] is not None


def test_a_separate_program_holding_a_tap_and_vhost_fd(ifname, cli):
    p, pid = start_holder("myvmm", ifname)
    try:
        assert p.pid == pid
        (proc,) = inspect(cli, "myvmm")["processes"]  # selected by its command name
        check_holder(proc, pid, ifname)
        whole = inspect(cli)
        assert pid in [x["pid"] for x in whole["processes"]]
        assert whole["worker_model"] == MODEL
        samples = top_samples(cli)
        tproc, nic = top_nic(samples, pid)
        assert tproc["vm"] == "myvmm" and tproc["kind"] == "other"
        assert nic["from_guest_pps"] > 0 and nic["path"] == "vhost-net", nic
        assert tproc["workers"] == 1 and len(tproc["worker_cpu"]) == 1
        r = cli("top", "--iterations", "1", "--interval", "0.5")
        assert r.code == 0 and f"myvmm [{pid}]" in r.stdout, r
        # Let the worker run up CPU time we can see (clock ticks), then look again.
        deadline = time.monotonic() + 60
        while True:
            (proc,) = inspect(cli, str(pid))["processes"]
            if proc["workers"][0]["cpu_seconds"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert proc["workers"][0]["cpu_seconds"] > 0, proc["workers"]
    finally:
        stop_process(p)
    assert not link_exists(ifname)


def test_a_worker_whose_owner_holds_no_vhost_fd_is_unmatched(ifname, cli):
    p, keeper = start_holder("passedon", ifname, "orphan")
    try:
        d = inspect(cli)
        listed = {x["pid"]: x for x in d["processes"]}
        assert p.pid not in listed  # the owner now holds neither fd
        assert keeper in listed and listed[keeper]["workers"] == []
        mine = [w for w in d["unmatched_workers"] if w["name"] == f"vhost-{p.pid}"]
        assert len(mine) == 1, d["unmatched_workers"]
        w = mine[0]
        assert w["model"] == MODEL and "cpu_seconds" in w
        assert w["tgid"] == (p.pid if MODEL == "task" else None)
        r = cli("inspect")
        assert r.code == 0 and f"unmatched worker vhost-{p.pid}" in r.stdout, r
    finally:
        stop_process(p)


def test_inspect_of_no_such_process_fails_on_stderr(cli):
    r = cli("inspect", "999999")
    assert r.code == 1 and r.stdout == "", r
    assert r.stderr.startswith("vhostctl: inspect: no process matches 999999"), r
    assert cli("inspect", "--json", "999999").code == 1


@pytest.fixture
def lower() -> Iterator[list[str]]:
    """Dummy lower devices, removed after (with any macvtap/ipvtap on them)."""
    made: list[str] = []
    yield made
    for name in made:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.mark.parametrize("kind, mode", [("macvtap", "bridge"), ("ipvtap", "l2")])
def test_macvtap_and_ipvtap_queues_are_recognised(kind, mode, ifname, lower, cli):
    subprocess.run(["modprobe", kind], capture_output=True)
    low = f"{ifname[:10]}lo"
    ip("link", "add", low, "type", "dummy")
    lower.append(low)
    ip("link", "set", low, "up")
    ip("link", "add", "link", low, "name", ifname, "type", kind, "mode", mode)
    ip("link", "set", ifname, "up")
    ifindex = int(Path(f"/sys/class/net/{ifname}/ifindex").read_text())
    deadline = time.monotonic() + 30
    while not os.path.exists(f"/dev/tap{ifindex}") and time.monotonic() < deadline:
        time.sleep(0.1)  # devtmpfs makes the node as the device is added
    tapfd = os.open(f"/dev/tap{ifindex}", os.O_RDWR | os.O_CLOEXEC)
    try:
        with VhostNet() as vh:
            vh.set_owner()
            (p,) = inspect(cli, str(os.getpid()))["processes"]
            assert p["macvtap_fds"] == {str(tapfd): ifname}
            (nic,) = p["nics"]
            assert (nic["path"], nic["tap"], nic["tap_kind"]) == ("vhost-net", ifname, kind)
            assert nic["tap_fds"] == [tapfd] and nic["vhost_fds"] == [vh.fileno()]
            link = nic["link"]
            assert (link["kind"], link["lower"], link["mode"]) == (kind, low, mode), link
            assert not any("unknown" in w for w in nic["warnings"] + p["warnings"])
            r = cli("inspect", str(os.getpid()))
            assert r.code == 0 and f"{kind} on {low} mode {mode}" in r.stdout, r
            r = cli("tap", "list", "--json")
            assert r.code == 0, r
            (listed,) = [t for t in r.json()["taps"] if t["name"] == ifname]
            assert listed["type"] == kind and listed["ifindex"] == ifindex
            r = cli("tap", "show", ifname, "--json")
            assert r.code == 0 and r.json()["type"] == kind, r
    finally:
        os.close(tapfd)


# -- vhost-user: a real backend nobody here wrote ---------------------------------------------

TESTPMD = shutil.which("dpdk-testpmd") or "/usr/bin/dpdk-testpmd"
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


def test_vhost_user_backend_is_named_and_charged(cli):
    work = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp"))
    sock = str(work / "vu.sock")
    log = open(work / "testpmd.log", "w")  # noqa: SIM115 (closed in the finally)
    pmd = subprocess.Popen(
        # Two lcores: testpmd forwards on a worker lcore, never on the main one.
        [TESTPMD, "--no-huge", "-m", "256", "--no-pci", "--no-shconf", "-l", "0-1",
         f"--vdev=net_vhost0,iface={sock},queues=1", "--", "--no-mlockall",
         "--total-num-mbufs=2048", "--forward-mode=io", "--auto-start"],
        stdin=subprocess.PIPE, stdout=log, stderr=log)
    procs = [pmd]
    qlog = None
    try:
        wait_until("testpmd's vhost-user socket", lambda: os.path.exists(sock), START_TIMEOUT,
                   procs, (work / "testpmd.log",))
        qlog = open(work / "qemu.log", "w")  # noqa: SIM115 (closed in the finally)
        qemu = subprocess.Popen(
            [QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "q35", "-accel", "tcg",
             "-m", "64", "-name", "vuvm",
             "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
             "-numa", "node,memdev=mem",
             "-chardev", f"socket,id=c0,path={sock}",
             "-netdev", "vhost-user,id=n1,chardev=c0",
             "-device", "virtio-net-pci,netdev=n1,id=nic1"],
            stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
        procs.append(qemu)

        def named() -> bool:
            r = cli("inspect", "--json", str(qemu.pid))
            if r.code != 0:
                return False
            (nic,) = r.json()["processes"][0]["nics"]
            return nic["backend"] is not None

        wait_until("QEMU connected to testpmd", named, START_TIMEOUT, procs,
                   (work / "testpmd.log", work / "qemu.log"))
        (p,) = inspect(cli, str(qemu.pid))["processes"]
        (nic,) = p["nics"]
        b = nic["backend"]
        assert (nic["path"], nic["socket"]) == ("vhost-user", sock)
        assert (b["pid"], b["comm"], b["socket"]) == (pmd.pid, "dpdk-testpmd", sock), b
        samples = top_samples(cli)
        _, tnic = top_nic(samples, qemu.pid)
        assert tnic["mover"]["by"] == "vhost-user backend" and tnic["mover"]["pid"] == pmd.pid
        # testpmd polls its port on its lcore: its CPU is what the NIC costs.
        assert tnic["cpu_pct"] > 0, tnic
        r = cli("inspect", str(qemu.pid))
        assert r.code == 0 and f"backend {b['comm']} pid {pmd.pid}" in r.stdout, r
    finally:
        for p in reversed(procs):
            stop_process(p)
        log.close()
        if qlog:
            qlog.close()
        shutil.rmtree(work, ignore_errors=True)


def test_vhost_off_nic_is_charged_to_the_vmm(ifname, cli):
    qemu = subprocess.Popen(
        [QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "q35", "-accel", "tcg",
         "-m", "64", "-name", "offvm",
         "-netdev", f"tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=off",
         "-device", "virtio-net-pci,netdev=n0,id=nic0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until("QEMU's tap", lambda: link_exists(ifname), START_TIMEOUT, [qemu])
        samples = top_samples(cli)
        proc, nic = top_nic(samples, qemu.pid)
        assert proc["vm"] == "offvm" and nic["path"] == "virtio"
        assert nic["mover"] == {"by": "vmm threads", "pid": qemu.pid, "tids": None,
                                "cpu_pct": nic["cpu_pct"]}
        assert proc["workers"] == 0 and nic["queues"][0]["vhost_fd"] is None
    finally:
        stop_process(qemu)
