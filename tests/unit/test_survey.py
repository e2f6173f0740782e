"""Survey of running VMs over fake procfs/sysfs trees: parsers, NIC classification, both
vhost worker models, vanishing processes and fds, QMP attachment, top rates."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostctl import qemu_cmdline as qc
from vhostctl import survey as sv
from vhostctl.errors import ValidationError, VhostctlError

PF_KTHREAD = 0x00200000


def stat_line(pid: int, comm: str, *, ppid: int = 1, flags: int = 0x400000, utime: int = 0,
              stime: int = 0, cpu: int = 0, state: str = "S", threads: int = 1) -> str:
    fields = ["0"] * 52
    fields[0], fields[1], fields[2], fields[3] = str(pid), f"({comm})", state, str(ppid)
    fields[19] = str(threads)
    fields[8], fields[13], fields[14], fields[38] = str(flags), str(utime), str(stime), str(cpu)
    return " ".join(fields) + "\n"


class FakeHost:
    """A /proc and /sys skeleton with just the files the survey reads."""

    def __init__(self, root: Path, release: str = "6.1.0-56-amd64") -> None:
        self.proc = root / "proc"
        self.sys = root / "sys"
        (self.proc / "sys/kernel").mkdir(parents=True)
        (self.proc / "net").mkdir()
        (self.sys / "class/net").mkdir(parents=True)
        (self.proc / "sys/kernel/osrelease").write_text(release + "\n")
        (self.proc / "net/unix").write_text("Num       RefCount Protocol Flags    Type St Inode "
                                           "Path\n")
        self.kthread(2, "kthreadd", ppid=0)
        self.unix: dict[int, tuple[str | None, int]] = {}  # what sock_diag would answer
        self.modes: dict[int, str] = {}  # ifindex -> what RTM_GETLINK would answer
        self.queues: dict[str, tuple[int, int]] = {}  # tun name -> (enabled, disabled)

    def scanner(self) -> sv.Scanner:
        return sv.Scanner(str(self.proc), str(self.sys), clk_tck=100,
                          unix_peers=lambda: self.unix, link_mode=self.modes.get,
                          tun_queues=lambda: self.queues)

    def process(self, pid: int, comm: str, argv: list[str], *, fds: dict[int, str] | None = None,
                tun: dict[int, str | None] | None = None, uid: int = 0,
                threads: dict[int, tuple[str, int, int, int]] | None = None) -> Path:
        d = self.proc / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "fdinfo").mkdir()
        (d / "task").mkdir()
        (d / "stat").write_text(stat_line(pid, comm, threads=1 + len(threads or {})))
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (d / "status").write_text(f"Name:\t{comm}\nTgid:\t{pid}\nPid:\t{pid}\n"
                                  f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        for fd, target in (fds or {}).items():
            os.symlink(target, d / "fd" / str(fd))
            (d / "fdinfo" / str(fd)).write_text("pos:\t0\nflags:\t02000002\n")
        for fd, iff in (tun or {}).items():
            os.symlink("/dev/net/tun", d / "fd" / str(fd))
            (d / "fdinfo" / str(fd)).write_text(
                "pos:\t0\nflags:\t02004002\nmnt_id:\t24\nino:\t77\n"
                + (f"iff:\t{iff}\n" if iff else ""))
        for tid, (tcomm, utime, stime, cpu) in (threads or {}).items():
            (d / "task" / str(tid)).mkdir()
            (d / "task" / str(tid) / "stat").write_text(
                stat_line(tid, tcomm, utime=utime, stime=stime, cpu=cpu))
        return d

    def kthread(self, pid: int, comm: str, *, ppid: int = 2, utime: int = 0, stime: int = 0,
                cpu: int = 0) -> None:
        d = self.proc / str(pid)
        d.mkdir()
        (d / "stat").write_text(stat_line(pid, comm, ppid=ppid, flags=PF_KTHREAD, utime=utime,
                                          stime=stime, cpu=cpu))
        (d / "status").write_text(f"Name:\t{comm}\nTgid:\t{pid}\n")

    def tap(self, name: str, *, tun_flags: int = 0x5002, owner: int = -1, group: int = -1,
            up: bool = True, master: str | None = None, mtu: int = 1500,
            stats: dict[str, int] | None = None) -> None:
        d = self.sys / "class/net" / name
        (d / "statistics").mkdir(parents=True)
        (d / "tun_flags").write_text(f"0x{tun_flags:x}\n")
        (d / "owner").write_text(f"{owner}\n")
        (d / "group").write_text(f"{group}\n")
        (d / "mtu").write_text(f"{mtu}\n")
        (d / "flags").write_text("0x1003\n" if up else "0x1002\n")
        (d / "operstate").write_text("unknown\n" if up else "down\n")
        (d / "address").write_text("fe:00:00:00:00:01\n")
        for k in sv.STAT_KEYS:
            (d / "statistics" / k).write_text(f"{(stats or {}).get(k, 0)}\n")
        if master:
            (self.sys / "class/net" / master).mkdir(exist_ok=True)
            os.symlink(f"../{master}", d / "master")


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


QEMU = "/usr/bin/qemu-system-x86_64"
VH, TUN = "/dev/vhost-net", "/dev/net/tun"


def only(result: sv.Survey) -> sv.VmProcess:
    assert len(result.processes) == 1, result.processes
    return result.processes[0]


# -- parsers ---------------------------------------------------------------------------------

def test_stat_splits_at_the_last_parenthesis():
    st_ = sv.parse_stat(stat_line(42, "a) (b c)", utime=7, stime=5, cpu=3, ppid=9))
    assert (st_.pid, st_.comm, st_.ppid, st_.utime, st_.stime, st_.processor) == \
        (42, "a) (b c)", 9, 7, 5, 3)


@pytest.mark.parametrize("text", ["", "42", "42 (x", "42 (x) S 1 2", "x (y) " + "1 " * 40])
def test_stat_malformed_is_a_value_error(text):
    with pytest.raises(ValueError):
        sv.parse_stat(text)


@given(comm=st.text(max_size=20).filter(lambda c: "\0" not in c),
       nums=st.lists(st.integers(0, 2**40), min_size=50, max_size=50))
def test_stat_roundtrip_any_comm(comm, nums):
    fields = [str(n) for n in nums]
    text = f"{nums[0]} ({comm}) R " + " ".join(fields[1:]) + "\n"
    parsed = sv.parse_stat(text)
    assert parsed.comm == comm
    assert (parsed.ppid, parsed.utime, parsed.processor) == (nums[1], nums[11], nums[36])


@given(st.text())
def test_stat_fuzz_only_value_errors(text):
    with contextlib.suppress(ValueError):
        sv.parse_stat(text)


@given(st.text())
def test_fdinfo_and_status_fuzz_never_raise(text):
    sv.parse_fdinfo(text)
    sv.parse_status_ids(text)
    sv.parse_unix_listeners(text)
    sv.parse_info_network(text)


def test_fdinfo_reads_iff():
    assert sv.parse_fdinfo("pos:\t0\nflags:\t02\niff:\tvnet3\ngarbage\n")["iff"] == "vnet3"


@given(st.binary())
def test_cmdline_fuzz(raw):
    argv = sv.parse_cmdline(raw)
    assert all(isinstance(a, str) for a in argv)


def test_cmdline_split():
    assert sv.parse_cmdline(b"qemu\0-name\0x y\0") == ["qemu", "-name", "x y"]
    assert sv.parse_cmdline(b"") == []


ARG = st.one_of(st.sampled_from(["-netdev", "-nic", "-net", "-chardev", "-name", "-device",
                                 "-qmp", "--netdev", "tap", "{", "{\"type\":1}", ",", ",,",
                                 "vhost-user,chardev=", "fds=3:x", "id=", "queues=q"]),
                st.text(max_size=30))


@given(st.lists(ARG, max_size=12))
def test_qemu_argv_fuzz_never_raises(argv):
    args = qc.parse_argv(["qemu", *argv])
    for nd in args.netdevs:
        assert isinstance(nd.fds, tuple)
        assert isinstance(nd.vhost_requested, bool)


@given(st.text(max_size=60), st.one_of(st.none(), st.just("type")))
def test_split_opts_fuzz(text, implied):
    assert isinstance(qc.split_opts(text, implied), dict)
    qc.parse_opts(text, implied)


def test_split_opts_qemu_rules():
    assert qc.split_opts("tap,id=n0,script=a,,b,vhost", "type") == \
        {"type": "tap", "id": "n0", "script": "a,b", "vhost": "on"}
    assert qc.split_opts("socket,path=/x,server,nowait", "backend")["wait"] == "off"


def test_libvirt_name_and_json_netdev():
    args = qc.parse_argv([
        QEMU, "-name", "guest=web1,debug-threads=on",
        "-netdev", '{"type":"tap","fds":"27:28","vhost":true,"vhostfds":"29:30","id":"hostnet0"}',
        "-device", '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0"}',
        "-netdev", "tap,fd=32,id=hostnet1,vhost=on,vhostfd=33",
    ])
    assert args.name == "web1"
    a, b = args.netdevs
    assert (a.id, a.fds, a.vhostfds, a.vhost_requested) == ("hostnet0", (27, 28), (29, 30), True)
    assert (b.id, b.fds, b.vhostfds) == ("hostnet1", (32,), (33,))
    assert args.device_for("hostnet0").driver == "virtio-net-pci"
    assert qc.vm_name("plain") == "plain"


def test_vhost_requested_rules():
    assert qc.NetdevSpec("tap", vhostfds=(3,)).vhost_requested
    assert not qc.NetdevSpec("tap", vhostfds=(3,), vhost=False).vhost_requested
    assert qc.NetdevSpec("tap", vhostforce=True).vhost_requested
    assert not qc.NetdevSpec("tap").vhost_requested


# -- scanning --------------------------------------------------------------------------------

def test_libvirt_vm_gets_exact_fds_per_nic(host):
    argv = [QEMU, "-name", "guest=web1,debug-threads=on", "-S",
            "-netdev", '{"type":"tap","fds":"27:28","vhost":true,"vhostfds":"29:30",'
            '"id":"hostnet0"}',
            "-device", '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0"}',
            "-netdev", "tap,fd=32,id=hostnet1,vhost=on,vhostfd=33",
            "-device", "virtio-net-pci,netdev=hostnet1,id=net1"]
    host.process(1234, "qemu-system-x86", argv, fds={29: VH, 30: VH, 33: VH, 5: "socket:[9]",
                                                     7: "anon_inode:kvm-vm"},
                 tun={27: "vnet0", 28: "vnet0", 32: "vnet1"}, uid=64055)
    host.tap("vnet0", tun_flags=0x5102, master="virbr0")
    host.tap("vnet1")
    p = only(host.scanner().scan())
    assert (p.pid, p.name, p.kind, p.uid, p.accel) == (1234, "web1", "qemu", 64055, "kvm")
    n0, n1 = p.nics
    assert (n0.id, n0.tap, n0.path, n0.queues, n0.tap_fds, n0.vhost_fds) == \
        ("hostnet0", "vnet0", "vhost-net", 2, [27, 28], [29, 30])
    assert n0.link.master == "virbr0" and n0.link.multi_queue and n0.link.vnet_hdr
    assert n0.device == "virtio-net-pci"
    assert (n1.id, n1.vhost_fds, n1.queues) == ("hostnet1", [33], 1)
    assert n0.warnings == [] and n1.warnings == []
    # 3 vhost fds, no worker found: the process is told so.
    assert any("no owner yet" in w for w in p.warnings)


def test_qemu_opened_fds_interleave_tap_then_vhost(host):
    argv = [QEMU, "-netdev", "tap,id=n0,ifname=tq0,script=no,downscript=no,vhost=on,queues=2",
            "-netdev", "tap,id=n1,ifname=tq1,script=no,downscript=no,vhost=on"]
    host.process(300, "qemu-system-x86", argv, fds={11: VH, 13: VH, 15: VH},
                 tun={10: "tq0", 12: "tq0", 14: "tq1"})
    host.tap("tq0", tun_flags=0x5102)
    host.tap("tq1")
    p = only(host.scanner().scan())
    by = {n.id: n for n in p.nics}
    assert by["n0"].vhost_fds == [11, 13] and by["n0"].path == "vhost-net"
    assert by["n1"].vhost_fds == [15]
    assert p.unassigned_vhost_fds == []


def test_vhost_off_is_virtio_without_warning(host):
    host.process(301, "qemu-system-x86", [QEMU, "-netdev", "tap,id=n0,ifname=t0,vhost=off"],
                 tun={9: "t0"})
    host.tap("t0")
    nic = only(host.scanner().scan()).nics[0]
    assert (nic.path, nic.vhost_requested, nic.warnings) == ("virtio", False, [])


def test_fallback_to_userspace_is_warned(host):
    host.process(302, "qemu-system-x86", [QEMU, "-netdev", "tap,id=n0,ifname=t0,vhost=on"],
                 tun={9: "t0"})
    host.tap("t0")
    nic = only(host.scanner().scan()).nics[0]
    assert nic.path == "virtio"
    assert any("fell back to userspace" in w for w in nic.warnings)


def test_fewer_vhost_fds_than_queue_pairs(host):
    host.process(303, "qemu-system-x86", [QEMU, "-netdev", "tap,id=n0,ifname=t0,queues=2"],
                 tun={3: "t0", 4: "t0"}, fds={5: VH})
    host.tap("t0", tun_flags=0x5102)
    nic = only(host.scanner().scan()).nics[0]
    assert nic.path == "vhost-net"
    assert any("1 vhost-net fd(s) for 2 queue pairs" in w for w in nic.warnings)


def test_down_and_ownerless_persistent_tap_are_warned(host):
    host.process(304, "qemu-system-x86", [QEMU], tun={3: "t0"}, fds={4: VH})
    host.tap("t0", tun_flags=0x5802, up=False)
    nic = only(host.scanner().scan()).nics[0]
    assert any("DOWN" in w and "vhost-net" in w for w in nic.warnings)
    assert any("persistent tap t0 has no owner" in w for w in nic.warnings)


def test_persistent_tap_with_owner_is_fine(host):
    host.process(305, "qemu-system-x86", [QEMU], tun={3: "t0"}, fds={4: VH})
    host.tap("t0", tun_flags=0x5802, owner=1000)
    nic = only(host.scanner().scan()).nics[0]
    assert nic.link.owner == 1000 and nic.link.persist
    assert not any("persistent" in w for w in nic.warnings)


def test_tap_in_another_netns(host):
    host.process(306, "qemu-system-x86", [QEMU], tun={3: "elsewhere"})
    nic = only(host.scanner().scan()).nics[0]
    assert nic.link.visible is False
    assert any("not in this network namespace" in w for w in nic.warnings)


def test_unattached_tun_fd_and_unassigned_vhost(host):
    host.process(307, "probe", ["python3", "probe.py"], tun={3: None}, fds={2: VH})
    p = only(host.scanner().scan())
    assert p.kind == "other" and p.nics == []
    assert p.unassigned_vhost_fds == [2]
    assert any("no interface attached" in w for w in p.warnings)


def test_vhost_user_from_the_command_line(host):
    host.process(308, "qemu-system-x86", [
        QEMU, "-chardev", "socket,id=c0,path=/run/vu0.sock,server=on,wait=off",
        "-netdev", "vhost-user,id=n1,chardev=c0,queues=2",
        "-device", "virtio-net-pci,netdev=n1,mq=on"])
    p = only(host.scanner().scan())  # no vhost/tun fds at all: still a VM
    (nic,) = p.nics
    assert (nic.path, nic.id, nic.socket, nic.socket_server, nic.queues, nic.device) == \
        ("vhost-user", "n1", "/run/vu0.sock", True, 2, "virtio-net-pci")


@pytest.mark.parametrize("qemu_listens", [True, False])
def test_vhost_user_backend_is_the_socket_peer(host, qemu_listens):
    server = ",server=on,wait=off" if qemu_listens else ""
    host.process(310, "qemu-system-x86", [
        QEMU, "-chardev", f"socket,id=c0,path=/run/vu0.sock{server}",
        "-netdev", "vhost-user,id=n1,chardev=c0"], fds={7: "socket:[100]", 8: "socket:[101]"})
    host.process(320, "dpdk-testpmd", ["dpdk-testpmd", "--vdev", "net_vhost0"],
                 fds={5: "socket:[200]", 6: "socket:[201]"})
    host.unix = {100: ("/run/q.qmp", 0), 101: ("/run/vu0.sock" if qemu_listens else None, 200),
                 200: (None if qemu_listens else "/run/vu0.sock", 101),
                 201: ("/run/vu0.sock", 0)}  # a listener: no peer
    p = only(host.scanner().scan())
    (nic,) = p.nics
    b = nic.backend
    assert (b.pid, b.comm, b.socket, b.inode, b.peer_inode) == \
        (320, "dpdk-testpmd", "/run/vu0.sock", 200, 101)
    assert nic.as_dict()["backend"]["argv"] == ["dpdk-testpmd", "--vdev", "net_vhost0"]
    assert nic.warnings == []


def test_vhost_user_without_a_peer_is_warned(host):
    host.process(311, "qemu-system-x86", [
        QEMU, "-chardev", "socket,id=c0,path=/run/vu0.sock,server=on,wait=off",
        "-netdev", "vhost-user,id=n1,chardev=c0"], fds={7: "socket:[100]"})
    host.unix = {100: ("/run/vu0.sock", 0)}
    (nic,) = only(host.scanner().scan()).nics
    assert nic.backend is None and "no process holds the other end" in nic.warnings[0]


def test_vhost_user_without_sock_diag_is_warned(host):
    host.process(312, "qemu-system-x86", [
        QEMU, "-chardev", "socket,id=c0,path=/run/vu0.sock",
        "-netdev", "vhost-user,id=n1,chardev=c0"], fds={7: "socket:[100]"})

    def denied():
        raise OSError(13, "Permission denied")

    s = host.scanner()
    s.unix_peers = denied
    p = only(s.scan())
    assert p.nics[0].backend is None and "sock_diag" in p.warnings[0]


def test_inspect_of_no_such_process_is_an_error(host):
    host.process(313, "qemu-system-x86", [QEMU])
    with pytest.raises(VhostctlError) as e:
        sv.inspect(["999999"], proc=str(host.proc), sys=str(host.sys))
    assert e.value.code == 1 and "no process matches 999999" in str(e.value)
    assert [p.pid for p in sv.inspect(["313"], proc=str(host.proc),
                                      sys=str(host.sys)).processes] == [313]


def test_non_qemu_without_fds_is_not_listed(host):
    host.process(309, "bash", ["bash"], fds={3: "/dev/null"})
    assert host.scanner().scan().processes == []


def test_kthread_workers_before_6_4(host):
    host.process(1234, "qemu-system-x86", [QEMU, "-netdev", "tap,id=n0,ifname=t0,vhost=on"],
                 tun={3: "t0"}, fds={4: VH})
    host.tap("t0")
    host.kthread(1300, "vhost-1234", utime=150, stime=50, cpu=1)
    host.kthread(1301, "vhost-999")  # its owner is not a VM we list
    host.kthread(1302, "kworker/0:1")
    r = host.scanner().scan()
    p = only(r)
    (w,) = p.workers
    assert (w.tid, w.model, w.owner, w.cpu_seconds, w.last_cpu) == \
        (1300, "kthread", 1234, 2.0, 1)
    assert r.worker_model == "kthread"
    assert [u.tid for u in r.unmatched_workers] == [1301]
    assert not any("no owner yet" in x for x in p.warnings)


def test_kthread_named_after_a_thread_maps_to_its_process(host):
    host.process(1234, "qemu-system-x86", [QEMU], tun={3: "t0"}, fds={4: VH})
    host.tap("t0")
    (host.proc / "1240").mkdir()  # a thread: /proc/TID exists, its Tgid is the process
    (host.proc / "1240/status").write_text("Name:\tqemu\nTgid:\t1234\nPid:\t1240\n")
    host.kthread(1300, "vhost-1240")
    assert [w.tid for w in only(host.scanner().scan()).workers] == [1300]


def test_task_workers_since_6_4(tmp_path):
    host = FakeHost(tmp_path, release="6.12.117+deb12-amd64")
    host.process(4000, "qemu-system-x86", [QEMU, "-netdev", "tap,id=n0,ifname=t0,queues=2"],
                 tun={3: "t0", 5: "t0"}, fds={4: VH, 6: VH},
                 threads={4001: ("qemu-system-x86", 1, 1, 0), 4010: ("vhost-4000", 30, 20, 1),
                          4011: ("vhost-4000", 0, 0, 0)})
    host.tap("t0", tun_flags=0x5102)
    r = host.scanner().scan()
    p = only(r)
    assert [(w.tid, w.model) for w in p.workers] == [(4010, "task"), (4011, "task")]
    assert r.worker_model == "task" and p.workers[0].cpu_seconds == 0.5


def test_expected_worker_model():
    assert sv.expected_worker_model("6.1.0-56-amd64") == "kthread"
    assert sv.expected_worker_model("6.4.0") == "task"
    assert sv.expected_worker_model("6.12.117+deb12-amd64") == "task"
    assert sv.expected_worker_model("garbage") is None
    # 6.17: vhost.fork_from_owner_default=0 brings kthreads back (hostcheck says the same).
    assert sv.expected_worker_model("6.17.0", "0") == "kthread"
    assert sv.expected_worker_model("6.17.0", "1") == "task"


def test_fork_from_owner_default_decides_when_no_worker_is_seen(tmp_path):
    host = FakeHost(tmp_path, release="6.17.1")
    params = host.sys / "module/vhost/parameters"
    params.mkdir(parents=True)
    (params / "fork_from_owner_default").write_text("0\n")
    assert host.scanner().scan().worker_model == "kthread"


def test_a_non_qemu_holder_is_labelled_as_procfs_derived(host):
    host.process(500, "myvmm", ["./myvmm", "--fast"], tun={3: "t0"}, fds={4: VH})
    host.tap("t0")
    host.kthread(501, "vhost-500", utime=7)
    p = only(host.scanner().scan())
    assert (p.kind, p.view, p.label) == ("other", ["procfs", "sysfs"], "myvmm")
    (nic,) = p.nics
    assert (nic.path, nic.tap, nic.pairing, nic.id) == ("vhost-net", "t0", "fd order", None)
    assert nic.queue_pairs == [{"tap_fd": 3, "vhost_fd": 4, "worker_tid": 501}]


def test_unmatched_task_worker_of_an_unlisted_process(tmp_path):
    host = FakeHost(tmp_path, release="6.12.117+deb12-amd64")
    # Its fds were passed on and closed: it holds no vhost fd, its worker still runs in it.
    host.process(600, "launcher", ["launcher"], fds={3: "/dev/null"},
                 threads={610: ("vhost-600", 40, 10, 1)})
    host.process(601, "single", ["single"])  # one thread: never listed for tasks
    r = host.scanner().scan()
    assert r.processes == []
    (w,) = r.unmatched_workers
    assert (w.tid, w.owner, w.tgid, w.model, w.cpu_seconds) == (610, 600, 600, "task", 0.5)
    assert r.as_dict()["unmatched_workers"][0]["tgid"] == 600


def test_worker_pairing_needs_equal_counts(host):
    host.process(700, "qemu-system-x86", [QEMU], tun={3: "t0", 5: "t0"}, fds={4: VH, 6: VH})
    host.tap("t0", tun_flags=0x5102)
    host.kthread(710, "vhost-700")  # one worker for two vhost fds: no pairing guessed
    (nic,) = only(host.scanner().scan()).nics
    assert nic.queue_pairs == [{"tap_fd": 3, "vhost_fd": 4, "worker_tid": None},
                               {"tap_fd": 5, "vhost_fd": 6, "worker_tid": None}]


def macvtap(host: FakeHost, name: str, *, kind: str = "macvtap", ifindex: int = 9,
            lower: str = "eth9", dev: str = "1:3") -> None:
    """A macvtap/ipvtap in sysfs whose queue device number is ``dev``."""
    d = host.sys / "class/net" / name
    (d / kind / f"tap{ifindex}").mkdir(parents=True)
    (d / "statistics").mkdir()
    (d / "ifindex").write_text(f"{ifindex}\n")
    (d / "flags").write_text("0x1003\n")
    (host.sys / "class/net" / lower).mkdir(exist_ok=True)
    os.symlink(f"../{lower}", d / f"lower_{lower}")
    (d / kind / f"tap{ifindex}" / "dev").write_text(dev + "\n")
    cls = host.sys / "class" / kind
    cls.mkdir(exist_ok=True)
    (cls / f"tap{ifindex}").mkdir()
    (cls / f"tap{ifindex}" / "dev").write_text(dev + "\n")
    os.symlink(f"../../net/{name}", cls / f"tap{ifindex}" / "device")


@pytest.mark.parametrize("kind, mode", [("macvtap", "bridge"), ("ipvtap", "l2")])
def test_macvtap_and_ipvtap_queue_fds(host, kind, mode):
    # /dev/null stands in for /dev/tap9: a real char device (1:3), whose major the fake
    # /proc/devices gives to macvtap/ipvtap.
    (host.proc / "devices").write_text(f"Character devices:\n  1 {kind}\n 10 misc\n\n"
                                       "Block devices:\n  1 ramdisk\n")
    macvtap(host, "mvt0", kind=kind)
    host.modes[9] = mode
    host.process(800, "qemu-system-x86", [QEMU, "-netdev", "tap,id=n0,fd=3,vhostfd=4"],
                 fds={3: "/dev/null", 4: VH})
    d = host.scanner().scan().as_dict()
    (p,) = d["processes"]
    assert p["macvtap_fds"] == {"3": "mvt0"} and p["tun_fds"] == {}
    (nic,) = p["nics"]
    assert (nic["id"], nic["path"], nic["tap"], nic["tap_kind"], nic["pairing"]) == \
        ("n0", "vhost-net", "mvt0", kind, "cmdline")
    assert (nic["link"]["kind"], nic["link"]["lower"], nic["link"]["mode"]) == \
        (kind, "eth9", mode)


def test_a_char_device_of_another_major_is_not_a_tap(host):
    (host.proc / "devices").write_text("Character devices:\n238 macvtap\n")
    host.process(801, "cat", ["cat"], fds={3: "/dev/null"})
    assert host.scanner().scan().processes == []


def test_parse_char_devices():
    text = "Character devices:\n  1 mem\n238 macvtap\n237 ipvtap\n\nBlock devices:\n  8 sd\n"
    assert sv.parse_char_devices(text) == {"mem": 1, "macvtap": 238, "ipvtap": 237}
    assert sv.parse_char_devices("") == {}


def test_select_by_pid_name_and_comm(host):
    host.process(10, "qemu-system-x86", [QEMU, "-name", "alpha"], tun={3: "a0"})
    host.process(11, "qemu-system-x86", [QEMU, "-name", "guest=beta"], tun={3: "b0"})
    s = host.scanner()
    assert [p.pid for p in s.scan(["beta"]).processes] == [11]
    assert [p.pid for p in s.scan(["10"]).processes] == [10]
    assert len(s.scan(["qemu-system-x86"]).processes) == 2
    assert s.scan(["nobody"]).processes == []


# -- vanishing pids and fds ------------------------------------------------------------------

def test_fd_closed_between_readlink_and_fdinfo(host):
    d = host.process(20, "qemu-system-x86", [QEMU], tun={3: "t0", 4: "t1"})
    (d / "fdinfo/4").unlink()
    host.tap("t0")
    s = host.scanner()
    p = only(s.scan())
    assert list(p.tun_fds) == [3]
    assert any("fdinfo/4" in x for x in s.skipped)


def test_fd_closed_between_listdir_and_readlink(host, monkeypatch):
    host.process(21, "qemu-system-x86", [QEMU], tun={3: "t0"}, fds={4: VH})
    real = os.readlink

    def flaky(path, *a, **kw):
        if str(path).endswith("/21/fd/4"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(sv.os, "readlink", flaky)
    p = only(host.scanner().scan())
    assert p.vhost_fds == []


def test_process_exits_mid_scan(host, monkeypatch):
    host.process(22, "qemu-system-x86", [QEMU], tun={3: "t0"})
    host.process(23, "qemu-system-x86", [QEMU, "-name", "stays"], tun={3: "t1"})
    real = sv.Scanner._fds

    def vanish(self, pid):
        out = real(self, pid)
        if pid == 22:
            shutil.rmtree(host.proc / "22")  # gone after its fds were read
        return out

    monkeypatch.setattr(sv.Scanner, "_fds", vanish)
    s = host.scanner()
    assert [p.pid for p in s.scan().processes] == [23]
    assert any("/22/" in x for x in s.skipped)


def test_unreadable_or_garbled_entries_are_skipped(host):
    host.process(24, "qemu-system-x86", [QEMU], tun={3: "t0"})
    (host.proc / "25").mkdir()  # a pid dir without anything in it
    (host.proc / "26").mkdir()
    (host.proc / "26/stat").write_text("26 (x) S garbage\n")
    s = host.scanner()
    assert [p.pid for p in s.scan().processes] == [24]
    assert any("/25/stat" in x for x in s.skipped) and any("/26/stat" in x for x in s.skipped)


def test_thread_vanishes_while_listing_tasks(host):
    host.process(27, "qemu-system-x86", [QEMU], tun={3: "t0"},
                 threads={28: ("vhost-27", 1, 1, 0)})
    (host.proc / "27/task/29").mkdir()  # listed, then gone: no stat
    assert [w.tid for w in only(host.scanner().scan()).workers] == [28]


# -- QMP attachment --------------------------------------------------------------------------

INFO_NETWORK = (
    "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n"
    " \\ n0: index=0,type=tap,ifname=t0,script=no,downscript=no\r\n"
    "hp0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57\r\n"
    " \\ hp0: index=0,type=tap,fd=12\r\n"
    "hp0.1: index=1,type=nic,\r\n"
    " \\ hp0: index=1,type=tap,fd=14\r\n"
    "lonely: index=0,type=tap,fd=20\r\n"
)


def test_parse_info_network_folds_queues():
    entries = sv.parse_info_network(INFO_NETWORK)
    assert [e["id"] for e in entries] == ["nic0", "hp0", "lonely"]
    assert entries[1]["queues"] == 2 and entries[1]["peers"][0]["info"] == "fd=12"


def test_attach_qmp_by_socket_inode(host):
    host.process(40, "qemu-system-x86", [QEMU, "-netdev", "tap,id=n0,ifname=t0"],
                 tun={3: "t0", 12: "t1", 14: "t1", 20: "t2"}, fds={6: "socket:[4242]"})
    host.process(41, "qemu-system-x86", [QEMU], tun={3: "x"}, fds={6: "socket:[1]"})
    for t in ("t0", "t1", "t2"):
        host.tap(t)
    (host.proc / "net/unix").write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/q.sock\n")
    s = host.scanner()
    r = s.scan()
    view = {"network": sv.parse_info_network(INFO_NETWORK), "virtio": [
        {"path": "/machine/peripheral/nic0/virtio-backend", "status": {"name": "virtio-net"}}]}
    p = sv.attach_qmp(r, view, s.unix_inodes("/run/q.sock"))
    assert p is not None and p.pid == 40 and p.qmp is view
    by = {n.tap: n for n in p.nics}
    assert by["t0"].qmp["device"] == "nic0" and by["t0"].qmp["virtio"] == {"name": "virtio-net"}
    assert by["t1"].id == "hp0"  # learnt from "fd=12": hot-plugged NICs are not on argv
    assert by["t2"].id == "lonely" and by["t2"].qmp["device"] is None
    assert r.processes[1].qmp is None


def test_attach_qmp_without_owner_warns(host):
    host.process(42, "qemu-system-x86", [QEMU], tun={3: "t0"})
    r = host.scanner().scan()
    assert sv.attach_qmp(r, {"network": []}, {999}) is None
    assert r.warnings


# -- JSON and top ----------------------------------------------------------------------------

def test_json_schema_is_stable(host):
    host.process(50, "qemu-system-x86", [QEMU, "-name", "vm", "-netdev", "tap,id=n0,ifname=t0"],
                 tun={3: "t0"}, fds={4: VH})
    host.tap("t0")
    host.kthread(60, "vhost-50", utime=3)
    d = json.loads(json.dumps(host.scanner().scan().as_dict()))
    assert set(d) == {"kernel", "worker_model", "processes", "unmatched_workers", "warnings",
                      "qmp"}
    p = d["processes"][0]
    assert set(p) >= {"pid", "name", "kind", "nics", "workers", "vhost_fds", "tun_fds",
                      "warnings", "qmp", "argv", "uid", "accel"}
    nic = p["nics"][0]
    assert set(nic) >= {"id", "path", "tap", "queues", "tap_fds", "vhost_fds", "link",
                        "warnings", "vhost_requested", "socket", "device"}
    assert set(nic["link"]) >= {"tun_flags", "flags", "owner", "group", "master", "mtu",
                                "operstate", "up", "stats", "persist", "multi_queue",
                                "vnet_hdr"}
    assert p["workers"][0] == {"tid": 60, "name": "vhost-50", "model": "kthread", "owner": 50,
                               "utime": 3, "stime": 0, "last_cpu": 0, "cpu_seconds": 0.03,
                               "tgid": None, "runqueue_wait_ns": None}
    assert p["view"] == ["cmdline", "procfs", "sysfs"] and p["macvtap_fds"] == {}
    assert (nic["tap_kind"], nic["pairing"], nic["backend"]) == ("tun", "fd order", None)
    assert nic["queue_pairs"] == [{"tap_fd": 3, "vhost_fd": 4, "worker_tid": 60}]
    assert (nic["link"]["kind"], nic["link"]["lower"], nic["link"]["mode"]) == \
        ("tun", None, None)


def _set_stats(host, name, **stats):
    for k, v in stats.items():
        (host.sys / "class/net" / name / "statistics" / k).write_text(f"{v}\n")


def test_top_rates_and_sorting(host):
    host.process(70, "qemu-system-x86", [QEMU, "-name", "a"], tun={3: "ta"}, fds={4: VH})
    host.process(71, "qemu-system-x86", [QEMU, "-name", "b"], tun={3: "tb"})
    host.tap("ta")
    host.tap("tb")
    host.kthread(80, "vhost-70", utime=100)
    s = host.scanner()
    before = s.scan()
    _set_stats(host, "ta", rx_packets=2000, tx_packets=1000, rx_bytes=1_000_000,
               rx_dropped=4)
    _set_stats(host, "tb", rx_packets=10)
    (host.proc / "80/stat").write_text(stat_line(80, "vhost-70", ppid=2, flags=PF_KTHREAD,
                                                 utime=150))
    groups = sv.top_rows(before, s.scan(), 2.0)
    ordered = sv.sort_rows(groups, "pps")
    vm_a, nics_a = ordered[0]
    assert vm_a.vm == "a" and vm_a.from_guest_pps == 1000 and vm_a.to_guest_pps == 500
    assert vm_a.from_guest_bps == 4_000_000 and vm_a.drops_ps == 2
    assert vm_a.cpu_pct == pytest.approx(25.0)  # 50 ticks / 100 Hz / 2 s
    assert nics_a[0].nic == "ta" and nics_a[0].path == "vhost-net"
    assert [g[0].vm for g in sv.sort_rows(groups, "name")] == ["a", "b"]
    assert next(g[0].vm for g in sv.sort_rows(groups, "cpu")) == "a"
    with pytest.raises(ValidationError):
        sv.sort_rows(groups, "bogus")


def test_top_counter_reset_is_not_negative(host):
    host.process(72, "qemu-system-x86", [QEMU], tun={3: "t0"})
    host.tap("t0", stats={"rx_packets": 500})
    s = host.scanner()
    before = s.scan()
    _set_stats(host, "t0", rx_packets=3)
    ((_vm, (nic,)),) = sv.top_rows(before, s.scan(), 1.0)
    assert nic.from_guest_pps == 0


@settings(max_examples=50)
@given(st.dictionaries(st.integers(3, 40), st.sampled_from([VH, TUN, "socket:[1]", "pipe:[2]"]),
                       max_size=12),
       st.lists(st.sampled_from(["-netdev", "tap,id=n0,ifname=t0", "tap,fds=3:4,vhostfds=5",
                                 "vhost-user,id=u,chardev=c", "-chardev", "socket,id=c,path=/s",
                                 "vhost=on", "x"]), max_size=8))
def test_scan_fuzz_never_crashes(tmp_path_factory, fds, argv):
    host = FakeHost(tmp_path_factory.mktemp("fz"))
    tun = {fd: "t0" for fd, t in fds.items() if t == TUN}
    other = {fd: t for fd, t in fds.items() if t != TUN}
    host.process(90, "qemu-system-x86", [QEMU, *argv], fds=other, tun=tun)
    r = host.scanner().scan()
    json.dumps(r.as_dict())
    for p in r.processes:
        claimed = [v for n in p.nics for v in n.vhost_fds] + p.unassigned_vhost_fds
        assert sorted(claimed) == p.vhost_fds  # every vhost fd accounted for exactly once


def test_render_survey_draws_the_path(host):
    from vhostctl.render import console
    from vhostctl.render_vm import print_survey, top_table

    host.process(95, "qemu-system-x86", [QEMU, "-name", "pic", "-netdev",
                                          "tap,id=n0,ifname=t0,vhost=on"],
                 tun={3: "t0"}, fds={4: VH})
    host.tap("t0", master="br0")
    host.kthread(96, "vhost-95")
    r = host.scanner().scan()
    with console().capture() as cap:
        print_survey(r, verbose=1)
        console().print(top_table(sv.top_rows(r, r, 1.0), "pps", 1.0))
    out = cap.get()
    for word in ("pic", "n0", "vhost-net", "vhost-95", "t0", "br0", "kthread"):
        assert word in out, (word, out)


def run_cli(*args: str):
    from typer.testing import CliRunner

    from vhostctl.cli import app, commands

    assert commands
    return CliRunner().invoke(app, list(args))


def test_cli_inspect_json_on_this_host():
    r = run_cli("inspect", "--json")
    assert r.exit_code == 0, r.stderr
    assert {"kernel", "processes", "worker_model"} <= set(json.loads(r.stdout))


def test_cli_top_once_prints_a_table():
    r = run_cli("top", "--once", "--interval", "0.1", "--sort", "name")
    assert r.exit_code == 0, r.stderr
    assert "drop/s" in r.stdout and "by name" in r.stdout


def test_cli_top_bad_sort_exits_2():
    r = run_cli("top", "--once", "--sort", "speed")
    assert r.exit_code == 2 and "--sort" in r.stderr


# -- raw netlink answers (vhostctl.nldiag) -----------------------------------------------------

def _nla(atype: int, value: bytes) -> bytes:
    import struct

    n = 4 + len(value)
    return struct.pack("=HH", n, atype) + value + b"\0" * ((4 - n % 4) % 4)


def _unix_msg(ino: int, name: bytes | None, peer: int | None) -> bytes:
    import struct

    from vhostctl._uapi import unix_diag as UD

    body = UD.UNIX_DIAG_MSG.pack(1, 1, 1, 0, ino, 0, 0)
    if name is not None:
        body += _nla(UD.UNIX_DIAG_NAME, name)
    if peer is not None:
        body += _nla(UD.UNIX_DIAG_PEER, struct.pack("=I", peer))
    return body


def test_unix_diag_names_and_peers():
    from vhostctl import nldiag

    assert nldiag.parse_unix_diag(_unix_msg(7, b"/run/vu.sock", 9)) == (7, "/run/vu.sock", 9)
    assert nldiag.parse_unix_diag(_unix_msg(8, b"\0abstract", None)) == (8, "@abstract", 0)
    assert nldiag.parse_unix_diag(_unix_msg(9, None, 7)) == (9, None, 7)
    with pytest.raises(ValueError):
        nldiag.parse_unix_diag(b"\0" * 4)


def test_netlink_messages_split_and_stop_at_a_short_one():
    from vhostctl import nldiag
    from vhostctl._uapi import unix_diag as UD

    a, b = _unix_msg(1, b"/a", 2), _unix_msg(2, None, 1)
    buf = b"".join(UD.NLMSG_HDR.pack(16 + len(x), 20, 2, 1, 0) + x for x in (a, b))
    assert [p for _, p in nldiag.iter_messages(buf)] == [a, b]
    assert list(nldiag.iter_messages(buf[:-3])) == [(20, a)]  # the cut one is dropped


@pytest.mark.parametrize("kind, data, mode", [
    (b"macvtap", (1, 4, "=I"), "bridge"), (b"macvlan", (1, 2, "=I"), "vepa"),
    (b"ipvtap", (1, 0, "=H"), "l2"), (b"ipvlan", (1, 2, "=H"), "l3s"),
    (b"macvtap", (1, 64, "=I"), "64"), (b"tun", (1, 1, "=I"), None)])
def test_link_mode_from_rtm_newlink(kind, data, mode):
    import struct

    from vhostctl import nldiag
    from vhostctl._uapi import if_link as L

    atype, value, fmt = data
    info = _nla(L.IFLA_INFO_KIND, kind + b"\0") + _nla(L.IFLA_INFO_DATA | 0x8000,
                                                       _nla(atype, struct.pack(fmt, value)))
    msg = struct.pack(L.IFINFOMSG, 0, 1, 5, 0, 0) + _nla(3, b"mvt0\0") + \
        _nla(L.IFLA_LINKINFO | 0x8000, info)
    assert nldiag.parse_link_mode(msg) == mode


# -- top: who moves each NIC's packets, and the NDJSON sample -------------------------------------

def test_top_charges_each_path_to_its_mover(tmp_path):
    host = FakeHost(tmp_path, release="6.12.117+deb12-amd64")
    host.process(900, "qemu-system-x86", [
        QEMU, "-name", "three",
        "-netdev", "tap,id=a,ifname=ta,vhost=on", "-netdev", "tap,id=b,ifname=tb,vhost=off",
        "-chardev", "socket,id=c0,path=/run/vu.sock", "-netdev", "vhost-user,id=c,chardev=c0"],
        tun={3: "ta", 5: "tb"}, fds={4: VH, 7: "socket:[100]"},
        threads={910: ("vhost-900", 0, 0, 0), 920: ("CPU 0/TCG", 0, 0, 1)})
    host.process(950, "dpdk-testpmd", ["dpdk-testpmd"], fds={3: "socket:[200]"})
    host.unix = {100: (None, 200), 200: ("/run/vu.sock", 100)}
    for t in ("ta", "tb"):
        host.tap(t)
    s = host.scanner()
    before = s.scan()
    (host.proc / "900/stat").write_text(stat_line(900, "qemu-system-x86", utime=300, threads=2))
    (host.proc / "900/task/910/stat").write_text(stat_line(910, "vhost-900", utime=100))
    (host.proc / "900/task/920/stat").write_text(stat_line(920, "CPU 0/TCG", utime=50))
    (host.proc / "950/stat").write_text(stat_line(950, "dpdk-testpmd", utime=200))
    _set_stats(host, "ta", rx_packets=1000)
    ((vm, nics),) = sv.top_rows(before, s.scan(), 1.0)
    assert vm.cpu_pct == pytest.approx(100.0) and vm.process_cpu_pct == pytest.approx(300.0)
    by = {n.nic: n for n in nics}
    assert by["ta"].mover == {"by": "vhost workers", "pid": 900, "tids": [910],
                              "cpu_pct": 100.0}
    assert by["ta"].queues == [{"index": 0, "tap_fd": 3, "vhost_fd": 4, "worker_tid": 910,
                                "worker_cpu_pct": 100.0, "from_guest_pps": None,
                                "to_guest_pps": None}]
    # vhost=off: QEMU's own threads, less the vhost task that lives among them and less the
    # vCPU thread (which runs the guest).
    assert by["tb"].mover == {"by": "vmm threads", "pid": 900, "tids": None, "cpu_pct": 150.0}
    assert by["c"].mover == {"by": "vhost-user backend", "pid": 950, "comm": "dpdk-testpmd",
                             "tids": None, "cpu_pct": 200.0}
    sample = sv.top_sample([(vm, nics)], interval=1.0, sort="pps", when=5.0)
    line = json.dumps(sample, separators=(",", ":"))
    assert "\n" not in line
    (p,) = json.loads(line)["processes"]
    assert (p["pid"], p["vm"], p["kind"], p["worker_cpu"]) == \
        (900, "three", "qemu", [{"tid": 910, "name": "vhost-900", "cpu_pct": 100.0}])
    assert {n["nic"]: n["from_guest_pps"] for n in p["nics"]}["ta"] == 1000.0
    assert set(p["nics"][0]) == {"nic", "path", "tap", "tap_kind", "from_guest_pps",
                                 "to_guest_pps", "from_guest_bps", "to_guest_bps", "drops_ps",
                                 "cpu_pct", "mover", "queues"}


def test_cli_top_json_is_one_object_per_line():
    from typer.testing import CliRunner

    from vhostctl.cli import app, commands  # noqa: F401

    r = CliRunner().invoke(app, ["top", "--json", "--iterations", "2", "--interval", "0.1"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert all(set(json.loads(x)) == {"time", "interval", "sort", "processes"} for x in lines)


# -- schedstat, tun queue counts, guest MAC (what the metrics exporter reads) ---------------------

def test_schedstat_wait_is_the_second_number():
    assert sv.parse_schedstat("123 456 7\n") == 456
    for bad in ("", "123", "1 x 2"):
        with pytest.raises(ValueError):
            sv.parse_schedstat(bad)


def test_tun_queues_from_rtm_newlink():
    import struct

    from vhostctl import nldiag
    from vhostctl._uapi import if_link as L

    def link(kind: bytes, data: bytes) -> bytes:
        info = _nla(L.IFLA_INFO_KIND, kind + b"\0") + _nla(L.IFLA_INFO_DATA | 0x8000, data)
        return struct.pack(L.IFINFOMSG, 0, 1, 5, 0, 0) + _nla(L.IFLA_IFNAME, b"tap7\0") + \
            _nla(L.IFLA_LINKINFO | 0x8000, info)

    counts = _nla(L.IFLA_TUN_NUM_QUEUES, struct.pack("=I", 3)) + \
        _nla(L.IFLA_TUN_NUM_DISABLED_QUEUES, struct.pack("=I", 1))
    assert nldiag.parse_tun_queues(link(b"tun", counts)) == ("tap7", 3, 1)
    assert nldiag.parse_tun_queues(link(b"veth", counts)) is None
    assert nldiag.parse_tun_queues(link(b"tun", counts[:8])) is None  # no disabled count


def test_workers_carry_runqueue_wait_and_taps_their_queue_counts(tmp_path):
    host = FakeHost(tmp_path, release="6.12.117+deb12-amd64")
    d = host.process(700, "qemu-system-x86", [QEMU, "-netdev", "tap,id=n0,ifname=tq0,vhost=on",
                                              "-device", "virtio-net-pci,netdev=n0,"
                                              "mac=52:54:00:12:34:56"],
                     fds={5: VH, 6: VH}, tun={3: "tq0", 4: "tq0"},
                     threads={701: ("vhost-700", 5, 6, 0), 702: ("vhost-700", 1, 1, 1)})
    (d / "task/701/schedstat").write_text("1000 2500000 9\n")  # 702's is unreadable
    host.tap("tq0", tun_flags=0x5102)
    host.queues["tq0"] = (1, 1)
    p = only(host.scanner().scan())
    assert [(w.tid, w.runqueue_wait_ns) for w in p.workers] == [(701, 2500000), (702, None)]
    nic = p.nics[0]
    assert (nic.link.queues_enabled, nic.link.queues_disabled) == (1, 1)
    assert nic.mac == "52:54:00:12:34:56"


def test_qemu_name_reads_the_name_of_a_qemu_only(tmp_path):
    host = FakeHost(tmp_path)
    host.process(700, "qemu-system-x86", [QEMU, "-name", "guest=web1,debug-threads=on"])
    host.process(701, "sleep", ["sleep", "-name", "x"])
    s = host.scanner()
    assert (s.qemu_name(700), s.qemu_name(701), s.qemu_name(702)) == ("web1", None, None)
