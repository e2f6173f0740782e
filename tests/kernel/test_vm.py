"""A real QEMU (Debian's, paused, TCG) against the real kernel: hand-off, hot-plug, inspection.

QEMU is started with ``-S``: no guest code runs, yet netdev init has already happened, so
vhost-net fds are open and VHOST_SET_OWNER has created the worker threads.  Every QEMU started
here is killed in a fixture finaliser; every wait is bounded.  Measured facts (worker model and
count per kernel) are appended to $VHOSTCTL_RESULTS/vm_facts.jsonl.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kernel.conftest import fds_but_sockets, ip, link_exists
from vhostctl.qmp import QmpClient
from vhostctl.survey import expected_worker_model, parse_info_network

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
BASE = ["-S", "-display", "none", "-nodefaults", "-machine", "q35", "-accel", "tcg", "-m", "64"]
HOTPLUG_PORT = ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
                # native PCIe hotplug: an unbooted guest never powered the slot, so device_del
                # completes at once (with ACPI hotplug it waits for the guest's _EJ0).
                "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
START_TIMEOUT = 120.0
QMP_TIMEOUT = "30"
EXPECTED_MODEL = expected_worker_model(os.uname().release)


def record(**facts: object) -> None:
    """Keep what the kernel showed, for the report (no effect without VHOSTCTL_RESULTS)."""
    out = os.environ.get("VHOSTCTL_RESULTS")
    if out:
        with open(Path(out) / "vm_facts.jsonl", "a") as f:
            f.write(json.dumps({"kernel": os.uname().release, **facts}) + "\n")


def wait_for(what: str, cond: Callable[[], bool], timeout: float,
             proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            text = log.read_text() if log and log.exists() else ""
            pytest.fail(f"{what}: process exited with {proc.returncode}: {text[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s")
        time.sleep(0.1)


def qmp_ready(path: str) -> bool:
    if not os.path.exists(path):
        return False
    try:
        with QmpClient.connect(path, 10):
            return True
    except OSError:
        return False


class Vm:
    def __init__(self, proc: subprocess.Popen, sock: str, log: Path) -> None:
        self.proc, self.sock, self.log = proc, sock, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def qmp(self, command: str, args: dict | None = None):
        with QmpClient.connect(self.sock, 30) as q:
            return q.execute(command, args)

    def network(self) -> list[dict]:
        return parse_info_network(self.qmp("human-monitor-command",
                                           {"command-line": "info network"}))

    def device_ids(self) -> list[str]:
        """Ids of the devices given one (-device id=, device_add).  Not query-pci: with -S no
        firmware numbered the root port's secondary bus, so query-pci cannot see behind it."""
        return sorted(c["name"] for c in self.qmp("qom-list", {"path": "/machine/peripheral"})
                      if c["type"].startswith("child<"))

    def fds(self) -> dict[int, str]:
        """QEMU's fds, less sockets: a QMP client's connection closes asynchronously."""
        return fds_but_sockets(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory (sun_path is 108 bytes) that an unprivileged QEMU can write to."""
    d = Path(tempfile.mkdtemp(prefix="vq", dir="/tmp"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qemu(workdir: Path) -> Iterator[Callable[..., Vm]]:
    """Start QEMU (paused, TCG) with extra args; wait until its QMP answers; kill it after."""
    started: list[Vm] = []

    def start(extra: list[str], *, prefix: list[str] | None = None,
              before_qmp: Callable[[], None] | None = None, name: str = "q") -> Vm:
        sock = str(workdir / f"{name}.qmp")
        log = workdir / f"{name}.log"
        argv = [*(prefix or []), QEMU, *BASE, "-qmp", f"unix:{sock},server=on,wait=off", *extra]
        with open(log, "w") as errf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf)
        vm = Vm(proc, sock, log)
        started.append(vm)
        if before_qmp:
            before_qmp()
        wait_for(f"QMP of {argv}", lambda: qmp_ready(sock), START_TIMEOUT, proc, log)
        return vm

    yield start
    for vm in started:
        vm.stop()


def inspect(cli, vm: Vm, *extra: str) -> dict:
    r = cli("inspect", "--json", "--timeout", QMP_TIMEOUT, *extra, str(vm.pid))
    assert r.code == 0, r
    (proc,) = r.json()["processes"]
    assert proc["pid"] == vm.pid
    return proc


def netdev_ids(vm: Vm) -> set[str]:
    return {p["id"] for e in vm.network() for p in e.get("peers", [e])}


# -- QEMU opens the tap and vhost-net itself ---------------------------------------------------

@pytest.mark.parametrize("queues", [1, 4])
def test_qemu_opens_vhost_itself(queues, qemu, ifname, cli):
    mq = f",queues={queues}" if queues > 1 else ""
    dev_mq = f",mq=on,vectors={2 * queues + 2}" if queues > 1 else ""
    vm = qemu(["-name", f"guest=vh{queues}",
               "-netdev", f"tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=on{mq}",
               "-device", f"virtio-net-pci,netdev=n0,id=nic0{dev_mq}"])
    assert vm.qmp("query-status")["status"] == "prelaunch"  # paused: no guest code ran
    assert "n0" in netdev_ids(vm)
    p = inspect(cli, vm, "--qmp", vm.sock)
    assert p["name"] == f"vh{queues}" and p["kind"] == "qemu"
    (nic,) = p["nics"]
    assert (nic["id"], nic["path"], nic["tap"], nic["queues"]) == ("n0", "vhost-net", ifname,
                                                                  queues)
    assert len(nic["tap_fds"]) == queues and len(nic["vhost_fds"]) == queues
    assert nic["vhost_requested"] is True and nic["warnings"] == [f"tap {ifname} is DOWN: "
                                                                  "vhost-net moves no packets "
                                                                  f"until it is up (ip link set "
                                                                  f"{ifname} up)"]
    # One worker per vhost device, created by VHOST_SET_OWNER at netdev init.
    workers = p["workers"]
    assert len(workers) == queues, workers
    assert {w["name"] for w in workers} == {f"vhost-{vm.pid}"}
    assert {w["model"] for w in workers} == {EXPECTED_MODEL}
    virtio = nic["qmp"]["virtio"]
    record(test="qemu-vhost", queues=queues, workers=len(workers),
           model=workers[0]["model"], worker_tids=[w["tid"] for w in workers],
           vhost_started=virtio.get("vhost-started"),
           vhost_dev=virtio.get("vhost-dev"), qmp_status=p["qmp"]["status"])
    assert virtio["name"] == "virtio-net"
    assert p["warnings"] == []
    r = cli("top", "--iterations", "2", "--interval", "0.2", "--sort", "cpu")
    assert r.code == 0, r
    assert f"vh{queues} [{vm.pid}]" in r.stdout and "(vhost-net)" in r.stdout, r.stdout


def test_vhost_off_is_virtio(qemu, ifname, cli):
    vm = qemu(["-netdev", f"tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=off",
               "-device", "virtio-net-pci,netdev=n0,id=nic0"])
    assert "n0" in netdev_ids(vm)
    p = inspect(cli, vm)
    (nic,) = p["nics"]
    assert (nic["path"], nic["tap"], nic["vhost_fds"], nic["vhost_requested"]) == \
        ("virtio", ifname, [], False)
    assert p["workers"] == [] and p["vhost_fds"] == []
    assert not any("fell back" in w for w in nic["warnings"])


class VhostUserPeer(threading.Thread):
    """The least a vhost-user backend must do for QEMU's netdev init: connect and answer
    VHOST_USER_GET_FEATURES (docs/interop/vhost-user.rst; no protocol features offered, so
    nothing else needs a reply)."""

    GET_FEATURES = 1
    REPLY = 0x1 | 0x4  # version 1, reply flag

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.requests: list[int] = []

    def run(self) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(0.2)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    s.connect(self.path)
                    break
                except OSError:
                    if time.monotonic() > deadline or self.stop.is_set():
                        return
                    time.sleep(0.05)
            while not self.stop.is_set():
                try:
                    msg, anc, _, _ = s.recvmsg(12, socket.CMSG_SPACE(8 * 4))
                except TimeoutError:
                    continue
                if len(msg) < 12:
                    return
                for _, _, data in anc:
                    for fd in array.array("i", data[:len(data) - len(data) % 4]):
                        os.close(fd)
                req, _, size = struct.unpack("<III", msg)
                while size:
                    size -= len(s.recv(size))
                self.requests.append(req)
                if req == self.GET_FEATURES:
                    s.sendall(struct.pack("<IIIQ", req, self.REPLY, 8, 1 << 32))  # VERSION_1
        except OSError:
            return
        finally:
            s.close()


def test_vhost_user_is_classified(qemu, workdir, cli):
    path = str(workdir / "vu.sock")
    peer = VhostUserPeer(path)
    # QEMU waits for a backend inside netdev init (net_vhost_user_init), even with
    # wait=off, so the peer connects before QMP can answer.
    vm = qemu(["-name", "vu", "-chardev", f"socket,id=c0,path={path},server=on,wait=off",
               "-netdev", "vhost-user,id=n1,chardev=c0",
               "-device", "virtio-net-pci,netdev=n1,id=nic1"], before_qmp=peer.start)
    try:
        assert "n1" in netdev_ids(vm)
        p = inspect(cli, vm)
        (nic,) = p["nics"]
        assert (nic["path"], nic["id"], nic["socket"], nic["socket_server"], nic["tap"]) == \
            ("vhost-user", "n1", path, True, None)
        assert p["vhost_fds"] == [] and p["tun_fds"] == {}
        record(test="vhost-user", backend_saw=peer.requests)
    finally:
        peer.stop.set()
        vm.stop()
        peer.join(10)


# -- exec: our hand-off ------------------------------------------------------------------------

def vhostctl_exec(*args: str) -> list[str]:
    return [sys.executable, "-m", "vhostctl", "exec", *args]


def test_exec_hands_the_datapath_to_qemu(workdir, ifname, cli):
    ip("tuntap", "add", "dev", ifname, "mode", "tap", "multi_queue", "vnet_hdr")
    sock, log = str(workdir / "h.qmp"), workdir / "h.log"
    argv = vhostctl_exec(
        "--tap", ifname, "--queues", "2", "--user", "nobody", "--",
        QEMU, *BASE, "-name", "guest=handoff", "-qmp", f"unix:{sock},server=on,wait=off",
        "-netdev", "tap,id=n0,fds={tapfds},vhostfds={vhostfds},vhost=on",
        "-device", "virtio-net-pci,netdev=n0,id=nic0,mq=on,vectors=6")
    with open(log, "w") as errf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf)
    vm = Vm(proc, sock, log)
    try:
        wait_for("QMP of the handed-off QEMU", lambda: qmp_ready(sock), START_TIMEOUT, proc, log)
        assert "n0" in netdev_ids(vm)
        p = inspect(cli, vm)  # the same pid: vhostctl became QEMU
        assert p["kind"] == "qemu" and p["name"] == "handoff" and p["uid"] == 65534
        (nic,) = p["nics"]
        netdev = next(a for a in p["argv"] if a.startswith("tap,id=n0,"))
        tapfds = [int(x) for x in netdev.split("fds=")[1].split(",")[0].split(":")]
        vhostfds = [int(x) for x in netdev.split("vhostfds=")[1].split(",")[0].split(":")]
        assert (nic["path"], nic["tap"], nic["tap_fds"], nic["vhost_fds"]) == \
            ("vhost-net", ifname, tapfds, vhostfds)
        # QEMU holds exactly the handed fds of each kind: nothing else leaked in.
        assert sorted(map(int, p["tun_fds"])) == tapfds and p["vhost_fds"] == vhostfds
        # QEMU, not vhostctl, became the owner: one worker per handed vhost fd.
        assert len(p["workers"]) == 2 and {w["model"] for w in p["workers"]} == {EXPECTED_MODEL}
        assert any(f"persistent tap {ifname} has no owner" in w for w in nic["warnings"])
        record(test="exec-qemu", tapfds=tapfds, vhostfds=vhostfds, workers=len(p["workers"]))
    finally:
        vm.stop()
        ip("link", "del", ifname)


CHILD = r"""
import json, os, sys
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink("/proc/self/fd/" + name)
    except OSError:
        continue  # the listdir's own fd
    iff = None
    if target == "/dev/net/tun":
        with open("/proc/self/fdinfo/" + name) as f:
            iff = next((l.split(":", 1)[1].strip() for l in f if l.startswith("iff:")), None)
    fds[name] = [target, iff]
with open("/proc/self/status") as f:
    caps = {l.split(":")[0]: int(l.split(":")[1], 16) for l in f if l.startswith("Cap")}
taps = {v[1] for v in fds.values() if v[1]}
sysfs = {}
for t in taps:
    base = "/sys/class/net/" + t
    sysfs[t] = {"master": os.path.basename(os.readlink(base + "/master")),
                "flags": int(open(base + "/flags").read(), 16)}
print(json.dumps({"argv": sys.argv[1:], "fds": fds, "caps": caps, "sysfs": sysfs,
                  "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
                  "groups": os.getgroups()}))
"""


def test_exec_child_gets_exactly_the_fds_and_ids(ifname):
    import grp
    import pwd

    bridge = ifname[:-1] + "b" if len(ifname) == 15 else ifname + "b"
    ip("link", "add", bridge, "type", "bridge")
    leak_r, leak_w = os.pipe()  # inheritable into vhostctl: must not reach the child
    try:
        r = subprocess.run(
            vhostctl_exec("--bridge", bridge, "--queues", "2", "--user", "nobody", "--group",
                          "nogroup", "--", "/usr/bin/python3", "-I", "-S", "-c", CHILD,
                          "tap={tapfds}", "vhost={vhostfds}"),
            pass_fds=[leak_r, leak_w], capture_output=True, text=True, timeout=300,
            stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
    finally:
        os.close(leak_r)
        os.close(leak_w)
        bridge_gone = subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    tapfds = [int(x) for x in data["argv"][0].removeprefix("tap=").split(":")]
    vhostfds = [int(x) for x in data["argv"][1].removeprefix("vhost=").split(":")]
    fds = {int(k): v for k, v in data["fds"].items()}
    assert set(fds) == {0, 1, 2, *tapfds, *vhostfds}, fds
    (tap,) = data["sysfs"]
    assert tap.startswith("vh")
    assert all(fds[fd] == ["/dev/net/tun", tap] for fd in tapfds)
    assert all(fds[fd] == ["/dev/vhost-net", None] for fd in vhostfds)
    assert data["sysfs"][tap]["master"] == bridge and data["sysfs"][tap]["flags"] & 1
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    assert data["ids"] == [nobody, nobody, nogroup, nogroup]
    assert data["groups"] == [nogroup]
    assert data["caps"]["CapEff"] == data["caps"]["CapPrm"] == data["caps"]["CapAmb"] == 0
    assert not link_exists(tap), "a tap made by exec must vanish with the command"
    assert bridge_gone.returncode == 0
    record(test="exec-child", tapfds=tapfds, vhostfds=vhostfds, tap=tap)


def test_exec_refuses_a_count_mismatch_before_opening(ifname):
    r = subprocess.run(vhostctl_exec("--tap", ifname, "--queues", "2", "--", "true",
                                     "tap,fds={tapfds},vhostfds={vhostfds},queues=3"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "queues=3" in r.stderr
    assert not link_exists(ifname)


# -- hot-plug ---------------------------------------------------------------------------------

def snapshot(vm: Vm) -> dict:
    return {"devices": vm.device_ids(), "netdevs": sorted(netdev_ids(vm)), "fds": vm.fds(),
            "links": sorted(os.listdir("/sys/class/net"))}


def test_hotplug_then_unplug_leaves_qemu_and_host_as_before(qemu, ifname, cli):
    vm = qemu(["-name", "hp", *HOTPLUG_PORT])
    before = snapshot(vm)
    workers_before = len(inspect(cli, vm)["workers"])
    r = cli("hotplug", "--qmp", vm.sock, "--tap", ifname, "--queues", "2", "--bus", "rp1",
            "--id", "hp0", "--mac", "52:54:00:00:00:42", "--timeout", QMP_TIMEOUT, "--json")
    assert r.code == 0, r
    assert r.json()["created"] is True and r.json()["fdnames"]["vhost"] == ["hp0-vhost0",
                                                                            "hp0-vhost1"]
    assert "hp0" in vm.device_ids() and "hp0" in netdev_ids(vm)
    # --mac read back from the NIC QEMU made (virtio-net-pci aliases its device's "mac")
    assert vm.qmp("qom-get", {"path": "/machine/peripheral/hp0", "property": "mac"}) == \
        "52:54:00:00:00:42"
    p = inspect(cli, vm, "--qmp", vm.sock)
    (nic,) = p["nics"]
    assert (nic["id"], nic["path"], nic["tap"], nic["queues"], len(nic["vhost_fds"])) == \
        ("hp0", "vhost-net", ifname, 2, 2)  # the id is QEMU's: a hot-plugged NIC is not on argv
    assert nic["link"]["up"] is True and nic["warnings"] == []
    assert len(p["workers"]) == workers_before + 2
    r = cli("unplug", "--qmp", vm.sock, "--id", "hp0", "--timeout", QMP_TIMEOUT)
    assert r.code == 0, r
    after = snapshot(vm)
    assert after == before
    assert not link_exists(ifname)
    assert len(inspect(cli, vm)["workers"]) == workers_before


def test_failed_hotplug_is_undone(qemu, ifname, cli):
    vm = qemu(["-name", "hpfail"])  # no root port: pcie.0 of q35 refuses hot-plug
    before = snapshot(vm)
    r = cli("hotplug", "--qmp", vm.sock, "--tap", ifname, "--id", "bad0", "--timeout",
            QMP_TIMEOUT)
    assert r.code == 1 and "does not support hotplugging" in " ".join(r.stderr.split()), r
    assert snapshot(vm) == before
    assert not link_exists(ifname)
