"""``vhostctl metrics`` (one scrape to stdout or a node_exporter textfile) and ``vhostctl
serve`` (``/metrics`` over HTTP): Prometheus series for vhost-net NICs."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import JsonOpt, app, guarded

NoChecksOpt = Annotated[bool, typer.Option(
    "--no-checks", help="Leave out vhostctl_host_check (no open of /dev/vhost-net and "
    "/dev/net/tun per scrape).")]


@app.command()
@guarded
def metrics(
    textfile: Annotated[str | None, typer.Option(
        "--textfile", metavar="PATH", help="Write atomically (temporary file, rename) to "
        "PATH, a .prom file in node_exporter's --collector.textfile.directory, instead of "
        "stdout.")] = None,
    no_checks: NoChecksOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Scan once and print every vhostctl_* series in the Prometheus text format.

    \b
    Example (cron or a systemd timer, every 15 s to 1 min):
      vhostctl metrics --textfile /var/lib/prometheus/node-exporter/vhostctl.prom
    """
    from ..metrics import VhostCollector, exposition, registry, samples, write_textfile

    reg = registry(VhostCollector(checks=not no_checks))
    if json_:
        from ..render import print_json

        print_json(samples(reg))
        return
    data = exposition(reg)
    if textfile:
        write_textfile(textfile, data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


@app.command()
@guarded
def serve(
    listen: Annotated[str, typer.Option(
        "--listen", metavar="ADDR:PORT", help="Address and port to serve /metrics on: "
        "127.0.0.1:9917, [::1]:9917, or :9917 for every IPv4 address.")],
    no_checks: NoChecksOpt = False,
) -> None:
    """Serve /metrics over HTTP; every scrape scans once (no background thread, nothing
    cached).  Runs until SIGTERM (exit 0) or Ctrl-C (exit 130)."""
    from ..metrics import VhostCollector, registry
    from ..metrics import serve as serve_
    from ..render import err_console

    def ready(addr: str) -> None:
        err_console().print(f"vhostctl: serving http://{addr}/metrics", markup=False,
                            highlight=False)

    serve_(listen, registry(VhostCollector(checks=not no_checks)), ready=ready)
