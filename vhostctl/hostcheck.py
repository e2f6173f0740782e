"""Is this host ready for vhost-net?  Every answer as data (:class:`Check`), nothing printed.

Each check says what it found, whether that is fine (``ok``: True, False, or None for plain
information) and, when it is not, the command that fixes it.  The device checks open the
nodes for real and ``fstat`` the opened fd: a node that exists with the wrong numbers, or
that the mode allows but a device cgroup denies, is caught that way and no other.

All filesystem roots are parameters (:class:`HostPaths`) so tests run over fake trees.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import re
import stat
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _fd
from ._uapi import if_tun as T
from ._uapi import vhost as V
from ._uapi.nsfs import NS_GET_USERNS
from ._uapi.virtio_net import FEATURES
from .errors import VhostctlError

# Misc character devices, include/linux/miscdevice.h: MISC_MAJOR 10, TUN_MINOR 200,
# VHOST_NET_MINOR 238.
MISC_MAJOR = 10
TUN_MINOR = 200
VHOST_NET_MINOR = 238
CAP_NET_ADMIN = 12  # include/uapi/linux/capability.h

# What tap add and the datapath need from TUNGETFEATURES.
_TUN_NEEDED = T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR | T.IFF_MULTI_QUEUE

_CONTAINER_CGROUP = re.compile(r"docker|kubepods|containerd|libpod|lxc|machine\.slice")


@dataclass(frozen=True)
class HostPaths:
    """Where to look; the defaults are the real system."""

    dev: str = "/dev"
    proc: str = "/proc"
    sys: str = "/sys"
    root: str = "/"
    release: str = field(default_factory=lambda: os.uname().release)

    def at(self, base: str, *parts: str) -> str:
        return os.path.join(base, *(p.lstrip("/") for p in parts))


@dataclass(frozen=True)
class Check:
    """One finding: ``ok`` is True (fine), False (not ready) or None (information)."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HostReport:
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        """Ready when no check failed; information-only checks never count."""
        return not any(c.ok is False for c in self.checks)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "checks": [asdict(c) for c in self.checks]}


# -- small readers ---------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) from a release string such as ``6.12.117+deb12-amd64``."""
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise ValueError(f"unrecognised kernel release {release!r}")
    return int(m.group(1)), int(m.group(2))


def _owner_names(st: os.stat_result) -> tuple[str, str]:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return user, group


def mode_allows(st: os.stat_result, uid: int, gids: list[int]) -> bool:
    """Would the mode bits let ``uid`` (in ``gids``) read and write?  Root always may."""
    if uid == 0:
        return True
    if uid == st.st_uid:
        bits = stat.S_IRUSR | stat.S_IWUSR
    elif st.st_gid in gids:
        bits = stat.S_IRGRP | stat.S_IWGRP
    else:
        bits = stat.S_IROTH | stat.S_IWOTH
    return st.st_mode & bits == bits


def _sudo_user() -> tuple[str, int, list[int]] | None:
    """The user behind ``sudo``, whose access matters once they stop using sudo."""
    name = os.environ.get("SUDO_USER")
    if os.geteuid() != 0 or not name:
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return name, pw.pw_uid, os.getgrouplist(name, pw.pw_gid)


def devices_list_allows(text: str, major: int, minor: int) -> bool:
    """Does a cgroup v1 ``devices.list`` allow read+write of char device major:minor?

    Entries are ``TYPE MAJOR:MINOR ACCESS`` with ``a`` for all types and ``*`` wildcards
    (Documentation/admin-guide/cgroup-v1/devices.rst).
    """
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("a", "c"):
            continue
        if parts[0] == "a":
            return True
        maj, _, mnr = parts[1].partition(":")
        if maj in ("*", str(major)) and mnr in ("*", str(minor)) and \
                {"r", "w"} <= set(parts[2]):
            return True
    return False


def cap_effective(proc: str) -> int | None:
    """CapEff of this process from ``/proc/self/status``."""
    text = _read(os.path.join(proc, "self", "status"))
    if text is None:
        return None
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", text, re.M)
    return int(m.group(1), 16) if m else None


# -- checks ---------------------------------------------------------------------------------


def _device(p: HostPaths, name: str, node: str, minor: int, module: str,
            group_hint: str) -> tuple[Check, int | None]:
    """Open the node for real; return the check and, when usable, the open fd."""
    path = p.at(p.dev, node)
    shown = f"/dev/{node}"
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return Check(name, False, f"{shown} is absent",
                         f"modprobe {module}  (or, if loaded: mknod -m 0660 {shown} c "
                         f"{MISC_MAJOR} {minor})"), None
        return Check(name, False, f"{shown}: {os.strerror(e.errno or errno.EIO)}",
                     f"ls -l {shown}"), None
    user, group = _owner_names(st)
    mode = f"{stat.filemode(st.st_mode)} {user}:{group}"
    data: dict[str, Any] = {"path": shown, "mode": stat.filemode(st.st_mode), "owner": user,
                            "group": group, "access": os.access(path, os.R_OK | os.W_OK)}
    if not stat.S_ISCHR(st.st_mode):
        return Check(name, False, f"{shown} is not a character device ({mode})",
                     f"rm {shown} && mknod -m 0660 {shown} c {MISC_MAJOR} {minor}",
                     data), None
    sudo = _sudo_user()
    if sudo is not None:
        data["sudo_user"] = sudo[0]
        data["sudo_user_access"] = mode_allows(st, sudo[1], sudo[2])
    try:
        fd = _fd.open_dev(path)
    except VhostctlError as e:
        if e.errno in (errno.EACCES, errno.EPERM) and data["access"]:
            fix = (f"the mode allows it but the kernel refused: a device cgroup denies "
                   f"c {MISC_MAJOR}:{minor}; for a container pass --device {shown}")
        elif e.errno in (errno.EACCES, errno.EPERM):
            fix = (f"run as root, or: sudo usermod -aG {group_hint} $USER && "
                   f"sudo chgrp {group_hint} {shown} && sudo chmod 0660 {shown}")
        else:
            fix = f"modprobe {module}"
        return Check(name, False, f"{shown} ({mode}) cannot be opened: {e.detail}", fix,
                     data), None
    rdev = os.fstat(fd).st_rdev
    got = (os.major(rdev), os.minor(rdev))
    data["rdev"] = f"{got[0]}:{got[1]}"
    if got != (MISC_MAJOR, minor):
        _fd.close(fd)
        return Check(name, False, f"{shown} is {got[0]}:{got[1]}, expected "
                     f"{MISC_MAJOR}:{minor} ({mode})",
                     f"rm {shown} && mknod -m 0660 {shown} c {MISC_MAJOR} {minor}",
                     data), None
    detail = f"{shown} {MISC_MAJOR}:{minor} {mode}, opened"
    if sudo is not None:
        detail += f"; {sudo[0]} {'could' if data['sudo_user_access'] else 'could not'} " \
            "open it without sudo"
    return Check(name, True, detail, data=data), fd


def _module(p: HostPaths, module: str, ko_dir: str, device_ok: bool) -> Check:
    name = f"{module} module"
    moddir = p.at(p.sys, "module", module)
    if os.path.exists(os.path.join(moddir, "initstate")):
        state = (_read(os.path.join(moddir, "initstate")) or "").strip() or "?"
        return Check(name, True, f"loaded as a module ({state})", data={"state": "module"})
    builtin = _read(p.at(p.root, "lib", "modules", p.release, "modules.builtin")) or ""
    if os.path.isdir(moddir) or f"{ko_dir}/{module}.ko" in builtin:
        return Check(name, True, "built into the kernel", data={"state": "builtin"})
    if device_ok:
        return Check(name, True, "not listed in /sys/module or modules.builtin, but the "
                     "device answers (built in)", data={"state": "builtin"})
    return Check(name, False, "not loaded", f"modprobe {module}", data={"state": "absent"})


def _vhost_features(fd: int | None, device_fix: str) -> list[Check]:
    from .vhost import VhostNet

    if fd is None:
        skipped = "not asked: /dev/vhost-net is not usable (see above)"
        return [Check("vhost features", False, skipped, device_fix),
                Check("vhost backend features", None, skipped)]
    with VhostNet(fd=fd) as dev:
        try:
            features = dev.get_features()
        except VhostctlError as e:
            return [Check("vhost features", False, f"VHOST_GET_FEATURES failed: {e}",
                          "check dmesg for vhost errors"),
                    Check("vhost backend features", None, "not asked")]
        try:
            backend: int | None = dev.get_backend_features()
        except VhostctlError as e:
            backend, why = None, str(e)
    names = FEATURES.decode(features)
    checks = [Check("vhost features", True, ", ".join(names),
                    data={"value": f"{features:#x}", "names": names})]
    if backend is None:
        checks.append(Check("vhost backend features", None, f"not offered ({why})",
                            data={"value": None, "names": []}))
    else:
        bnames = V.BACKEND_FEATURES.decode(backend)
        checks.append(Check("vhost backend features", None, ", ".join(bnames) or "none",
                            data={"value": f"{backend:#x}", "names": bnames}))
    return checks


def tun_features_of(fd: int) -> int:
    """TUNGETFEATURES on an open /dev/net/tun fd (no interface needed)."""
    out = ctypes.c_uint(0)
    _fd.ioctl(fd, T.TUNGETFEATURES, out)
    return out.value


def _tun_features(fd: int | None, device_fix: str) -> Check:
    name = "tun features"
    if fd is None:
        return Check(name, False, "not asked: /dev/net/tun is not usable (see above)",
                     device_fix)
    try:
        value = tun_features_of(fd)
    except VhostctlError as e:
        return Check(name, False, f"TUNGETFEATURES failed: {e}", "modprobe tun")
    finally:
        _fd.close(fd)
    names = T.IFF_FLAGS.decode(value)
    data = {"value": f"{value:#x}", "names": names}
    missing = _TUN_NEEDED & ~value
    if missing:
        return Check(name, False, f"missing {', '.join(T.IFF_FLAGS.decode(missing))}",
                     "use a kernel with a current tun driver (3.8 or later)", data)
    return Check(name, True, ", ".join(names), data=data)


def _params(p: HostPaths) -> Check:
    wanted = (("vhost", "max_mem_regions"), ("vhost", "max_iotlb_entries"),
              ("vhost", "fork_from_owner_default"), ("vhost_net", "experimental_zcopytx"))
    values: dict[str, str] = {}
    for mod, param in wanted:
        text = _read(p.at(p.sys, "module", mod, "parameters", param))
        if text is not None:
            values[param] = text.strip()
    if not values:
        return Check("module parameters", None, "not readable (vhost modules not loaded?)",
                     data={})
    return Check("module parameters", None, " ".join(f"{k}={v}" for k, v in values.items()),
                 data=values)


def expected_worker_model(release: str | None,
                          fork_from_owner_default: str | None = None) -> str | None:
    """"kthread" or "task": where this kernel puts vhost workers (None: release unreadable).

    drivers/vhost/vhost.c: since 6.4 ("vhost: use vhost_tasks for worker threads", commit
    6e890c5d5021) a worker is a thread of the owner process; before, a kthread.  Since 6.17
    the vhost module parameter fork_from_owner_default=0 (or VHOST_SET_FORK_FROM_OWNER per
    device) brings kthreads back.
    """
    try:
        ver = kernel_version(release or "")
    except ValueError:
        return None
    if ver < (6, 4) or (fork_from_owner_default or "").upper() in ("0", "N"):
        return "kthread"
    return "task"


def _workers(p: HostPaths, params: dict[str, str]) -> Check:
    try:
        ver = kernel_version(p.release)
    except ValueError as e:
        return Check("vhost workers", None, str(e))
    model = expected_worker_model(p.release, params.get("fork_from_owner_default"))
    data: dict[str, Any] = {"kernel": p.release, "model": model}
    if model == "kthread":
        why = "kernel < 6.4" if ver < (6, 4) else "fork_from_owner_default=0"
        detail = (f"kernel threads named vhost-<owner pid>, children of kthreadd ({why})")
    else:
        detail = "threads named vhost-<owner pid> inside the owner process (kernel >= 6.4)"
    return Check("vhost workers", None, detail, data=data)


def netns_in_scope(proc: str) -> bool | None:
    """Is this process's network namespace owned by its user namespace (or a descendant)?

    Capabilities count only over namespaces their user namespace owns: after ``unshare -U``
    CapEff shows every bit, yet TUNSETIFF still answers EPERM in the host's network
    namespace.  NS_GET_USERNS on /proc/self/ns/net returns EPERM exactly when the owner is
    outside our user namespace's scope (ns_get_owner() in fs/nsfs.c).  None when unknown.
    """
    try:
        fd = _fd.open_dev(os.path.join(proc, "self", "ns", "net"), os.O_RDONLY)
    except VhostctlError:
        return None
    try:
        owner = _fd.ioctl(fd, NS_GET_USERNS, op="NS_GET_USERNS")
    except VhostctlError as e:
        return False if e.errno == errno.EPERM else None
    finally:
        _fd.close(fd)
    _fd.close(owner)
    return True


def _cap(p: HostPaths) -> Check:
    eff = cap_effective(p.proc)
    if eff is None:
        return Check("CAP_NET_ADMIN", None, "unknown: no CapEff in /proc/self/status")
    has = bool(eff >> CAP_NET_ADMIN & 1)
    data: dict[str, Any] = {"cap_eff": f"{eff:#x}"}
    if has and netns_in_scope(p.proc) is False:
        data["user_namespace"] = True
        return Check("CAP_NET_ADMIN", False,
                     "missing over this network namespace: CapEff has it, but only inside a "
                     "user namespace that does not own the network namespace (unshare -U); "
                     "creating or changing taps fails with EPERM",
                     "run vhostctl in the host's user namespace as root, or give the user "
                     "namespace its own network namespace (unshare -U -n) and use taps there",
                     data)
    if has:
        return Check("CAP_NET_ADMIN", True, "effective: may create taps and change links",
                     data=data)
    return Check("CAP_NET_ADMIN", False,
                 "missing: cannot create taps or change links; only attach taps owned by "
                 "this user or group",
                 "run as root (sudo vhostctl ...), or start it with the capability: "
                 "sudo setpriv --inh-caps +net_admin --ambient-caps +net_admin vhostctl ...",
                 data)


def _container(p: HostPaths, devices_failed: bool) -> Check:
    hints = []
    for marker in (".dockerenv", "run/.containerenv"):
        if os.path.exists(p.at(p.root, marker)):
            hints.append(f"/{marker}")
    cg = _read(os.path.join(p.proc, "1", "cgroup")) or ""
    m = _CONTAINER_CGROUP.search(cg)
    if m:
        hints.append(f"/proc/1/cgroup mentions {m.group(0)}")
    data: dict[str, Any] = {"container": bool(hints), "evidence": hints}
    v1_list = _read(p.at(p.sys, "fs", "cgroup", "devices", "devices.list"))
    if v1_list is not None:
        data["devices_cgroup"] = "v1"
        data["devices_cgroup_allows"] = {
            "vhost-net": devices_list_allows(v1_list, MISC_MAJOR, VHOST_NET_MINOR),
            "tun": devices_list_allows(v1_list, MISC_MAJOR, TUN_MINOR)}
    elif os.path.exists(p.at(p.sys, "fs", "cgroup", "cgroup.controllers")):
        data["devices_cgroup"] = "v2"  # BPF-based: not readable, the open test decides
    if not hints:
        return Check("container", None, "none detected", data=data)
    detail = "inside a container (" + "; ".join(hints) + ")"
    allows = data.get("devices_cgroup_allows")
    if allows:
        denied = [k for k, v in allows.items() if not v]
        if denied:
            detail += "; devices cgroup denies " + ", ".join(denied)
    fix = ("start the container with --device /dev/vhost-net --device /dev/net/tun "
           "--cap-add NET_ADMIN") if devices_failed else ""
    return Check("container", None, detail, fix, data)


def _kvm(p: HostPaths) -> Check:
    path = p.at(p.dev, "kvm")
    try:
        st = os.stat(path)
    except OSError:
        return Check("/dev/kvm", None, "absent: vhost-net does not need it, but guests run "
                     "without KVM acceleration", "modprobe kvm_intel  (or kvm_amd)",
                     {"present": False})
    user, group = _owner_names(st)
    return Check("/dev/kvm", None, f"present ({stat.filemode(st.st_mode)} {user}:{group}); "
                 "not needed by vhost-net itself",
                 data={"present": True, "access": os.access(path, os.R_OK | os.W_OK)})


def host_report(paths: HostPaths | None = None) -> HostReport:
    """Run every check; never raises for what it finds, only reports it."""
    p = paths or HostPaths()
    vhost_check, vhost_fd = _device(p, "vhost-net device", "vhost-net", VHOST_NET_MINOR,
                                    "vhost_net", "kvm")
    tun_check, tun_fd = _device(p, "tun device", "net/tun", TUN_MINOR, "tun", "netdev")
    checks = [vhost_check, tun_check,
              _module(p, "vhost_net", "kernel/drivers/vhost", vhost_check.ok is True),
              _module(p, "tun", "kernel/drivers/net", tun_check.ok is True)]
    checks += _vhost_features(vhost_fd, vhost_check.fix)
    checks.append(_tun_features(tun_fd, tun_check.fix))
    params = _params(p)
    checks += [params, _workers(p, params.data), _cap(p),
               _container(p, not (vhost_check.ok and tun_check.ok)), _kvm(p)]
    return HostReport(tuple(checks))


def offered(paths: HostPaths | None = None) -> dict[str, Any]:
    """Everything the running kernel offers, decoded: for ``vhostctl features``.

    vhost features and backend features (VHOST_GET_*FEATURES need no ownership), tun flags
    (TUNGETFEATURES) and the tun offloads vhostctl knows (the kernel has no query for
    those; TUNSETOFFLOAD answers EINVAL for one it lacks).
    """
    from .vhost import VhostNet

    p = paths or HostPaths()
    out: dict[str, Any] = {}
    with VhostNet(p.at(p.dev, "vhost-net")) as dev:
        f = dev.get_features()
        out["vhost"] = {"value": f"{f:#x}", "names": FEATURES.decode(f, aliases=True)}
        try:
            b = dev.get_backend_features()
            out["vhost_backend"] = {"value": f"{b:#x}",
                                    "names": V.BACKEND_FEATURES.decode(b)}
        except VhostctlError:
            out["vhost_backend"] = None
    fd = _fd.open_dev(p.at(p.dev, "net", "tun"))
    try:
        t = tun_features_of(fd)
    finally:
        _fd.close(fd)
    out["tun"] = {"value": f"{t:#x}", "names": T.IFF_FLAGS.decode(t)}
    out["tun_offloads"] = [{"name": n, "value": f"{m:#x}"} for n, m in T.OFFLOADS]
    return out
