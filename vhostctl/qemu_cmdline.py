"""Read a QEMU command line the way QEMU reads it: the options that tell how a VM's NICs are wired.

Pure functions over strings (no procfs, no kernel): :mod:`vhostctl.survey` feeds them
``/proc/PID/cmdline`` and :mod:`vhostctl.handoff` checks a command before handing fds over.
Both syntaxes QEMU accepts are understood:

- ``key=value`` lists (util/qemu-option.c ``opts_do_parse``): ``,`` separates, ``,,`` is a
  literal comma, the first item without ``=`` is the option's implied key (``tap`` is the
  ``type`` of ``-netdev tap,...``), a bare ``key`` means ``key=on`` and ``nokey`` ``key=off``;
- JSON objects (``-netdev '{"type":"tap",...}'``), which libvirt emits since QEMU 6.0.

Nothing here raises on odd input: a malformed option is skipped, since a survey of running VMs
must describe what it can and not stop at one strange command line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# Options whose next argv element is their value and which matter to us.  Every other option
# is skipped one element at a time (its value, if any, never starts with "-netdev" etc.).
_VALUED = {"netdev", "nic", "net", "chardev", "name", "qmp", "device", "mon", "smp"}
_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


def split_opts(text: str, implied: str | None = None) -> dict[str, str]:
    """``a,b=c,,d,e`` -> ``{implied: "a", "b": "c,d", "e": "on"}`` (QEMU's QemuOpts rules)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out: dict[str, str] = {}
    for n, part in enumerate(parts):
        if not part:
            continue
        if "=" in part:
            key, value = part.split("=", 1)
        elif n == 0 and implied:
            key, value = implied, part
        elif part.startswith("no") and len(part) > 2:
            key, value = part[2:], "off"  # legacy "nowait"
        else:
            key, value = part, "on"
        out[key] = value
    return out


def parse_opts(text: str, implied: str | None = None) -> dict[str, Any]:
    """Either syntax: a JSON object (libvirt) or a ``key=value`` list."""
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}
    return split_opts(text, implied)


def as_bool(value: Any) -> bool | None:
    """QEMU's boolean spellings (``on``/``off``, ``yes``/``no``, JSON true/false)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    return None


def as_fds(value: Any) -> tuple[int, ...]:
    """``"3:4"``, ``"3"``, ``["3","4"]`` or ``3`` -> (3, 4); fd *names* (from getfd) are dropped."""
    if isinstance(value, bool) or value is None:
        return ()
    if isinstance(value, int):
        return (value,) if value >= 0 else ()
    items = value if isinstance(value, list) else str(value).split(":")
    return tuple(int(x) for x in (str(i).strip() for i in items) if x.isascii() and x.isdigit())


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    return None


def _as_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class NetdevSpec:
    """One ``-netdev``/``-nic``/``-net`` backend as written on the command line."""

    type: str
    id: str | None = None
    ifname: str | None = None
    fds: tuple[int, ...] = ()  # fd=/fds= given as numbers (an exec hand-off, libvirt)
    vhostfds: tuple[int, ...] = ()
    vhost: bool | None = None  # vhost=on/off as written; None when not said
    vhostforce: bool = False
    queues: int | None = None
    chardev: str | None = None  # vhost-user
    # Every option as written (poll-us, sndbuf, ...), for checks that read one key.
    opts: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def vhost_requested(self) -> bool:
        """What QEMU's net_init_tap_one() decides: vhost=, else vhostfd(s)= or vhostforce."""
        if self.vhost is not None:
            return self.vhost
        return bool(self.vhostfds) or self.vhostforce


@dataclass(frozen=True)
class ChardevSpec:
    backend: str
    id: str | None = None
    path: str | None = None
    server: bool = False
    fd: int | None = None


@dataclass(frozen=True)
class DeviceSpec:
    driver: str
    id: str | None = None
    netdev: str | None = None
    mac: str | None = None
    # Every property as written (mq, vectors, host_mtu, tx_queue_size, iommu_platform, ...).
    opts: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def opt(self, key: str) -> str | None:
        """One property as a string (JSON ``true`` reads as ``on``), None when not given."""
        v = self.opts.get(key)
        if v is None:
            return None
        if isinstance(v, bool):
            return "on" if v else "off"
        return str(v)

    def int_opt(self, key: str) -> int | None:
        return _as_int(self.opts.get(key))

    def bool_opt(self, key: str) -> bool | None:
        return as_bool(self.opts.get(key)) if key in self.opts else None


@dataclass
class QemuArgs:
    """What a QEMU command line says about the VM's name, NICs and monitors."""

    name: str | None = None
    process_name: str | None = None
    netdevs: list[NetdevSpec] = field(default_factory=list)
    chardevs: dict[str, ChardevSpec] = field(default_factory=dict)
    devices: list[DeviceSpec] = field(default_factory=list)
    qmp_paths: list[str] = field(default_factory=list)
    cpus: int | None = None  # -smp N or -smp cpus=N

    def device_for(self, netdev_id: str | None) -> DeviceSpec | None:
        if netdev_id is None:
            return None
        return next((d for d in self.devices if d.netdev == netdev_id), None)


def _netdev(opts: dict[str, Any], implied_type: str | None = None) -> NetdevSpec | None:
    ntype = _as_str(opts.get("type")) or implied_type
    if not ntype:
        return None
    fds = as_fds(opts.get("fds")) or as_fds(opts.get("fd"))
    vhostfds = as_fds(opts.get("vhostfds")) or as_fds(opts.get("vhostfd"))
    return NetdevSpec(
        type=ntype,
        id=_as_str(opts.get("id")) or _as_str(opts.get("name")),
        ifname=_as_str(opts.get("ifname")),
        fds=fds,
        vhostfds=vhostfds,
        vhost=as_bool(opts.get("vhost")) if "vhost" in opts else None,
        vhostforce=bool(as_bool(opts.get("vhostforce"))),
        queues=_as_int(opts.get("queues")),
        chardev=_as_str(opts.get("chardev")),
        opts=dict(opts),
    )


def _chardev(opts: dict[str, Any]) -> ChardevSpec | None:
    backend = _as_str(opts.get("backend"))
    if not backend:
        return None
    return ChardevSpec(backend=backend, id=_as_str(opts.get("id")),
                       path=_as_str(opts.get("path")),
                       server=bool(as_bool(opts.get("server", "off"))),
                       fd=_as_int(opts.get("fd")))


def vm_name(value: str) -> str | None:
    """``-name foo`` or libvirt's ``-name guest=foo,debug-threads=on``."""
    return _as_str(split_opts(value, "guest").get("guest"))


def parse_argv(argv: list[str]) -> QemuArgs:
    """Walk a QEMU argv; unknown options are skipped, malformed values ignored."""
    out = QemuArgs()
    i = 1
    while i < len(argv):
        arg = argv[i]
        opt = arg[2:] if arg.startswith("--") else arg[1:] if arg.startswith("-") else ""
        if opt not in _VALUED or i + 1 >= len(argv):
            i += 1
            continue
        value = argv[i + 1]
        i += 2
        if opt == "name":
            opts = split_opts(value, "guest")
            out.name = _as_str(opts.get("guest"))
            out.process_name = _as_str(opts.get("process"))
        elif opt == "netdev":
            nd = _netdev(parse_opts(value, "type"))
            if nd:
                out.netdevs.append(nd)
        elif opt in ("nic", "net"):
            opts = parse_opts(value, "type")
            # -net nic,... is the guest half of a legacy pair: no host backend.
            nd = _netdev(opts) if opts.get("type") != "nic" else None
            if nd:
                out.netdevs.append(nd)
        elif opt == "chardev":
            ch = _chardev(parse_opts(value, "backend"))
            if ch and ch.id:
                out.chardevs[ch.id] = ch
        elif opt == "device":
            opts = parse_opts(value, "driver")
            driver = _as_str(opts.get("driver"))
            if driver:
                out.devices.append(DeviceSpec(driver, _as_str(opts.get("id")),
                                              _as_str(opts.get("netdev")),
                                              _as_str(opts.get("mac")), dict(opts)))
        elif opt == "smp":
            out.cpus = _as_int(parse_opts(value, "cpus").get("cpus"))
        elif opt == "qmp":
            addr = value.split(",", 1)[0]
            if addr.startswith("unix:"):
                out.qmp_paths.append(addr[5:])
    return out


def is_qemu(comm: str, argv: list[str]) -> bool:
    """QEMU system emulators are qemu-system-ARCH (qemu-kvm on some distributions)."""
    exe = argv[0].rsplit("/", 1)[-1] if argv else ""
    return comm.startswith("qemu") or exe.startswith("qemu")


# Placeholders vhostctl exec substitutes; any other {tap...}/{vhost...} word is a typo.
PLACEHOLDER_RE = re.compile(r"\{(?:tap|vhost)[A-Za-z_]*\}")
