"""``vhostctl doctor``: the facts of a survey and of the host check, turned into verdicts.

Each check answers one of the questions the users of vhost-net ask ("is vhost-net really
used?", "why is it slow?") for one subject (the host, a VM, a NIC, a tap, a worker) and names
its evidence: the file, counter or QMP field read and the value found.  Nothing is guessed:
a check whose evidence cannot be read (no QMP socket, a rate without ``--watch``) is listed
in :attr:`Report.not_run` with the reason.  The checks are pure functions over a
:class:`Facts` (one or two scans, the host report, QEMU's view), so the unit tests drive them
with built surveys and the kernel tests with real ones.

Severity: ``error`` (vhost-net is broken or bypassed), ``warning`` (it costs performance),
``info`` (worth knowing, costs nothing by itself).  The schema of ``--json`` is in vhostctl(8).
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ._uapi import virtio_config as VC
from .errors import VhostctlError
from .hostcheck import HostPaths, HostReport, host_report, mode_allows
from .qemu_cmdline import DeviceSpec, NetdevSpec, QemuArgs, parse_argv
from .survey import (
    PATH_VHOST_NET,
    PATH_VIRTIO,
    Nic,
    Scanner,
    Survey,
    TapLink,
    VmProcess,
    Worker,
    attach_qmp,
    qmp_view,
)

SCHEMA = 1
ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITIES = (ERROR, WARNING, INFO)

# Thresholds of the rate checks, over the --watch window.
SATURATED = 0.90  # a worker on CPU this share of the window moves all it can
STARVED = 0.20  # runnable but waiting for a CPU this share of the window
BUSY_SHARE = 0.10  # with N workers, the others below this share of the busiest: one does it all
BUSY_MIN = 0.05  # ... and the busiest on CPU at least this share (an idle NIC is not skewed)

# QEMU's virtio-net-pci default queue sizes (hw/net/virtio-net.c VIRTIO_NET_RX_QUEUE_DEFAULT_SIZE,
# VIRTIO_NET_TX_QUEUE_DEFAULT_SIZE) and the only backends allowed a larger TX queue
# (virtio_net_max_tx_queue_size(): vhost-user and vhost-vdpa peers).
RX_QUEUE_DEFAULT = 256
TX_QUEUE_DEFAULT = 256
NOT_VIRTIO = ("e1000", "e1000e", "rtl8139", "vmxnet3", "ne2k_pci", "pcnet", "i82559er")

RATE_CHECKS = ("tap-tx-drops", "worker-saturated", "worker-starved", "mq-one-busy-worker")


@dataclass(frozen=True)
class Finding:
    """One verdict: what is wrong, read where, and the command or option that fixes it."""

    id: str
    severity: str
    subject: str
    summary: str
    evidence: tuple[tuple[str, Any], ...]
    fix: str
    pid: int | None = None
    nic: str | None = None
    tap: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["evidence"] = [{"source": s, "value": v} for s, v in self.evidence]
        return d


@dataclass(frozen=True)
class NotRun:
    """A check that could not look: which, for what, and why."""

    check: str
    subject: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    kernel: str | None
    window: float | None
    subjects: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    not_run: list[NotRun] = field(default_factory=list)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def exit_code(self) -> int:
        """0 when nothing above info was found, 1 otherwise (vhostctl(8))."""
        return 1 if any(f.severity in (ERROR, WARNING) for f in self.findings) else 0

    def ids(self) -> list[str]:
        return [f.id for f in self.findings]

    def as_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "kernel": self.kernel, "window_seconds": self.window,
                "subjects": self.subjects,
                "summary": {s: self.count(s) for s in SEVERITIES},
                "findings": [f.as_dict() for f in self.findings],
                "not_run": [n.as_dict() for n in self.not_run]}


@dataclass
class Facts:
    """What the checks read: a scan, a second one ``window`` seconds later (--watch), the host
    check, and ``read`` for the few files a scan does not keep (through the scanner's reader)."""

    survey: Survey
    host: HostReport
    read: Callable[[str], str | None]
    proc: str = "/proc"
    sys: str = "/sys"
    dev: str = "/dev"
    root: str = "/"
    later: Survey | None = None
    window: float | None = None
    qmp_socket: str | None = None
    all_taps: list[TapLink] = field(default_factory=list)  # every tun/tap on the host
    processes: list[VmProcess] = field(default_factory=list)  # the ones asked about
    taps: list[str] = field(default_factory=list)  # taps asked about that no process holds
    host_wide: bool = True  # no selection: host-wide checks (orphans) run too

    def sysfs(self, *parts: str) -> str | None:
        text = self.read(os.path.join(self.sys, *parts))
        return text.strip() if text is not None else None

    def procfs(self, *parts: str) -> str | None:
        text = self.read(os.path.join(self.proc, *parts))
        return text.strip() if text is not None else None


# -- subjects ---------------------------------------------------------------------------------

def _vm(p: VmProcess) -> str:
    return f"{p.label} [{p.pid}]"


def _nic(p: VmProcess, n: Nic) -> str:
    what = n.id or "?"
    if n.tap:
        what += f" (tap {n.tap})"
    elif n.socket:
        what += f" (vhost-user {n.socket})"
    return f"{_vm(p)} nic {what}"


def _specs(n: Nic, args: QemuArgs) -> tuple[NetdevSpec | None, DeviceSpec | None]:
    spec = next((s for s in args.netdevs if n.id is not None and s.id == n.id), None)
    return spec, args.device_for(n.id)


def _netdev_text(spec: NetdevSpec | None) -> str:
    if spec is None:
        return "-"
    return f"-netdev {spec.type}," + ",".join(f"{k}={v}" for k, v in spec.opts.items()
                                              if k != "type")


def _device_text(dev: DeviceSpec | None) -> str:
    if dev is None:
        return "-"
    return f"-device {dev.driver}," + ",".join(f"{k}={v}" for k, v in dev.opts.items()
                                               if k != "driver")


# -- host checks ------------------------------------------------------------------------------

def check_vhost_available(f: Facts) -> Iterator[Finding]:
    """Problem 2: no /dev/vhost-net (module not loaded, not built, node missing)."""
    try:
        dev, mod = f.host.check("vhost-net device"), f.host.check("vhost_net module")
    except KeyError:
        return
    if dev.ok is not False and mod.ok is not False:
        return
    release = f.survey.kernel or os.uname().release
    ev: list[tuple[str, Any]] = [("/dev/vhost-net", dev.detail),
                                 ("/sys/module/vhost_net", mod.data.get("state", mod.detail))]
    config = f.read(os.path.join(f.root, "boot", f"config-{release}"))
    built = None
    for line in (config or "").splitlines():
        if line.startswith("CONFIG_VHOST_NET=") or line == "# CONFIG_VHOST_NET is not set":
            built = line
            ev.append((f"/boot/config-{release}", line))
    ko_dir = os.path.join(f.root, "lib", "modules", release, "kernel", "drivers", "vhost")
    ko = sorted(glob.glob(os.path.join(ko_dir, "vhost_net.ko*")))
    if built != "CONFIG_VHOST_NET=y":
        ev.append((f"/lib/modules/{release}/kernel/drivers/vhost/vhost_net.ko*",
                   ko[0] if ko else "absent"))
    if built == "# CONFIG_VHOST_NET is not set" or (mod.ok is False and not ko):
        fix = ("this kernel has no vhost-net to load: boot a kernel built with "
               "CONFIG_VHOST_NET=m and its modules (Debian: linux-image-amd64)")
    elif mod.ok is False:
        fix = ("modprobe vhost_net; to load it at every boot: echo vhost_net > "
               "/etc/modules-load.d/vhost-net.conf")
    else:
        fix = dev.fix
    yield Finding("vhost-net-unavailable", ERROR, "host",
                  "vhost-net cannot be used on this host: every VM NIC falls back to the VMM "
                  "moving packets in userspace", tuple(ev), fix)


def check_zerocopy(f: Facts) -> Iterator[Finding]:
    """Problem 15: experimental zero-copy TX (drivers/vhost/net.c experimental_zcopytx)."""
    v = f.sysfs("module", "vhost_net", "parameters", "experimental_zcopytx")
    if v not in ("1", "Y"):
        return
    yield Finding("vhost-zerocopy-tx", INFO, "host",
                  "experimental zero-copy TX is on: guest pages stay pinned until the lower "
                  "device frees them, so a slow consumer (a full qdisc, a bridge to a slow "
                  "port) stalls the guest's TX ring; it only pays off for large frames to a "
                  "physical NIC",
                  (("/sys/module/vhost_net/parameters/experimental_zcopytx", v),),
                  "with no VM running: modprobe -r vhost_net && modprobe vhost_net "
                  "experimental_zcopytx=0 (and drop it from /etc/modprobe.d)")


def _bridges(f: Facts) -> dict[str, list[str]]:
    """Each bridge carrying a tap of the subjects: its taps."""
    out: dict[str, list[str]] = {}
    links = [n.link for p in f.processes for n in p.nics if n.link is not None]
    links += [t for t in f.all_taps if t.name in f.taps]
    for link in links:
        if link.master:
            out.setdefault(link.master, [])
            if link.name not in out[link.master]:
                out[link.master].append(link.name)
    return out


NF_CALLS = ("iptables", "ip6tables", "arptables")


def check_br_netfilter(f: Facts) -> Iterator[Finding]:
    """Problem 9: bridged VM frames through netfilter.  net/bridge/br_netfilter_hooks.c
    br_nf_pre_routing(): a frame goes to iptables when the netns's bridge-nf-call-iptables
    is on *or* the bridge's own nf_call_iptables is."""
    for br, taps in sorted(_bridges(f).items()):
        if not os.path.isdir(os.path.join(f.sys, "class", "net", br, "bridge")):
            continue
        ev: list[tuple[str, Any]] = []
        for t in NF_CALLS:
            g = f.procfs("sys", "net", "bridge", f"bridge-nf-call-{t}")
            if g == "1":
                ev.append((f"/proc/sys/net/bridge/bridge-nf-call-{t}", 1))
            b = f.sysfs("class", "net", br, "bridge", f"nf_call_{t}")
            if b == "1":
                ev.append((f"/sys/class/net/{br}/bridge/nf_call_{t}", 1))
        if not ev:
            continue
        yield Finding("br-netfilter", WARNING, f"bridge {br}",
                      f"br_netfilter hands every frame bridged between {', '.join(taps)} and "
                      "the other ports to iptables/ip6tables/arptables: a conntrack lookup per "
                      "packet on the VM's path", tuple(ev),
                      "sysctl -w net.bridge.bridge-nf-call-iptables=0 "
                      "net.bridge.bridge-nf-call-ip6tables=0 "
                      "net.bridge.bridge-nf-call-arptables=0 (persist in /etc/sysctl.d; "
                      f"per bridge: ip link set {br} type bridge nf_call_iptables 0 "
                      "nf_call_ip6tables 0 nf_call_arptables 0)")


def check_bridge_down(f: Facts) -> Iterator[Finding]:
    for br, taps in sorted(_bridges(f).items()):
        flags = f.sysfs("class", "net", br, "flags")
        try:
            up = bool(int(flags, 16) & 1) if flags else None
        except ValueError:
            up = None
        if up is False:
            yield Finding("bridge-down", ERROR, f"bridge {br}",
                          f"bridge {br}, which carries {', '.join(taps)}, is down: it forwards "
                          "nothing", ((f"/sys/class/net/{br}/flags", flags),),
                          f"ip link set {br} up")


def check_orphan_taps(f: Facts) -> Iterator[Finding]:
    """Problem 14: persistent taps nobody holds (left by a VM that died, or never started)."""
    held = {name for p in f.survey.processes for name in p.tun_fds.values() if name}
    for link in f.all_taps:
        if not (f.host_wide or link.name in f.taps):
            continue
        if link.name in held or link.kind != "tun" or not link.persist:
            continue
        ev: tuple[tuple[str, Any], ...] = (
            (f"/sys/class/net/{link.name}/tun_flags",
             f"{link.tun_flags:#x}" if link.tun_flags is not None else None),
            ("/proc/*/fdinfo", "no process has a queue of it"))
        yield Finding("orphan-tap", WARNING, f"tap {link.name}",
                      f"persistent tap {link.name} is held by no process: a VM that died or "
                      "never started left it" + (f" (in bridge {link.master})" if link.master
                                                 else ""), ev,
                      f"ip link del {link.name} (or start the VM that uses it)",
                      tap=link.name)


# -- per-process checks -----------------------------------------------------------------------

def _creds(f: Facts, pid: int) -> tuple[int, list[int]] | None:
    text = f.read(os.path.join(f.proc, str(pid), "status"))
    if text is None:
        return None
    uid, gids = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key == "Uid" and parts:
            uid = int(parts[1])  # effective: what open(2) checks
        elif key == "Gid" and parts:
            gids.add(int(parts[1]))
        elif key == "Groups":
            gids.update(int(g) for g in parts if g.isdigit())
    return (uid, sorted(gids)) if uid is not None else None


def _vhost_access(f: Facts, p: VmProcess) -> tuple[bool | None, list[tuple[str, Any]]]:
    """Would this process's credentials open /dev/vhost-net by its mode?  (None: unknown.)"""
    node = os.path.join(f.dev, "vhost-net")
    try:
        st = os.stat(node)
    except OSError as e:
        return None, [("/dev/vhost-net", os.strerror(e.errno or errno.EIO))]
    creds = _creds(f, p.pid)
    if creds is None:
        return None, []
    uid, gids = creds
    ev: list[tuple[str, Any]] = [
        ("/dev/vhost-net", f"{stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}"),
        (f"/proc/{p.pid}/status", f"euid {uid}, groups {' '.join(map(str, gids)) or '-'}")]
    label = f.procfs(str(p.pid), "attr", "current")
    if label and label.rstrip("\0") not in ("unconfined", "kernel"):
        ev.append((f"/proc/{p.pid}/attr/current", label.rstrip("\0")))
    return mode_allows(st, uid, gids), ev


def _tap_backed(n: Nic) -> bool:
    return bool(n.tap) and n.tap_kind == "tun"


def check_vhost_use(f: Facts, p: VmProcess, args: QemuArgs) -> Iterator[Finding]:
    """Problems 1 and 3: vhost asked for but not in effect, or never asked for; and whether
    the VMM's own user could open /dev/vhost-net."""
    if p.kind != "qemu":
        return
    access: tuple[bool | None, list[tuple[str, Any]]] | None = None
    for n in p.nics:
        if not n.tap or n.path != PATH_VIRTIO:
            continue
        spec, dev = _specs(n, args)
        if dev is not None and not dev.driver.startswith("virtio-net"):
            continue  # check_nic_model says it
        if access is None:
            access = _vhost_access(f, p)
        allowed, aev = access
        handoff = (f"hand QEMU ready fds instead: vhostctl exec --tap {n.tap} --queues "
                   f"{n.queues} -- qemu-system-x86_64 ... -netdev tap,id={n.id or 'n0'},"
                   "fds={tapfds},vhostfds={vhostfds},vhost=on")
        if allowed is False:
            yield Finding("vmm-cannot-open-vhost", ERROR, _nic(p, n),
                          "QEMU's user may not open /dev/vhost-net (mode, owner and groups): "
                          "QEMU cannot start vhost-net for this NIC by itself", tuple(aev),
                          handoff + "; or: chgrp kvm /dev/vhost-net && chmod 0660 "
                          "/dev/vhost-net with QEMU's user in group kvm",
                          pid=p.pid, nic=n.id, tap=n.tap)
        cmd = (f"/proc/{p.pid}/cmdline", _netdev_text(spec))
        fds = (f"/proc/{p.pid}/fd", f"{len(n.tap_fds)} tap fd(s), no /dev/vhost-net")
        if n.vhost_requested:
            ev = [cmd, fds, (f"/proc/{p.pid}/task", "no vhost worker for it")]
            virtio = (n.qmp or {}).get("virtio")
            if virtio is not None:
                ev.append(("QMP x-query-virtio-status vhost-started",
                           virtio.get("vhost-started")))
            yield Finding("vhost-not-used", ERROR, _nic(p, n),
                          "vhost-net was requested but is not in effect: the VMM went on "
                          "without /dev/vhost-net and moves every packet in userspace",
                          tuple(ev),
                          handoff if allowed is False else
                          "find why QEMU could not open /dev/vhost-net in its log ('open "
                          "vhost char device failed'); add vhostforce=on so that it fails "
                          "instead of falling back", pid=p.pid, nic=n.id, tap=n.tap)
        else:
            yield Finding("vhost-not-requested", WARNING, _nic(p, n),
                          "vhost-net is not requested for this tap NIC: QEMU's own threads "
                          "move every packet (QEMU's default is vhost=off)", (cmd, fds),
                          "add vhost=on to -netdev tap (libvirt: <driver name='vhost'/>), "
                          "or " + handoff, pid=p.pid, nic=n.id, tap=n.tap)


def check_nic_model(f: Facts, p: VmProcess, args: QemuArgs) -> Iterator[Finding]:
    """Problem 4a: an emulated NIC model: vhost-net only serves virtio-net."""
    for n in p.nics:
        if not n.tap:
            continue
        dev = args.device_for(n.id)
        if dev is None or dev.driver.startswith("virtio-net"):
            continue
        ev: list[tuple[str, Any]] = [(f"/proc/{p.pid}/cmdline", _device_text(dev))]
        if n.vhost_fds:
            ev.append((f"/proc/{p.pid}/fd", f"{len(n.vhost_fds)} /dev/vhost-net fd(s) "
                       "opened for it, never started"))
        yield Finding("nic-model-not-virtio", ERROR if n.vhost_requested else WARNING,
                      _nic(p, n),
                      f"the guest's NIC is an emulated {dev.driver}: vhost-net cannot serve it "
                      "and QEMU emulates every register access"
                      + (" (its vhost fds sit idle)" if n.vhost_fds else ""), tuple(ev),
                      f"-device virtio-net-pci,netdev={n.id} (libvirt: <model type='virtio'/>)",
                      pid=p.pid, nic=n.id, tap=n.tap)


def _device_status(status: Any) -> tuple[Any, bool | None]:
    """The device status as QEMU reports it and whether DRIVER_OK is set: an int in the
    virtio spec's bits, or (QEMU 7.2+, hw/virtio/virtio-qmp.c) {"statuses": ["VIRTIO_CONFIG_S_
    DRIVER_OK: Driver setup and ready", ...]}, shown by name."""
    if isinstance(status, bool):
        return status, None
    if isinstance(status, int):
        return status, bool(status & VC.VIRTIO_CONFIG_S_DRIVER_OK)
    if isinstance(status, dict) and isinstance(status.get("statuses"), list):
        names = [str(x).split(":", 1)[0] for x in status["statuses"]]
        return names, "VIRTIO_CONFIG_S_DRIVER_OK" in names
    return status, None


def check_driver(f: Facts, p: VmProcess, args: QemuArgs) -> Iterator[NotRun | Finding]:
    """Problem 4b and 1's confirmation: QEMU's own account, x-query-virtio-status."""
    for n in p.nics:
        if n.path != PATH_VHOST_NET or p.kind != "qemu":
            continue
        virtio = (n.qmp or {}).get("virtio")
        if virtio is None:
            why = ("no QMP socket given (--qmp SOCKET)" if p.qmp is None
                   else (p.qmp.get("virtio_error") or "QEMU did not name this NIC's device"))
            yield NotRun("guest-driver-not-ready", _nic(p, n), why)
            continue
        status, driver_ok = _device_status(virtio.get("status"))
        started = virtio.get("vhost-started")
        ev = (("QMP x-query-virtio-status status", status),
              ("QMP x-query-virtio-status vhost-started", started))
        if driver_ok is False:
            state = p.qmp.get("status") if p.qmp else None
            yield Finding("guest-driver-not-ready", WARNING, _nic(p, n),
                          "the guest's virtio-net driver has not set DRIVER_OK, so vhost-net "
                          "has not started (QEMU starts it with the driver)"
                          + (f"; the VM is {state}" if state and state != "running" else ""),
                          (*ev, ("QMP query-status", state)),
                          "start the VM (cont) and load virtio_net in the guest "
                          "(lsmod | grep virtio_net; modprobe virtio_net)",
                          pid=p.pid, nic=n.id, tap=n.tap)
        elif started is False:
            yield Finding("vhost-not-started", ERROR, _nic(p, n),
                          "the driver is ready but QEMU did not start vhost-net: it moves this "
                          "NIC's packets itself", ev,
                          "QEMU's log names the reason (vhost_net_start failed); restart the "
                          "NIC or the VM with vhostforce=on", pid=p.pid, nic=n.id, tap=n.tap)


def check_tap_state(f: Facts, p: VmProcess, args: QemuArgs) -> Iterator[Finding]:
    """A held tap that is down, or without a vnet header (problem 7)."""
    for n in p.nics:
        link = n.link
        if not n.tap or link is None or not link.visible:
            continue
        if link.up is False:
            yield Finding("tap-down", ERROR, _nic(p, n),
                          f"tap {n.tap} is down: nothing crosses it until it is up",
                          ((f"/sys/class/net/{n.tap}/flags", "IFF_UP clear"),
                           (f"/sys/class/net/{n.tap}/operstate", link.operstate)),
                          f"ip link set {n.tap} up", pid=p.pid, nic=n.id, tap=n.tap)
        if _tap_backed(n) and link.tun_flags is not None and not link.vnet_hdr:
            yield Finding("tap-no-vnet-hdr", WARNING, _nic(p, n),
                          f"tap {n.tap} has no vnet header (IFF_VNET_HDR): no checksum or "
                          "segmentation offload crosses it, every frame is checksummed and "
                          "segmented in the guest", ((f"/sys/class/net/{n.tap}/tun_flags",
                                                      f"{link.tun_flags:#x}"),),
                          f"recreate the tap with a vnet header (vhostctl tap add {n.tap} "
                          "--vnet-hdr; ip tuntap add ... vnet_hdr) and drop vnet_hdr=off "
                          "from -netdev", pid=p.pid, nic=n.id, tap=n.tap)


def check_multiqueue(f: Facts, p: VmProcess, args: QemuArgs) -> Iterator[Finding]:
    """Problem 6: several queue pairs configured, fewer in use."""
    for n in p.nics:
        if not n.tap:
            continue
        spec, dev = _specs(n, args)
        queues = max(n.queues, spec.queues or 1 if spec else 1)
        link = n.link
        if link is not None and link.queues_disabled:
            total = (link.queues_enabled or 0) + link.queues_disabled
            yield Finding("mq-queues-disabled", WARNING, _nic(p, n),
                          f"{link.queues_disabled} of {total} tap queues are disabled: the guest "
                          "has not enabled those queue pairs, so their workers sit idle",
                          (("rtnetlink IFLA_TUN_NUM_QUEUES", link.queues_enabled),
                           ("rtnetlink IFLA_TUN_NUM_DISABLED_QUEUES", link.queues_disabled)),
                          f"in the guest: ethtool -L <nic> combined {queues}",
                          pid=p.pid, nic=n.id, tap=n.tap)
        if queues < 2 or dev is None or not dev.driver.startswith("virtio-net"):
            continue
        dtext = (f"/proc/{p.pid}/cmdline", _device_text(dev))
        if dev.bool_opt("mq") is not True:
            yield Finding("mq-off", WARNING, _nic(p, n),
                          f"{queues} queue pairs on the backend but the device lacks mq=on: the "
                          "guest sees one queue pair", (dtext,),
                          f"-device {dev.driver},...,mq=on,vectors={2 * queues + 2}",
                          pid=p.pid, nic=n.id, tap=n.tap)
        vectors = dev.int_opt("vectors")
        if vectors is not None and vectors < 2 * queues + 2:
            # drivers/virtio/virtio_pci_common.c vp_find_vqs(): without a vector per queue the
            # guest falls back to shared vectors (or INTx), one interrupt for many queues.
            yield Finding("mq-vectors", WARNING, _nic(p, n),
                          f"vectors={vectors} is below 2N+2 = {2 * queues + 2} for {queues} queue "
                          "pairs: the guest shares interrupt vectors between queues", (dtext,),
                          f"-device {dev.driver},...,vectors={2 * queues + 2}",
                          pid=p.pid, nic=n.id, tap=n.tap)
        if args.cpus is not None and queues > args.cpus:
            # drivers/net/virtio_net.c virtnet_probe(): curr_queue_pairs = min(max, online CPUs)
            yield Finding("mq-more-queues-than-vcpus", INFO, _nic(p, n),
                          f"{queues} queue pairs for {args.cpus} vCPU(s): the guest's virtio_net "
                          f"uses {args.cpus} by default, the rest stay idle",
                          ((f"/proc/{p.pid}/cmdline", f"-smp {args.cpus}; {dtext[1]}"),),
                          f"-smp {queues}, or queues={args.cpus}", pid=p.pid, nic=n.id,
                          tap=n.tap)


def check_device_options(f: Facts, p: VmProcess, args: QemuArgs) -> Iterator[Finding]:
    """Problems 10, 12, 13, 15: MTU along the path, vIOMMU, an ignored TX queue size, busy
    polling."""
    for n in p.nics:
        spec, dev = _specs(n, args)
        link = n.link
        if link is not None and link.visible and link.mtu is not None:
            if dev is not None and dev.int_opt("host_mtu") not in (None, link.mtu):
                yield Finding("mtu-mismatch", WARNING, _nic(p, n),
                              f"the guest is told MTU {dev.int_opt('host_mtu')} (host_mtu) but tap "
                              f"{n.tap} has MTU {link.mtu}: larger frames are dropped on the tap",
                              ((f"/proc/{p.pid}/cmdline", _device_text(dev)),
                               (f"/sys/class/net/{n.tap}/mtu", link.mtu)),
                              f"ip link set {n.tap} mtu {dev.int_opt('host_mtu')} (and its "
                              "bridge), or host_mtu matching the tap", pid=p.pid, nic=n.id,
                              tap=n.tap)
            bmtu = f.sysfs("class", "net", link.master, "mtu") if link.master else None
            if bmtu and bmtu.isdigit() and int(bmtu) != link.mtu:
                yield Finding("mtu-mismatch", WARNING, _nic(p, n),
                              f"tap {n.tap} (MTU {link.mtu}) and its bridge {link.master} (MTU "
                              f"{bmtu}) disagree: frames above the smaller one are dropped",
                              ((f"/sys/class/net/{n.tap}/mtu", link.mtu),
                               (f"/sys/class/net/{link.master}/mtu", int(bmtu))),
                              f"ip link set {n.tap} mtu {max(link.mtu, int(bmtu))} and ip link "
                              f"set {link.master} mtu {max(link.mtu, int(bmtu))}",
                              pid=p.pid, nic=n.id, tap=n.tap)
        if dev is None:
            continue
        dtext = (f"/proc/{p.pid}/cmdline", _device_text(dev))
        if n.path == PATH_VHOST_NET and dev.bool_opt("iommu_platform"):
            yield Finding("viommu-with-vhost", WARNING, _nic(p, n),
                          "iommu_platform=on: every address the guest gives vhost-net goes "
                          "through the vIOMMU, and each IOTLB miss is a round trip to QEMU "
                          "(VHOST_IOTLB_MISS)", (dtext,),
                          "drop iommu_platform=on unless the guest needs DMA isolation for "
                          "this NIC (e.g. a guest-side userspace driver)",
                          pid=p.pid, nic=n.id, tap=n.tap)
        txq = dev.int_opt("tx_queue_size")
        if n.tap and txq is not None and txq > TX_QUEUE_DEFAULT:
            yield Finding("tx-queue-size-ignored", INFO, _nic(p, n),
                          f"tx_queue_size={txq} is ignored with a tap backend: QEMU keeps "
                          f"{TX_QUEUE_DEFAULT} (virtio_net_max_tx_queue_size(): only vhost-user "
                          "and vDPA get more)", (dtext,),
                          "drop tx_queue_size; rx_queue_size (up to 1024) does apply",
                          pid=p.pid, nic=n.id, tap=n.tap)
        poll = _int(spec.opts.get("poll-us")) if spec else None
        if n.path == PATH_VHOST_NET and poll:
            yield Finding("busy-poll", INFO, _nic(p, n),
                          f"poll-us={poll}: each worker busy-polls the tap up to {poll} µs "
                          "after its ring empties (VHOST_SET_VRING_BUSYLOOP_TIMEOUT): lower "
                          "latency, paid with a CPU spinning per busy queue",
                          ((f"/proc/{p.pid}/cmdline", _netdev_text(spec)),),
                          "poll-us=0 where CPU matters more than latency",
                          pid=p.pid, nic=n.id, tap=n.tap)


def check_macvtap(f: Facts, p: VmProcess, args: QemuArgs) -> Iterator[Finding]:
    """A macvtap guest cannot reach its host through the lower device (drivers/net/macvlan.c
    delivers between macvlans of one lower device, never to the lower device's own stack)."""
    for n in p.nics:
        link = n.link
        if link is None or link.kind != "macvtap" or link.mode in (None, "passthru", "source"):
            continue
        yield Finding("macvtap-host-unreachable", INFO, _nic(p, n),
                      f"macvtap {n.tap} in {link.mode} mode: the guest cannot reach this host's "
                      f"own addresses on {link.lower or 'the lower device'} (frames between a "
                      "macvtap and its lower device's stack are not delivered)",
                      (("rtnetlink IFLA_MACVLAN_MODE", link.mode),
                       (f"/sys/class/net/{n.tap}/lower_*", link.lower)),
                      f"give the host a macvlan of its own on {link.lower or 'the lower device'} "
                      "in bridge mode, or use a tap on a bridge",
                      pid=p.pid, nic=n.id, tap=n.tap)


def check_worker_cpus(f: Facts, p: VmProcess, args: QemuArgs) -> Iterator[Finding | NotRun]:
    """Problem 8c: a worker that may only run on CPUs that pinned vCPU threads own: the two
    take turns, and a busy guest starves its own datapath.  Unpinned threads (every online
    CPU allowed) never count: the scheduler moves them apart."""
    online_text = f.sysfs("devices", "system", "cpu", "online")
    if not p.workers or not online_text:
        return
    if not p.vcpu_tids:
        yield NotRun("worker-shares-vcpu-cpu", _vm(p), "its vCPU threads are not named (QEMU "
                     "names them only with -name debug-threads=on): give --qmp SOCKET")
        return
    online = parse_cpu_list(online_text)
    pinned: dict[int, set[int]] = {}
    for tid in p.vcpu_tids:
        cpus = _allowed(f, p.pid, tid)
        if cpus is not None and cpus & online != online:
            pinned[tid] = cpus
    for w in p.workers:
        wc = _allowed(f, w.tgid, w.tid) if w.tgid else _allowed(f, w.tid, None)
        if not wc:
            continue
        shared = sorted(t for t, c in pinned.items() if c <= wc)
        if not shared or not wc <= set().union(*(pinned[t] for t in shared)):
            continue
        cpu_list = _cpu_list(wc)
        where = "" if w.tgid else f"/proc/{w.tid}"
        yield Finding("worker-shares-vcpu-cpu", WARNING, f"{_vm(p)} worker {w.name} [{w.tid}]",
                      f"vhost worker {w.tid} may only run on CPU {cpu_list}, where vCPU "
                      f"thread(s) {', '.join(map(str, shared))} are pinned: the worker waits "
                      "whenever the guest runs",
                      ((f"{where or f'/proc/{p.pid}/task/{w.tid}'}/status Cpus_allowed_list",
                        cpu_list),
                       *((f"/proc/{p.pid}/task/{t}/status Cpus_allowed_list",
                          _cpu_list(pinned[t])) for t in shared),
                       ("/sys/devices/system/cpu/online", online_text)),
                      f"taskset -pc <a CPU no vCPU is pinned to> {w.tid} (libvirt: "
                      "<emulatorpin> away from <vcpupin>)", pid=p.pid)


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def _allowed(f: Facts, pid: int, tid: int | None) -> set[int] | None:
    path = os.path.join(f.proc, str(pid), *(("task", str(tid)) if tid else ()), "status")
    text = f.read(path)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    return None


def parse_cpu_list(text: str) -> set[int]:
    """``0-2,5`` -> {0, 1, 2, 5} (the kernel's cpulist format, lib/bitmap-str.c)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad cpu list {text!r}")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# -- rate checks (--watch) --------------------------------------------------------------------

def _later_proc(f: Facts, p: VmProcess) -> VmProcess | None:
    if f.later is None:
        return None
    return next((q for q in f.later.processes if q.pid == p.pid), None)


def check_rates(f: Facts, p: VmProcess, args: QemuArgs) -> Iterator[Finding]:
    """Problems 5, 6b, 8a, 8b: drops toward the guest, saturated, starved or lone workers,
    measured over the --watch window."""
    q = _later_proc(f, p)
    if q is None or not f.window:
        return
    dt = f.window
    for n in p.nics:
        if not n.tap or n.link is None:
            continue
        m = next((x for x in q.nics if x.tap == n.tap), None)
        if m is None or m.link is None:
            continue
        drops = m.link.stats.get("tx_dropped", 0) - n.link.stats.get("tx_dropped", 0)
        if drops > 0:
            dev = args.device_for(n.id)
            qlen = f.sysfs("class", "net", n.tap, "tx_queue_len")
            rxq = dev.int_opt("rx_queue_size") if dev else None
            yield Finding("tap-tx-drops", WARNING, _nic(p, n),
                          f"tap {n.tap} dropped {drops} frames toward the guest in {dt:g} s "
                          f"({drops / dt:.0f}/s): the guest does not drain its RX ring as fast "
                          "as frames arrive", (
                              (f"/sys/class/net/{n.tap}/statistics/tx_dropped",
                               f"+{drops} in {dt:g} s"),
                              (f"/sys/class/net/{n.tap}/tx_queue_len", qlen),
                              (f"/proc/{p.pid}/cmdline rx_queue_size",
                               rxq if rxq is not None else f"{RX_QUEUE_DEFAULT} (default)")),
                          f"ip link set {n.tap} txqueuelen 10000, and -device virtio-net-pci,"
                          "...,rx_queue_size=1024; with several vCPUs, more queue pairs",
                          pid=p.pid, nic=n.id, tap=n.tap)
    later_workers = {w.tid: w for w in q.workers}
    shares: list[tuple[Worker, float]] = []
    for w in p.workers:
        w2 = later_workers.get(w.tid)
        if w2 is None:
            continue
        busy = (w2.cpu_seconds - w.cpu_seconds) / dt
        shares.append((w, busy))
        subject = f"{_vm(p)} worker {w.name} [{w.tid}]"
        src = f"/proc/{w.tid}/stat utime+stime"
        if busy >= SATURATED:
            yield Finding("worker-saturated", WARNING, subject,
                          f"vhost worker {w.tid} was on CPU {busy:.0%} of {dt:g} s: its queue "
                          "pair moves all one CPU can", ((src, f"{busy:.0%} of the window"),),
                          "spread the load over more queue pairs (queues=N, mq=on, and "
                          "ethtool -L <nic> combined N in the guest)", pid=p.pid)
        if w.runqueue_wait_ns is not None and w2.runqueue_wait_ns is not None:
            waited = (w2.runqueue_wait_ns - w.runqueue_wait_ns) / 1e9 / dt
            if waited >= STARVED:
                yield Finding("worker-starved", WARNING, subject,
                              f"vhost worker {w.tid} waited for a CPU {waited:.0%} of {dt:g} s "
                              "while runnable: other threads hold the CPUs it may use",
                              ((f"/proc/{w.tid}/schedstat run-queue wait",
                                f"{waited:.0%} of the window"),
                               (f"/proc/{w.tid}/stat last CPU", w2.last_cpu)),
                              f"give it a CPU of its own: taskset -pc <idle CPU> {w.tid}, and "
                              "keep vCPU threads off that CPU", pid=p.pid)
    if len(shares) >= 2:
        top = max(b for _, b in shares)
        if top >= BUSY_MIN and all(b < BUSY_SHARE * top for w, b in shares if b != top):
            busiest = next(w for w, b in shares if b == top)
            yield Finding("mq-one-busy-worker", WARNING, _vm(p),
                          f"one of {len(shares)} vhost workers does the work ({busiest.tid}: "
                          f"{top:.0%} of a CPU, the others under {BUSY_SHARE * top:.0%}): "
                          "traffic uses one queue pair",
                          tuple((f"/proc/{w.tid}/stat utime+stime", f"{b:.0%}")
                                for w, b in shares),
                          "in the guest: ethtool -L <nic> combined N; a single flow always "
                          "hashes to one queue (use several flows to spread)", pid=p.pid)


PROCESS_CHECKS = (check_vhost_use, check_nic_model, check_driver, check_tap_state,
                  check_multiqueue, check_device_options, check_macvtap, check_worker_cpus,
                  check_rates)
HOST_CHECKS = (check_vhost_available, check_zerocopy, check_br_netfilter, check_bridge_down,
               check_orphan_taps)


def diagnose(f: Facts) -> Report:
    """Run every check over ``f``; the findings errors first, then warnings, then info."""
    report = Report(kernel=f.survey.kernel, window=f.window,
                    subjects=[_vm(p) for p in f.processes] + [f"tap {t}" for t in f.taps])
    items: list[Finding | NotRun] = []
    for hcheck in HOST_CHECKS:
        items.extend(hcheck(f))
    for p in f.processes:
        args = parse_argv(p.argv) if p.kind == "qemu" else QemuArgs()
        for pcheck in PROCESS_CHECKS:
            items.extend(pcheck(f, p, args))
    report.findings = [it for it in items if isinstance(it, Finding)]
    report.not_run = [it for it in items if isinstance(it, NotRun)]
    if f.later is None and f.processes:
        report.not_run += [NotRun(c, "every subject", "a rate: run with --watch SECONDS")
                           for c in RATE_CHECKS]
    report.findings.sort(key=lambda x: SEVERITIES.index(x.severity))
    return report


# -- the command ------------------------------------------------------------------------------

def _all_taps(scanner: Scanner) -> list[TapLink]:
    base = os.path.join(scanner.sys, "class", "net")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    return [link for link in (scanner.tap_link(n) for n in names)
            if link.tun_flags is not None]


def _select(survey: Survey, taps: list[TapLink],
            targets: list[str]) -> tuple[list[VmProcess], list[str]]:
    if not targets:
        return list(survey.processes), []
    wanted = set(targets)
    procs = [p for p in survey.processes
             if {str(p.pid), p.name, p.comm} & wanted or {n.tap for n in p.nics} & wanted]
    held = {n.tap for p in procs for n in p.nics}
    loose = [t.name for t in taps if t.name in wanted and t.name not in held]
    missing = wanted - {str(p.pid) for p in procs} - {p.name for p in procs} \
        - {p.comm for p in procs} - held - set(loose)
    if missing:
        raise VhostctlError("doctor", errno.ESRCH,
                            f"no VM, process or tap matches {' '.join(sorted(missing))}",
                            hint="give a pid, VM name, command name or tap name; plain "
                            "`vhostctl doctor` checks every VM on the host")
    return procs, loose


def doctor(targets: Iterable[str] = (), *, qmp_path: str | None = None,
           watch: float | None = None, timeout: float = 5.0, proc: str = "/proc",
           sys: str = "/sys", paths: HostPaths | None = None,
           sleep: Callable[[float], None] = time.sleep) -> Report:
    """Scan (twice, ``watch`` seconds apart, when asked), add QEMU's view from ``qmp_path``,
    run every check on the processes and taps named by ``targets`` (default: all)."""
    hp = paths or HostPaths(proc=proc, sys=sys)
    scanner = Scanner(proc, sys)
    first = scanner.scan()
    taps = _all_taps(scanner)
    wanted = list(targets)
    procs, loose = _select(first, taps, wanted)
    if qmp_path:
        from .qmp import QmpClient

        with QmpClient.connect(qmp_path, timeout) as client:
            view = qmp_view(client)
        if attach_qmp(first, view, scanner.unix_inodes(qmp_path)) is None:
            raise VhostctlError("doctor", errno.ESRCH, f"no VM listed holds the QMP socket "
                                f"{qmp_path}", hint="give the -qmp socket of a VM that holds "
                                "a tap or /dev/vhost-net")
    later = None
    if watch:
        sleep(watch)
        later = Scanner(proc, sys).scan()
    facts = Facts(survey=first, host=host_report(hp), read=scanner.read, proc=proc, sys=sys,
                  dev=hp.dev, root=hp.root, later=later, window=watch, qmp_socket=qmp_path,
                  all_taps=taps, processes=procs, taps=loose, host_wide=not wanted)
    return diagnose(facts)
