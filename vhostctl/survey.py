"""Read-only discovery of running VMs: which process holds which tap, whether vhost-net moves its
packets, and which threads do the work.

Nothing here can attach to another process's vhost fd (every vring ioctl is owner-checked in
drivers/vhost/vhost.c), so the picture is assembled from what the kernel shows everyone:

- ``/proc/PID/fd/N`` links: ``/dev/vhost-net``, ``/dev/net/tun`` (misc minors 238 and 200),
  and macvtap/ipvtap queues ``/dev/tapN``: char devices of the dynamic major that
  ``/proc/devices`` names "macvtap" or "ipvtap" (tap_create_cdev(), drivers/net/tap.c), whose
  interface is the one ``/sys/class/{macvtap,ipvtap}/tapN/dev`` gives that number to;
- ``/proc/PID/fdinfo/N`` of a tun fd: ``iff:\\t<name>`` (tun_chr_show_fdinfo, drivers/net/tun.c);
- the peers of unix sockets (sock_diag UNIX_DIAG_PEER, what ``ss -xp`` shows): a vhost-user
  NIC's backend is the process that holds the other end of QEMU's socket;
- ``/proc/PID/cmdline``: the VM name and how each NIC was asked for (see :mod:`qemu_cmdline`);
- ``/sys/class/net/X/{tun_flags,owner,group,master,mtu,operstate,flags,statistics/*}``;
- vhost workers named ``vhost-<owner pid>``: kernel threads (PF_KTHREAD, children of kthreadd)
  before Linux 6.4 (vhost_worker_create, drivers/vhost/vhost.c), and since 6.4 threads inside
  the owner's thread group (vhost_task_create, kernel/vhost_task.c).

The scan follows psutil's rules: processes and fds vanish while we read, so a failed read
skips that fd or process and is recorded in :attr:`Survey.skipped` (shown with ``-v``);
``/proc/PID/stat`` is split at the *last* ``)`` since a comm may contain one.  The procfs and
sysfs roots are parameters so the unit tests run on fake trees.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ._uapi import if_tun as T
from .errors import ValidationError, VhostctlError
from .hostcheck import expected_worker_model
from .nldiag import link_mode as netlink_link_mode
from .nldiag import tun_queues as netlink_tun_queues
from .nldiag import unix_socket_peers
from .qemu_cmdline import NetdevSpec, QemuArgs, is_qemu, parse_argv

VHOST_NET_DEV = "/dev/vhost-net"
TUN_DEV = "/dev/net/tun"
MISC_MAJOR = 10
VHOST_NET_MINOR = 238  # include/linux/miscdevice.h
TUN_MINOR = 200
KVM_VM_LINK = "anon_inode:kvm-vm"
PF_KTHREAD = 0x00200000  # include/linux/sched.h
IFF_UP = 0x1  # include/uapi/linux/if.h
WORKER_RE = re.compile(r"vhost-(\d+)")
# QEMU's vCPU threads with -name ...,debug-threads=on: "CPU 0/KVM", "CPU 1/TCG", or one
# "ALL CPUs/TCG" (QEMU's accel/kvm/kvm-accel-ops.c, accel/tcg/tcg-accel-ops-mttcg.c, -rr.c).
VCPU_COMM = re.compile(r"(CPU \d+|ALL CPUs)/")
STAT_KEYS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped",
             "rx_errors", "tx_errors")

PATH_VHOST_NET = "vhost-net"
PATH_VIRTIO = "virtio"
PATH_VHOST_USER = "vhost-user"

TAP_CLASSES = ("macvtap", "ipvtap")  # /proc/devices names of the tap.c char devices
# What a process's view rests on: QEMU's command line besides what the kernel shows everyone.
VIEW_QEMU = ["cmdline", "procfs", "sysfs"]
VIEW_OTHER = ["procfs", "sysfs"]


# -- parsers (pure; ValueError on malformed input, never anything else) ----------------------

@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` this module needs (proc(5) numbering)."""

    pid: int
    comm: str
    state: str
    ppid: int  # field 4
    flags: int  # field 9
    num_threads: int  # field 20
    utime: int  # field 14, clock ticks
    stime: int  # field 15
    processor: int  # field 39: the CPU it last ran on


def parse_stat(text: str) -> ProcStat:
    """Split at the first ``(`` and the *last* ``)``: a comm may hold spaces and parentheses."""
    lpar, rpar = text.find("("), text.rfind(")")
    if lpar < 0 or rpar < lpar:
        raise ValueError("stat: no '(comm)'")
    rest = text[rpar + 1:].split()
    if len(rest) < 37:  # rest[0] is field 3; field 39 is rest[36]
        raise ValueError(f"stat: {len(rest) + 2} fields, expected at least 39")
    try:
        return ProcStat(pid=int(text[:lpar]), comm=text[lpar + 1:rpar], state=rest[0],
                        ppid=int(rest[1]), flags=int(rest[6]), num_threads=int(rest[17]),
                        utime=int(rest[11]), stime=int(rest[12]),
                        processor=int(rest[36]))
    except ValueError:
        raise ValueError("stat: a numeric field is not a number") from None


def parse_fdinfo(text: str) -> dict[str, str]:
    """``key:\\tvalue`` lines of ``/proc/PID/fdinfo/N``; lines without a colon are ignored."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key:
            out[key.strip()] = value.strip()
    return out


def parse_cmdline(raw: bytes) -> list[str]:
    """NUL-separated argv; undecodable bytes are kept as escapes rather than failing."""
    parts = raw.split(b"\0") if raw else []
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode(errors="surrogateescape") for p in parts]


def parse_status_ids(text: str) -> tuple[int | None, int | None]:
    """(real uid, Tgid) from ``/proc/PID/status``."""
    uid = tgid = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key == "Uid" and parts and parts[0].isdigit():
            uid = int(parts[0])
        elif key == "Tgid" and parts and parts[0].isdigit():
            tgid = int(parts[0])
    return uid, tgid


def parse_char_devices(text: str) -> dict[str, int]:
    """``/proc/devices``: name -> major of the character devices (the first section)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("Block devices"):
            break
        major, _, name = line.strip().partition(" ")
        if major.isdigit() and name:
            out[name.strip()] = int(major)
    return out


def parse_schedstat(text: str) -> int:
    """Run-queue wait in ns: the second of ``/proc/PID/schedstat``'s three numbers
    (proc_pid_schedstat(), fs/proc/base.c: time on CPU, time waiting, timeslices)."""
    parts = text.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError("schedstat: expected 'run_ns wait_ns slices'")
    return int(parts[1])


def parse_unix_listeners(text: str) -> dict[str, list[int]]:
    """``/proc/net/unix``: path -> inodes of sockets bound there (listening or not)."""
    out: dict[str, list[int]] = {}
    for line in text.splitlines()[1:]:
        cols = line.split(None, 7)
        if len(cols) == 8 and cols[6].isdigit():
            out.setdefault(cols[7], []).append(int(cols[6]))
    return out


# -- what the survey reports -----------------------------------------------------------------

@dataclass
class Worker:
    """A vhost worker: a kernel thread before Linux 6.4, a thread of the owner since."""

    tid: int
    name: str
    model: str  # "kthread" | "task"
    owner: int  # the pid in its name: the thread that called VHOST_SET_OWNER
    utime: int
    stime: int
    last_cpu: int
    clk_tck: int = 100
    tgid: int | None = None  # the process a "task" worker is a thread of (None: a kthread)
    # Time spent runnable but waiting for a CPU (schedstat field 2, ns; None: unreadable,
    # or a kernel without CONFIG_SCHED_INFO): a worker starved by other threads.
    runqueue_wait_ns: int | None = None

    @property
    def cpu_seconds(self) -> float:
        return (self.utime + self.stime) / self.clk_tck

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["clk_tck"]
        d["cpu_seconds"] = round(self.cpu_seconds, 3)
        return d


@dataclass
class TapLink:
    """A tap as sysfs shows it; ``visible`` is False when it lives in another netns.

    ``kind`` is "tun", "macvtap" or "ipvtap"; a macvtap/ipvtap also has its ``lower`` device
    (sysfs ``lower_*``) and its ``mode`` (rtnetlink IFLA_MACVLAN_MODE / IFLA_IPVLAN_MODE).
    """

    name: str
    visible: bool = False
    kind: str = "tun"
    lower: str | None = None
    mode: str | None = None
    tun_flags: int | None = None
    # A tun's attached queues, enabled and disabled (rtnetlink IFLA_TUN_NUM_QUEUES and
    # IFLA_TUN_NUM_DISABLED_QUEUES: tun->numqueues, tun->numdisabled in drivers/net/tun.c).
    queues_enabled: int | None = None
    queues_disabled: int | None = None
    flags: list[str] = field(default_factory=list)
    owner: int | None = None
    group: int | None = None
    master: str | None = None
    mtu: int | None = None
    operstate: str | None = None
    up: bool | None = None
    address: str | None = None
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def persist(self) -> bool:
        return bool(self.tun_flags and self.tun_flags & T.IFF_PERSIST)

    @property
    def multi_queue(self) -> bool:
        return bool(self.tun_flags and self.tun_flags & T.IFF_MULTI_QUEUE)

    @property
    def vnet_hdr(self) -> bool:
        return bool(self.tun_flags and self.tun_flags & T.IFF_VNET_HDR)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(persist=self.persist, multi_queue=self.multi_queue, vnet_hdr=self.vnet_hdr)
        return d


@dataclass
class Nic:
    """One VM network interface and the way its packets travel."""

    path: str  # PATH_VHOST_NET | PATH_VIRTIO | PATH_VHOST_USER
    id: str | None = None  # netdev id
    tap: str | None = None
    queues: int = 1
    tap_fds: list[int] = field(default_factory=list)
    vhost_fds: list[int] = field(default_factory=list)
    vhost_requested: bool | None = None
    device: str | None = None  # the guest-side device driver (-device ...,netdev=id)
    mac: str | None = None  # the guest's MAC address, when the command line gives it
    socket: str | None = None  # vhost-user
    socket_server: bool | None = None
    link: TapLink | None = None
    warnings: list[str] = field(default_factory=list)
    qmp: dict[str, Any] | None = None
    # How the vhost fds were given to this tap: "cmdline" (vhostfds= named them) or
    # "fd order" (each goes to the tap fd just below it); None without vhost fds.
    pairing: str | None = None
    # One per queue pair: its tap fd, vhost fd and worker thread (paired by creation order).
    queue_pairs: list[dict[str, int | None]] = field(default_factory=list)
    backend: Backend | None = None  # vhost-user: the process at the other end of the socket

    @property
    def tap_kind(self) -> str | None:
        return (self.link.kind if self.link else "tun") if self.tap else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["link"] = self.link.as_dict() if self.link else None
        d["backend"] = self.backend.as_dict() if self.backend else None
        d["tap_kind"] = self.tap_kind
        return d


@dataclass
class Backend:
    """A vhost-user backend: the process holding the peer of the VMM's unix socket."""

    pid: int
    comm: str
    argv: list[str]
    socket: str | None  # the path either end is bound to
    inode: int  # the backend's end
    peer_inode: int  # the VMM's end
    utime: int = 0  # the whole process, clock ticks
    stime: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VmProcess:
    """A process holding vhost-net or tun fds: a VMM, a vhostctl probe, a DPDK app..."""

    pid: int
    comm: str
    argv: list[str]
    kind: str  # "qemu" | "other"
    view: list[str] = field(default_factory=lambda: list(VIEW_OTHER))
    name: str | None = None
    uid: int | None = None
    accel: str | None = None
    nics: list[Nic] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    vhost_fds: list[int] = field(default_factory=list)
    tun_fds: dict[int, str | None] = field(default_factory=dict)
    macvtap_fds: dict[int, str | None] = field(default_factory=dict)  # and ipvtap
    unassigned_vhost_fds: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    qmp: dict[str, Any] | None = None
    socket_inodes: set[int] = field(default_factory=set, repr=False)
    clk_tck: int = field(default=100, repr=False)
    utime: int = 0  # every thread of the process (vhost tasks included), clock ticks
    stime: int = 0
    vcpu_ticks: int = field(default=0, repr=False)  # its vCPU threads' utime + stime
    vcpu_tids: list[int] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        return self.name or self.comm

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "comm": self.comm, "argv": self.argv, "kind": self.kind,
            "view": self.view,
            "name": self.name, "uid": self.uid, "accel": self.accel,
            "nics": [n.as_dict() for n in self.nics],
            "workers": [w.as_dict() for w in self.workers],
            "vhost_fds": self.vhost_fds,
            "tun_fds": {str(k): v for k, v in sorted(self.tun_fds.items())},
            "macvtap_fds": {str(k): v for k, v in sorted(self.macvtap_fds.items())},
            "cpu_seconds": round((self.utime + self.stime) / self.clk_tck, 3),
            "unassigned_vhost_fds": self.unassigned_vhost_fds,
            "warnings": self.warnings, "qmp": self.qmp,
        }


@dataclass
class Survey:
    kernel: str | None
    worker_model: str | None  # what was seen, else what the kernel version implies
    processes: list[VmProcess] = field(default_factory=list)
    unmatched_workers: list[Worker] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    clk_tck: int = 100
    qmp: dict[str, Any] | None = None  # QEMU's view when no listed process owns the socket

    def as_dict(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel, "worker_model": self.worker_model,
            "processes": [p.as_dict() for p in self.processes],
            "unmatched_workers": [w.as_dict() for w in self.unmatched_workers],
            "warnings": self.warnings, "qmp": self.qmp,
        }


# -- the scan --------------------------------------------------------------------------------

@dataclass
class _Fds:
    vhost: list[int] = field(default_factory=list)
    tun: dict[int, str | None] = field(default_factory=dict)
    mvtap: dict[int, str | None] = field(default_factory=dict)
    kvm: bool = False
    sockets: set[int] = field(default_factory=set)


class Scanner:
    """One pass over procfs and sysfs.  ``proc``/``sys`` are the roots (fake trees in tests)."""

    def __init__(self, proc: str = "/proc", sys: str = "/sys", clk_tck: int | None = None, *,
                 unix_peers: Callable[[], dict[int, tuple[str | None, int]]] | None = None,
                 link_mode: Callable[[int], str | None] | None = None,
                 tun_queues: Callable[[], dict[str, tuple[int, int]]] | None = None) -> None:
        self.proc = proc.rstrip("/") or "/"
        self.sys = sys.rstrip("/") or "/"
        self.clk_tck = clk_tck or os.sysconf("SC_CLK_TCK")
        self.unix_peers = unix_peers or unix_socket_peers
        self.link_mode = link_mode or netlink_link_mode
        self.tun_queues = tun_queues or netlink_tun_queues
        self._tun_queues: dict[str, tuple[int, int]] | None = None
        self.skipped: list[str] = []
        self._tap_majors: dict[int, str] = {}
        self._tap_devs: dict[tuple[int, int], str] | None = None
        self._socket_owners: dict[int, list[int]] = {}

    # -- tolerant reads: a vanished pid/fd is normal, it is recorded and skipped -------------
    def _skip(self, what: str, err: BaseException) -> None:
        self.skipped.append(f"{what}: {err}")

    def read(self, path: str) -> str | None:
        """A procfs/sysfs file's text, None (recorded in ``skipped``) when it cannot be read:
        the one reader the commands built on a scan (doctor) use for what the scan skips."""
        return self._read(path)

    def _read(self, path: str) -> str | None:
        try:
            with open(path, errors="surrogateescape") as f:
                return f.read()
        except OSError as e:
            self._skip(path, e)
            return None

    def _read_bytes(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            self._skip(path, e)
            return None

    def _listdir(self, path: str) -> list[str] | None:
        try:
            return os.listdir(path)
        except OSError as e:
            self._skip(path, e)
            return None

    def _stat(self, path: str) -> ProcStat | None:
        text = self._read(path)
        if text is None:
            return None
        try:
            return parse_stat(text)
        except ValueError as e:
            self._skip(path, e)
            return None

    def _worker(self, st: ProcStat, model: str, base: str) -> Worker | None:
        """A Worker when ``st`` is a vhost thread; ``base`` is its /proc directory."""
        m = WORKER_RE.fullmatch(st.comm)
        if not m:
            return None
        sched = self._read(f"{base}/schedstat")
        try:
            wait = parse_schedstat(sched) if sched is not None else None
        except ValueError as e:
            self._skip(f"{base}/schedstat", e)
            wait = None
        return Worker(tid=st.pid, name=st.comm, model=model, owner=int(m[1]), utime=st.utime,
                      stime=st.stime, last_cpu=st.processor, clk_tck=self.clk_tck,
                      runqueue_wait_ns=wait)

    def _tun_queue_counts(self, name: str) -> tuple[int, int] | None:
        """(enabled, disabled) queues of tun ``name``: one RTM_GETLINK dump per scan."""
        if self._tun_queues is None:
            try:
                self._tun_queues = self.tun_queues()
            except OSError as e:
                self._skip("RTM_GETLINK dump (tun queues)", e)
                self._tun_queues = {}
        return self._tun_queues.get(name)

    # -- fds ----------------------------------------------------------------------------------
    def _classify(self, link_path: str, target: str) -> tuple[str | None, int]:
        """("vhost" | "tun" | "macvtap" | "ipvtap" | None, st_rdev) of one fd."""
        if target == VHOST_NET_DEV:
            return "vhost", 0
        if target == TUN_DEV:
            return "tun", 0
        if target.startswith("/dev/"):  # a renamed node, or /dev/tapN: trust the number
            try:
                st = os.stat(link_path)
            except OSError:
                return None, 0
            if not stat.S_ISCHR(st.st_mode):
                return None, 0
            major = os.major(st.st_rdev)
            if major == MISC_MAJOR:
                return ({VHOST_NET_MINOR: "vhost", TUN_MINOR: "tun"}.get(os.minor(st.st_rdev)),
                        0)
            return self._tap_majors.get(major), st.st_rdev
        return None, 0

    def _tap_dev_name(self, rdev: int) -> str | None:
        """The macvtap/ipvtap interface whose queue device is ``rdev`` (sysfs class dirs:
        tapN/dev holds "major:minor", tapN/device links to the interface)."""
        if self._tap_devs is None:
            self._tap_devs = {}
            for cls in TAP_CLASSES:
                base = f"{self.sys}/class/{cls}"
                if not os.path.isdir(base):
                    continue
                for entry in self._listdir(base) or ():
                    text = self._read(f"{base}/{entry}/dev") or ""
                    major, _, minor = text.strip().partition(":")
                    try:
                        dev = os.readlink(f"{base}/{entry}/device")
                        self._tap_devs[(int(major), int(minor))] = os.path.basename(dev)
                    except (OSError, ValueError) as e:
                        self._skip(f"{base}/{entry}", e)
        return self._tap_devs.get((os.major(rdev), os.minor(rdev)))

    def _fds(self, pid: int) -> _Fds | None:
        base = f"{self.proc}/{pid}"
        names = self._listdir(f"{base}/fd")
        if names is None:
            return None
        out = _Fds()
        for name in names:
            if not name.isdigit():
                continue
            fd = int(name)
            try:
                target = os.readlink(f"{base}/fd/{name}")
            except OSError:
                continue  # closed since listdir
            if target.startswith("socket:[") and target.endswith("]"):
                inode = target[8:-1]
                if inode.isdigit():
                    out.sockets.add(int(inode))
                    self._socket_owners.setdefault(int(inode), []).append(pid)
                continue
            if target == KVM_VM_LINK:
                out.kvm = True
                continue
            kind, rdev = self._classify(f"{base}/fd/{name}", target)
            if kind == "vhost":
                out.vhost.append(fd)
            elif kind in TAP_CLASSES:
                out.mvtap[fd] = self._tap_dev_name(rdev)
            elif kind == "tun":
                info = self._read(f"{base}/fdinfo/{name}")
                if info is None:
                    continue  # closed since readlink
                out.tun[fd] = parse_fdinfo(info).get("iff") or None
        out.vhost.sort()
        return out

    # -- sysfs --------------------------------------------------------------------------------
    def tap_link(self, name: str) -> TapLink:
        """What sysfs says about interface ``name`` (absent: not in this netns, or gone)."""
        link = TapLink(name)
        if not name or "/" in name or name in (".", ".."):
            return link
        base = f"{self.sys}/class/net/{name}"
        if not os.path.isdir(base):
            return link
        link.visible = True
        for cls in TAP_CLASSES:
            if os.path.isdir(f"{base}/{cls}"):
                link.kind = cls
                lower = [e for e in self._listdir(base) or () if e.startswith("lower_")]
                link.lower = lower[0].removeprefix("lower_") if len(lower) == 1 else None
                ifindex = (self._read(f"{base}/ifindex") or "").strip()
                try:
                    link.mode = self.link_mode(int(ifindex)) if ifindex.isdigit() else None
                except (OSError, ValueError) as e:
                    self._skip(f"mode of {name}", e)

        def num(attr: str, base10: bool = True) -> int | None:
            text = self._read(f"{base}/{attr}")
            try:
                return int(text.strip(), 10 if base10 else 16) if text is not None else None
            except ValueError:
                return None

        link.tun_flags = num("tun_flags", base10=False)
        if link.tun_flags is not None and link.tun_flags >= 0:
            link.flags = T.IFF_FLAGS.decode(link.tun_flags)
            counts = self._tun_queue_counts(name)
            if counts:
                link.queues_enabled, link.queues_disabled = counts
        else:
            link.tun_flags = None
        owner, group = num("owner"), num("group")
        link.owner = owner if owner is not None and owner >= 0 else None
        link.group = group if group is not None and group >= 0 else None
        link.mtu = num("mtu")
        dev_flags = num("flags", base10=False)
        link.up = None if dev_flags is None else bool(dev_flags & IFF_UP)
        link.operstate = (self._read(f"{base}/operstate") or "").strip() or None
        link.address = (self._read(f"{base}/address") or "").strip() or None
        try:
            link.master = os.path.basename(os.readlink(f"{base}/master"))
        except OSError:
            link.master = None
        for key in STAT_KEYS:
            v = num(f"statistics/{key}")
            if v is not None:
                link.stats[key] = v
        return link

    # -- processes ----------------------------------------------------------------------------
    def pids(self) -> list[int]:
        return sorted(int(p) for p in self._listdir(self.proc) or () if p.isdigit())

    def _process(self, pid: int, st: ProcStat, fds: _Fds) -> VmProcess | None:
        base = f"{self.proc}/{pid}"
        raw = self._read_bytes(f"{base}/cmdline")
        status = self._read(f"{base}/status")
        if raw is None or status is None:
            return None
        argv = parse_cmdline(raw)
        uid, _ = parse_status_ids(status)
        qemu = is_qemu(st.comm, argv)
        args = parse_argv(argv) if qemu else QemuArgs()
        proc = VmProcess(pid=pid, comm=st.comm, argv=argv, kind="qemu" if qemu else "other",
                         view=list(VIEW_QEMU if qemu else VIEW_OTHER),
                         name=args.name, uid=uid, accel="kvm" if fds.kvm else None,
                         vhost_fds=fds.vhost, tun_fds=fds.tun, macvtap_fds=fds.mvtap,
                         socket_inodes=fds.sockets, clk_tck=self.clk_tck, utime=st.utime,
                         stime=st.stime)
        proc.nics, proc.unassigned_vhost_fds = build_nics(args, {**fds.tun, **fds.mvtap},
                                                          fds.vhost)
        for nic in proc.nics:
            if nic.tap:
                nic.link = self.tap_link(nic.tap)
        proc.workers = self._task_workers(pid, proc)
        return proc

    def _task_workers(self, pid: int, proc: VmProcess | None = None) -> list[Worker]:
        """The vhost tasks among ``pid``'s threads; for a VMM, also its vCPU threads' CPU."""
        out = []
        for tid in self._listdir(f"{self.proc}/{pid}/task") or ():
            if not tid.isdigit() or int(tid) == pid:
                continue
            st = self._stat(f"{self.proc}/{pid}/task/{tid}/stat")
            if st and proc is not None and VCPU_COMM.match(st.comm):
                proc.vcpu_ticks += st.utime + st.stime
                proc.vcpu_tids.append(st.pid)
                continue
            w = st and self._worker(st, "task", f"{self.proc}/{pid}/task/{tid}")
            if w:
                w.tgid = pid
                out.append(w)
        return out

    def _backends(self, procs: list[VmProcess]) -> None:
        """Name each vhost-user NIC's backend: the holder of the peer of one of the VMM's unix
        sockets bound to (or connected to) the NIC's socket path."""
        wanted = [(p, n) for p in procs for n in p.nics if n.path == PATH_VHOST_USER]
        if not wanted:
            return
        try:
            table = self.unix_peers()
        except OSError as e:
            for p, _ in wanted:
                p.warnings.append(f"vhost-user backend not named: the unix socket peer table "
                                  f"(sock_diag) is not readable: {e.strerror or e} (modprobe "
                                  "unix_diag)")
            return
        for p, nic in wanted:
            for ino in sorted(p.socket_inodes):
                name, peer = table.get(ino, (None, 0))
                peer_name = table.get(peer, (None, 0))[0]
                path = name or peer_name
                if not peer or (nic.socket and path != nic.socket):
                    continue
                owners = [o for o in self._socket_owners.get(peer, ()) if o != p.pid]
                st = self._stat(f"{self.proc}/{owners[0]}/stat") if owners else None
                raw = self._read_bytes(f"{self.proc}/{owners[0]}/cmdline") if owners else None
                if st is None:
                    continue
                nic.backend = Backend(pid=st.pid, comm=st.comm, argv=parse_cmdline(raw or b""),
                                      socket=path, inode=peer, peer_inode=ino,
                                      utime=st.utime, stime=st.stime)
                nic.socket = nic.socket or path
                break
            else:
                nic.warnings.append("no process holds the other end of this vhost-user "
                                    "socket (backend not connected, or in another network "
                                    "namespace)")

    def _tgid(self, tid: int) -> int | None:
        """The process a thread id belongs to (a kthread worker names its owner *thread*)."""
        status = self._read(f"{self.proc}/{tid}/status")
        return parse_status_ids(status)[1] if status else None

    def scan(self, select: Iterable[str] = ()) -> Survey:
        """Every QEMU and every process holding vhost-net/tun fds (or those named by pid, VM
        name or comm)."""
        self.skipped = []
        self._tap_devs = None
        self._tun_queues = None
        self._socket_owners = {}
        release = (self._read(f"{self.proc}/sys/kernel/osrelease") or "").strip() or None
        self._tap_majors = {major: name for name, major in
                            parse_char_devices(self._read(f"{self.proc}/devices") or "").items()
                            if name in TAP_CLASSES}
        kthreads: list[Worker] = []
        strays: list[Worker] = []
        procs: list[VmProcess] = []
        for pid in self.pids():
            st = self._stat(f"{self.proc}/{pid}/stat")
            if st is None:
                continue
            if st.flags & PF_KTHREAD:
                w = self._worker(st, "kthread", f"{self.proc}/{pid}")
                if w:
                    kthreads.append(w)
                continue
            fds = self._fds(pid)
            # Every QEMU is shown (a vhost-user-only VM holds neither kind of fd); other
            # processes only when they hold vhost-net, tun or macvtap/ipvtap fds.
            if fds is None or not (fds.vhost or fds.tun or fds.mvtap or is_qemu(st.comm, [])):
                if fds is not None and st.num_threads > 1:
                    # A vhost task of a process that no longer holds its vhost fd (passed on
                    # and closed) still runs in that process: never drop it.
                    strays.extend(self._task_workers(pid))
                continue
            proc = self._process(pid, st, fds)
            if proc is not None and os.path.isdir(f"{self.proc}/{pid}"):
                procs.append(proc)
        by_pid = {p.pid: p for p in procs}
        unmatched = strays
        for w in kthreads:
            owner = by_pid.get(w.owner) or by_pid.get(self._tgid(w.owner) or -1)
            (owner.workers if owner else unmatched).append(w)
        unmatched.sort(key=lambda w: w.tid)
        for p in procs:
            p.workers.sort(key=lambda w: w.tid)
            pair_queues(p)
            p.warnings.extend(process_warnings(p))
        self._backends(procs)
        seen = {w.model for p in procs for w in p.workers} | {w.model for w in unmatched}
        fork = self._read(f"{self.sys}/module/vhost/parameters/fork_from_owner_default")
        model = (seen.pop() if len(seen) == 1
                 else expected_worker_model(release, fork.strip() if fork else None))
        wanted = set(select)
        if wanted:
            procs = [p for p in procs if {str(p.pid), p.name, p.comm} & wanted]
        return Survey(kernel=release, worker_model=model, processes=procs,
                      unmatched_workers=unmatched if not wanted else [],
                      skipped=list(self.skipped), clk_tck=self.clk_tck)

    def qemu_name(self, pid: int) -> str | None:
        """The ``-name`` of process ``pid`` when it is a QEMU (judged by its argv), else None."""
        raw = self._read_bytes(f"{self.proc}/{pid}/cmdline")
        argv = parse_cmdline(raw) if raw else []
        if not argv or not is_qemu(os.path.basename(argv[0]), argv):
            return None
        return parse_argv(argv).name

    def unix_inodes(self, path: str) -> set[int]:
        """Inodes of the unix sockets bound to ``path`` (this netns's /proc/net/unix)."""
        text = self._read(f"{self.proc}/net/unix") or ""
        table = parse_unix_listeners(text)
        paths = {path, os.path.realpath(path)}
        return {i for p in paths for i in table.get(p, ())}


# -- NICs from fds + command line --------------------------------------------------------------

def _match_spec(specs: list[NetdevSpec], tap: str, fds: list[int]) -> NetdevSpec | None:
    for s in specs:
        if s.ifname == tap or (s.fds and set(s.fds) & set(fds)):
            return s
    return None


def build_nics(args: QemuArgs, tun: dict[int, str | None],
               vhost: list[int]) -> tuple[list[Nic], list[int]]:
    """Group tun fds by interface into NICs and give each its vhost fds.

    vhost fds say nothing about their backend, so: first the exact fd numbers a command line
    gave (``vhostfds=``, an exec hand-off or libvirt); then each remaining vhost fd goes to the
    tap whose fd is the nearest below it, which is the order QEMU opens them in
    (net_init_tap(): per queue, the tap, then /dev/vhost-net in net_init_tap_one()).
    Returns the NICs and the vhost fds no tap could claim.
    """
    by_tap: dict[str, list[int]] = {}
    for fd in sorted(tun):
        name = tun[fd]
        if name:
            by_tap.setdefault(name, []).append(fd)
    taps = [s for s in args.netdevs if s.type in ("tap", "bridge")]
    used: set[int] = set()
    nics: list[Nic] = []
    spec_of: dict[str, NetdevSpec | None] = {}
    for name, fds in by_tap.items():
        spec = _match_spec(taps, name, fds)
        spec_of[name] = spec
        if spec is not None:
            used.add(id(spec))
    # One unmatched tap and one unmatched tap netdev without ifname/fds: they are the pair.
    loose_taps = [n for n, s in spec_of.items() if s is None]
    loose_specs = [s for s in taps if id(s) not in used and not s.ifname and not s.fds]
    if len(loose_taps) == 1 and len(loose_specs) == 1:
        spec_of[loose_taps[0]] = loose_specs[0]
    free = sorted(vhost)
    for name, fds in by_tap.items():
        spec = spec_of[name]
        claimed = [v for v in (spec.vhostfds if spec else ()) if v in free]
        for v in claimed:
            free.remove(v)
        dev = args.device_for(spec.id) if spec else None
        nics.append(Nic(path=PATH_VIRTIO, id=spec.id if spec else None, tap=name,
                        queues=len(fds), tap_fds=fds, vhost_fds=claimed,
                        vhost_requested=spec.vhost_requested if spec else None,
                        device=dev.driver if dev else None, mac=dev.mac if dev else None,
                        pairing="cmdline" if claimed else None))
    explicit = {n.tap for n in nics if n.vhost_fds}
    owner_of = {fd: n for n in nics if n.tap not in explicit for fd in n.tap_fds}
    unassigned = []
    for v in free:
        below = [fd for fd in owner_of if fd < v]
        if below:
            owner_of[max(below)].vhost_fds.append(v)
            owner_of[max(below)].pairing = "fd order"
        else:
            unassigned.append(v)
    for s in args.netdevs:
        if s.type != "vhost-user":
            continue
        ch = args.chardevs.get(s.chardev or "")
        dev = args.device_for(s.id)
        nics.append(Nic(path=PATH_VHOST_USER, id=s.id, queues=s.queues or 1,
                        socket=ch.path if ch else None,
                        socket_server=ch.server if ch else None,
                        device=dev.driver if dev else None, mac=dev.mac if dev else None))
    for n in nics:
        if n.tap_fds and n.vhost_fds:
            n.path = PATH_VHOST_NET
    return nics, unassigned


def pair_queues(proc: VmProcess) -> None:
    """One entry per queue pair of each NIC: its tap fd, its vhost fd and that fd's worker.

    A vhost fd shows nothing of its worker, but each VHOST_SET_OWNER creates one, and QEMU
    and vhostctl open and own their vhost fds in fd order (net_init_tap_one()), so when the
    counts agree the n-th worker by thread id is the n-th vhost fd's.
    """
    workers = ({v: w.tid for v, w in zip(sorted(proc.vhost_fds), proc.workers, strict=True)}
               if len(proc.workers) == len(proc.vhost_fds) else {})
    for nic in proc.nics:
        pairs = []
        for i, t in enumerate(nic.tap_fds):
            v = nic.vhost_fds[i] if i < len(nic.vhost_fds) else None
            pairs.append({"tap_fd": t, "vhost_fd": v,
                          "worker_tid": workers.get(v) if v is not None else None})
        nic.queue_pairs = pairs


def nic_warnings(nic: Nic) -> list[str]:
    """What an admin should hear about one NIC (the four cases of issue 5, and visibility)."""
    out = []
    link, tap = nic.link, nic.tap
    if tap and link is not None and not link.visible:
        out.append(f"tap {tap} is not in this network namespace (no sysfs entry): flags, "
                   "bridge and counters unknown")
    if tap and link is not None and link.up is False:
        mover = "vhost-net" if nic.path == PATH_VHOST_NET else "the VMM"
        out.append(f"tap {tap} is DOWN: {mover} moves no packets until it is up "
                   f"(ip link set {tap} up)")
    if tap and link is not None and link.persist and link.owner is None and link.group is None:
        # drivers/net/tun.c tun_not_capable(): without an owner or group, any process that
        # can open /dev/net/tun passes TUNSETIFF on this device.
        out.append(f"persistent tap {tap} has no owner or group: on most kernels any process "
                   "that can open /dev/net/tun may attach a queue to it (set one: "
                   f"vhostctl tap del {tap}; vhostctl tap add {tap} --owner USER)")
    if nic.path == PATH_VHOST_NET and len(nic.vhost_fds) < len(nic.tap_fds):
        out.append(f"{len(nic.vhost_fds)} vhost-net fd(s) for {len(nic.tap_fds)} queue pairs: "
                   "queues without one are moved by the VMM in userspace")
    if nic.path == PATH_VIRTIO and nic.vhost_requested:
        out.append("vhost was requested on the command line but the process holds no "
                   "/dev/vhost-net fd for this NIC: QEMU fell back to userspace virtio "
                   "(net_init_tap_one() only warns unless vhostforce=on); check access to "
                   "/dev/vhost-net and QEMU's log")
    return out


def process_warnings(proc: VmProcess) -> list[str]:
    out = []
    for nic in proc.nics:
        nic.warnings = nic_warnings(nic)
    for fd, name in sorted(proc.tun_fds.items()):
        if name is None:
            out.append(f"tun fd {fd} has no interface attached (TUNSETIFF not done yet, or "
                       "the queue was detached)")
    if proc.unassigned_vhost_fds:
        out.append(f"vhost-net fd(s) {proc.unassigned_vhost_fds} belong to no tap of this "
                   "process")
    nv, nw = len(proc.vhost_fds), len(proc.workers)
    if nv > nw:
        out.append(f"{nv} vhost-net fd(s) but {nw} worker thread(s): {nv - nw} fd(s) have no "
                   "owner yet (VHOST_SET_OWNER not called — normal while vhostctl exec holds "
                   "them before the VMM starts)")
    return out


def inspect(select: Iterable[str] = (), *, qmp_path: str | None = None,
            timeout: float = 5.0, proc: str = "/proc", sys: str = "/sys") -> Survey:
    """Scan this host (or fake trees) for VMs and their datapaths; with ``qmp_path`` add what
    that QEMU says about itself."""
    scanner = Scanner(proc, sys)
    wanted = list(select)
    result = scanner.scan(wanted)
    if wanted and not result.processes:
        # As `ps -p`: a selection that matches nothing is a failure, said on stderr.
        raise VhostctlError("inspect", errno.ESRCH, f"no process matches {' '.join(wanted)}",
                            hint="give the pid, VM name or command name of a QEMU or of a "
                            "process holding /dev/vhost-net, a tap or a macvtap queue; "
                            "plain `vhostctl inspect` lists them")
    if qmp_path:
        from .qmp import QmpClient

        with QmpClient.connect(qmp_path, timeout) as client:
            view = qmp_view(client)
        if attach_qmp(result, view, scanner.unix_inodes(qmp_path)) is None:
            result.qmp = view
    return result


# -- top: rates between two surveys -----------------------------------------------------------

@dataclass
class TopRow:
    """One line of ``vhostctl top``: a VM (totals, worker CPU) or one of its NICs.

    ``mover`` says whose CPU moves a NIC's packets: the vhost workers of its queue pairs
    (vhost-net), the VMM's own threads (virtio: QEMU reads and writes the tap itself) or the
    vhost-user backend process.  ``queues`` has one entry per queue pair with its worker's
    CPU; per-queue packet rates stay None, since tun and macvtap keep no per-queue counters
    visible outside the kernel (only per-device ones in sysfs).
    """

    level: str  # "vm" | "nic"
    pid: int
    vm: str
    nic: str | None = None
    path: str | None = None
    from_guest_pps: float | None = None  # the tap's rx: frames the guest sent
    to_guest_pps: float | None = None  # the tap's tx: frames for the guest
    from_guest_bps: float | None = None
    to_guest_bps: float | None = None
    drops_ps: float | None = None
    cpu_pct: float | None = None  # vhost workers (VM rows), the mover (NIC rows)
    workers: int = 0
    kind: str | None = None  # VM rows: "qemu" | "other"
    process_cpu_pct: float | None = None  # VM rows: every thread of the process
    worker_cpu: list[dict[str, Any]] = field(default_factory=list)  # VM rows, per worker
    tap: str | None = None  # NIC rows
    tap_kind: str | None = None
    mover: dict[str, Any] | None = None
    queues: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pps(self) -> float:
        return (self.from_guest_pps or 0) + (self.to_guest_pps or 0)

    @property
    def bps(self) -> float:
        return (self.from_guest_bps or 0) + (self.to_guest_bps or 0)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["level"]
        if self.level == "vm":
            for k in ("nic", "path", "tap", "tap_kind", "mover", "queues"):
                del d[k]
        else:
            for k in ("pid", "vm", "workers", "kind", "process_cpu_pct", "worker_cpu"):
                del d[k]
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def top_sample(groups: list[tuple[TopRow, list[TopRow]]], *, interval: float, sort: str,
               when: float) -> dict[str, Any]:
    """One ``top --json`` sample: every process with its NICs (one JSON line each)."""
    return {"time": round(when, 3), "interval": round(interval, 3), "sort": sort,
            "processes": [dict(vm.as_dict(), nics=[n.as_dict() for n in nics])
                          for vm, nics in groups]}


SORT_KEYS = ("pps", "bps", "drops", "cpu", "name")


def _delta(cur: dict[str, int], prev: dict[str, int], key: str) -> int:
    d = cur.get(key, 0) - prev.get(key, 0)
    return d if d > 0 else 0  # a counter that went back: the tap was recreated


def _nic_key(nic: Nic) -> str:
    return nic.tap or nic.id or nic.path


def _pct(ticks: int, clk_tck: int, dt: float) -> float:
    return 100.0 * ticks / clk_tck / dt


def top_rows(prev: Survey, cur: Survey, dt: float) -> list[tuple[TopRow, list[TopRow]]]:
    """Per VM and per NIC rates over ``dt`` seconds between two scans."""
    dt = dt if dt > 0 else 1e-9
    before = {p.pid: p for p in prev.processes}
    out = []
    for p in cur.processes:
        old = before.get(p.pid)
        old_nics = {_nic_key(n): n for n in old.nics} if old else {}
        old_cpu = {w.tid: w.utime + w.stime for w in old.workers} if old else {}
        per = {w.tid: max(0, w.utime + w.stime - old_cpu.get(w.tid, w.utime + w.stime))
               for w in p.workers}
        ticks = sum(per.values())
        own = max(0, p.utime + p.stime - (old.utime + old.stime)) if old else 0
        vm = TopRow("vm", p.pid, p.label, cpu_pct=_pct(ticks, cur.clk_tck, dt),
                    workers=len(p.workers), kind=p.kind,
                    process_cpu_pct=_pct(own, cur.clk_tck, dt),
                    worker_cpu=[{"tid": w.tid, "name": w.name,
                                 "cpu_pct": round(_pct(per[w.tid], cur.clk_tck, dt), 3)}
                                for w in p.workers])
        # The VMM's own threads: the process less the vhost tasks that live in it (6.4+)
        # and less its vCPUs, which run the guest, not the tap (named with debug-threads=on).
        vcpus = max(0, p.vcpu_ticks - old.vcpu_ticks) if old else 0
        vmm = max(0, own - vcpus - sum(per[w.tid] for w in p.workers if w.model == "task"))
        nics = []
        for n in p.nics:
            row = TopRow("nic", p.pid, p.label, nic=n.tap or n.id, path=n.path, tap=n.tap,
                         tap_kind=n.tap_kind)
            o = old_nics.get(_nic_key(n))
            if n.link and n.link.stats and o and o.link and o.link.stats:
                c, b = n.link.stats, o.link.stats
                row.from_guest_pps = _delta(c, b, "rx_packets") / dt
                row.to_guest_pps = _delta(c, b, "tx_packets") / dt
                row.from_guest_bps = 8 * _delta(c, b, "rx_bytes") / dt
                row.to_guest_bps = 8 * _delta(c, b, "tx_bytes") / dt
                row.drops_ps = (_delta(c, b, "rx_dropped") + _delta(c, b, "tx_dropped")) / dt
            row.queues = [{"index": i, **q, "from_guest_pps": None, "to_guest_pps": None,
                           "worker_cpu_pct": (round(_pct(per[q["worker_tid"]], cur.clk_tck,
                                                         dt), 3)
                                              if q["worker_tid"] in per else None)}
                          for i, q in enumerate(n.queue_pairs)]
            row.mover, row.cpu_pct = _mover(p, n, o, per, vmm, cur.clk_tck, dt)
            nics.append(row)
        counted = [r for r in nics if r.from_guest_pps is not None]
        if counted:
            vm.from_guest_pps = sum(r.from_guest_pps or 0 for r in counted)
            vm.to_guest_pps = sum(r.to_guest_pps or 0 for r in counted)
            vm.from_guest_bps = sum(r.from_guest_bps or 0 for r in counted)
            vm.to_guest_bps = sum(r.to_guest_bps or 0 for r in counted)
            vm.drops_ps = sum(r.drops_ps or 0 for r in counted)
        out.append((vm, nics))
    return out


def _mover(p: VmProcess, n: Nic, old: Nic | None, per: dict[int, int], vmm: int,
           clk_tck: int, dt: float) -> tuple[dict[str, Any] | None, float | None]:
    """Whose CPU moves this NIC's packets, and how much of it over the interval."""
    if n.path == PATH_VHOST_NET:
        tids = [q["worker_tid"] for q in n.queue_pairs if q["worker_tid"] is not None]
        if not tids and len(p.nics) == 1:
            tids = sorted(per)  # one NIC: every worker is its own
        pct = _pct(sum(per.get(t, 0) for t in tids), clk_tck, dt)
        return {"by": "vhost workers", "pid": p.pid, "tids": tids,
                "cpu_pct": round(pct, 3)}, pct
    if n.path == PATH_VIRTIO:
        pct = _pct(vmm, clk_tck, dt)
        return {"by": "vmm threads", "pid": p.pid, "tids": None, "cpu_pct": round(pct, 3)}, pct
    b = n.backend
    if b is None:
        return None, None
    ob = old.backend if old and old.backend and old.backend.pid == b.pid else None
    pct = _pct(max(0, b.utime + b.stime - (ob.utime + ob.stime)), clk_tck, dt) if ob else 0.0
    return {"by": "vhost-user backend", "pid": b.pid, "comm": b.comm, "tids": None,
            "cpu_pct": round(pct, 3)}, pct


class TopSampler:
    """Scans once when made; each call returns the sorted rates since the previous call."""

    def __init__(self, scanner: Scanner | None = None) -> None:
        self.scanner = scanner or Scanner()
        self.prev = self.scanner.scan()
        self.t = time.monotonic()
        self.dt = 0.0  # the interval the last call measured over

    def __call__(self, sort: str) -> list[tuple[TopRow, list[TopRow]]]:
        cur, now = self.scanner.scan(), time.monotonic()
        self.dt = now - self.t
        groups = top_rows(self.prev, cur, self.dt)
        self.prev, self.t = cur, now
        return sort_rows(groups, sort)

    def sample(self, sort: str) -> dict[str, Any]:
        """The rates since the previous call as one ``top --json`` object."""
        groups = self(sort)
        return top_sample(groups, interval=self.dt, sort=sort, when=time.time())


def sort_rows(groups: list[tuple[TopRow, list[TopRow]]],
              key: str) -> list[tuple[TopRow, list[TopRow]]]:
    """Busiest first (``name``: alphabetical); NICs sorted the same way inside their VM."""
    if key not in SORT_KEYS:
        raise ValidationError("--sort", f"{key!r}: one of {', '.join(SORT_KEYS)}")
    if key == "name":
        def k(r: TopRow) -> Any:
            return (r.vm, r.nic or "", r.pid)
        rev = False
    else:
        def k(r: TopRow) -> Any:
            return {"pps": r.pps, "bps": r.bps, "drops": r.drops_ps or 0,
                    "cpu": r.cpu_pct or 0}[key]
        rev = True
    return sorted(((vm, sorted(nics, key=k, reverse=rev)) for vm, nics in groups),
                  key=lambda g: k(g[0]), reverse=rev)


# -- QEMU's own view, over QMP ----------------------------------------------------------------

_INFO_NET_RE = re.compile(r"^(?P<peer>\s*\\\s*)?(?P<id>[^:\s]+): index=(?P<index>\d+),"
                          r"type=(?P<type>[^,]+),?(?P<info>.*)$")


def parse_info_network(text: str) -> list[dict[str, Any]]:
    """HMP ``info network``: NIC lines, each followed by `` \\ peer`` lines.

    A multiqueue NIC is listed once per queue (``index=1``, ...); those lines only raise the
    ``queues`` count of the queue-0 entry with the same peer.
    """
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for line in text.replace("\r", "").splitlines():
        m = _INFO_NET_RE.match(line)
        if not m:
            continue
        entry = {"id": m["id"], "type": m["type"], "info": m["info"].strip()}
        index = int(m["index"])
        if m["peer"]:
            if current is None:
                continue
            if current.get("index", 0) == 0:
                current.setdefault("peers", []).append(entry)
            else:
                for e in out:
                    if any(p["id"] == entry["id"] for p in e.get("peers", ())):
                        e["queues"] = e.get("queues", 1) + 1
                        break
            continue
        current = dict(entry, index=index)
        if index == 0:
            out.append(current)
    for e in out:
        e.pop("index", None)
    return out


def qmp_view(client: Any) -> dict[str, Any]:
    """QEMU's own account: version, run state, netdevs (HMP ``info network``) and, where the
    QEMU has it (7.2+), ``x-query-virtio-status`` of each virtio-net device."""
    from .qmp import QmpCommandError

    view: dict[str, Any] = {"version": client.execute("query-version").get("qemu"),
                            "status": client.execute("query-status").get("status")}
    name = client.execute("query-name")
    view["name"] = name.get("name") if isinstance(name, dict) else None
    cpus = client.execute("query-cpus-fast")  # QEMU 2.12+; the vCPU threads' ids
    view["vcpu_threads"] = [c["thread-id"] for c in (cpus if isinstance(cpus, list) else ())
                            if isinstance(c, dict) and isinstance(c.get("thread-id"), int)]
    text = client.execute("human-monitor-command", {"command-line": "info network"})
    view["network"] = parse_info_network(text if isinstance(text, str) else "")
    try:
        devices = client.execute("x-query-virtio")
    except QmpCommandError as e:
        view["virtio"] = None
        view["virtio_error"] = e.desc
        return view
    view["virtio"] = []
    for d in devices if isinstance(devices, list) else ():
        if d.get("name") != "virtio-net":
            continue
        status = client.execute("x-query-virtio-status", {"path": d["path"]})
        view["virtio"].append({"path": d["path"], "status": status})
    return view


def _devid(path: str) -> str | None:
    m = re.fullmatch(r"/machine/peripheral/([^/]+)/virtio-backend", path)
    return m[1] if m else None


def attach_qmp(result: Survey, view: dict[str, Any], inodes: set[int]) -> VmProcess | None:
    """Put QEMU's view on the process that listens on the QMP socket (matched by inode),
    and on each NIC whose netdev QEMU names (by id, or by the ``fd=N`` QEMU reports)."""
    proc = next((p for p in result.processes if p.socket_inodes & inodes), None)
    if proc is None:
        result.warnings.append("the QMP socket belongs to none of the processes shown "
                               "(another network namespace, or not a VM holding vhost/tun fds)")
        return None
    proc.qmp = view
    if not proc.vcpu_tids:  # threads are named "CPU n/KVM" only with -name debug-threads=on
        proc.vcpu_tids = list(view.get("vcpu_threads") or ())
    for entry in view.get("network") or ():
        # A NIC line lists its netdev as a peer; a netdev without a NIC stands alone.
        pairs = ([(entry, p) for p in entry.get("peers", ())] if entry["type"] == "nic"
                 else [(None, entry)])
        for nic_entry, netdev in pairs:
            fd = re.search(r"(?:^|,)fds?=(\d+)", netdev.get("info", ""))
            for nic in proc.nics:
                if nic.id == netdev["id"] or (nic.id is None and fd and int(fd[1]) in nic.tap_fds):
                    nic.id = nic.id or netdev["id"]
                    nic.qmp = {"netdev": netdev, "device": nic_entry["id"] if nic_entry else None,
                               "model": nic_entry["info"] if nic_entry else None}
    for v in view.get("virtio") or ():
        dev = _devid(v["path"])
        for nic in proc.nics:
            if nic.qmp and nic.qmp.get("device") == dev:
                nic.qmp["virtio"] = v["status"]
    return proc
