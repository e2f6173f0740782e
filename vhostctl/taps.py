"""Tap management for ``vhostctl tap add|del|list|show``: composition of tun and netlink.

``add`` works like ``ip tuntap add``: the tap it makes is always persistent, since one made
by a command that then exits would vanish with it.  Everything is validated and every name
resolved before the kernel is asked; the tap is created with IFF_TUN_EXCL (never
check-then-create); persistence is set last, so on any failure closing the queue fds removes
everything that was done.

Holders of tap queues are found in ``/proc/PID/fdinfo/FD`` (``iff:\\t<name>``, written by
tun_chr_show_fdinfo() in drivers/net/tun.c); the scan survives processes and fds vanishing
under it, and its procfs root is a parameter.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import os
import pwd
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _fd
from ._uapi import if_tun as T
from .errors import IoctlError, UnsupportedError, ValidationError, VhostctlError
from .netlink import IFF_LOWER_UP, Link, Netlink, validate_mac, validate_netns
from .tun import MAX_TAP_QUEUES, Holder, Tap, scan_holders, validate_ifname
from .tun import HolderScan as HolderScan  # re-exported: list/show report it

# drivers/net/tun.c tun_net_init(): min_mtu = MIN_MTU (68), max_mtu = MAX_MTU (65535) minus
# the hard header, ETH_HLEN (14) for a tap.
TAP_MIN_MTU = 68
TAP_MAX_MTU = 65535 - 14

# set_offload() in drivers/net/tun.c: every offload needs TUN_F_CSUM, TSO_ECN rides on TSO4
# or TSO6, and USO4/USO6 only work together; anything left over is EINVAL.
_NEEDS_CSUM = T.TUN_F_TSO4 | T.TUN_F_TSO6 | T.TUN_F_TSO_ECN | T.TUN_F_UFO | T.TUN_F_USO4 \
    | T.TUN_F_USO6

_STATS = ("rx_packets", "rx_bytes", "rx_errors", "rx_dropped",
          "tx_packets", "tx_bytes", "tx_errors", "tx_dropped")


# -- validation ------------------------------------------------------------------------------


def _resolve_id(what: str, value: str | int, lookup: Callable[[str], int]) -> int:
    """A numeric id as given (ASCII digits only), else ``lookup(name)``; a ValidationError
    for anything the kernel could not take as an owner or group."""
    if isinstance(value, int) or (value.isascii() and value.isdigit()):
        n = int(value)
        if not 0 <= n < 2**32 - 1:  # (uid_t)-1 means "no owner" to the kernel
            raise ValidationError(what, f"{what} id {n} out of range 0..{2**32 - 2}")
        return n
    try:
        return lookup(value)
    except (KeyError, ValueError):  # unknown, or not a name at all (an embedded NUL)
        raise ValidationError(what, f"no such {'user' if what == 'owner' else what} "
                              f"{value!r}") from None


def resolve_user(user: str | int) -> int:
    """A uid from a user name or number; unknown names are a ValidationError."""
    return _resolve_id("owner", user, lambda name: pwd.getpwnam(name).pw_uid)


def resolve_group(group: str | int) -> int:
    """A gid from a group name or number; unknown names are a ValidationError."""
    return _resolve_id("group", group, lambda name: grp.getgrnam(name).gr_gid)


def user_name(uid: int | None) -> str | None:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int | None) -> str | None:
    if gid is None:
        return None
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def invoking_uid() -> int:
    """The user who asked: the one behind sudo (SUDO_UID) when run through it, else the
    effective uid.

    A persistent tap with neither owner nor group can be attached by *any* process that can
    open /dev/net/tun: tun_not_capable() in drivers/net/tun.c refuses a caller only when an
    owner or group is set and does not match.  (Commit 3ca459eaba1b, "tun: fix group
    permission check", required CAP_NET_ADMIN there instead and reached some stable kernels
    before it was reverted in 2025: on those only root may attach.)  So ``tap add`` never
    leaves both unset.
    """
    sudo = os.environ.get("SUDO_UID", "")
    if os.geteuid() == 0 and sudo.isdigit() and int(sudo) < 2**32 - 1:
        return int(sudo)
    return os.geteuid()


def random_mac() -> str:
    """A random locally administered unicast MAC starting with 0xfe.

    A Linux bridge takes the numerically lowest port MAC as its own (br_stp_recalculate_
    bridge_id() in net/bridge/br_stp_if.c); 0xfe keeps a tap from becoming that one.
    """
    return "fe:" + ":".join(f"{b:02x}" for b in os.urandom(5))


def parse_offloads(text: str | Iterable[str] | None, *, vnet_hdr: bool) -> int:
    """TUN_F_* bits from names (``csum,tso4``), checked against set_offload()'s rules."""
    if not text:
        return 0
    value = T.OFFLOADS.encode(text)
    if value & ~T.OFFLOADS.mask:  # "bit40"/"0x..." spellings name bits, not offloads
        raise ValidationError("offload", f"{text!r} names bits that are not offloads",
                              hint="valid: " + ", ".join(T.OFFLOADS.short_names()))
    if value and not vnet_hdr:
        raise ValidationError("offload", "offloads need a vnet header: drop --no-vnet-hdr")
    if value & _NEEDS_CSUM and not value & T.TUN_F_CSUM:
        raise ValidationError("offload", "every other offload needs csum: add csum")
    if value & T.TUN_F_TSO_ECN and not value & (T.TUN_F_TSO4 | T.TUN_F_TSO6):
        raise ValidationError("offload", "tso_ecn needs tso4 or tso6")
    if bool(value & T.TUN_F_USO4) != bool(value & T.TUN_F_USO6):
        raise ValidationError("offload", "the kernel takes uso4 and uso6 only together")
    return value


@dataclass(frozen=True)
class TapSpec:
    """A validated request for one tap: numbers resolved, nothing left to look up.

    ``mac``/``mtu`` None mean "random" / "the bridge's, else the kernel default"; they are
    compared with an existing tap only when given.
    """

    name: str
    queues: int = 1
    vnet_hdr: bool = True
    owner: int | None = None
    group: int | None = None
    bridge: str | None = None
    mtu: int | None = None
    mac: str | None = None
    netns: str | None = None
    offloads: int = 0

    @property
    def multi_queue(self) -> bool:
        return self.queues > 1


def make_spec(name: str, *, queues: int = 1, vnet_hdr: bool = True,
              owner: str | int | None = None, group: str | int | None = None,
              bridge: str | None = None, mtu: int | None = None, mac: str | None = None,
              netns: str | None = None,
              offloads: str | Iterable[str] | None = None) -> TapSpec:
    """Validate everything that can be checked without the kernel."""
    validate_ifname(name, op="tap name")
    if not isinstance(queues, int) or not 1 <= queues <= MAX_TAP_QUEUES:
        raise ValidationError("queues", f"{queues}: must be 1..{MAX_TAP_QUEUES}")
    if mtu is not None and not TAP_MIN_MTU <= mtu <= TAP_MAX_MTU:
        raise ValidationError("mtu", f"{mtu}: a tap takes {TAP_MIN_MTU}..{TAP_MAX_MTU}")
    if bridge is not None:
        validate_ifname(bridge, op="bridge name")
        if netns is not None:
            raise ValidationError("bridge", "--bridge and --netns exclude each other: the "
                                  "bridge is in this namespace, the tap would not be")
    if owner is None and group is None:
        owner = invoking_uid()
    return TapSpec(
        name=name, queues=queues, vnet_hdr=vnet_hdr,
        owner=resolve_user(owner) if owner is not None else None,
        group=None if group is None else resolve_group(group),
        bridge=bridge, mtu=mtu,
        mac=None if mac is None else validate_mac(mac),
        netns=None if netns is None else validate_netns(netns),
        offloads=parse_offloads(offloads, vnet_hdr=vnet_hdr),
    )


# -- reading taps back -----------------------------------------------------------------------


_SYS_pidfd_getfd = 438  # the same on every architecture but alpha (unified syscall table)


def _pidfd_getfd(pidfd: int, targetfd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd: int = libc.syscall(_SYS_pidfd_getfd, pidfd, targetfd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def holder_vnet_hdr_sz(name: str, holders: list[Holder]) -> int | None:
    """The tap's vnet header size, read through a copy of a holder's fd (pidfd_getfd).

    Reading it otherwise means attaching a queue, which would disturb a running VM.  The
    copied fd is close-on-exec (pidfd_getfd(2) always sets it) and closed at once.  The
    holder may have closed that fd number and reused it since the scan, so the copy is
    identified by the kernel (rdev 10:200, TUNGETIFF naming ``name``) before any TUN ioctl.
    Needs ptrace rights over the holder; None when that or anything else fails.
    """
    for h in holders:
        try:
            pidfd = _fd.call(f"pidfd_open({h.pid})", os.pidfd_open, h.pid)
        except VhostctlError:
            continue
        try:
            fd = _fd.call(f"pidfd_getfd({h.pid}, {h.fd})", _pidfd_getfd, pidfd, h.fd)
        except VhostctlError:
            continue
        finally:
            _fd.close(pidfd)
        try:
            tap = Tap.adopt(fd, name)
        except VhostctlError:
            continue
        with tap:
            try:
                return tap.vnet_hdr_sz
            except VhostctlError:
                continue
    return None


@dataclass(frozen=True)
class TapInfo:
    """One tun/tap as list/show report it."""

    name: str
    ifindex: int
    type: str | None
    flags: list[str]
    persist: bool | None
    vnet_hdr: bool | None
    multi_queue: bool | None
    queues: int | None
    disabled_queues: int | None
    vnet_hdr_sz: int | None
    owner: int | None
    owner_name: str | None
    group: int | None
    group_name: str | None
    mtu: int | None
    mac: str | None
    up: bool
    operstate: str | None
    master: str | None
    stats: dict[str, int]
    holders: list[Holder] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tun_flags(link: Link) -> list[str]:
    """The IFF_* names TUNGETIFF would report, rebuilt from IFLA_TUN_* attributes."""
    t = link.tun
    if t is None:
        return []
    flags = T.IFF_TAP if t.type == "tap" else T.IFF_TUN if t.type == "tun" else 0
    for on, bit in ((t.pi is False, T.IFF_NO_PI), (t.vnet_hdr, T.IFF_VNET_HDR),
                    (t.multi_queue, T.IFF_MULTI_QUEUE), (t.persist, T.IFF_PERSIST)):
        if on:
            flags |= bit
    return T.IFF_FLAGS.decode(flags)


# Links whose queues a VMM opens as a char device (/dev/tapN, drivers/net/tap.c): listed with
# their kind; they have no tun flags, owner or group.
VTAP_KINDS = ("macvtap", "ipvtap")


def tap_info(link: Link, holders: list[Holder]) -> TapInfo:
    """A :class:`TapInfo` from a netlink link and its holders (no kernel calls but one
    pidfd_getfd per tap for the vnet header size)."""
    t = link.tun
    if t is None and link.kind in VTAP_KINDS:
        return TapInfo(
            name=link.name, ifindex=link.ifindex, type=link.kind, flags=[], persist=None,
            vnet_hdr=None, multi_queue=None, queues=None, disabled_queues=None,
            vnet_hdr_sz=None, owner=None, owner_name=None, group=None, group_name=None,
            mtu=link.mtu, mac=link.mac, up=link.up, operstate=link.operstate,
            master=link.master, stats={k: link.stats[k] for k in _STATS if k in link.stats},
            holders=list(holders))
    if t is None:
        raise ValidationError("tap", f"{link.name} is not a tun/tap link (kind {link.kind})")
    warnings = []
    if t.persist and t.owner is None and t.group is None:
        warnings.append(f"{link.name} is persistent with neither owner nor group: on most "
                        "kernels any process that can open /dev/net/tun may attach a queue to "
                        f"it; recreate it with one: vhostctl tap del {link.name}; vhostctl "
                        f"tap add {link.name} --owner USER")
    queues, disabled = t.num_queues, t.num_disabled_queues
    if not t.multi_queue:
        # tun_fill_info() counts queues of multi-queue taps only.  A single-queue tap has
        # one while a process holds it or its carrier is on (tun_attach() turns it on,
        # the last __tun_detach() off); LOWER_UP shows the carrier only while up.
        carrier = link.up and bool(link.flags & IFF_LOWER_UP)
        queues, disabled = (1 if holders or carrier else 0), 0
    return TapInfo(
        name=link.name, ifindex=link.ifindex, type=t.type, flags=_tun_flags(link),
        persist=t.persist, vnet_hdr=t.vnet_hdr, multi_queue=t.multi_queue,
        queues=queues, disabled_queues=disabled,
        vnet_hdr_sz=holder_vnet_hdr_sz(link.name, holders) if holders else None,
        owner=t.owner, owner_name=user_name(t.owner),
        group=t.group, group_name=group_name(t.group),
        mtu=link.mtu, mac=link.mac, up=link.up, operstate=link.operstate,
        master=link.master, stats={k: link.stats[k] for k in _STATS if k in link.stats},
        holders=list(holders), warnings=warnings,
    )


@dataclass(frozen=True)
class TapList:
    taps: list[TapInfo]
    unreadable_processes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"taps": [t.to_dict() for t in self.taps],
                "unreadable_processes": self.unreadable_processes}


def list_taps(nl: Netlink | None = None, *, proc: str = "/proc") -> TapList:
    """Every tun/tap, macvtap and ipvtap in this namespace with its holders (tun fds)."""
    own = nl is None
    nl = nl or Netlink()
    try:
        links = [x for x in nl.links() if x.kind in ("tun", *VTAP_KINDS)]
    finally:
        if own:
            nl.close()
    scan = scan_holders(proc)
    return TapList([tap_info(x, scan.by_name.get(x.name, [])) for x in links],
                   scan.unreadable)


def show_tap(name: str, nl: Netlink | None = None, *, proc: str = "/proc") -> TapInfo:
    """One tun/tap; a link of another kind is refused."""
    validate_ifname(name, op="tap name")
    own = nl is None
    nl = nl or Netlink()
    try:
        link = nl.link(name)
    finally:
        if own:
            nl.close()
    if not link.is_tun and link.kind not in VTAP_KINDS:
        raise ValidationError("tap show", f"{name} is a {link.kind or 'plain'} link, not "
                              "a tun/tap")
    return tap_info(link, scan_holders(proc).by_name.get(name, []))


# -- add -------------------------------------------------------------------------------------


def differences(spec: TapSpec, link: Link, *, mtu: int | None) -> list[str]:
    """How an existing link differs from what ``spec`` would create ([] = identical).

    A persistent tap does not remember how many queues it had, only whether it is
    multi-queue, so queues compare as multi-queue or not.  Offloads are not visible over
    rtnetlink and are set again by whoever attaches, so they are not compared.
    """
    if not link.is_tun or link.tun is None:
        return [f"kind is {link.kind or 'none'}, want tun (tap)"]
    t = link.tun

    rows: list[tuple[str, Any, Any]] = [
        ("type", t.type, "tap"),
        ("pi", t.pi, False),
        ("vnet_hdr", t.vnet_hdr, spec.vnet_hdr),
        ("multi_queue", t.multi_queue, spec.multi_queue),
        ("persist", t.persist, True),
        ("owner", t.owner, spec.owner),
        ("group", t.group, spec.group),
        ("master", link.master, spec.bridge),
        ("up", link.up, True),
    ]
    if mtu is not None:
        rows.append(("mtu", link.mtu, mtu))
    if spec.mac is not None:
        rows.append(("mac", (link.mac or "").lower() or None, spec.mac))
    return [f"{label} is {_shown(label, have)}, want {_shown(label, want)}"
            for label, have, want in rows if have != want]


def _shown(label: str, value: Any) -> str:
    if value is None:
        return "none"
    if label == "owner":
        return f"{value} ({user_name(value)})"
    if label == "group":
        return f"{value} ({group_name(value)})"
    return str(value)


def create(spec: TapSpec, nl: Netlink, *, persist: bool, mtu: int | None = None,
           bridge_mac: str | None = None) -> list[Tap]:
    """Create the tap and configure it; return its open queue fds (the caller closes them).

    Order: queues (IFF_TUN_EXCL) -> owner/group -> offloads -> MTU, MAC, master, up (or the
    namespace move) -> persist last.  On any failure every fd is closed before the error
    propagates: the tap is not persistent yet, so the kernel deletes it with its last fd;
    the bridge gets back ``bridge_mac``, the address it had before (see
    :func:`restore_bridge_mac`).
    """
    taps = Tap.open_queues(spec.name, spec.queues, vnet_hdr=spec.vnet_hdr, exclusive=True)
    try:
        first = taps[0]
        if spec.owner is not None:
            first.set_owner(spec.owner)
        if spec.group is not None:
            first.set_group(spec.group)
        if spec.offloads:
            try:
                first.set_offload(spec.offloads)
            except IoctlError as e:
                if e.errno != errno.EINVAL:
                    raise
                names = [n.removeprefix("TUN_F_").lower()
                         for n in T.OFFLOADS.decode(spec.offloads)]
                raise UnsupportedError(
                    "TUNSETOFFLOAD", "this kernel refuses the offload set " + ",".join(names),
                    hint="uso4/uso6 need Linux 6.2, udp_tunnel_gso 6.17") from None
        mtu = spec.mtu if spec.mtu is not None else mtu
        if mtu is not None:
            nl.set_mtu(spec.name, mtu)
        nl.wait_udev(spec.name)  # else udev may replace the address afterwards
        nl.set_mac(spec.name, spec.mac or random_mac())
        if spec.bridge is not None:
            nl.set_master(spec.name, spec.bridge)
        if spec.netns is not None:
            nl.set_netns(spec.name, spec.netns, up=True)
        else:
            nl.set_up(spec.name)
        if persist:
            first.set_persist(True)
    except BaseException:
        for t in taps:
            t.close()
        if spec.bridge is not None:
            restore_bridge_mac(nl, spec.bridge, bridge_mac)
        raise
    return taps


def restore_bridge_mac(nl: Netlink, bridge: str, mac: str | None) -> None:
    """Give a bridge back the address it had before our tap joined it and left again.

    A bridge whose address was never set follows its ports: with our tap as its only port
    it takes the tap's address, and once the tap is gone it keeps a zero address
    (br_stp_recalculate_bridge_id() in net/bridge/br_stp_if.c; seen on 6.12, not on 6.1).
    Best effort, on failure paths only: the error being reported matters more.
    """
    if mac is None:
        return
    with contextlib.suppress(VhostctlError):
        now = nl.find(bridge)
        if now is not None and (now.mac or "").lower() != mac.lower():
            nl.set_mac(bridge, mac)


@dataclass(frozen=True)
class AddResult:
    created: bool
    tap: TapInfo

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "tap": self.tap.to_dict()}


def _bridge(nl: Netlink, bridge: str) -> Link:
    link = nl.find(bridge)
    if link is None:
        raise ValidationError("bridge", f"{bridge!r} does not exist",
                              hint=f"create it: ip link add {bridge} type bridge")
    if not link.is_bridge:
        raise ValidationError("bridge", f"{bridge!r} is a {link.kind or 'plain'} link, not a "
                              "bridge")
    return link


# How long ``--exist-ok`` waits for a tap that a concurrent ``tap add`` is still configuring
# (it becomes persistent last) before comparing it; generous, since a busy or emulated host
# may take seconds, and only a non-persistent tap held by a running process waits it out.
SETTLE_SECONDS = 20.0


def _find_settled(nl: Netlink, name: str, deadline: float, wait: bool) -> Link | None:
    """The link called ``name``; with ``wait``, once it is no longer a tap being set up
    (not yet persistent) or the deadline has passed.  None if there is (or is no longer) one.
    Polls with a growing pause, so waiting contenders do not starve the one that creates.
    """
    link = nl.find(name)
    pause = 0.02
    while (wait and link is not None and link.tun is not None and not link.tun.persist
           and time.monotonic() < deadline):
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.5)
        link = nl.find(name)
    return link


def _remove_created(name: str, nl: Netlink, err: BaseException) -> None:
    """Delete a tap this command created, when a later step failed (RTM_DELLINK)."""
    try:
        nl.delete(name)
    except VhostctlError as e:
        if isinstance(err, VhostctlError):
            err.hint = "; ".join(filter(None, [
                err.hint, f"{name} was created but could not be removed again ({e}): "
                f"vhostctl tap del {name}"]))


def add(spec: TapSpec, *, exist_ok: bool = False, nl: Netlink | None = None,
        proc: str = "/proc") -> AddResult:
    """``tap add``: create a persistent tap as ``spec`` says, or accept an identical one."""
    own = nl is None
    nl = nl or Netlink()
    ns_nl = Netlink(netns=spec.netns) if spec.netns else nl
    try:
        br = _bridge(nl, spec.bridge) if spec.bridge is not None else None
        bridge_mac = br.mac if br is not None else None
        mtu = br.mtu if br is not None else spec.mtu
        deadline = time.monotonic() + SETTLE_SECONDS
        existing = _find_settled(ns_nl, spec.name, deadline, exist_ok) if spec.netns else None
        created = False
        while existing is None:
            try:
                for t in create(spec, nl, persist=True, mtu=mtu, bridge_mac=bridge_mac):
                    t.close()
                created = True
                break
            except IoctlError as e:
                if e.errno != errno.EBUSY:
                    raise
            # IFF_TUN_EXCL: the name is taken (tun_set_iff() in drivers/net/tun.c).
            if spec.netns:
                raise VhostctlError(f"tap add {spec.name}", errno.EEXIST,
                                    "a link of that name exists in this namespace, "
                                    f"not in {spec.netns}")
            existing = _find_settled(nl, spec.name, deadline, exist_ok)
            if existing is None and time.monotonic() >= deadline:
                raise VhostctlError(f"tap add {spec.name}", errno.EBUSY,
                                    hint="the name was taken and freed again while we "
                                    "tried; retry")
        if existing is not None:
            if not existing.is_tun:
                raise VhostctlError(f"tap add {spec.name}", errno.EEXIST,
                                    f"exists and is not a tap (kind is "
                                    f"{existing.kind or 'none'})", hint="choose another name")
            if not exist_ok:
                raise VhostctlError(f"tap add {spec.name}", errno.EEXIST,
                                    hint="pass --exist-ok to accept an identical tap")
            diff = differences(spec, existing, mtu=mtu)
            if diff:
                raise VhostctlError(f"tap add {spec.name}", errno.EEXIST,
                                    "exists and differs: " + "; ".join(diff))
        try:
            link = ns_nl.link(spec.name)
            # A tap we just created exclusively and closed has no holder: skip the scan of
            # every process's fds (the slowest part of add on a busy host).
            holders = [] if spec.netns or created else \
                scan_holders(proc).by_name.get(spec.name, [])
            return AddResult(created, tap_info(link, holders))
        except BaseException as e:
            if created:  # "failed" must mean "nothing changed": take the new tap away again
                _remove_created(spec.name, ns_nl, e)
                if spec.bridge is not None:
                    restore_bridge_mac(nl, spec.bridge, bridge_mac)
            raise
    finally:
        if ns_nl is not nl:
            ns_nl.close()
        if own:
            nl.close()


# -- del -------------------------------------------------------------------------------------


def delete(name: str, nl: Netlink | None = None, *, proc: str = "/proc") -> None:
    """``tap del``: remove a tun/tap that nobody holds; refuse any other kind of link.

    Done as ``ip tuntap del`` does (iproute2 ip/iptuntap.c): attach a queue, clear
    persistence, close; the kernel frees the device with its last queue.  That needs only
    what attaching needs, so the tap's owner can delete it without CAP_NET_ADMIN.
    """
    validate_ifname(name, op="tap name")
    own = nl is None
    nl = nl or Netlink()
    try:
        link = nl.find(name)
        if link is None:
            raise VhostctlError(f"tap del {name}", errno.ENODEV, "no such tap")
        if not link.is_tun or link.tun is None:
            raise ValidationError(f"tap del {name}", f"{name} is a {link.kind or 'plain'} "
                                  "link, not a tun/tap: vhostctl deletes only tun/tap devices")
        t = link.tun
        # Queue counts are reported for multi-queue taps only (tun_fill_info()); attaching
        # to a held single-queue tap fails with EBUSY instead (tun_attach()).
        if (t.num_queues or 0) + (t.num_disabled_queues or 0) > 0:
            raise _busy(name, scan_holders(proc).by_name.get(name, []))
        try:
            tap = Tap.open(name, tap=t.type != "tun", vnet_hdr=bool(t.vnet_hdr),
                           multi_queue=bool(t.multi_queue), no_pi=not t.pi)
        except IoctlError as e:
            if e.errno != errno.EBUSY:
                raise
            raise _busy(name, scan_holders(proc).by_name.get(name, [])) from None
        with tap:
            tap.set_persist(False)
        if nl.find(name) is not None:
            raise _busy(name, scan_holders(proc).by_name.get(name, []))
    finally:
        if own:
            nl.close()


def _busy(name: str, holders: list[Holder]) -> VhostctlError:
    if holders:
        who = ", ".join(f"pid {h.pid} ({h.comm}) fd {h.fd}" for h in holders)
    else:
        who = "no process has a queue fd open: a vhost backend or a passed fd holds it"
    return VhostctlError(f"tap del {name}", errno.EBUSY, f"in use: {who}",
                         hint=f"stop the user first; ip link del {name} removes it anyway")
