"""``vhostctl apply``: make this host's taps (and the bridges it manages) what a YAML spec says.

Three phases, each only reading what the previous one produced:

1. :func:`load_spec` parses and validates the YAML without the kernel: every error names the
   file and line (``spec.yaml:12: taps[1].queues: ...``).
2. :func:`make_plan` reads the kernel (one RTM_GETLINK dump, the holder scan) and says what
   each tap and bridge needs, per attribute; it still changes nothing, and everything the
   kernel can tell before a change (a bridge that is not a bridge, a name taken by another
   kind of link, a tap that must be recreated but is held) fails here.
3. :func:`execute` carries the plan out tap by tap.  Every step of a tap records how to undo
   it; when one fails, that tap is put back as it was, the taps done before stay as
   specified, and the error says which were changed.  A tap that needs nothing gets no
   netlink write at all, so a second apply is silent (``ip monitor link`` sees nothing).

Taps created by apply carry ``vhostctl-apply:<id>`` as their ifalias: the mark lives on the
device, so ``--prune`` can never act on a stale state file, and taps without it (made by
hand, by ``tap add``, by libvirt) are never pruned.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import taps as taplib
from .errors import ValidationError, VhostctlError
from .netlink import IFF_LOWER_UP, Link, Netlink
from .tun import MAX_TAP_QUEUES, Holder, Tap, scan_holders, validate_ifname

SPEC_VERSION = 1
MARK_PREFIX = "vhostctl-apply:"
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_TOP_KEYS = {"version", "id", "bridges", "taps"}
_BRIDGE_KEYS = {"name", "managed", "mtu"}
_TAP_KEYS = {"name", "queues", "vnet_hdr", "owner", "group", "mtu", "mac", "bridge",
             "txqueuelen", "offloads", "persist"}


# -- spec ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapDecl:
    """One tap of the spec: the validated :class:`~vhostctl.taps.TapSpec` plus what apply
    adds (txqueuelen, MTU inherited from the bridge) and where it was written."""

    spec: taplib.TapSpec
    line: int
    mtu_from_bridge: bool = False
    txqlen: int | None = None


@dataclass(frozen=True)
class BridgeDecl:
    name: str
    line: int
    managed: bool = False
    mtu: int | None = None


@dataclass(frozen=True)
class Spec:
    id: str
    path: str
    taps: list[TapDecl]
    bridges: list[BridgeDecl]

    @property
    def mark(self) -> str:
        return MARK_PREFIX + self.id


class _Bad(Exception):
    """A spec error at a node: turned into a ValidationError with the file and line."""

    def __init__(self, node: Any, where: str, message: str) -> None:
        super().__init__(message)
        self.line = node.start_mark.line + 1 if node is not None else 1
        self.where, self.message = where, message


def _scalar(node: Any, where: str, kinds: tuple[type, ...], what: str) -> Any:
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        raise _Bad(node, where, f"expected {what}, got a {_node_kind(node)}")
    value = yaml.safe_load(yaml.serialize(node)) if node.tag != "tag:yaml.org,2002:str" \
        else node.value
    # bool is an int in Python: "queues: true" must not pass as 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _Bad(node, where, f"expected {what}, got {node.value!r}")
    return value


def _node_kind(node: Any) -> str:
    import yaml

    return {yaml.MappingNode: "mapping", yaml.SequenceNode: "list"}.get(type(node), "scalar")


def _mapping(node: Any, where: str, keys: set[str]) -> dict[str, Any]:
    """A mapping node's items by key (values stay nodes); unknown and repeated keys fail
    (PyYAML itself keeps the last of two equal keys silently)."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise _Bad(node, where, f"expected a mapping, got a {_node_kind(node)}")
    out: dict[str, Any] = {}
    for k, v in node.value:
        key = _scalar(k, where, (str,), "a key")
        if key in out:
            raise _Bad(k, f"{where}.{key}" if where else key, "repeated key")
        if key not in keys:
            raise _Bad(k, where or "spec", f"unknown key {key!r} (allowed: "
                       f"{', '.join(sorted(keys))})")
        out[key] = v
    return out


def _sequence(node: Any, where: str) -> list[Any]:
    import yaml

    if not isinstance(node, yaml.SequenceNode):
        raise _Bad(node, where, f"expected a list, got a {_node_kind(node)}")
    return list(node.value)


def _checked(node: Any, where: str, fn: Callable[[], Any]) -> Any:
    """Run a library validator; its ValidationError becomes one at this node."""
    try:
        return fn()
    except ValidationError as e:
        raise _Bad(node, where, e.detail + (f" ({e.hint})" if e.hint else "")) from None


def _name_list(node: Any, where: str) -> list[str]:
    import yaml

    if isinstance(node, yaml.ScalarNode):
        text = _scalar(node, where, (str,), "a list of offload names")
        return [x.strip() for x in text.split(",") if x.strip()]
    return [_scalar(x, where, (str,), "an offload name") for x in _sequence(node, where)]


def _bridge(node: Any, where: str) -> BridgeDecl:
    m = _mapping(node, where, _BRIDGE_KEYS)
    if "name" not in m:
        raise _Bad(node, where, "missing key 'name'")
    name = _scalar(m["name"], f"{where}.name", (str,), "a name")
    _checked(m["name"], f"{where}.name", lambda: validate_ifname(name, op="bridge name"))
    managed = _scalar(m["managed"], f"{where}.managed", (bool,), "true or false") \
        if "managed" in m else False
    mtu = None
    if "mtu" in m:
        mtu = _scalar(m["mtu"], f"{where}.mtu", (int,), "an integer")
        if not taplib.TAP_MIN_MTU <= mtu <= 65535:
            raise _Bad(m["mtu"], f"{where}.mtu", f"{mtu}: a bridge takes "
                       f"{taplib.TAP_MIN_MTU}..65535")
        if not managed:
            raise _Bad(m["mtu"], f"{where}.mtu", "only a bridge with 'managed: true' is "
                       "changed by apply; set managed or drop mtu")
    return BridgeDecl(name, node.start_mark.line + 1, managed, mtu)


def _tap(node: Any, where: str, bridges: dict[str, BridgeDecl]) -> TapDecl:
    import yaml

    m = _mapping(node, where, _TAP_KEYS)
    if "name" not in m:
        raise _Bad(node, where, "missing key 'name'")
    name = _scalar(m["name"], f"{where}.name", (str,), "a name")
    _checked(m["name"], f"{where}.name", lambda: validate_ifname(name, op="tap name"))

    def get(key: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
        return _scalar(m[key], f"{where}.{key}", kinds, what) if key in m else default

    queues = get("queues", (int,), "an integer", 1)
    if not 1 <= queues <= MAX_TAP_QUEUES:
        raise _Bad(m["queues"], f"{where}.queues", f"{queues}: must be 1..{MAX_TAP_QUEUES}")
    vnet_hdr = get("vnet_hdr", (bool,), "true or false", True)
    if get("persist", (bool,), "true or false", True) is not True:
        raise _Bad(m["persist"], f"{where}.persist", "taps made by apply are persistent (one "
                   "that is not would vanish when apply exits)")
    owner = get("owner", (str, int), "a user name or uid")
    group = get("group", (str, int), "a group name or gid")
    bridge = get("bridge", (str,), "a bridge name")
    mtu, from_bridge = None, False
    if "mtu" in m and isinstance(m["mtu"], yaml.MappingNode):
        inherit = _mapping(m["mtu"], f"{where}.mtu", {"inherit"})
        if "inherit" not in inherit or _scalar(inherit["inherit"], f"{where}.mtu.inherit",
                                               (str,), "'bridge'") != "bridge":
            raise _Bad(m["mtu"], f"{where}.mtu", "expected a number or 'inherit: bridge'")
        if bridge is None:
            raise _Bad(m["mtu"], f"{where}.mtu", "'inherit: bridge' needs a bridge")
        from_bridge = True
    elif "mtu" in m:
        mtu = get("mtu", (int,), "an integer or 'inherit: bridge'")
    txqlen = get("txqueuelen", (int,), "an integer")
    if txqlen is not None and not 0 <= txqlen < 2**32:
        raise _Bad(m["txqueuelen"], f"{where}.txqueuelen", f"{txqlen}: must be 0..2^32-1")
    mac = get("mac", (str,), "a MAC address")
    offloads = _name_list(m["offloads"], f"{where}.offloads") if "offloads" in m else None
    if bridge is not None and bridge == name:
        raise _Bad(m["bridge"], f"{where}.bridge", "a tap cannot be its own bridge")
    if name in bridges:
        raise _Bad(m["name"], f"{where}.name", f"{name!r} is also a bridge of this spec "
                   f"(line {bridges[name].line})")
    # make_spec()'s error names the field in ``op``: point at that key's node.
    key_of_op = {"queues": "queues", "mtu": "mtu", "MAC address": "mac", "owner": "owner",
                 "group": "group", "bridge": "bridge", "offload": "offloads"}
    try:
        spec = taplib.make_spec(name, queues=queues, vnet_hdr=vnet_hdr, owner=owner,
                                group=group, bridge=bridge, mtu=mtu, mac=mac,
                                offloads=offloads)
    except ValidationError as e:
        key = next((k for op, k in key_of_op.items() if op in e.op), None)
        at = m.get(key) if key else None
        raise _Bad(at if at is not None else node, f"{where}.{key}" if at is not None
                   else where, e.detail + (f" ({e.hint})" if e.hint else "")) from None
    return TapDecl(spec, node.start_mark.line + 1, from_bridge, txqlen)


def load_spec(text: str, path: str = "<spec>") -> Spec:
    """Parse and validate a spec without asking the kernel; a ValidationError names the
    file and line of the first problem."""
    import yaml

    try:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else 1
            raise ValidationError(f"{path}:{line}", f"not valid YAML: {e.problem or e}") \
                from None
        if root is None:
            raise _Bad(None, "spec", "empty: expected a mapping with 'taps'")
        top = _mapping(root, "", _TOP_KEYS)
        version = _scalar(top["version"], "version", (int,), "an integer") \
            if "version" in top else SPEC_VERSION
        if version != SPEC_VERSION:
            raise _Bad(top["version"], "version", f"{version}: this vhostctl reads version "
                       f"{SPEC_VERSION}")
        spec_id = _scalar(top["id"], "id", (str,), "a name") if "id" in top else "default"
        if not _ID_RE.fullmatch(spec_id):
            raise _Bad(top["id"], "id", f"{spec_id!r}: 1 to 64 of letters, digits, '_.-'")
        bridges: dict[str, BridgeDecl] = {}
        for i, n in enumerate(_sequence(top["bridges"], "bridges") if "bridges" in top else []):
            b = _bridge(n, f"bridges[{i}]")
            if b.name in bridges:
                raise _Bad(n, f"bridges[{i}].name", f"{b.name!r} is listed twice (first at "
                           f"line {bridges[b.name].line})")
            bridges[b.name] = b
        if "taps" not in top:
            raise _Bad(root, "spec", "missing key 'taps'")
        decls: dict[str, TapDecl] = {}
        for i, n in enumerate(_sequence(top["taps"], "taps")):
            t = _tap(n, f"taps[{i}]", bridges)
            if t.spec.name in decls:
                raise _Bad(n, f"taps[{i}].name", f"{t.spec.name!r} is listed twice (first at "
                           f"line {decls[t.spec.name].line})")
            decls[t.spec.name] = t
    except _Bad as e:
        raise ValidationError(f"{path}:{e.line}", f"{e.where}: {e.message}" if e.where
                              else e.message) from None
    return Spec(spec_id, path, list(decls.values()), list(bridges.values()))


def read_spec(path: str) -> Spec:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValidationError(f"read {path}", os.strerror(e.errno or errno.EIO)) from None
    except UnicodeDecodeError:
        raise ValidationError(f"read {path}", "not UTF-8 text") from None
    return load_spec(text, path)


# -- plan ------------------------------------------------------------------------------------

# What can change in place, and how: over rtnetlink, or through an attached queue (owner and
# group are tun ioctls; the kernel cannot unset them: TUNSETOWNER refuses an invalid uid,
# tun.c __tun_chr_ioctl()).  Everything else is fixed by TUNSETIFF at creation.
_NETLINK_ATTRS = ("mtu", "mac", "master", "txqueuelen", "up")
_QUEUE_ATTRS = ("owner", "group")
_FIXED_ATTRS = ("type", "pi", "vnet_hdr", "multi_queue", "persist")


@dataclass(frozen=True)
class Change:
    attr: str
    before: Any
    after: Any


@dataclass(frozen=True)
class HolderInfo:
    pid: int
    comm: str
    fd: int
    vm: str | None


@dataclass
class Item:
    """What one tap or bridge needs: ``action`` is none, create, update, recreate, delete
    (prune) or blocked (a recreate that a holder prevents: nothing is done)."""

    kind: str
    name: str
    action: str
    changes: list[Change] = field(default_factory=list)
    holders: list[HolderInfo] = field(default_factory=list)
    reason: str = ""
    line: int | None = None
    status: str = "pending"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    spec_id: str
    items: list[Item]

    @property
    def changes(self) -> bool:
        return any(i.action not in ("none", "blocked") for i in self.items)

    @property
    def blocked(self) -> list[Item]:
        return [i for i in self.items if i.action == "blocked"]

    def to_dict(self) -> dict[str, Any]:
        return {"spec_id": self.spec_id, "changes": self.changes,
                "items": [i.to_dict() for i in self.items]}


def _holders(hs: list[Holder], proc: str) -> list[HolderInfo]:
    """Each holder with its VM name, read through the survey's procfs reader."""
    from .survey import Scanner

    scan = Scanner(proc=proc)
    return [HolderInfo(h.pid, h.comm, h.fd, scan.qemu_name(h.pid)) for h in hs]


def _held(link: Link, holders: list[Holder]) -> bool:
    """Held by a process fd, or by anything else: queue counts (multi-queue taps only,
    tun_fill_info()), or the carrier of a single-queue tap, which tun_attach() turns on
    and the last __tun_detach() off."""
    t = link.tun
    if holders:
        return True
    if t is not None and t.multi_queue:
        return bool((t.num_queues or 0) + (t.num_disabled_queues or 0))
    return link.up and bool(link.flags & IFF_LOWER_UP)


def _want(decl: TapDecl, bridge_mtu: int | None) -> dict[str, Any]:
    s = decl.spec
    want: dict[str, Any] = {"type": "tap", "pi": False, "vnet_hdr": s.vnet_hdr,
                            "multi_queue": s.multi_queue, "persist": True,
                            "owner": s.owner, "group": s.group, "master": s.bridge,
                            "up": True}
    mtu = bridge_mtu if decl.mtu_from_bridge else s.mtu
    if mtu is not None:
        want["mtu"] = mtu
    if s.mac is not None:
        want["mac"] = s.mac
    if decl.txqlen is not None:
        want["txqueuelen"] = decl.txqlen
    return want


def _have(link: Link) -> dict[str, Any]:
    t = link.tun
    return {"type": t.type if t else None, "pi": t.pi if t else None,
            "vnet_hdr": t.vnet_hdr if t else None,
            "multi_queue": t.multi_queue if t else None, "persist": t.persist if t else None,
            "owner": t.owner if t else None, "group": t.group if t else None,
            "master": link.master, "up": link.up, "mtu": link.mtu,
            "mac": (link.mac or "").lower() or None, "txqueuelen": link.txqlen}


def _diff(have: dict[str, Any], want: dict[str, Any]) -> list[Change]:
    return [Change(k, have.get(k), v) for k, v in want.items() if have.get(k) != v]


def _fail_at(decl_line: int | None, path: str, detail: str, hint: str = "") -> ValidationError:
    where = f"{path}:{decl_line}" if decl_line else path
    return ValidationError(where, detail, hint=hint)


def make_plan(spec: Spec, nl: Netlink, *, prune: bool = False,
              proc: str = "/proc") -> Plan:
    """What ``spec`` needs on this host: reads only (one link dump, the holder scan)."""
    links = {x.name: x for x in nl.links()}
    scan = scan_holders(proc)
    items: list[Item] = []
    bridge_mtu: dict[str, int | None] = {}
    for b in spec.bridges:
        link = links.get(b.name)
        if link is not None and not link.is_bridge:
            raise _fail_at(b.line, spec.path, f"bridge {b.name!r} exists and is a "
                           f"{link.kind or 'plain'} link, not a bridge")
        if link is None and not b.managed:
            raise _fail_at(b.line, spec.path, f"bridge {b.name!r} does not exist",
                           hint="create it, or say 'managed: true' to let apply create it")
        if link is None:
            changes = [Change("exists", False, True), Change("up", False, True)]
            if b.mtu is not None:
                changes.append(Change("mtu", None, b.mtu))
            items.append(Item("bridge", b.name, "create", changes, line=b.line))
            bridge_mtu[b.name] = b.mtu if b.mtu is not None else 1500  # br_dev_setup()
            continue
        bridge_mtu[b.name] = b.mtu if b.mtu is not None else link.mtu
        changes = []
        if b.managed:
            want = {"up": True, **({"mtu": b.mtu} if b.mtu is not None else {})}
            changes = _diff({"up": link.up, "mtu": link.mtu}, want)
        items.append(Item("bridge", b.name, "update" if changes else "none", changes,
                          line=b.line))
    declared = {b.name for b in spec.bridges}
    for decl in spec.taps:
        s = decl.spec
        if s.bridge is not None and s.bridge not in declared:
            br = links.get(s.bridge)
            if br is None:
                raise _fail_at(decl.line, spec.path, f"tap {s.name}: bridge {s.bridge!r} does "
                               "not exist", hint="create it, or list it under 'bridges' with "
                               "'managed: true'")
            if not br.is_bridge:
                raise _fail_at(decl.line, spec.path, f"tap {s.name}: {s.bridge!r} is a "
                               f"{br.kind or 'plain'} link, not a bridge")
            bridge_mtu[s.bridge] = br.mtu
        want = _want(decl, bridge_mtu.get(s.bridge) if s.bridge else None)
        link = links.get(s.name)
        if link is None:
            items.append(Item("tap", s.name, "create",
                              [Change(k, None, v) for k, v in want.items()], line=decl.line))
            continue
        if not link.is_tun:
            raise _fail_at(decl.line, spec.path, f"{s.name!r} exists and is a "
                           f"{link.kind or 'plain'} link, not a tap", hint="choose another name")
        changes = _diff(_have(link), want)
        holders = scan.by_name.get(s.name, [])
        item = Item("tap", s.name, "none", changes, _holders(holders, proc), line=decl.line)
        fixed = [c.attr for c in changes if c.attr in _FIXED_ATTRS]
        unset = [c.attr for c in changes if c.attr in _QUEUE_ATTRS and c.after is None]
        queue = [c.attr for c in changes if c.attr in _QUEUE_ATTRS]
        if fixed or unset:
            item.action, item.reason = "recreate", (
                ", ".join(fixed + unset) + (" cannot be changed in place" if fixed else
                                            " cannot be unset in place"))
            if _held(link, holders):
                item.action = "blocked"
        elif changes:
            item.action = "update"
            if queue and _held(link, holders):
                item.action = "blocked"
                item.reason = ", ".join(queue) + " change needs a queue of the tap, and it is held"
        if item.action == "blocked":
            who = "; ".join(f"pid {h.pid} ({h.vm or h.comm})" for h in item.holders) or \
                "a vhost backend or a passed fd (no process has a queue fd open)"
            item.reason += f"; held by {who}: nothing done"
        items.append(item)
    if prune:
        wanted = {d.spec.name for d in spec.taps}
        for link in links.values():
            if link.is_tun and link.alias == spec.mark and link.name not in wanted:
                holders = scan.by_name.get(link.name, [])
                item = Item("tap", link.name, "delete", [Change("exists", True, False)],
                            _holders(holders, proc), reason=f"marked {spec.mark}, not in spec")
                if _held(link, holders):
                    item.action = "blocked"
                    item.reason += "; held by " + ("; ".join(
                        f"pid {h.pid} ({h.vm or h.comm})" for h in item.holders) or
                        "a vhost backend or a passed fd") + ": nothing done"
                items.append(item)
    return Plan(spec.id, items)


# -- act -------------------------------------------------------------------------------------


class ApplyError(VhostctlError):
    """A step failed: the failing item was put back as it was; ``plan`` holds every item's
    status (done ones stay as specified)."""

    def __init__(self, cause: VhostctlError, plan: Plan) -> None:
        done = [f"{i.name} ({i.status})" for i in plan.items
                if i.status in ("created", "updated", "recreated", "deleted")]
        bad = [i for i in plan.items if i.status in ("rolled back", "undo failed")]
        where = f"{bad[0].kind} {bad[0].name}: " if bad else ""
        tail = "changed: " + (", ".join(done) if done else "nothing")
        if bad:
            tail += f"; {bad[0].name} {bad[0].status}" + (f" ({bad[0].reason})"
                                                         if bad[0].reason else "")
        super().__init__(f"apply: {where}{cause.op}", cause.errno or errno.EIO,
                         f"{cause.detail}; {tail}", hint=cause.hint)
        self.cause, self.plan = cause, plan

    @property
    def code(self) -> int:
        return self.cause.code


class _Undo:
    """The undo steps of one item, run newest first."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self.steps.append((what, fn))

    def run(self) -> list[str]:
        failed = []
        for what, fn in reversed(self.steps):
            try:
                fn()
            except VhostctlError as e:
                failed.append(f"{what}: {e}")
        return failed


def _create_tap(spec: taplib.TapSpec, nl: Netlink, *, mtu: int | None, txqlen: int | None,
                alias: str | None, bridge_mac: str | None) -> None:
    """taps.create() with apply's extras (txqueuelen, the mark) before persistence, which
    still comes last: until then closing the queues removes everything."""
    queues = taplib.create(spec, nl, persist=False, mtu=mtu, bridge_mac=bridge_mac)
    try:
        if txqlen is not None:
            nl.set_txqlen(spec.name, txqlen)
        if alias:
            nl.set_alias(spec.name, alias)
        queues[0].set_persist(True)
    except BaseException:
        for q in queues:
            q.close()
        if spec.bridge is not None:
            taplib.restore_bridge_mac(nl, spec.bridge, bridge_mac)
        raise
    for q in queues:
        q.close()


def _create_from(decl: TapDecl, spec: Spec, nl: Netlink) -> None:
    """Create a declared tap; without an MTU of its own it takes its bridge's, as with
    ``tap add --bridge``."""
    br = nl.link(decl.spec.bridge) if decl.spec.bridge else None
    _create_tap(decl.spec, nl, mtu=br.mtu if br is not None else None, txqlen=decl.txqlen,
                alias=spec.mark, bridge_mac=br.mac if br is not None else None)


def _attached(name: str, link: Link) -> Tap:
    t = link.tun
    return Tap.open(name, tap=t is None or t.type != "tun", vnet_hdr=bool(t and t.vnet_hdr),
                    multi_queue=bool(t and t.multi_queue), no_pi=not (t and t.pi))


def _update_tap(item: Item, link: Link, nl: Netlink, undo: _Undo) -> None:
    """Netlink attributes first (each undoable), then owner/group through one attached
    queue.  ``up`` goes last among the netlink steps, so a tap is never brought up half
    configured."""
    name = item.name
    by = {c.attr: c for c in item.changes}
    order = [a for a in ("mtu", "mac", "txqueuelen", "master") if a in by]
    setters: dict[str, Callable[[Any], None]] = {
        "mtu": lambda v: nl.set_mtu(name, v),
        "mac": lambda v: nl.set_mac(name, v),
        "txqueuelen": lambda v: nl.set_txqlen(name, v),
        "master": lambda v: nl.set_master(name, v),
        "up": lambda v: nl.set_up(name, v),
    }
    for attr in order + (["up"] if "up" in by else []):
        c = by[attr]
        setters[attr](c.after)
        if c.before is not None or attr == "master":  # master None: release it again
            undo.push(f"restore {attr} of {name}", functools.partial(setters[attr], c.before))
    queue = [by[a] for a in _QUEUE_ATTRS if a in by]
    if queue:
        with _attached(name, link) as q:
            for c in queue:
                setter = q.set_owner if c.attr == "owner" else q.set_group
                setter(c.after)
                if c.before is not None:
                    undo.push(f"restore {c.attr} of {name}", functools.partial(setter, c.before))


def _restore_tap(old: Link, nl: Netlink) -> None:
    """Recreate a tap we deleted from what the link dump said it was (undo of a recreate)."""
    t = old.tun
    spec = taplib.TapSpec(
        name=old.name, queues=2 if t and t.multi_queue else 1,
        vnet_hdr=bool(t and t.vnet_hdr), owner=t.owner if t else None,
        group=t.group if t else None, bridge=old.master, mtu=old.mtu,
        mac=(old.mac or "").lower() or None)
    _create_tap(spec, nl, mtu=old.mtu, txqlen=old.txqlen, alias=old.alias, bridge_mac=None)
    if not old.up:
        nl.set_up(old.name, False)


def execute(plan: Plan, spec: Spec, nl: Netlink, *, proc: str = "/proc") -> Plan:
    """Carry ``plan`` out.  Blocked items refuse the whole apply before any change."""
    if plan.blocked:
        b = plan.blocked[0]
        for i in plan.items:
            i.status = "blocked" if i.action == "blocked" else "not done"
        raise ApplyError(VhostctlError(f"{b.kind} {b.name}", errno.EBUSY, b.reason,
                                       hint="stop the holder, or change the spec back"), plan)
    decls = {d.spec.name: d for d in spec.taps}
    bdecls = {b.name: b for b in spec.bridges}
    links = {x.name: x for x in nl.links()} if any(
        i.action != "none" for i in plan.items) else {}
    for item in plan.items:
        if item.action == "none":
            item.status = "unchanged"
            continue
        undo = _Undo()
        try:
            if item.kind == "bridge":
                _do_bridge(item, bdecls[item.name], spec, nl, undo)
            elif item.action == "create":
                d = decls[item.name]
                _create_from(d, spec, nl)
                item.status = "created"
            elif item.action == "update":
                _update_tap(item, links[item.name], nl, undo)
                item.status = "updated"
            elif item.action == "recreate":
                d = decls[item.name]
                old = links[item.name]
                taplib.delete(item.name, nl, proc=proc)
                undo.push(f"recreate {item.name} as it was",
                          functools.partial(_restore_tap, old, nl))
                _create_from(d, spec, nl)
                item.status = "recreated"
            elif item.action == "delete":
                taplib.delete(item.name, nl, proc=proc)
                item.status = "deleted"
        except VhostctlError as e:
            failed = undo.run()
            item.status, item.reason = ("undo failed", "; ".join(failed)) if failed else \
                ("rolled back", "")
            if item.action == "delete" and _gone(nl, item.name):
                item.status, item.reason = "deleted", ""  # it went with its last queue

            for rest in plan.items:
                if rest.status == "pending":
                    rest.status = "not done"
            raise ApplyError(e, plan) from None
    return plan


def _gone(nl: Netlink, name: str) -> bool:
    try:
        return nl.find(name) is None
    except VhostctlError:
        return False


def _do_bridge(item: Item, decl: BridgeDecl, spec: Spec, nl: Netlink, undo: _Undo) -> None:
    if item.action == "create":
        nl.add_bridge(decl.name)
        undo.push(f"delete bridge {decl.name}", lambda: nl.delete(decl.name))
        nl.set_alias(decl.name, spec.mark)
        if decl.mtu is not None:
            nl.set_mtu(decl.name, decl.mtu)
        nl.set_up(decl.name)
        item.status = "created"
        return
    for c in item.changes:
        if c.attr == "mtu":
            nl.set_mtu(decl.name, c.after)
            undo.push(f"restore mtu of {decl.name}",
                      functools.partial(nl.set_mtu, decl.name, c.before))
        elif c.attr == "up":
            nl.set_up(decl.name, c.after)
            undo.push(f"restore state of {decl.name}",
                      functools.partial(nl.set_up, decl.name, c.before))
    item.status = "updated"


def apply(spec: Spec, *, check: bool = False, prune: bool = False, nl: Netlink | None = None,
          proc: str = "/proc") -> Plan:
    """Plan, and unless ``check``, act.  The returned plan carries each item's status."""
    own = nl is None
    nl = nl or Netlink()
    try:
        plan = make_plan(spec, nl, prune=prune, proc=proc)
        if check:
            for i in plan.items:
                i.status = {"none": "unchanged", "blocked": "blocked"}.get(
                    i.action, "would " + i.action)
            return plan
        return execute(plan, spec, nl, proc=proc)
    finally:
        if own:
            nl.close()

