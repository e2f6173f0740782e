"""``vhostctl doctor`` against the real kernel: each fault is made for real, named with its
evidence and exit 1, then its fix (as the finding writes it, where a test can apply it) is
applied and the finding is gone.

The faults need no running guest (a paused QEMU has done its netdev and device init, so
vhost fds, workers, tap queues and QEMU's command line are all real): vhost-net unloaded
and experimental zero-copy; a QEMU whose user may not open /dev/vhost-net (fallen back to
userspace) and the hand-off that fixes it; vhost not requested; a tap down; an emulated NIC
model; multi-queue without mq=on, with too few vectors, more queues than vCPUs, disabled
queues; host_mtu against the tap, a vIOMMU, an ignored tx_queue_size, busy polling; a bridge
down and br_netfilter; an orphan tap; a worker pinned with the vCPUs; drops toward a guest
that does not drain its queue (--watch).  The healthy counterparts that need a guest (its
driver ready, queues enabled, traffic without findings, one busy worker among two) run on the
booted guests of tests/kernel/test_guest.py.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.kernel.conftest import gone, ip, link_exists, wait_until
from tests.kernel.guest import vhostctl_exec
from tests.kernel.test_vm import Vm, qemu, workdir  # noqa: F401  (fixtures)
from vhostctl.selftest import host_socket, probe_frame

pytestmark = pytest.mark.kernel

QMP_TIMEOUT = "30"
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def doctor(cli, *args: str) -> dict:
    """``doctor --json``; its exit code must say whether anything above info was found."""
    r = cli("doctor", "--json", "--timeout", QMP_TIMEOUT, *args)
    assert r.code in (0, 1), r
    rep = r.json()
    assert rep["schema"] == 1
    serious = [f for f in rep["findings"] if f["severity"] in ("error", "warning")]
    assert r.code == (1 if serious else 0), (r.code, serious)
    assert rep["summary"] == {s: sum(f["severity"] == s for f in rep["findings"])
                              for s in ("error", "warning", "info")}
    rep["code"] = r.code
    return rep


def find(rep: dict, fid: str) -> list[dict]:
    return [f for f in rep["findings"] if f["id"] == fid]


def one(rep: dict, fid: str, severity: str) -> dict:
    found = find(rep, fid)
    assert len(found) == 1, (fid, rep["findings"])
    assert found[0]["severity"] == severity, found[0]
    return found[0]


def evidence(f: dict) -> dict:
    return {e["source"]: e["value"] for e in f["evidence"]}


def sh(command: str) -> None:
    """Run a fix exactly as a finding writes it."""
    subprocess.run(command, shell=True, check=True, capture_output=True, timeout=60)


def tap_netdev(tap: str, extra: str = "") -> list[str]:
    return ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=on{extra}"]


VIRTIO = ["-device", "virtio-net-pci,netdev=n0,id=nic0"]


# -- the host ---------------------------------------------------------------------------------

def _reload(*params: str) -> None:
    subprocess.run(["modprobe", "-r", "vhost_net"], check=True, capture_output=True)
    subprocess.run(["modprobe", "vhost_net", *params], check=True, capture_output=True)


def test_vhost_net_unloaded_then_loaded_by_the_fix_and_zero_copy(cli):
    with open("/sys/module/vhost_net/refcnt") as f:
        assert f.read().strip() == "0", "vhost_net is in use: an earlier test leaked a fd"
    subprocess.run(["rmmod", "vhost_net"], check=True, capture_output=True)
    try:
        wait_until("/dev/vhost-net gone", lambda: not os.path.exists("/dev/vhost-net"), 10)
        rep = doctor(cli)
        assert rep["code"] == 1
        f = one(rep, "vhost-net-unavailable", "error")
        ev = evidence(f)
        assert ev["/sys/module/vhost_net"] == "absent"
        ko = ev[f"/lib/modules/{os.uname().release}/kernel/drivers/vhost/vhost_net.ko*"]
        assert os.path.basename(ko).startswith("vhost_net.ko") and os.path.exists(ko), ev
        assert f["fix"].startswith("modprobe vhost_net;"), f
        sh(f["fix"].split(";")[0])
        assert find(doctor(cli), "vhost-net-unavailable") == []

        _reload("experimental_zcopytx=1")
        f = one(doctor(cli), "vhost-zerocopy-tx", "info")
        assert evidence(f) == {"/sys/module/vhost_net/parameters/experimental_zcopytx": "1"}
        sh(f["fix"].split(":", 1)[1].split(" (")[0])
        assert find(doctor(cli), "vhost-zerocopy-tx") == []
    finally:
        _reload()
    with open("/sys/module/vhost_net/parameters/experimental_zcopytx") as f:
        assert f.read().strip() == "0"


def test_orphan_tap_then_deleted_by_the_fix(cli, tap_name):
    assert cli("tap", "add", tap_name).code == 0
    f = one(doctor(cli, tap_name), "orphan-tap", "warning")
    assert f["tap"] == tap_name and f["subject"] == f"tap {tap_name}"
    assert int(evidence(f)[f"/sys/class/net/{tap_name}/tun_flags"], 16) & 0x800  # IFF_PERSIST
    assert [x["tap"] for x in find(doctor(cli), "orphan-tap") if x["tap"] == tap_name] == \
        [tap_name]  # host-wide too
    sh(f["fix"].split(" (")[0])
    assert not link_exists(tap_name)
    assert [x for x in find(doctor(cli), "orphan-tap") if x["tap"] == tap_name] == []


def test_bridge_down_and_br_netfilter(qemu, tap_name, cli):  # noqa: F811
    br = f"{tap_name}b"
    ip("link", "add", br, "type", "bridge")
    loaded = os.path.isdir("/sys/module/br_netfilter")
    try:
        assert cli("tap", "add", tap_name, "--bridge", br).code == 0
        vm = qemu([*tap_netdev(tap_name), *VIRTIO], name="br")
        rep = doctor(cli, str(vm.pid))
        f = one(rep, "bridge-down", "error")
        assert int(evidence(f)[f"/sys/class/net/{br}/flags"], 16) & 1 == 0
        assert find(rep, "br-netfilter") == []  # br_netfilter not loaded yet
        sh(f["fix"])
        assert find(doctor(cli, str(vm.pid)), "bridge-down") == []

        subprocess.run(["modprobe", "br_netfilter"], check=True, capture_output=True)
        f = one(doctor(cli, str(vm.pid)), "br-netfilter", "warning")
        assert evidence(f)["/proc/sys/net/bridge/bridge-nf-call-iptables"] == 1
        assert tap_name in f["summary"]
        sh(f["fix"].split(" (")[0])
        assert find(doctor(cli, str(vm.pid)), "br-netfilter") == []
    finally:
        gone(br)
        if not loaded and os.path.isdir("/sys/module/br_netfilter"):
            subprocess.run(["rmmod", "br_netfilter"], capture_output=True)


# -- vhost-net in effect or not ---------------------------------------------------------------

def test_vmm_that_may_not_open_vhost_net_then_the_handoff(qemu, tap_name, cli):  # noqa: F811
    """A VMM that runs as nobody, holds its tap and asked for vhost=on, but /dev/vhost-net is
    0600 root.  Debian 12's QEMU (7.2) cannot be that VMM: when its open of /dev/vhost-net
    fails without vhostforce it warns, then aborts (net/net.c net_client_init1: Assertion
    `nc' failed), so the stand-in is a process with QEMU's argv holding the tap queue, as a
    QEMU that went on without vhost-net does.  The hand-off that fixes it is real QEMU."""
    from vhostctl.tun import Tap

    assert cli("tap", "add", tap_name, "--owner", "nobody").code == 0
    mode = os.stat("/dev/vhost-net").st_mode & 0o7777
    os.chmod("/dev/vhost-net", 0o600)
    (tap,) = Tap.open_queues(tap_name, 1, vnet_hdr=True)
    fd = tap.fileno()
    child = subprocess.Popen(
        [*AS_NOBODY, "bash", "-c", "exec -a qemu-system-x86_64 bash -c "
         f"'sleep 600 {fd}<&-; exit 0' \"$@\"", "bash", "-netdev",
         f"tap,id=n0,fd={fd},vhost=on", *VIRTIO], pass_fds=[fd], stdin=subprocess.DEVNULL)
    tap.close()
    try:
        wait_until("the stand-in runs as nobody under QEMU's name", lambda: Path(
            f"/proc/{child.pid}/cmdline").read_bytes().startswith(b"qemu-system-x86_64\0"), 30)
        rep = doctor(cli, str(child.pid))
        assert rep["code"] == 1
        cannot = one(rep, "vmm-cannot-open-vhost", "error")
        ev = evidence(cannot)
        gid = os.stat("/dev/vhost-net").st_gid  # Debian's udev gives it group kvm
        assert ev["/dev/vhost-net"].startswith(f"crw------- 0:{gid}"), ev
        assert ev[f"/proc/{child.pid}/status"].startswith("euid 65534,"), ev
        assert "vhostctl exec --tap " + tap_name in cannot["fix"]
        unused = one(rep, "vhost-not-used", "error")
        ev = evidence(unused)
        assert "vhost=on" in ev[f"/proc/{child.pid}/cmdline"]
        assert ev[f"/proc/{child.pid}/fd"] == "1 tap fd(s), no /dev/vhost-net"
        assert unused["fix"] == cannot["fix"].split("; or:")[0]  # the hand-off

        os.chmod("/dev/vhost-net", 0o666)  # the mode fix: this VMM could open it now ...
        rep = doctor(cli, str(child.pid))
        assert find(rep, "vmm-cannot-open-vhost") == []
        one(rep, "vhost-not-used", "error")  # ... but it runs without vhost until restarted
        os.chmod("/dev/vhost-net", 0o600)
    finally:
        child.kill()
        child.wait(10)
    try:
        # The hand-off, as the fix writes it: vhostctl opens both, QEMU (nobody) gets fds.
        vm = qemu(["-netdev", "tap,id=n0,fds={tapfds},vhostfds={vhostfds},vhost=on", *VIRTIO],
                  prefix=vhostctl_exec("--tap", tap_name, "--queues", "1", "--user", "nobody",
                                       "--"), name="ho")
        rep = doctor(cli, str(vm.pid))
        assert rep["code"] == 0 and rep["findings"] == [], rep
    finally:
        os.chmod("/dev/vhost-net", mode)


def test_vhost_not_requested_tap_down_and_driver_not_ready(qemu, tap_name, cli):  # noqa: F811
    vm = qemu(["-netdev", f"tap,id=n0,ifname={tap_name},script=no,downscript=no,vhost=off",
               *VIRTIO], name="off")
    rep = doctor(cli, str(vm.pid))
    f = one(rep, "vhost-not-requested", "warning")
    assert "vhost=off" in evidence(f)[f"/proc/{vm.pid}/cmdline"]
    down = one(rep, "tap-down", "error")
    assert evidence(down)[f"/sys/class/net/{tap_name}/flags"] == "IFF_UP clear"
    sh(down["fix"])
    assert find(doctor(cli, str(vm.pid)), "tap-down") == []
    vm.stop()
    wait_until(f"{tap_name} gone with QEMU", lambda: not link_exists(tap_name), 30)

    vm = qemu([*tap_netdev(tap_name), *VIRTIO], name="on")
    ip("link", "set", tap_name, "up")
    rep = doctor(cli, str(vm.pid))
    assert rep["code"] == 0 and rep["findings"] == [], rep  # vhost=on: vhost-not-requested gone
    (subject,) = rep["subjects"]
    assert {"check": "guest-driver-not-ready", "subject": f"{subject} nic n0 (tap {tap_name})",
            "reason": "no QMP socket given (--qmp SOCKET)"} in rep["not_run"], rep["not_run"]
    rep = doctor(cli, "--qmp", vm.sock, str(vm.pid))
    f = one(rep, "guest-driver-not-ready", "warning")
    ev = evidence(f)
    assert ev["QMP x-query-virtio-status status"] == []  # the guest never ran: no bit set
    assert ev["QMP x-query-virtio-status vhost-started"] is False
    assert ev["QMP query-status"] == "prelaunch"
    assert "guest-driver-not-ready" not in {n["check"] for n in rep["not_run"]}


def test_emulated_nic_model(qemu, tap_name, cli):  # noqa: F811
    vm = qemu([*tap_netdev(tap_name), "-device", "e1000,netdev=n0,id=nic0"], name="e1k")
    ip("link", "set", tap_name, "up")
    rep = doctor(cli, str(vm.pid))
    f = one(rep, "nic-model-not-virtio", "error")  # vhost=on asked for: error
    ev = evidence(f)
    assert ev[f"/proc/{vm.pid}/cmdline"].startswith("-device e1000,"), ev
    assert ev[f"/proc/{vm.pid}/fd"].startswith("1 /dev/vhost-net fd(s)"), ev
    assert f["fix"].startswith("-device virtio-net-pci,netdev=n0")
    assert find(rep, "vhost-not-used") == [] and find(rep, "vhost-not-requested") == []
    # Its fix is a QEMU with virtio-net-pci: test_vhost_not_requested_... has it, no finding.


# -- multi-queue and device options -----------------------------------------------------------

def test_multiqueue_vectors_vcpus_and_disabled_queues(qemu, tap_name, cli):  # noqa: F811
    vm = qemu(["-smp", "1", *tap_netdev(tap_name, ",queues=2"), "-device",
               "virtio-net-pci,netdev=n0,id=nic0,mq=on,vectors=4"], name="mq")
    ip("link", "set", tap_name, "up")
    rep = doctor(cli, str(vm.pid))
    v = one(rep, "mq-vectors", "warning")
    assert "vectors=4" in evidence(v)[f"/proc/{vm.pid}/cmdline"]
    assert "2N+2 = 6" in v["summary"]
    c = one(rep, "mq-more-queues-than-vcpus", "info")
    assert evidence(c)[f"/proc/{vm.pid}/cmdline"].startswith("-smp 1; -device virtio-net-pci,")
    # Until the guest driver enables it, QEMU keeps the second tap queue detached
    # (virtio_net_set_queue_pairs() -> peer_detach(): TUNSETQUEUE IFF_DETACH_QUEUE).
    d = one(rep, "mq-queues-disabled", "warning")
    assert evidence(d) == {"rtnetlink IFLA_TUN_NUM_QUEUES": 1,
                           "rtnetlink IFLA_TUN_NUM_DISABLED_QUEUES": 1}
    assert find(rep, "mq-off") == []
    text = cli("doctor", "--qmp", vm.sock, "--timeout", QMP_TIMEOUT, str(vm.pid))
    assert text.code == 1 and "mq-vectors" in text.stdout and "fix: " in text.stdout, text
    results = os.environ.get("VHOSTCTL_RESULTS")
    if results:  # the README's sample
        Path(results, "doctor.txt").write_text(f"# {os.uname().release}\n{text.stdout}")
    vm.stop()
    wait_until(f"{tap_name} gone with QEMU", lambda: not link_exists(tap_name), 30)

    vm = qemu(["-smp", "2", *tap_netdev(tap_name, ",queues=2"), *VIRTIO], name="mq2")
    rep = doctor(cli, str(vm.pid))
    f = one(rep, "mq-off", "warning")
    assert f["fix"] == "-device virtio-net-pci,...,mq=on,vectors=6"
    assert find(rep, "mq-vectors") == [] and find(rep, "mq-more-queues-than-vcpus") == []


def test_mtu_viommu_tx_queue_size_and_busy_poll(qemu, tap_name, cli):  # noqa: F811
    vm = qemu(["-device", "intel-iommu", *tap_netdev(tap_name, ",poll-us=50"), "-device",
               "virtio-net-pci,netdev=n0,id=nic0,host_mtu=9000,disable-legacy=on,"
               "iommu_platform=on,tx_queue_size=1024"], name="opt")
    ip("link", "set", tap_name, "up")
    rep = doctor(cli, str(vm.pid))
    m = one(rep, "mtu-mismatch", "warning")
    assert evidence(m)[f"/sys/class/net/{tap_name}/mtu"] == 1500
    assert "host_mtu=9000" in evidence(m)[f"/proc/{vm.pid}/cmdline"]
    assert "iommu_platform=on" in evidence(one(rep, "viommu-with-vhost", "warning"))[
        f"/proc/{vm.pid}/cmdline"]
    assert "tx_queue_size=1024" in one(rep, "tx-queue-size-ignored", "info")["summary"]
    assert "poll-us=50" in evidence(one(rep, "busy-poll", "info"))[f"/proc/{vm.pid}/cmdline"]
    sh(m["fix"].split(" (")[0])
    assert find(doctor(cli, str(vm.pid)), "mtu-mismatch") == []


# -- workers and rates ------------------------------------------------------------------------

def test_worker_pinned_with_the_vcpus_then_moved(qemu, tap_name, cli):  # noqa: F811
    # Every thread QEMU makes (vCPUs; on 6.4+ its vhost task) inherits CPU 0 from taskset.
    vm = qemu([*tap_netdev(tap_name), *VIRTIO], prefix=["taskset", "-c", "0"], name="pin")
    ip("link", "set", tap_name, "up")
    r = cli("inspect", "--json", str(vm.pid))
    (worker,) = r.json()["processes"][0]["workers"]
    if worker["model"] == "kthread":  # before 6.4 a kernel thread, made with every CPU
        subprocess.run(["taskset", "-pc", "0", str(worker["tid"])], check=True,
                       capture_output=True)
    rep = doctor(cli, str(vm.pid))  # QEMU names no vCPU thread without debug-threads=on
    assert "worker-shares-vcpu-cpu" in {n["check"] for n in rep["not_run"]}, rep
    f = one(doctor(cli, "--qmp", vm.sock, str(vm.pid)), "worker-shares-vcpu-cpu", "warning")
    ev = evidence(f)
    assert next(v for k, v in ev.items() if k.endswith("Cpus_allowed_list")) == "0", ev
    assert any(k.startswith(f"/proc/{vm.pid}/task/") and v == "0" for k, v in ev.items()
               if k.endswith("Cpus_allowed_list") and str(worker["tid"]) not in k), ev
    sh(f["fix"].replace("<a CPU no vCPU is pinned to>", "1").split(" (")[0])
    assert find(doctor(cli, "--qmp", vm.sock, str(vm.pid)), "worker-shares-vcpu-cpu") == []


def test_drops_toward_a_guest_that_does_not_drain(qemu, tap_name, cli):  # noqa: F811
    """A paused guest drains nothing: the tap's queue (tx_queue_len frames) fills and every
    further frame the host sends it is dropped (drivers/net/tun.c tun_net_xmit())."""
    vm = qemu([*tap_netdev(tap_name), *VIRTIO], name="drop")
    # The queue stays full: any frame the kernel itself sends (IPv6 RS, MLD) is dropped too,
    # after ours have stopped (seen on 6.12).  Without IPv6 only ours reach the tap.
    Path(f"/proc/sys/net/ipv6/conf/{tap_name}/disable_ipv6").write_text("1")
    ip("link", "set", tap_name, "up")
    rep = doctor(cli, str(vm.pid))
    assert "tap-tx-drops" in {n["check"] for n in rep["not_run"]}  # a rate: needs --watch
    halt = threading.Event()
    stats = Path(f"/sys/class/net/{tap_name}/statistics/tx_dropped")

    def send() -> None:
        s = host_socket(int(Path(f"/sys/class/net/{tap_name}/ifindex").read_text()))
        try:
            frames = [probe_frame(i, 128) for i in range(100)]
            while not halt.is_set():
                for fr in frames:
                    s.send(fr)
                halt.wait(0.05)
        finally:
            s.close()

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        wait_until("the tap's queue full", lambda: int(stats.read_text()) > 0, 60)
        rep = doctor(cli, "--watch", "2", str(vm.pid))
    finally:
        halt.set()
        t.join(30)
    f = one(rep, "tap-tx-drops", "warning")
    ev = evidence(f)
    assert ev[f"/sys/class/net/{tap_name}/tx_queue_len"] == "1000"
    assert ev[f"/proc/{vm.pid}/cmdline rx_queue_size"] == "256 (default)"
    dropped = int(ev[f"/sys/class/net/{tap_name}/statistics/tx_dropped"].split()[0])
    assert dropped > 0 and rep["window_seconds"] == 2
    assert f["fix"].startswith(f"ip link set {tap_name} txqueuelen ")
    time.sleep(0.5)  # the last frames in flight
    rep = doctor(cli, "--watch", "1", str(vm.pid))
    assert find(rep, "tap-tx-drops") == [], rep
    assert not {n["check"] for n in rep["not_run"]} & {"tap-tx-drops", "worker-saturated"}
