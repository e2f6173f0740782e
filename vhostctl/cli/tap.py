"""``vhostctl tap add|del|list|show``: persistent taps for vhost-net and QEMU."""

from __future__ import annotations

from typing import Annotated

import typer

from . import JsonOpt, app, guarded

tap_app = typer.Typer(
    help="Create, delete and inspect tun/tap devices.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(tap_app, name="tap")

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The interface name.",
                                        show_default=False)]


@tap_app.command("add")
@guarded
def add(
    name: NameArg,
    queues: Annotated[int, typer.Option(
        "--queues", "-q", min=1, max=256, metavar="N",
        help="Number of queues; more than one makes a multi-queue tap.")] = 1,
    vnet_hdr: Annotated[bool, typer.Option(
        "--vnet-hdr/--no-vnet-hdr",
        help="Give the tap a virtio-net header (IFF_VNET_HDR), as vhost-net and QEMU "
        "expect.")] = True,
    persist: Annotated[bool, typer.Option(
        "--persist",
        help="Keep the tap after vhostctl exits.  Taps made by tap add are always "
        "persistent, as with ip tuntap add; the flag is accepted so scripts can say "
        "so.")] = True,
    owner: Annotated[str | None, typer.Option(
        "--owner", metavar="USER",
        help="User (name or uid) allowed to attach the tap without CAP_NET_ADMIN.  With "
        "neither --owner nor --group, the owner is the invoking user (SUDO_UID under sudo, "
        "else the effective uid): a tap with neither can be attached by anyone.")] = None,
    group: Annotated[str | None, typer.Option(
        "--group", metavar="GROUP",
        help="Group (name or gid) allowed to attach the tap without CAP_NET_ADMIN.")] = None,
    bridge: Annotated[str | None, typer.Option(
        "--bridge", metavar="BR",
        help="Enslave the tap to this bridge; its MTU becomes the tap's unless --mtu is "
        "given.")] = None,
    mtu: Annotated[int | None, typer.Option(
        "--mtu", metavar="N", help="MTU of the tap, 68 to 65521.")] = None,
    mac: Annotated[str | None, typer.Option(
        "--mac", metavar="MAC",
        help="Link address; the default is random with first octet fe, so that a bridge "
        "never adopts it.")] = None,
    netns: Annotated[str | None, typer.Option(
        "--netns", metavar="NS",
        help="Move the tap into this named network namespace (ip netns) and bring it up "
        "there.")] = None,
    offload: Annotated[str | None, typer.Option(
        "--offload", metavar="LIST",
        help="Comma-separated tun offloads to enable (csum, tso4, tso6, tso_ecn, ufo, uso4, "
        "uso6).")] = None,
    exist_ok: Annotated[bool, typer.Option(
        "--exist-ok",
        help="Succeed if a tap of that name exists exactly as asked; fail listing the "
        "differences otherwise.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Create a persistent tap, configure it and bring it up.

    The tap is created exclusively (never over an existing link), then given its owner,
    group, offloads, MTU, MAC and master, brought up (or moved into a namespace), and made
    persistent last.  If any step fails, everything done so far is undone.
    """
    from ..render import print_json, print_line, print_tap
    from ..taps import add as add_tap
    from ..taps import make_spec

    spec = make_spec(name, queues=queues, vnet_hdr=vnet_hdr, owner=owner, group=group,
                     bridge=bridge, mtu=mtu, mac=mac, netns=netns, offloads=offload)
    result = add_tap(spec, exist_ok=exist_ok)
    if json_:
        print_json(result.to_dict())
        return
    print_line(f"{'created' if result.created else 'exists as asked:'} {name}")
    print_tap(result.tap)


@tap_app.command("del")
@guarded
def delete(name: NameArg, json_: JsonOpt = False) -> None:
    """Delete a tun/tap device that no process holds.

    Links of other kinds are refused.  A tap in use is not deleted; the error names the
    processes that hold it.
    """
    from ..render import print_json, print_line
    from ..taps import delete as delete_tap

    delete_tap(name)
    if json_:
        print_json({"deleted": name})
    else:
        print_line(f"deleted {name}")


@tap_app.command("list")
@guarded
def list_(json_: JsonOpt = False) -> None:
    """List every tun/tap with its flags, queues, owner, bridge, counters and holders."""
    from ..render import print_json, print_tap_list
    from ..taps import list_taps

    taps = list_taps()
    if json_:
        print_json(taps.to_dict())
    else:
        print_tap_list(taps)


@tap_app.command("show")
@guarded
def show(name: NameArg, json_: JsonOpt = False) -> None:
    """Show one tun/tap in detail, including the processes holding its queues."""
    from ..render import print_json, print_tap
    from ..taps import show_tap

    tap = show_tap(name)
    if json_:
        print_json(tap.to_dict())
    else:
        print_tap(tap)
