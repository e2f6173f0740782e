"""Add a vhost-net NIC to a running QEMU, and take it away again, over QMP.

The sequence is libvirt's (qemuMonitorAddNetdev/qemuDomainAttachNetDevice): hand every tap
queue fd and one ``/dev/vhost-net`` fd per queue pair to QEMU with ``getfd`` (SCM_RIGHTS),
``netdev_add`` a tap backend that names those fds with ``vhost=on``, then ``device_add`` the
guest NIC.  QEMU calls VHOST_SET_OWNER itself: the vhost fds are handed over untouched.

Undo on any failure, newest step first: ``device_del``, ``netdev_del``, ``closefd`` for fds
not yet consumed (monitor_get_fd() removes a named fd from the monitor when a netdev takes
it, so after a successful ``netdev_add`` there is nothing left to close).  Our own copies of
the fds are closed in every case: QEMU holds its own.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Any

from .errors import ValidationError, VhostctlError, WaitTimeout
from .qmp import DEFAULT_TIMEOUT, QmpClient, QmpCommandError
from .tun import MAX_TAP_QUEUES, Tap, validate_ifname
from .vhost import VhostNet

# util/id.c id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
UNPLUG_TIMEOUT = 10.0


def validate_id(value: str, what: str = "QEMU id") -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or len(value) > 64:
        raise ValidationError(what, f"{value!r}: QEMU ids start with a letter and use letters, "
                              "digits, '-', '.', '_' (at most 64 here)")
    return value


def validate_device(driver: str) -> str:
    """vhost-net serves virtio-net only: another NIC model would never start it."""
    if not _TOKEN_RE.fullmatch(driver or "") or not driver.startswith("virtio-net"):
        raise ValidationError("--device", f"{driver!r}: vhost-net needs a virtio-net device "
                              "(virtio-net-pci, virtio-net-pci-non-transitional, "
                              "virtio-net-device, virtio-net-ccw)")
    return driver


def default_id(tap: str) -> str:
    return f"net-{tap}"


@dataclass
class HotplugResult:
    id: str
    tap: str
    created: bool
    queues: int
    device: str
    bus: str | None
    mac: str | None
    fdnames: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _tap_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def device_args(nic_id: str, device: str, queues: int, mac: str | None,
                bus: str | None) -> dict[str, Any]:
    """device_add arguments; multiqueue needs mq=on and 2*N+2 MSI-X vectors (QEMU docs)."""
    args: dict[str, Any] = {"driver": device, "id": nic_id, "netdev": nic_id}
    if mac:
        args["mac"] = mac
    if bus:
        args["bus"] = bus
    if queues > 1:
        args["mq"] = True
        if device.startswith("virtio-net-pci"):
            args["vectors"] = 2 * queues + 2
    return args


def hotplug(qmp_path: str, tap: str, *, queues: int = 1, nic_id: str | None = None,
            mac: str | None = None, device: str = "virtio-net-pci", bus: str | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> HotplugResult:
    """Attach (or create) tap ``tap`` with ``queues`` queues and plug it into the VM."""
    from .netlink import validate_mac

    validate_ifname(tap, op="--tap")
    if not isinstance(queues, int) or not 1 <= queues <= MAX_TAP_QUEUES:
        raise ValidationError("--queues", f"{queues!r}: must be 1..{MAX_TAP_QUEUES}")
    nic_id = validate_id(nic_id or default_id(tap), "--id")
    mac = validate_mac(mac) if mac else None
    validate_device(device)
    if bus is not None and not _TOKEN_RE.fullmatch(bus):
        raise ValidationError("--bus", f"{bus!r}: a QEMU bus id such as pcie.0 or a root "
                              "port's id")
    with QmpClient.connect(qmp_path, timeout) as qmp:
        created = not _tap_exists(tap)
        # IFF_TUN_EXCL when creating: never bring up someone else's tap made meanwhile.
        taps = Tap.open_queues(tap, queues, vnet_hdr=True, exclusive=created)
        vhosts: list[VhostNet] = []
        try:
            for _ in range(queues):
                vhosts.append(VhostNet())
            if created:
                _link_up(taps[0].name)
            result = HotplugResult(id=nic_id, tap=taps[0].name, created=created,
                                   queues=queues, device=device, bus=bus, mac=mac)
            _plug(qmp, result, [t.fileno() for t in taps], [v.fileno() for v in vhosts])
            return result
        finally:
            for obj in (*vhosts, *taps):
                obj.close()


def _link_up(name: str) -> None:
    from .netlink import Netlink

    with Netlink() as nl:
        nl.set_up(name)


def _plug(qmp: QmpClient, r: HotplugResult, tapfds: list[int], vhostfds: list[int]) -> None:
    undo: list[tuple[str, dict[str, Any]]] = []
    try:
        names: dict[str, list[str]] = {"tap": [], "vhost": []}
        for kind, fds in (("tap", tapfds), ("vhost", vhostfds)):
            for i, fd in enumerate(fds):
                name = f"{r.id}-{kind}{i}"
                qmp.execute("getfd", {"fdname": name}, fds=[fd])
                undo.append(("closefd", {"fdname": name}))
                names[kind].append(name)
        r.fdnames = names
        qmp.execute("netdev_add", {"type": "tap", "id": r.id, "fds": ":".join(names["tap"]),
                                   "vhostfds": ":".join(names["vhost"]), "vhost": True})
        # The netdev consumed the named fds (monitor_get_fd); only it is left to undo.
        undo = [("netdev_del", {"id": r.id})]
        qmp.execute("device_add", device_args(r.id, r.device, r.queues, r.mac, r.bus))
        undo.append(("device_del", {"id": r.id}))
        _verify(qmp, r.id)
    except BaseException as e:
        failed = []
        for command, args in reversed(undo):
            why = qmp.try_execute(command, args)
            if why is None and command == "device_del":
                try:
                    qmp.wait_event("DEVICE_DELETED", device=r.id)
                except VhostctlError as w:
                    why = str(w)
            if why:
                failed.append(why)
        if failed and isinstance(e, VhostctlError):
            e.hint = "; ".join(filter(None, [e.hint, "undo incomplete: " + "; ".join(failed)]))
        raise


def _verify(qmp: QmpClient, nic_id: str) -> None:
    """The NIC must now be a peer of our netdev (HMP info network, the one listing of both)."""
    from .survey import parse_info_network

    text = qmp.execute("human-monitor-command", {"command-line": "info network"})
    for entry in parse_info_network(text if isinstance(text, str) else ""):
        if entry["id"] == nic_id and any(p["id"] == nic_id and p["type"] == "tap"
                                         for p in entry.get("peers", ())):
            return
    raise VhostctlError(f"QMP device_add {nic_id}", 0,
                        "QEMU accepted the device but does not list it with its tap netdev")


@dataclass
class UnplugResult:
    id: str
    device_removed: bool
    netdev_removed: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def unplug(qmp_path: str, nic_id: str, *, timeout: float = DEFAULT_TIMEOUT,
           unplug_timeout: float = UNPLUG_TIMEOUT) -> UnplugResult:
    """device_del, wait for DEVICE_DELETED (the guest must release a PCI device), netdev_del."""
    validate_id(nic_id, "--id")
    with QmpClient.connect(qmp_path, timeout) as qmp:
        device = netdev = True
        try:
            qmp.execute("device_del", {"id": nic_id})
        except QmpCommandError as e:
            if e.error_class != "DeviceNotFound":
                raise
            device = False
        if device:
            try:
                qmp.wait_event("DEVICE_DELETED", unplug_timeout, device=nic_id)
            except WaitTimeout as e:
                e.hint = ("the guest did not release the device: PCI unplug needs the guest's "
                          "consent (ACPI or PCIe native hotplug); the netdev was left in place")
                raise
        try:
            qmp.execute("netdev_del", {"id": nic_id})
        except QmpCommandError as e:
            if e.error_class != "DeviceNotFound" and "not found" not in e.desc:
                raise
            netdev = False
        if not device and not netdev:
            raise VhostctlError(f"unplug {nic_id}", 0, f"QEMU has no device or netdev "
                                f"named {nic_id!r}",
                                hint="list them with: vhostctl inspect --qmp SOCKET")
        return UnplugResult(id=nic_id, device_removed=device, netdev_removed=netdev)
