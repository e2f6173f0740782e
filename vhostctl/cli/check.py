"""``vhostctl check`` and ``vhostctl features``: what this host and kernel offer."""

from __future__ import annotations

import typer

from ..errors import EXIT_FAILURE
from . import JsonOpt, app, guarded


@app.command()
@guarded
def check(json_: JsonOpt = False) -> None:
    """Check whether this host is ready for vhost-net and say how to fix what is not.

    Opens /dev/vhost-net and /dev/net/tun for real, checks their device numbers, modules,
    offered features, module parameters, the vhost worker model, CAP_NET_ADMIN, container
    limits and /dev/kvm.  Exits 0 when ready, 1 when not.
    """
    from ..hostcheck import host_report
    from ..render import print_checks, print_json

    report = host_report()
    if json_:
        print_json(report.to_dict())
    else:
        print_checks(report)
    if not report.ready:
        raise typer.Exit(EXIT_FAILURE)


@app.command()
@guarded
def features(json_: JsonOpt = False) -> None:
    """List every feature, flag and offload the running kernel offers, decoded by name.

    Shows the vhost-net feature bits (VHOST_GET_FEATURES), the vhost backend features, the
    tun flags (TUNGETFEATURES) and the tun offloads vhostctl knows.
    """
    from ..hostcheck import offered
    from ..render import print_features, print_json

    data = offered()
    if json_:
        print_json(data)
    else:
        print_features(data)
