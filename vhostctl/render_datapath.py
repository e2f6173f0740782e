"""Rendering of datapath results (selftest): rich tables for people, dicts for --json."""

from __future__ import annotations

from typing import Any

from .render import console


def print_selftest(report: Any) -> None:
    """One row per queue pair, then the verdict and any problem found."""
    from rich.table import Table

    t = Table(title=f"vhost-net selftest on {report.tap} (kernel {report.kernel})",
              title_justify="left")
    for col in ("queue", "TX frames", "TX bytes", "TX verified", "RX frames", "RX bytes",
                "RX verified", "time"):
        t.add_column(col, justify="right")
    for q in report.queues:
        t.add_row(str(q.queue), str(q.tx_frames), str(q.tx_bytes), str(q.tx_verified),
                  str(q.rx_frames), str(q.rx_bytes), str(q.rx_verified), f"{q.seconds:.3f}s")
    c = console()
    c.print(t)
    c.print(f"features: {', '.join(report.features)}")
    c.print(f"virtio-net header: {report.hdr_len} bytes, placed by the "
            f"{'tap (IFF_VNET_HDR)' if report.hdr_mode == 'tap' else 'vhost (bit 27)'}")
    for p in report.problems:
        c.print(f"[red]✗[/] {p}")
    if report.ok:
        c.print("[green]✓[/] every frame crossed vhost-net intact, both ways")
