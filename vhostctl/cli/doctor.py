"""``vhostctl doctor``: why vhost-net is not used, or is slow, for a VM; evidence and fix."""

from __future__ import annotations

from typing import Annotated

import typer

from . import JsonOpt, app, guarded
from .vm import TimeoutOpt


@app.command()
@guarded
def doctor(
    select: Annotated[list[str] | None, typer.Argument(
        metavar="[VM|PID|TAP]...", help="Only these VMs (pid, VM name, command name) or taps "
        "(default: every VMM on the host, and host-wide checks).")] = None,
    qmp: Annotated[str | None, typer.Option(
        "--qmp", metavar="SOCKET", help="Ask this QEMU (its -qmp socket) whether vhost-net "
        "started and whether the guest driver is ready.")] = None,
    watch: Annotated[float | None, typer.Option(
        "--watch", metavar="SECONDS", min=0.5, help="Sample counters and CPU over this "
        "window: drops and saturated, starved or lone workers are measured.")] = None,
    timeout: TimeoutOpt = 5.0,
    json_: JsonOpt = False,
) -> None:
    """Name what keeps vhost-net from being used, or makes it slow, with evidence and fix.

    Each finding has a stable id, a severity (error: vhost-net broken or bypassed; warning:
    it costs performance; info), what was read and the value found, and the fix.  Checks
    that could not run (no --qmp, no --watch) are listed with the reason.  Exits 0 when
    nothing above info is found, 1 otherwise.
    """
    from ..doctor import doctor as run
    from ..render import print_json
    from ..render_doctor import print_report

    report = run(select or (), qmp_path=qmp, watch=watch, timeout=timeout)
    if json_:
        print_json(report.as_dict())
    else:
        print_report(report)
    if report.exit_code:
        raise typer.Exit(report.exit_code)
