"""doctor's verdict logic over built surveys: the thresholds of the rate checks, the pinning
rule, the findings a kernel test cannot provoke (a kernel built without vhost-net, QEMU that
did not start vhost with the driver ready, macvtap), and the exit code.  The proof that each
check reads the right thing is tests/kernel/test_doctor.py, against the real kernel."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vhostctl import doctor as d
from vhostctl.hostcheck import Check, HostReport
from vhostctl.survey import Nic, Survey, TapLink, VmProcess, Worker

ARGV = ["qemu-system-x86_64", "-netdev", "tap,id=n0,fd=3,vhostfd=4", "-device",
        "virtio-net-pci,netdev=n0,id=nic0"]
HOST_OK = HostReport((Check("vhost-net device", True, "ok"),
                      Check("vhost_net module", True, "loaded", data={"state": "module"})))


def worker(tid: int, ticks: int = 0, wait_ns: int | None = 0) -> Worker:
    return Worker(tid=tid, name="vhost-100", model="task", owner=100, utime=ticks, stime=0,
                  last_cpu=0, tgid=100, runqueue_wait_ns=wait_ns)


def vm(workers: list[Worker], stats: dict[str, int] | None = None,
       argv: list[str] = ARGV) -> VmProcess:
    link = TapLink("t0", visible=True, tun_flags=0x1002 | 0x4000, up=True, mtu=1500,
                   queues_enabled=1, queues_disabled=0, stats=stats or {})
    nic = Nic("vhost-net", id="n0", tap="t0", tap_fds=[3], vhost_fds=[4], vhost_requested=True,
              device="virtio-net-pci", link=link)
    return VmProcess(pid=100, comm="qemu-system-x86", argv=argv, kind="qemu", nics=[nic],
                     workers=workers, vcpu_tids=[101])


def facts(p: VmProcess, later: VmProcess | None = None, files: dict[str, str] | None = None,
          host: HostReport = HOST_OK, window: float = 2.0) -> d.Facts:
    return d.Facts(survey=Survey("6.12.0", "task", [p]), host=host,
                   read=(files or {}).get, proc="/p", sys="/s", dev="/nonexistent",
                   later=Survey("6.12.0", "task", [later]) if later else None,
                   window=window if later else None, processes=[p], host_wide=False)


def ids(f: d.Facts) -> list[str]:
    return d.diagnose(f).ids()


@pytest.mark.parametrize(("ticks", "saturated"), [(179, False), (180, True)])
def test_saturated_from_ninety_percent_of_the_window(ticks: int, saturated: bool) -> None:
    """100 ticks a second, 2 s: 180 ticks is 90 %."""
    a, b = vm([worker(7)]), vm([worker(7, ticks)])
    assert ("worker-saturated" in ids(facts(a, b))) is saturated


@pytest.mark.parametrize(("waited_ns", "starved"), [(399_000_000, False), (400_000_000, True)])
def test_starved_from_twenty_percent_of_the_window_waiting(waited_ns: int, starved: bool) -> None:
    a, b = vm([worker(7, wait_ns=10)]), vm([worker(7, wait_ns=10 + waited_ns)])
    assert ("worker-starved" in ids(facts(a, b))) is starved


def test_starved_not_judged_without_schedstat() -> None:
    a, b = vm([worker(7, wait_ns=None)]), vm([worker(7, wait_ns=None)])
    assert "worker-starved" not in ids(facts(a, b))


@pytest.mark.parametrize(("busy", "other", "lone"), [
    (20, 1, True),    # 10 % and 0.5 %: one worker does it all
    (20, 3, False),   # the other above a tenth of the busiest: both work
    (9, 0, False),    # the busiest under 5 %: an idle NIC is not a skewed one
])
def test_one_busy_worker_among_several(busy: int, other: int, lone: bool) -> None:
    a = vm([worker(7), worker(8)])
    b = vm([worker(7, busy), worker(8, other)])
    assert ("mq-one-busy-worker" in ids(facts(a, b))) is lone


def test_drops_are_a_rate_over_the_window_and_only_new_ones_count() -> None:
    a, b = vm([], {"tx_dropped": 500}), vm([], {"tx_dropped": 500})
    assert "tap-tx-drops" not in ids(facts(a, b))  # old drops: not now
    b = vm([], {"tx_dropped": 540})
    (f,) = [x for x in d.diagnose(facts(a, b)).findings if x.id == "tap-tx-drops"]
    assert "dropped 40 frames toward the guest in 2 s (20/s)" in f.summary
    assert ("/proc/100/cmdline rx_queue_size", "256 (default)") in f.evidence


def test_without_watch_the_rate_checks_are_not_run_and_say_why() -> None:
    rep = d.diagnose(facts(vm([worker(7)])))
    assert {n.check for n in rep.not_run} >= set(d.RATE_CHECKS)
    assert all("--watch" in n.reason for n in rep.not_run if n.check in d.RATE_CHECKS)


def _status(cpus: str) -> str:
    return f"Name:\tx\nCpus_allowed_list:\t{cpus}\n"


@pytest.mark.parametrize(("vcpu", "wk", "shares"), [
    ("0", "0", True),        # both pinned to CPU 0
    ("0-1", "0-1", False),   # nothing pinned: the scheduler keeps them apart
    ("0", "1", False),       # pinned apart
    ("0", "0-1", False),     # the worker may still run on CPU 1
])
def test_worker_shares_only_a_pinned_vcpus_cpus(vcpu: str, wk: str, shares: bool) -> None:
    files = {"/s/devices/system/cpu/online": "0-1\n", "/p/100/task/101/status": _status(vcpu),
             "/p/100/task/7/status": _status(wk)}
    assert ("worker-shares-vcpu-cpu" in ids(facts(vm([worker(7)]), files=files))) is shares


def test_cpu_list_parsing() -> None:
    assert d.parse_cpu_list("0-2,5,7-8\n") == {0, 1, 2, 5, 7, 8}
    assert d.parse_cpu_list("") == set()
    with pytest.raises(ValueError):
        d.parse_cpu_list("0-x")


def test_vhost_not_started_although_the_driver_is_ready() -> None:
    p = vm([worker(7)])
    p.nics[0].qmp = {"virtio": {"status": 15, "vhost-started": False}}
    p.qmp = {"status": "running"}
    rep = d.diagnose(facts(p))
    assert rep.ids() == ["vhost-not-started"] and rep.exit_code == 1
    p.nics[0].qmp = {"virtio": {"status": 15, "vhost-started": True}}
    assert d.diagnose(facts(p)).ids() == []
    # QEMU 7.2+ names the bits (hw/virtio/virtio-qmp.c virtio_config_status_map).
    p.nics[0].qmp = {"virtio": {"status": {"statuses": [
        "VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found",
        "VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device"]}, "vhost-started": False}}
    (f,) = d.diagnose(facts(p)).findings
    assert f.id == "guest-driver-not-ready"
    assert f.evidence[0] == ("QMP x-query-virtio-status status",
                             ["VIRTIO_CONFIG_S_ACKNOWLEDGE", "VIRTIO_CONFIG_S_DRIVER"])
    p.nics[0].qmp["virtio"]["status"]["statuses"].append(
        "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready")
    assert d.diagnose(facts(p)).ids() == ["vhost-not-started"]


def test_a_kernel_built_without_vhost_net_is_not_told_to_modprobe() -> None:
    host = HostReport((Check("vhost-net device", False, "absent", "modprobe vhost_net"),
                       Check("vhost_net module", False, "not loaded", "modprobe vhost_net",
                             data={"state": "absent"})))
    f = facts(vm([]), files={"/boot/config-6.12.0": "# CONFIG_VHOST_NET is not set\n"},
              host=host)
    f = replace(f, root="/")
    (finding,) = [x for x in d.diagnose(f).findings if x.id == "vhost-net-unavailable"]
    assert "built with CONFIG_VHOST_NET=m" in finding.fix
    assert ("/boot/config-6.12.0", "# CONFIG_VHOST_NET is not set") in finding.evidence


def test_macvtap_in_bridge_mode_is_info_and_exit_stays_zero() -> None:
    p = vm([])
    assert p.nics[0].link is not None
    p.nics[0].link = replace(p.nics[0].link, kind="macvtap", mode="bridge", lower="eth0")
    rep = d.diagnose(facts(p))
    assert rep.ids() == ["macvtap-host-unreachable"] and rep.exit_code == 0
    p.nics[0].link = replace(p.nics[0].link, mode="passthru")
    assert d.diagnose(facts(p)).ids() == []


def test_bridge_mtu_mismatch_and_findings_sorted_worst_first() -> None:
    p = vm([])
    assert p.nics[0].link is not None
    p.nics[0].link = replace(p.nics[0].link, master="br0", up=False)
    rep = d.diagnose(facts(p, files={"/s/class/net/br0/mtu": "9000\n"}))
    assert rep.ids() == ["tap-down", "mtu-mismatch"]
    assert rep.as_dict()["summary"] == {"error": 1, "warning": 1, "info": 0}


def test_a_target_that_matches_nothing_is_refused() -> None:
    with pytest.raises(d.VhostctlError, match="no VM, process or tap matches nope"):
        d._select(Survey("6.12.0", "task", [vm([])]), [], ["nope"])
    procs, loose = d._select(Survey("6.12.0", "task", [vm([])]),
                             [TapLink("t9", tun_flags=0x1002)], ["t0", "t9"])
    assert [p.pid for p in procs] == [100] and loose == ["t9"]


def test_text_keeps_each_line_whole_for_grep(capsys: pytest.CaptureFixture[str]) -> None:
    from vhostctl.render_doctor import print_report

    dev = "-device virtio-net-pci,netdev=n0,id=nic0,mq=on,vectors=4," + "x" * 80
    rep = d.Report(kernel="6.12.0", window=None, subjects=["qemu [1]"], findings=[
        d.Finding("mq-vectors", "warning", "qemu [1] nic n0", "vectors=4 is below 6 " * 6,
                  (("/proc/1/cmdline", dev),), "vectors=6"),
        d.Finding("mq-more-queues-than-vcpus", "info", "qemu [1] nic n0", "2 for 1",
                  (("/proc/1/cmdline", "-smp 1"),), "-smp 2")])
    print_report(rep)
    out = capsys.readouterr().out.splitlines()
    assert f"    /proc/1/cmdline: {dev}" in out
    assert out[-1] == "0 errors, 1 warning, 1 info (qemu [1])"
