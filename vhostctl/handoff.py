"""Hand a ready datapath to a VMM: open the tap queues and vhost-net fds, then exec the VMM.

This is how an unprivileged QEMU gets vhost-net without ever touching ``/dev/vhost-net`` or
``/dev/net/tun`` itself (libvirt does the same with ``-netdev tap,fds=…,vhostfds=…``):

1. check the command before anything is opened: ``{tapfds}`` and ``{vhostfds}`` appear exactly
   once each, no misspelt placeholder, and whatever the same argument says about queues agrees
   with ``--queues`` (``queues=N``; a singular ``fd=``/``vhostfd=`` takes one fd only);
2. open N queues of the tap (attach to an existing one, or create it, optionally on a bridge)
   and N ``/dev/vhost-net`` fds — never VHOST_SET_OWNER: the owner must be the VMM, which
   calls it at netdev init (vhost_dev_init() in QEMU's hw/virtio/vhost.c);
3. substitute colon-separated fd numbers, make exactly those fds inheritable (every other fd
   above 2 gets FD_CLOEXEC, including any our parent leaked to us);
4. drop privileges in the only safe order (supplementary groups, gid, uid) and verify that no
   capability is left; 5. ``execv`` — no shell anywhere.

Non-persistent taps we create live exactly as long as the VMM holds their fds.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shutil
from dataclasses import dataclass, field
from typing import NoReturn

from . import _fd
from .errors import SyscallError, ValidationError, VhostctlError
from .qemu_cmdline import PLACEHOLDER_RE, parse_opts
from .tun import MAX_TAP_QUEUES, Tap, validate_ifname
from .vhost import VhostNet

TAPFDS = "{tapfds}"
VHOSTFDS = "{vhostfds}"
NEW_TAP_TEMPLATE = "vh%d"


@dataclass(frozen=True)
class Identity:
    """Who the command runs as after the hand-off."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def check_command(argv: list[str], queues: int) -> None:
    """Refuse a command that would not receive exactly the fds we are about to open."""
    if not argv:
        raise ValidationError("exec", "no command given", hint="vhostctl exec [OPTIONS] -- "
                              "qemu-system-x86_64 ... -netdev tap,id=n0,fds={tapfds},"
                              "vhostfds={vhostfds} ...")
    if not 1 <= queues <= MAX_TAP_QUEUES:
        raise ValidationError("--queues", f"{queues}: must be 1..{MAX_TAP_QUEUES}")
    for ph in (TAPFDS, VHOSTFDS):
        count = sum(a.count(ph) for a in argv)
        if count != 1:
            raise ValidationError(
                "exec", f"{ph} appears {count} times in the command; it must appear exactly "
                "once", hint="e.g. -netdev tap,id=n0,fds={tapfds},vhostfds={vhostfds},vhost=on")
    for arg in argv:
        for ph in PLACEHOLDER_RE.findall(arg):
            if ph not in (TAPFDS, VHOSTFDS):
                raise ValidationError("exec", f"unknown placeholder {ph}",
                                      hint="only {tapfds} and {vhostfds} are substituted")
        if TAPFDS in arg or VHOSTFDS in arg:
            _check_counts(arg, queues)


def _check_counts(arg: str, queues: int) -> None:
    opts = parse_opts(arg, "type")
    if not opts:
        return  # not an option list (a plain argument for a custom VMM): nothing to compare
    if "queues" in opts:
        q = str(opts["queues"]).strip()
        if not q.isdigit() or int(q) != queues:
            raise ValidationError("exec", f"the command says queues={q} but --queues is "
                                  f"{queues}", hint="make them agree (QEMU itself refuses "
                                  "queues= together with fds=: drop it there)")
    for key, ph in (("fd", TAPFDS), ("vhostfd", VHOSTFDS)):
        if queues > 1 and ph in str(opts.get(key, "")):
            raise ValidationError("exec", f"{key}= takes one fd but --queues {queues} opens "
                                  f"{queues}", hint=f"use {key}s={ph}")
    vhost = str(opts.get("vhost", "")).lower()
    if VHOSTFDS in arg and vhost in ("off", "false", "no"):
        raise ValidationError("exec", "vhost=off contradicts {vhostfds}: QEMU would ignore "
                              "the vhost-net fds", hint="use vhost=on")


def substitute(argv: list[str], tapfds: list[int], vhostfds: list[int]) -> list[str]:
    """Put colon-separated fd numbers in place of the placeholders (str.replace: JSON-safe)."""
    t = ":".join(str(fd) for fd in tapfds)
    v = ":".join(str(fd) for fd in vhostfds)
    return [a.replace(TAPFDS, t).replace(VHOSTFDS, v) for a in argv]


def _number(text: str) -> bool:
    """A numeric id: ASCII digits only ('²'.isdigit() is True, but int() refuses it)."""
    return text.isascii() and text.isdigit()


def resolve_identity(user: str | None, group: str | None) -> Identity | None:
    """Look the target user up before anything is opened; None means stay who we are."""
    if user is None:
        if group is not None:
            raise ValidationError("--group", "needs --user: a process that stays root keeps "
                                  "every capability", hint="add --user USER")
        return None
    try:
        pw = pwd.getpwuid(int(user)) if _number(user) else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise ValidationError("--user", f"no user {user!r} in the password database") from None
    if pw.pw_uid == 0:
        raise ValidationError("--user", f"{user!r} is root: the command would keep every "
                              "capability", hint="omit --user to run as yourself, or name an "
                              "unprivileged user")
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrgid(int(group)) if _number(group) else grp.getgrnam(group)).gr_gid
        except (KeyError, OverflowError):
            raise ValidationError("--group", f"no group {group!r}") from None
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, gid))))
    if os.geteuid() != 0 and pw.pw_uid != os.getuid():
        raise VhostctlError("setuid", errno.EPERM, hint="only root can run a command as "
                            "another user")
    return Identity(pw.pw_name, pw.pw_uid, gid, groups)


def resolve_executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        where = "is not executable" if "/" in name else "is not in PATH"
        raise ValidationError("exec", f"{name!r} {where}")
    return path


@dataclass
class Datapath:
    """The fds about to be handed over; closing them undoes everything (non-persistent taps)."""

    taps: list[Tap]
    vhosts: list[VhostNet] = field(default_factory=list)
    created: bool = False
    bridge: str | None = None

    @property
    def tap_name(self) -> str:
        return self.taps[0].name

    @property
    def tapfds(self) -> list[int]:
        return [t.fileno() for t in self.taps]

    @property
    def vhostfds(self) -> list[int]:
        return [v.fileno() for v in self.vhosts]

    def close(self) -> None:
        for obj in (*self.vhosts, *self.taps):
            obj.close()


def _exists(name: str) -> bool:
    import socket

    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def open_datapath(tap: str | None, bridge: str | None, queues: int) -> Datapath:
    """N tap queues (existing ``tap``, or a new one — ``vh%d`` unless named) and N vhost fds.

    A tap we create is brought up, and enslaved to ``bridge`` when given; all or nothing.
    """
    if tap is not None and bridge is not None:
        raise ValidationError("exec", "--tap and --bridge exclude each other",
                              hint="--tap NAME uses that tap; --bridge BR creates a new one on BR")
    name = validate_ifname(tap, op="--tap") if tap else NEW_TAP_TEMPLATE
    if bridge is not None:
        validate_ifname(bridge, op="--bridge")
    created = not (tap and _exists(tap))
    nl = None
    if created:  # only a tap we make is ours to bring up and enslave
        from .netlink import Netlink

        nl = Netlink()
    try:
        if bridge is not None and not (nl and nl.is_bridge(bridge)):
            raise ValidationError("--bridge", f"{bridge!r} is not a bridge",
                                  hint=f"create it: ip link add {bridge} type bridge")
        # IFF_TUN_EXCL: if someone creates the name between our check and TUNSETIFF, fail
        # (EBUSY) rather than bring up or enslave their tap.
        dp = Datapath(Tap.open_queues(name, queues, vnet_hdr=True, exclusive=created),
                      created=created, bridge=bridge)
        try:
            for _ in range(queues):
                dp.vhosts.append(VhostNet())
            if nl is not None:
                if bridge is not None:
                    nl.set_master(dp.tap_name, bridge)
                nl.set_up(dp.tap_name)
        except BaseException:
            dp.close()
            raise
        return dp
    finally:
        if nl is not None:
            nl.close()


def keep_only(fds: list[int]) -> None:
    """Make ``fds`` (and 0-2) the only fds a child inherits."""
    keep = set(fds) | {0, 1, 2}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            if e.errno != errno.EBADF:  # the listdir's own fd is gone already
                raise SyscallError(f"set_inheritable({fd}, False)", e.errno or errno.EIO
                                   ) from None
    for fd in fds:
        _fd.call(f"set_inheritable({fd})", os.set_inheritable, fd, True)


_CAP_FIELDS = ("CapPrm", "CapEff", "CapAmb")


def capabilities(status: str) -> dict[str, int]:
    """CapPrm/CapEff/CapAmb of a /proc/PID/status text."""
    out = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in _CAP_FIELDS:
            out[key] = int(value.strip(), 16)
    return out


def drop_privileges(who: Identity) -> None:
    """setgroups, setgid, setuid — in that order, since each needs the privilege the next
    one gives up — then prove that no capability survived (commoncap.c clears permitted,
    effective and ambient on a transition away from uid 0 unless SECBIT_KEEP_CAPS)."""
    _fd.call("setgroups", os.setgroups, list(who.groups))
    _fd.call("setgid", os.setgid, who.gid)
    _fd.call("setuid", os.setuid, who.uid)
    with open("/proc/self/status") as f:
        caps = capabilities(f.read())
    left = {k: v for k, v in caps.items() if v}
    if left or len(caps) != len(_CAP_FIELDS):
        raise VhostctlError("drop privileges", errno.EPERM,
                            f"capabilities survived setuid({who.uid}): " + ", ".join(
                                f"{k}={v:#x}" for k, v in left.items()),
                            hint="SECBIT_KEEP_CAPS or no_new_privs settings of the caller")


def run(argv: list[str], *, tap: str | None = None, bridge: str | None = None,
        queues: int = 1, user: str | None = None, group: str | None = None) -> NoReturn:
    """Everything above, in order; never returns (the process becomes the command)."""
    check_command(argv, queues)
    who = resolve_identity(user, group)
    exe = resolve_executable(argv[0])
    dp = open_datapath(tap, bridge, queues)
    try:
        final = substitute(argv, dp.tapfds, dp.vhostfds)
        keep_only(dp.tapfds + dp.vhostfds)
        if who is not None:
            drop_privileges(who)
        _fd.call(f"execv {exe}", os.execv, exe, final)
    except BaseException:
        dp.close()
        raise
