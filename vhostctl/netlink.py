"""rtnetlink through pyroute2: the only module that imports it.

Links are looked up, brought up, given an MTU, a MAC, a master or another network namespace
here; taps themselves are created by :mod:`vhostctl.tun` (the kernel offers no rtnetlink
create for tun/tap: tun_validate() in drivers/net/tun.c answers EOPNOTSUPP).  Every request
names its step, so a failure reads "RTM_NEWLINK set mtu 9000 on vt1: Invalid argument".

A :class:`Netlink` takes an injected ``IPRoute`` (tests, or a caller that already has one) or
opens its own on first use and closes it with :meth:`Netlink.close`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import _fd
from ._uapi.bits import BitNames
from .errors import SyscallError, ValidationError, VhostctlError

# net_device_flags, include/uapi/linux/if.h.
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000

LINK_FLAGS = BitNames.from_masks(
    [
        ("UP", IFF_UP),
        ("BROADCAST", 0x2),
        ("DEBUG", 0x4),
        ("LOOPBACK", 0x8),
        ("POINTOPOINT", 0x10),
        ("NOTRAILERS", 0x20),
        ("RUNNING", IFF_RUNNING),
        ("NOARP", 0x80),
        ("PROMISC", 0x100),
        ("ALLMULTI", 0x200),
        ("MASTER", 0x400),
        ("SLAVE", 0x800),
        ("MULTICAST", 0x1000),
        ("PORTSEL", 0x2000),
        ("AUTOMEDIA", 0x4000),
        ("DYNAMIC", 0x8000),
        ("LOWER_UP", IFF_LOWER_UP),
        ("DORMANT", 0x20000),
        ("ECHO", 0x40000),
    ],
    what="link flag",
)

NETNS_RUN_DIR = "/var/run/netns"  # where `ip netns add` bind-mounts named namespaces

# IFLA_TUN_TYPE values: IFF_TUN / IFF_TAP (drivers/net/tun.c tun_fill_info()).
_TUN_TYPES = {1: "tun", 2: "tap"}

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

# Likely causes by (step prefix, errno), for messages that say what to do.
_HINTS: dict[tuple[str, int], str] = {
    ("set mtu", errno.EINVAL): "outside the device's MTU range (ip -d link show: minmtu/maxmtu)",
    ("set master", errno.EINVAL): "the master is not a bridge or bond, or would create a loop",
    ("set master", errno.EBUSY): "the link already has a master",
    ("set master", errno.ELOOP): "enslaving would create a loop",
    ("set netns", errno.EEXIST): "a link of that name already exists in the target namespace",
    ("set netns", errno.EINVAL): "the link cannot change namespace (netns-local device)",
    ("set mac", errno.EADDRNOTAVAIL): "not a valid unicast Ethernet address",
    ("", errno.EPERM): "needs CAP_NET_ADMIN",
    ("", errno.ENODEV): "no such link (it may have just been deleted)",
}


class NetlinkError(VhostctlError):
    """An rtnetlink request was refused; ``op`` names the message, the step and the link."""

    def __init__(self, op: str, err: int, extack: str = "") -> None:
        step = op.split(" ", 1)[1] if " " in op else op
        hints = [(len(p), h) for (p, e), h in _HINTS.items() if e == err and step.startswith(p)]
        super().__init__(op, err, hint=max(hints)[1] if hints else "")
        if extack and extack != os.strerror(err):
            self.detail = f"{self.detail} ({extack})"


@dataclass(frozen=True)
class TunAttrs:
    """IFLA_INFO_DATA of a tun/tap link; fields the kernel did not report stay None.

    Owner and group are only reported when set (tun_fill_info() checks uid_valid/gid_valid).
    """

    type: str | None = None
    pi: bool | None = None
    vnet_hdr: bool | None = None
    persist: bool | None = None
    multi_queue: bool | None = None
    num_queues: int | None = None
    num_disabled_queues: int | None = None
    owner: int | None = None
    group: int | None = None


@dataclass(frozen=True)
class Link:
    """One link as RTM_GETLINK describes it."""

    name: str
    ifindex: int
    flags: int
    mtu: int | None
    mac: str | None
    operstate: str | None
    kind: str | None = None
    master_ifindex: int | None = None
    master: str | None = None
    min_mtu: int | None = None
    max_mtu: int | None = None
    stats: dict[str, int] = field(default_factory=dict)
    tun: TunAttrs | None = None
    txqlen: int | None = None
    alias: str | None = None

    @property
    def up(self) -> bool:
        """Administratively up (IFF_UP), whatever the carrier says."""
        return bool(self.flags & IFF_UP)

    @property
    def flag_names(self) -> list[str]:
        return LINK_FLAGS.decode(self.flags)

    @property
    def is_tun(self) -> bool:
        return self.kind == "tun"

    @property
    def is_bridge(self) -> bool:
        return self.kind == "bridge"


def _bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


def _tun_attrs(data: Any) -> TunAttrs:
    g = data.get_attr
    t = g("IFLA_TUN_TYPE")
    return TunAttrs(
        type=_TUN_TYPES.get(t, None if t is None else str(t)),
        pi=_bool(g("IFLA_TUN_PI")),
        vnet_hdr=_bool(g("IFLA_TUN_VNET_HDR")),
        persist=_bool(g("IFLA_TUN_PERSIST")),
        multi_queue=_bool(g("IFLA_TUN_MULTI_QUEUE")),
        num_queues=g("IFLA_TUN_NUM_QUEUES"),
        num_disabled_queues=g("IFLA_TUN_NUM_DISABLED_QUEUES"),
        owner=g("IFLA_TUN_OWNER"),
        group=g("IFLA_TUN_GROUP"),
    )


def parse_link(msg: Any) -> Link:
    """A :class:`Link` from one RTM_NEWLINK message (pyroute2 ``ifinfmsg``)."""
    g = msg.get_attr
    kind = tun = None
    info = g("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND")
        data = info.get_attr("IFLA_INFO_DATA")
        if kind == "tun" and data is not None and hasattr(data, "get_attr"):
            tun = _tun_attrs(data)
    stats = g("IFLA_STATS64") or g("IFLA_STATS") or {}
    master = g("IFLA_MASTER")
    return Link(
        name=g("IFLA_IFNAME"),
        ifindex=msg["index"],
        flags=msg["flags"],
        mtu=g("IFLA_MTU"),
        mac=g("IFLA_ADDRESS"),
        operstate=g("IFLA_OPERSTATE"),
        kind=kind,
        master_ifindex=master or None,
        min_mtu=g("IFLA_MIN_MTU"),
        max_mtu=g("IFLA_MAX_MTU"),
        stats={k: int(v) for k, v in dict(stats).items() if isinstance(v, int)},
        tun=tun,
        txqlen=g("IFLA_TXQLEN"),
        alias=g("IFLA_IFALIAS") or None,
    )


def validate_mac(mac: str) -> str:
    """A unicast, non-zero Ethernet address as ``aa:bb:cc:dd:ee:ff`` (lower case)."""
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
        raise ValidationError("MAC address", f"{mac!r}: expected six hex pairs like "
                              "fe:12:34:56:78:9a")
    octets = bytes.fromhex(mac.replace(":", ""))
    if octets[0] & 1:
        raise ValidationError("MAC address", f"{mac}: a multicast address (lowest bit of the "
                              "first octet set) cannot be a link address")
    if not any(octets):
        raise ValidationError("MAC address", f"{mac}: the all-zero address is not valid")
    return mac.lower()


UDEV_RUN = Path("/run/udev")


def wait_udev(ifindex: int, timeout: float = 10.0, run: Path = UDEV_RUN) -> bool:
    """Wait until systemd-udevd has handled a new link, so an address set next stays.

    udev gives a new link that has a random address its own (MACAddressPolicy=persistent in
    systemd's 99-default.link) a moment after it appears: tun/tap included, seen 0.1-0.2 s
    after TUNSETIFF under emulation.  An address we set before that is overwritten.  udevd
    marks a device handled by writing its database entry ``/run/udev/data/n<ifindex>`` (what
    sd_device_get_is_initialized() reads).  True at once when no udevd runs (no
    ``/run/udev/control``); False when the entry has not appeared within ``timeout``.
    """
    if not (run / "control").exists():
        return True
    entry = run / "data" / f"n{ifindex}"
    deadline = time.monotonic() + timeout
    while not entry.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def validate_netns(name: str, run_dir: str = NETNS_RUN_DIR) -> str:
    """A named network namespace that exists (as made by ``ip netns add``)."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValidationError("network namespace", f"{name!r} is not a namespace name")
    if not os.path.exists(os.path.join(run_dir, name)):
        raise ValidationError("network namespace", f"{name!r} does not exist in {run_dir}",
                              hint=f"create it: ip netns add {name}")
    return name


CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h


def _netns_socket(netns: str) -> int:
    """An rtnetlink socket (its fd) created inside the named network namespace.

    A socket belongs to the namespace it was created in.  setns(CLONE_NEWNET) changes only
    the calling thread's namespace, so a short-lived thread enters the namespace, creates the
    socket and ends: this process never moves, and nothing is forked (pyroute2's own netns
    support forks a child per socket, which costs seconds under emulation).  The namespace
    must exist: it is opened, never created.
    """
    validate_netns(netns)
    nsfd = _fd.open_dev(os.path.join(NETNS_RUN_DIR, netns), os.O_RDONLY)
    out: dict[str, Any] = {}

    def enter_and_create() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(nsfd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            out["sock"] = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)  # NETLINK_ROUTE
        except OSError as e:
            out["err"] = e.errno or errno.EIO

    try:
        worker = threading.Thread(target=enter_and_create, name=f"netns-{netns}")
        worker.start()
        worker.join()
    finally:
        _fd.close(nsfd)
    if "sock" not in out:
        raise SyscallError(f"rtnetlink socket in netns {netns}", out.get("err", errno.EIO))
    return int(out["sock"].detach())


class Netlink:
    """Verb-shaped link operations over one rtnetlink socket.

    ``ipr`` is an injected pyroute2 ``IPRoute`` (then the caller closes it); otherwise one
    is opened on first use, in ``netns`` when given, and closed by :meth:`close`.
    """

    def __init__(self, ipr: Any = None, *, netns: str | None = None) -> None:
        self._ipr = ipr
        self._owned = ipr is None
        self.netns = netns

    # -- socket ---------------------------------------------------------------------------
    def _ip(self) -> Any:
        if self._ipr is None:
            try:
                from pyroute2 import IPRoute

                _fd.faults.check("rtnetlink socket")
                if self.netns:
                    fd = _netns_socket(self.netns)
                    try:
                        self._ipr = IPRoute(fileno=fd)
                    except BaseException:
                        _fd.close(fd)
                        raise
                else:
                    self._ipr = IPRoute()
            except VhostctlError:
                raise
            except OSError as e:
                where = f" in netns {self.netns}" if self.netns else ""
                raise SyscallError(f"rtnetlink socket{where}", e.errno or errno.EIO) from None
        return self._ipr

    def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None and self._owned:
            ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, op: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

        try:
            _fd.faults.check(op)  # every request is a kernel call the fault tests can fail
            return fn(*args, **kwargs)
        except PyNetlinkError as e:
            extack = str(e.args[1]) if len(e.args) > 1 and e.args[1] else ""
            raise NetlinkError(op, e.code or errno.EIO, extack) from None
        except OSError as e:
            raise NetlinkError(op, e.errno or errno.EIO) from None

    # -- lookups --------------------------------------------------------------------------
    def _resolve_master(self, link: Link) -> Link:
        if link.master_ifindex is None:
            return link
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

        try:
            msgs = self._ip().link("get", index=link.master_ifindex)
        except PyNetlinkError:  # the master vanished between the two requests: keep its index
            return link
        return replace(link, master=msgs[0].get_attr("IFLA_IFNAME")) if msgs else link

    def find(self, name: str) -> Link | None:
        """The link called ``name``, or None if there is none."""
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

        ip = self._ip()
        try:
            _fd.faults.check(f"RTM_GETLINK {name}")
            msgs = ip.link("get", ifname=name)
        except PyNetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise NetlinkError(f"RTM_GETLINK {name}", e.code or errno.EIO) from None
        except OSError as e:
            raise NetlinkError(f"RTM_GETLINK {name}", e.errno or errno.EIO) from None
        return self._resolve_master(parse_link(msgs[0])) if msgs else None

    def link(self, name: str) -> Link:
        """The link called ``name``; ENODEV as a typed error if there is none."""
        found = self.find(name)
        if found is None:
            raise NetlinkError(f"RTM_GETLINK {name}", errno.ENODEV)
        return found

    def links(self, kind: str | None = None) -> list[Link]:
        """Every link (of one IFLA_INFO_KIND when given), in ifindex order."""
        msgs = self._request("RTM_GETLINK dump", self._ip().get_links)
        parsed = [parse_link(m) for m in msgs]
        by_index = {x.ifindex: x.name for x in parsed}
        out = []
        for x in parsed:
            if kind is not None and x.kind != kind:
                continue
            if x.master_ifindex is not None:
                x = replace(x, master=by_index.get(x.master_ifindex))
            out.append(x)
        return sorted(out, key=lambda x: x.ifindex)

    def tun_links(self) -> list[Link]:
        """Every tun/tap link in this namespace."""
        return self.links(kind="tun")

    def is_bridge(self, name: str) -> bool:
        found = self.find(name)
        return bool(found and found.is_bridge)

    # -- changes --------------------------------------------------------------------------
    def _set(self, name: str, step: str, **attrs: Any) -> None:
        link = self.link(name)
        self._request(f"RTM_NEWLINK {step} on {name}", self._ip().link, "set",
                      index=link.ifindex, **attrs)

    def set_up(self, name: str, up: bool = True) -> None:
        self._set(name, "set up" if up else "set down", state="up" if up else "down")

    def set_mtu(self, name: str, mtu: int) -> None:
        if not isinstance(mtu, int) or mtu <= 0:
            raise ValidationError(f"set mtu on {name}", f"{mtu!r} is not a positive integer")
        self._set(name, f"set mtu {mtu}", mtu=mtu)

    def wait_udev(self, name: str, timeout: float = 10.0) -> bool:
        """:func:`wait_udev` for a link by name: call it between creating a link and giving it
        an address."""
        return wait_udev(self.link(name).ifindex, timeout)

    def set_mac(self, name: str, mac: str) -> None:
        mac = validate_mac(mac)
        self._set(name, f"set mac {mac}", address=mac)

    def set_master(self, name: str, master: str | None) -> None:
        """Enslave ``name`` to ``master`` (a bridge), or release it with None."""
        if master is None:
            self._set(name, "set nomaster", master=0)
            return
        m = self.link(master)
        self._set(name, f"set master {master}", master=m.ifindex)

    def set_txqlen(self, name: str, txqlen: int) -> None:
        if not isinstance(txqlen, int) or not 0 <= txqlen < 2**32:
            raise ValidationError(f"set txqueuelen on {name}", f"{txqlen!r} is not 0..2^32-1")
        self._set(name, f"set txqueuelen {txqlen}", txqlen=txqlen)

    def set_alias(self, name: str, alias: str | None) -> None:
        """IFLA_IFALIAS; None or "" clears it (dev_set_alias() in net/core/dev.c frees an
        empty alias).  At most IFALIASZ - 1 (255) bytes."""
        text = alias or ""
        if len(text.encode()) > 255:
            raise ValidationError(f"set alias on {name}", "longer than 255 bytes (IFALIASZ)")
        self._set(name, "set alias" if text else "set noalias", ifalias=text)

    def add_bridge(self, name: str) -> None:
        """RTM_NEWLINK with IFLA_INFO_KIND bridge (NLM_F_EXCL: an existing name is EEXIST)."""
        self._request(f"RTM_NEWLINK add bridge {name}", self._ip().link, "add", ifname=name,
                      kind="bridge")

    def set_netns(self, name: str, netns: str, *, up: bool = False) -> None:
        """Move ``name`` into the named namespace; with ``up`` bring it up there.

        One message does both: do_setlink() (net/core/rtnetlink.c) changes the namespace
        before it applies ifi_flags, so the link comes up in its new namespace.
        """
        validate_netns(netns)
        fd = _fd.open_dev(os.path.join(NETNS_RUN_DIR, netns), os.O_RDONLY)
        try:
            extra = {"state": "up"} if up else {}
            self._set(name, f"set netns {netns}" + (" up" if up else ""), net_ns_fd=fd, **extra)
        finally:
            _fd.close(fd)

    def delete(self, name: str) -> None:
        """RTM_DELLINK: tun devices get unregister_netdevice_queue as their dellink."""
        link = self.link(name)
        self._request(f"RTM_DELLINK {name}", self._ip().link, "del", index=link.ifindex)
