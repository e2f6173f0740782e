"""Rendering: rich consoles, tables and JSON.  No logic, no kernel access."""

from __future__ import annotations

import json
import sys
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


@cache
def console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


@cache
def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Stable JSON on stdout: sorted keys, one document, trailing newline."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# -- check / features / tap (vhostctl.cli.check, vhostctl.cli.tap) ---------------------------

_MARK = {True: "✓", False: "✗", None: "·"}


def print_line(text: str, *, err: bool = False) -> None:
    """One unwrapped plain line: output stays grep-able whatever the terminal width."""
    (err_console() if err else console()).print(text, markup=False, soft_wrap=True)


def print_checks(report: Any) -> None:
    """One line per host check (``✓``/``✗``/``·`` for information), the fix under a failure."""
    width = max((len(c.name) for c in report.checks), default=0)
    for c in report.checks:
        print_line(f"{_MARK[c.ok]} {c.name:<{width}}  {c.detail}")
        if c.fix and c.ok is not True:
            print_line(f"  {'':<{width}}  fix: {c.fix}")
    failed = sum(1 for c in report.checks if c.ok is False)
    print_line("ready" if report.ready else f"not ready: {failed} check(s) failed")


def print_features(offered: dict[str, Any]) -> None:
    """Feature words by source, one name per line, value in hex beside the heading."""
    sections = (("vhost-net features (VHOST_GET_FEATURES)", offered.get("vhost")),
                ("vhost backend features (VHOST_GET_BACKEND_FEATURES)",
                 offered.get("vhost_backend")),
                ("tun flags (TUNGETFEATURES)", offered.get("tun")))
    for title, word in sections:
        if word is None:
            print_line(f"{title}: not offered")
            continue
        print_line(f"{title}: {word['value']}")
        for name in word["names"]:
            print_line(f"  {name}")
    print_line("tun offloads known to vhostctl (TUNSETOFFLOAD; the kernel has no query):")
    for o in offered.get("tun_offloads", []):
        print_line(f"  {o['name']} {o['value']}")


def _queues(tap: Any) -> str:
    if tap.queues is None:
        return "?"
    return f"{tap.queues}" + (f"+{tap.disabled_queues}off" if tap.disabled_queues else "")


def _holders(tap: Any) -> str:
    return ",".join(f"{h.comm}[{h.pid}]:{h.fd}" for h in tap.holders) or "-"


def print_tap_list(taps: Any) -> None:
    """An aligned table of every tun/tap (like ``ip -br``); warnings go to stderr."""
    head = ("NAME", "TYPE", "FLAGS", "QUEUES", "HDR", "OWNER", "GROUP", "PERSIST", "MASTER",
            "MTU", "STATE", "RX", "TX", "HOLDERS")
    rows = [head]
    for t in taps.taps:
        flags = ",".join(f.removeprefix("IFF_").lower() for f in t.flags
                         if f not in ("IFF_TAP", "IFF_TUN", "IFF_PERSIST"))
        rows.append((
            t.name, t.type or "?", flags or "-", _queues(t),
            "-" if t.vnet_hdr_sz is None else str(t.vnet_hdr_sz),
            t.owner_name or "-", t.group_name or "-", "yes" if t.persist else "no",
            t.master or "-", str(t.mtu), ("up" if t.up else "down") + f"/{t.operstate}",
            str(t.stats.get("rx_packets", 0)), str(t.stats.get("tx_packets", 0)),
            _holders(t)))
    if not taps.taps:
        print_line("no tun/tap devices")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for r in rows:
            print_line("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for w in [w for t in taps.taps for w in t.warnings]:
        print_line(f"vhostctl: warning: {w}", err=True)
    if taps.unreadable_processes:
        print_line(f"vhostctl: warning: {taps.unreadable_processes} process(es) could not be "
              "inspected for tap holders; run as root to see them all", err=True)


def print_tap(tap: Any) -> None:
    """One tap as ``key: value`` lines."""
    rows = [
        ("name", tap.name), ("ifindex", tap.ifindex), ("type", tap.type),
        ("flags", " ".join(tap.flags)), ("persist", tap.persist),
        ("queues", f"{tap.queues} attached, {tap.disabled_queues} disabled"),
        ("vnet_hdr_sz", "unknown (no holder readable)" if tap.vnet_hdr_sz is None
         else tap.vnet_hdr_sz),
        ("owner", "none" if tap.owner is None else f"{tap.owner_name} ({tap.owner})"),
        ("group", "none" if tap.group is None else f"{tap.group_name} ({tap.group})"),
        ("mtu", tap.mtu), ("mac", tap.mac),
        ("state", ("up" if tap.up else "down") + f", operstate {tap.operstate}"),
        ("master", tap.master or "none"),
        ("stats", " ".join(f"{k}={v}" for k, v in tap.stats.items())),
        ("holders", _holders(tap)),
    ]
    for key, value in rows:
        print_line(f"{key + ':':<13}{value}")
    for w in tap.warnings:
        print_line(f"vhostctl: warning: {w}", err=True)
