"""``vhostctl apply`` and ``vhostctl export``: a YAML spec of taps, made true or exported."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import EXIT_FAILURE, VhostctlError
from . import JsonOpt, app, fail, guarded

SpecOpt = Annotated[str, typer.Option("--file", "-f", metavar="SPEC",
                                      help="The YAML spec (schema in vhostctl(8)).")]

# Terraform's -detailed-exitcode: 0 nothing to do, 1 error, 2 changes made or pending.
_DETAILED_CHANGES = 2


@app.command("apply")
@guarded
def apply_(
    file: SpecOpt,
    check: Annotated[bool, typer.Option(
        "--check", help="Print the plan and change nothing.")] = False,
    diff: Annotated[bool, typer.Option(
        "--diff", help="Show every attribute that changes, before and after.")] = False,
    prune: Annotated[bool, typer.Option(
        "--prune", help="Also delete taps this spec's id marked (ifalias) and that it no "
        "longer lists.  Unmarked taps are never deleted.")] = False,
    detailed_exitcode: Annotated[bool, typer.Option(
        "--detailed-exitcode", help="Exit 0 when nothing changed or would change, 2 when "
        "something did or would, 1 on any error.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Make this host's taps (and the bridges the spec manages) what SPEC says.

    Plans first (reading only), then acts tap by tap; a failing step puts that tap back as
    it was and the error names every tap already changed.  Applying the same spec again
    writes nothing.
    """
    from ..apply import ApplyError, apply, read_spec
    from ..render import print_json
    from ..render_apply import print_plan

    try:
        plan = apply(read_spec(file), check=check, prune=prune)
    except ApplyError as e:
        if json_:
            print_json({"check": check, "error": str(e), **e.plan.to_dict()})
        raise fail(str(e), EXIT_FAILURE if detailed_exitcode else e.code) from None
    except VhostctlError as e:
        if not detailed_exitcode:
            raise
        raise fail(str(e), EXIT_FAILURE) from None
    if json_:
        print_json({"check": check, "error": None, **plan.to_dict()})
    else:
        print_plan(plan, diff=diff)
    if detailed_exitcode and plan.changes:
        raise typer.Exit(_DETAILED_CHANGES)


@app.command("export")
@guarded
def export_(
    file: SpecOpt,
    format_: Annotated[str, typer.Option(
        "--format", metavar="FORMAT",
        help="networkd (.netdev/.network files) or udev (a rule for what networkd cannot "
        "set on a tap).")] = "networkd",
    output: Annotated[str | None, typer.Option(
        "--output", "-o", metavar="DIR",
        help="Write the files into DIR (e.g. /etc/systemd/network) instead of printing "
        "them.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Convert SPEC into files that recreate its taps at boot without vhostctl.

    Every file names what it cannot express (a tap's MTU and txqueuelen in networkd's [Tap],
    offloads); the udev format covers MTU and txqueuelen.
    """
    from ..apply import read_spec
    from ..export import export, write_files
    from ..render import print_json, print_line

    result = export(read_spec(file), format_)
    if output is not None:
        write_files(result, output)
    if json_:
        print_json(result.to_dict())
        return
    if output is not None:
        for f in result.files:
            print_line(f"wrote {output.rstrip('/')}/{f.name}")
    else:
        for f in result.files:
            print_line(f"# --- {f.name}")
            print_line(f.content.rstrip("\n"))
    for note in result.notes:
        print_line(f"vhostctl: note: {note}", err=True)
