"""``vhostctl export``: an apply spec as systemd-networkd or udev files, for hosts that
recreate their taps at boot without vhostctl.

Neither format can say everything a spec says, and every file says what it leaves out:

- networkd's ``[Tap]`` (systemd.netdev(5)) has no MTU, txqueuelen, offloads or ifalias.  The
  MTU and txqueuelen go to the ``.network`` file's ``[Link]`` (applied once networkd manages
  the link) and, for ``--format udev``, to a rule that writes ``/sys/class/net/NAME/mtu``
  and ``tx_queue_len`` when the tap appears.  Offloads belong to whoever attaches the tap
  (QEMU sets its own), and the apply mark is not written: an exported tap is networkd's.
- udev cannot create a tap (only TUNSETIFF can), so ``--format udev`` is the companion of
  ``vhostctl apply`` or of networkd's ``.netdev``, setting what they leave to udev.
- networkd's ``[Tap]`` has ``MultiQueue=`` but no queue count: a persistent tap has none
  (tun_fill_info() reports queues only while attached).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .apply import Spec, TapDecl
from .errors import ValidationError, VhostctlError
from .taps import group_name, user_name

FORMATS = ("networkd", "udev")


@dataclass(frozen=True)
class ExportFile:
    name: str
    content: str


@dataclass(frozen=True)
class Export:
    format: str
    files: list[ExportFile]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "notes": self.notes,
                "files": [{"name": f.name, "content": f.content} for f in self.files]}


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def _tap_mtu(decl: TapDecl, spec: Spec) -> int | None:
    """The MTU to write: the tap's own, or with ``inherit: bridge`` the managed bridge's
    (an unmanaged bridge's MTU is not known without the kernel: then none is written)."""
    if not decl.mtu_from_bridge:
        return decl.spec.mtu
    return next((b.mtu for b in spec.bridges if b.name == decl.spec.bridge), None)


def _left_out(decl: TapDecl, spec: Spec) -> list[str]:
    out = []
    if decl.spec.offloads:
        out.append("offloads (set by whoever attaches the tap: QEMU sets its own)")
    if decl.mtu_from_bridge and _tap_mtu(decl, spec) is None:
        out.append(f"mtu inherit: bridge ({decl.spec.bridge} is not managed by the spec, "
                   "its MTU is not known here)")
    if _tap_mtu(decl, spec) is not None or decl.txqlen is not None:
        out.append("MTU and txqueuelen ([Tap] has neither: they are in the .network file's "
                   "[Link], and in the udev rule of 'vhostctl export --format udev')")
    return out


def _networkd(spec: Spec) -> Export:
    files: list[ExportFile] = []
    notes: list[str] = []
    for b in spec.bridges:
        if not b.managed:
            continue
        mtu_line = f"MTUBytes={b.mtu}\n" if b.mtu is not None else ""
        files.append(ExportFile(f"10-vhostctl-{b.name}.netdev",
                                f"# vhostctl export of {spec.path}, bridge {b.name}\n"
                                f"[NetDev]\nName={b.name}\nKind=bridge\n{mtu_line}"))
        files.append(ExportFile(f"10-vhostctl-{b.name}.network",
                                f"# vhostctl export of {spec.path}, bridge {b.name}\n"
                                f"[Match]\nName={b.name}\n\n[Link]\nRequiredForOnline=no\n\n"
                                "[Network]\nConfigureWithoutCarrier=yes\n"
                                "LinkLocalAddressing=no\n"))
    for d in spec.taps:
        s = d.spec
        missing = _left_out(d, spec)
        head = f"# vhostctl export of {spec.path} line {d.line}, tap {s.name}\n" + "".join(
            f"# not expressible here: {m}\n" for m in missing)
        netdev = f"{head}[NetDev]\nName={s.name}\nKind=tap\n"
        netdev += f"\n[Tap]\nMultiQueue={_yes(s.multi_queue)}\nPacketInfo=no\n" \
                  f"VNetHeader={_yes(s.vnet_hdr)}\n"
        if s.owner is not None:
            netdev += f"User={user_name(s.owner)}\n"
        if s.group is not None:
            netdev += f"Group={group_name(s.group)}\n"
        files.append(ExportFile(f"10-vhostctl-{s.name}.netdev", netdev))
        # networkd ignores a tap's MACAddress= in [NetDev] ("set it in the corresponding
        # .network file", systemd 252): it goes to [Link].
        link = "RequiredForOnline=no\n" + (f"MACAddress={s.mac}\n" if s.mac else "")
        mtu = _tap_mtu(d, spec)
        if mtu is not None:
            link += f"MTUBytes={mtu}\n"
        network = (f"# vhostctl export of {spec.path} line {d.line}, tap {s.name}\n"
                   f"[Match]\nName={s.name}\n\n[Link]\n{link}\n[Network]\n"
                   "ConfigureWithoutCarrier=yes\nLinkLocalAddressing=no\n")
        if s.bridge:
            network += f"Bridge={s.bridge}\n"
        files.append(ExportFile(f"10-vhostctl-{s.name}.network", network))
        if d.txqlen is not None:
            notes.append(f"{s.name}: txqueuelen {d.txqlen} has no networkd setting for a tap: "
                         "use 'vhostctl export --format udev'")
        notes += [f"{s.name}: {m}" for m in missing if not m.startswith("MTU and")]
    return Export("networkd", files, notes)


def _udev(spec: Spec) -> Export:
    rules = [f"# vhostctl export of {spec.path}: what networkd's [Tap] cannot say.",
             "# udev cannot create a tap: vhostctl apply or networkd's .netdev does."]
    notes = []
    for d in spec.taps:
        attrs = []
        mtu = _tap_mtu(d, spec)
        if mtu is not None:
            attrs.append(f'ATTR{{mtu}}="{mtu}"')
        if d.txqlen is not None:
            attrs.append(f'ATTR{{tx_queue_len}}="{d.txqlen}"')
        if attrs:
            rules.append(f'ACTION=="add", SUBSYSTEM=="net", KERNEL=="{d.spec.name}", '
                         f'ATTR{{tun_flags}}=="?*", {", ".join(attrs)}')
        else:
            notes.append(f"{d.spec.name}: nothing for udev (no MTU, no txqueuelen)")
    return Export("udev", [ExportFile("70-vhostctl.rules", "\n".join(rules) + "\n")], notes)


def export(spec: Spec, fmt: str) -> Export:
    if fmt not in FORMATS:
        raise ValidationError("export", f"unknown format {fmt!r}", hint="networkd or udev")
    return _networkd(spec) if fmt == "networkd" else _udev(spec)


def write_files(result: Export, directory: str) -> None:
    """Write every file into ``directory`` (which must exist), each through a temporary
    name and a rename, so that networkd or udev never reads half a file."""
    import os

    if not os.path.isdir(directory):
        raise ValidationError("export", f"{directory!r} is not a directory")
    for f in result.files:
        path = os.path.join(directory, f.name)
        tmp = f"{path}.vhostctl-tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                out.write(f.content)
            os.replace(tmp, path)
        except OSError as e:
            raise VhostctlError(f"write {path}", e.errno or 5) from None
