"""Rendering for ``vhostctl doctor``: findings, worst first, each with its evidence and fix.

No logic and no kernel access: everything shown comes from a :class:`vhostctl.doctor.Report`.
"""

from __future__ import annotations

from typing import Any

from .render import console

_STYLE = {"error": "bold red", "warning": "bold yellow", "info": "cyan"}


def print_report(report: Any) -> None:
    """One finding per block; lines are never broken by us (soft wrap), so a pipe or a log
    keeps each evidence line whole for grep, and a terminal wraps them itself."""
    from rich.text import Text

    out = console()
    for f in report.findings:
        head = Text()
        head.append(f"{f.severity:<7}", _STYLE.get(f.severity, ""))
        head.append(f" {f.id}", "bold")
        head.append(f"  {f.subject}")
        out.print(head, soft_wrap=True)
        out.print(Text(f"  {f.summary}"), soft_wrap=True)
        for source, value in f.evidence:
            out.print(Text(f"    {source}: {value}", style="dim"), soft_wrap=True)
        out.print(Text(f"  fix: {f.fix}", style="green"), soft_wrap=True)
    for n in report.not_run:
        out.print(Text(f"not run {n.check}  {n.subject}: {n.reason}", style="dim"),
                  soft_wrap=True)
    counts = ", ".join(f"{report.count(s)} {s}{'s' if report.count(s) != 1 and s != 'info' else ''}"
                       for s in ("error", "warning", "info"))
    what = ", ".join(report.subjects) if report.subjects else "no VM"
    window = f", over {report.window:g} s" if report.window else ""
    out.print(Text(f"{counts} ({what}{window})",
                   style="bold" if report.exit_code else "bold green"), soft_wrap=True)
