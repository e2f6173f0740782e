"""The Prometheus collector over fake procfs/sysfs trees (the survey's FakeHost): which series,
which labels, guest perspective, no duplicates, vanishing processes; the textfile writer and
the HTTP server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_survey import QEMU, VH, FakeHost
from vhostctl import metrics as m
from vhostctl.errors import ValidationError, VhostctlError
from vhostctl.hostcheck import Check, HostReport


def scrape(host: FakeHost, report: HostReport | None = None) -> dict[str, list]:
    """name -> [(labels, value)] of one scrape through the real text format and parser."""
    if report is None:
        text = m.exposition(m.registry(m.VhostCollector(host.scanner(), checks=False)))
    else:
        text = generate_latest(_Static(m.families(host.scanner().scan(), report)))
    out: dict[str, list] = {}
    seen = set()
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in seen, f"duplicate series {key}"
            seen.add(key)
            assert all(v != "" for v in s.labels.values()), f"empty label in {key}"
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


class _Static:
    def __init__(self, fams):
        self.fams = fams

    def collect(self):
        return self.fams


def one(series: dict[str, list], name: str, **labels: str) -> float:
    hits = [v for lab, v in series.get(name, []) if all(lab.get(k) == x for k, x in
                                                          labels.items())]
    assert len(hits) == 1, (name, labels, series.get(name))
    return hits[0]


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path, release="6.12.117+deb12-amd64")


def vhost_vm(host: FakeHost) -> None:
    """QEMU 'web' with tap tw0: 2 queue pairs on vhost-net, one worker task per pair."""
    d = host.process(800, "qemu-system-x86", [
        QEMU, "-name", "guest=web,debug-threads=on",
        "-netdev", "tap,id=hostnet0,ifname=tw0,vhost=on,queues=2",
        "-device", "virtio-net-pci,netdev=hostnet0,mac=52:54:00:aa:bb:cc,mq=on"],
        tun={20: "tw0", 22: "tw0"}, fds={21: VH, 23: VH},
        threads={801: ("vhost-800", 150, 250, 0), 802: ("vhost-800", 10, 20, 1)})
    (d / "task/801/schedstat").write_text("9000000000 1500000000 42\n")
    (d / "task/802/schedstat").write_text("1000 250000000 3\n")
    host.tap("tw0", tun_flags=0x5102, master="br0",
             stats={"tx_bytes": 1000, "tx_packets": 10, "rx_bytes": 5000, "rx_packets": 50,
                    "tx_dropped": 3, "rx_dropped": 1, "rx_errors": 2})
    host.queues["tw0"] = (2, 0)


def test_a_vhost_net_nic_has_its_info_queues_workers_and_guest_side_traffic(host):
    vhost_vm(host)
    s = scrape(host)
    (labels, value), = s["vhostctl_nic_info"]
    assert value == 1
    assert labels == {"domain": "web", "target_device": "tw0", "device": "tw0",
                      "netdev": "hostnet0", "source_bridge": "br0",
                      "mac_address": "52:54:00:aa:bb:cc", "model_type": "virtio-net-pci",
                      "backend": "vhost-net", "interface_type": "tun",
                      "queues_configured": "2", "qemu_pid": "800"}
    key = {"domain": "web", "target_device": "tw0"}
    assert one(s, "vhostctl_nic_vhost_requested", **key) == 1
    assert one(s, "vhostctl_nic_vhost_active", **key) == 1
    assert one(s, "vhostctl_nic_queues_enabled", **key) == 2
    assert one(s, "vhostctl_nic_queues_disabled", **key) == 0
    # Guest perspective: the tap's tx is what the guest received.
    assert one(s, "vhostctl_nic_receive_bytes_total", **key) == 1000
    assert one(s, "vhostctl_nic_receive_packets_total", **key) == 10
    assert one(s, "vhostctl_nic_transmit_bytes_total", **key) == 5000
    assert one(s, "vhostctl_nic_transmit_packets_total", **key) == 50
    assert one(s, "vhostctl_nic_receive_drops_total", **key) == 3
    assert one(s, "vhostctl_nic_transmit_drops_total", **key) == 1
    assert one(s, "vhostctl_nic_transmit_errors_total", **key) == 2
    cpu = "vhostctl_vhost_worker_cpu_seconds_total"
    assert one(s, cpu, queue="0", mode="user", **key) == 1.5  # 150 ticks at 100 Hz
    assert one(s, cpu, queue="0", mode="system", **key) == 2.5
    assert one(s, cpu, queue="1", mode="system", **key) == 0.2
    wait = "vhostctl_vhost_worker_runqueue_wait_seconds_total"
    assert one(s, wait, queue="0", **key) == 1.5
    assert one(s, wait, queue="1", **key) == 0.25
    assert all("tid" not in lab and "pid" not in lab for lab, _ in s[cpu])
    assert one(s, "vhostctl_vhost_workers", domain="web") == 2
    assert one(s, "vhostctl_host_info", kernel="6.12.117+deb12-amd64",
               worker_model="task") == 1
    assert {v for _, v in s["vhostctl_vhost_worker_unattributed_cpu_seconds_total"]} == {0}


def test_vhost_requested_on_the_command_line_but_no_vhost_fd_is_requested_not_active(host):
    host.process(810, "qemu-system-x86", [
        QEMU, "-name", "slow", "-netdev", "tap,id=n0,ifname=ts0,vhost=on",
        "-device", "virtio-net-pci,netdev=n0"], tun={5: "ts0"})
    host.tap("ts0")
    s = scrape(host)
    key = {"domain": "slow", "target_device": "ts0"}
    assert one(s, "vhostctl_nic_vhost_requested", **key) == 1
    assert one(s, "vhostctl_nic_vhost_active", **key) == 0
    assert one(s, "vhostctl_nic_info", **key) == 1
    assert s["vhostctl_nic_info"][0][0]["backend"] == "userspace"
    assert "vhostctl_vhost_worker_cpu_seconds_total" not in s


def test_vhost_off_is_not_requested_and_an_unknown_request_is_left_out(host):
    host.process(820, "qemu-system-x86", [QEMU, "-name", "off", "-netdev",
                                          "tap,id=n0,ifname=to0,vhost=off"], tun={5: "to0"})
    host.process(821, "myvmm", ["/usr/bin/myvmm"], tun={5: "tu0"})  # no command line view
    host.tap("to0")
    host.tap("tu0")
    s = scrape(host)
    assert one(s, "vhostctl_nic_vhost_requested", target_device="to0") == 0
    assert one(s, "vhostctl_nic_vhost_active", target_device="to0") == 0
    assert [lab["target_device"] for lab, _ in s["vhostctl_nic_vhost_requested"]] == ["to0"]
    assert one(s, "vhostctl_nic_vhost_active", domain="myvmm", target_device="tu0") == 0


def test_a_vhost_user_nic_keeps_its_info_without_empty_labels(host):
    host.process(830, "qemu-system-x86", [
        QEMU, "-name", "dpdk", "-chardev", "socket,id=c0,path=/run/vu0.sock,server=on",
        "-netdev", "vhost-user,id=vu0,chardev=c0,queues=2",
        "-device", "virtio-net-pci,netdev=vu0"])
    s = scrape(host)
    (labels, _), = s["vhostctl_nic_info"]
    assert labels == {"domain": "dpdk", "netdev": "vu0", "backend": "vhost-user",
                      "socket": "/run/vu0.sock", "model_type": "virtio-net-pci",
                      "queues_configured": "2", "qemu_pid": "830"}
    for name in ("vhostctl_nic_vhost_requested", "vhostctl_nic_vhost_active",
                 "vhostctl_nic_receive_bytes_total"):
        assert name not in s


def test_two_holders_of_one_tap_make_no_duplicate_series(host):
    for pid in (840, 841):  # the same program twice on one multi-queue tap
        host.process(pid, "vmm", ["/usr/bin/vmm"], tun={5: "td0"}, fds={6: VH})
    host.tap("td0", tun_flags=0x5102, stats={"tx_bytes": 7})
    s = scrape(host)  # scrape() fails on a duplicate
    assert one(s, "vhostctl_nic_receive_bytes_total", target_device="td0") == 7
    assert len(s["vhostctl_nic_info"]) == 2  # qemu_pid tells the two apart
    assert one(s, "vhostctl_vhost_workers", domain="vmm") == 0


def test_workers_matched_to_no_queue_are_counted_apart(host):
    # 2 vhost fds but 1 worker: the pairing is unknown, the CPU still shows.
    host.process(850, "qemu-system-x86", [QEMU, "-netdev", "tap,id=n0,ifname=tx0,queues=2"],
                 tun={3: "tx0", 5: "tx0"}, fds={4: VH, 6: VH},
                 threads={851: ("vhost-850", 30, 70, 0)})
    host.tap("tx0", tun_flags=0x5102)
    host.kthread(900, "vhost-12345", utime=100)  # its owner is not listed
    s = scrape(host)
    assert "vhostctl_vhost_worker_cpu_seconds_total" not in s
    loose = "vhostctl_vhost_worker_unattributed_cpu_seconds_total"
    assert one(s, loose, mode="user") == pytest.approx(1.3)
    assert one(s, loose, mode="system") == pytest.approx(0.7)


def test_host_checks_become_pass_fail_gauges_and_module_parameters_numbers(host):
    report = HostReport((Check("vhost-net device", True, "ok"),
                         Check("vhost_net module", False, "absent", "modprobe vhost_net"),
                         Check("CAP_NET_ADMIN", False, "missing"),  # the exporter's own
                         Check("module parameters", None, "...",
                               data={"max_mem_regions": "64", "fork_from_owner_default": "Y",
                                     "experimental_zcopytx": "0", "odd": "x"}),
                         Check("/dev/kvm", None, "absent")))
    s = scrape(host, report)
    assert sorted((lab["check"], v) for lab, v in s["vhostctl_host_check"]) == \
        [("vhost_net_device", 1), ("vhost_net_module", 0)]
    assert sorted((lab["parameter"], v) for lab, v in
                  s["vhostctl_vhost_module_parameter"]) == \
        [("experimental_zcopytx", 0), ("fork_from_owner_default", 1), ("max_mem_regions", 64)]


def test_a_process_that_vanishes_mid_scan_never_fails_the_scrape(host, monkeypatch):
    vhost_vm(host)
    host.process(860, "qemu-system-x86", [QEMU, "-name", "gone", "-netdev",
                                          "tap,id=n0,ifname=tg0"], tun={5: "tg0"})
    host.tap("tg0")
    real = os.listdir

    def listdir(path):  # QEMU 860 exits right after its fds were listed
        names = real(path)
        if str(path).endswith("/860/fd"):
            shutil.rmtree(host.proc / "860")
        return names

    monkeypatch.setattr(os, "listdir", listdir)
    s = scrape(host)
    assert [lab["domain"] for lab, _ in s["vhostctl_nic_info"]] == ["web"]
    assert one(s, "vhostctl_scrape_skipped_reads") >= 1


def test_a_process_vanishing_at_any_read_of_its_proc_entry_never_fails_the_scrape(
        host, monkeypatch, tmp_path):
    """Churn, made deterministic: a second QEMU (tap fds, vhost fds, worker threads) exits
    just before the n-th read the scan makes under its /proc entry, for every n until a scan
    makes no more.  Every scrape parses; the VM that stays is always reported whole."""
    import builtins

    vhost_vm(host)
    gone = host.process(860, "qemu-system-x86", [
        QEMU, "-name", "gone", "-netdev", "tap,id=n0,ifname=tg0,vhost=on,queues=2",
        "-device", "virtio-net-pci,netdev=n0,mq=on"],
        tun={5: "tg0", 7: "tg0"}, fds={6: VH, 8: VH},
        threads={861: ("vhost-860", 5, 5, 0), 862: ("vhost-860", 5, 5, 1)})
    (gone / "task/861/schedstat").write_text("1 2 3\n")
    host.tap("tg0", tun_flags=0x5102)
    host.queues["tg0"] = (2, 0)
    keep = shutil.copytree(gone, tmp_path / "keep-860", symlinks=True)
    prefix = str(gone)
    state = {"left": 0, "alive": True}

    def hook(real):
        def call(path, *a, **kw):
            if state["alive"] and str(path).startswith(prefix):
                state["left"] -= 1
                if state["left"] == 0:
                    state["alive"] = False
                    shutil.rmtree(prefix)  # QEMU 860 exits now
            return real(path, *a, **kw)
        return call

    for name in ("listdir", "readlink", "stat", "scandir"):
        monkeypatch.setattr(os, name, hook(getattr(os, name)))
    monkeypatch.setattr(os.path, "isdir", hook(os.path.isdir))
    monkeypatch.setattr(builtins, "open", hook(builtins.open))
    whole = None
    for n in range(1, 1000):
        if not state["alive"]:
            shutil.copytree(keep, prefix, symlinks=True)
        state.update(left=n, alive=True)
        s = scrape(host)
        assert one(s, "vhostctl_nic_info", domain="web") == 1, n
        assert one(s, "vhostctl_nic_queues_enabled", domain="web") == 2, n
        domains = sorted(lab["domain"] for lab, _ in s["vhostctl_nic_info"])
        assert domains in (["web"], ["gone", "web"]), (n, domains)
        if state["alive"]:  # the scan made fewer than n reads: every one was hit
            whole = s
            break
    assert whole is not None and n > 5, n
    assert sorted(lab["domain"] for lab, _ in whole["vhostctl_nic_info"]) == ["gone", "web"]


def test_check_label_is_snake_case():
    assert m.check_label("vhost-net device") == "vhost_net_device"
    assert m.check_label("/dev/kvm") == "dev_kvm"
    assert m.check_label("CAP_NET_ADMIN") == "cap_net_admin"


# -- textfile ---------------------------------------------------------------------------------

def test_textfile_is_replaced_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "vhostctl.prom"
    path.write_text("old\n")
    m.write_textfile(str(path), b"vhostctl_processes 1.0\n")
    assert path.read_bytes() == b"vhostctl_processes 1.0\n"
    assert os.listdir(tmp_path) == ["vhostctl.prom"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_textfile_refuses_other_names_and_missing_directories(tmp_path):
    with pytest.raises(ValidationError, match=r"\.prom"):
        m.write_textfile(str(tmp_path / "x.txt"), b"")
    with pytest.raises(ValidationError, match="no such directory"):
        m.write_textfile(str(tmp_path / "nodir" / "x.prom"), b"")


def test_a_failed_rename_removes_the_temporary(tmp_path):
    (tmp_path / "busy.prom").mkdir()  # rename(2) of a file over a directory fails
    with pytest.raises(VhostctlError) as e:
        m.write_textfile(str(tmp_path / "busy.prom"), b"x")
    assert e.value.code == 1 and "busy.prom" in str(e.value)
    assert os.listdir(tmp_path) == ["busy.prom"]


# -- serve ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9917", ("127.0.0.1", 9917)), (":9917", ("", 9917)),
    ("[::1]:80", ("::1", 80)), ("localhost:65535", ("localhost", 65535))])
def test_listen_addresses(text, want):
    assert m.parse_listen(text) == want


@pytest.mark.parametrize("text", ["9917", "host:", "host:-1", "host:65536", "::1:80",
                                  "host:http"])
def test_bad_listen_addresses_are_usage_errors(text):
    with pytest.raises(ValidationError) as e:
        m.parse_listen(text)
    assert e.value.code == 2


def test_serve_answers_metrics_and_404_then_a_busy_port_is_one_error(host):
    vhost_vm(host)
    reg = m.registry(m.VhostCollector(host.scanner(), checks=False))
    srv = m.server("127.0.0.1:0", reg)
    port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'vhostctl_nic_vhost_active{domain="web",target_device="tw0"} 1.0' in body
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=30)
        assert e.value.code == 404
        with pytest.raises(VhostctlError) as busy:
            m.server(f"127.0.0.1:{port}", reg)
        assert busy.value.errno == 98 and "cannot listen on" in str(busy.value)
        assert busy.value.code == 1
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


def test_serve_refuses_an_address_that_is_not_ours():
    with pytest.raises(VhostctlError) as e:
        m.server("192.0.2.1:9917")  # TEST-NET-1: never a local address
    assert "not one of this host's" in str(e.value)


def test_serve_names_a_port_that_needs_privilege(monkeypatch):
    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(VhostctlError) as e:
        m.server("127.0.0.1:80")
    assert e.value.code == 3 and "CAP_NET_BIND_SERVICE" in str(e.value)

