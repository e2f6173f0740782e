"""Rendering of the probe guest (``vhostctl up``): a live counter table, a closing line."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from .render import console

# (column heading, ProbeReport counter); the IPv6 ones only when the guest has --ip6.
_COLUMNS = (("RX", "rx_frames"), ("TX", "tx_frames"), ("ARP", "arp_replies"),
            ("echo", "echo_replies"))
_COLUMNS6 = (("NA", "nd_adverts"), ("echo6", "echo6_replies"))
_TAIL = (("ignored", "ignored"), ("dropped", "dropped"), ("ring full", "tx_dropped"))


def _columns(report: Any) -> tuple[tuple[str, str], ...]:
    return _COLUMNS + (_COLUMNS6 if report.ipv6 else ()) + _TAIL


def title(report: Any) -> str:
    addrs = report.ipv4 + (f" {report.ipv6}" if report.ipv6 else "")
    return (f"probe guest {report.mac} {addrs} on {report.tap} (host side {report.tap_mac}) "
            f"in bridge {report.bridge}, MTU {report.mtu}")


def probe_table(report: Any) -> Any:
    """One row per queue pair, a total row when there are several."""
    from rich.table import Table

    cols = _columns(report)
    t = Table(title=title(report), title_justify="left",
              caption=f"up {report.seconds:.0f}s.  ARP, echo, NA, echo6: replies sent; ring "
              "full: replies the TX ring had no room for.  Ctrl-C or SIGTERM stops.",
              caption_justify="left")
    t.add_column("queue", justify="right")
    for head, _ in cols:
        t.add_column(head, justify="right")
    for q in report.queues:
        t.add_row(str(q.queue), *(str(getattr(q, k)) for _, k in cols))
    if len(report.queues) > 1:
        totals = report.totals()
        t.add_row("all", *(str(totals[k]) for _, k in cols), style="bold")
    return t


@contextlib.contextmanager
def live_probe() -> Iterator[Callable[[Any], None]]:
    """A rich Live screen; yields the callable that redraws it from a report.

    Not on a terminal (a pipe, a log file) the table is printed once, when the probe stops.
    """
    from rich.live import Live
    from rich.text import Text

    c = console()
    if not c.is_terminal:
        seen: list[Any] = []
        yield seen.append
        if seen:
            c.print(probe_table(seen[-1]))
        return
    with Live(Text("starting the probe guest…", style="dim"), console=c,
              auto_refresh=False) as live:
        yield lambda report: live.update(probe_table(report), refresh=True)


def print_probe_end(report: Any) -> None:
    """The closing line under the live table."""
    t = report.totals()
    v6 = f", {t['nd_adverts']} NA, {t['echo6_replies']} echo6" if report.ipv6 else ""
    console().print(f"stopped by {report.stopped_by} after {report.seconds:.1f}s: "
                    f"{t['arp_replies']} ARP, {t['echo_replies']} echo{v6} replies; "
                    f"{report.tap} removed", markup=False, soft_wrap=True)
