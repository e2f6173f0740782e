"""``vhostctl up``: a resident probe guest on vhost-net that answers ARP and ping."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Annotated

import typer

from . import JsonOpt, app, guarded


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], str | None]]:
    """SIGINT and SIGTERM ask the loop to stop (by name) instead of killing the process.

    The loop polls the returned callable at least every 200 ms and tears down itself, so a
    signal never lands in the middle of a ring update.  The old handlers come back on exit.
    """
    caught: list[str] = []

    def handler(signum: int, frame: object) -> None:
        caught.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: caught[0] if caught else None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@app.command()
@guarded
def up(
    name: Annotated[str, typer.Argument(metavar="NAME", show_default=False,
                                        help="Name of the tap to create; it must not exist.")],
    bridge: Annotated[str, typer.Option(
        "--bridge", "-b", metavar="BR", show_default=False,
        help="Existing bridge to enslave the tap to; the tap takes its MTU.")],
    ip: Annotated[str, typer.Option(
        "--ip", metavar="ADDR/PREFIX", show_default=False,
        help="The guest's IPv4 address with prefix length, e.g. 10.0.0.2/24.")],
    mac: Annotated[str | None, typer.Option(
        "--mac", metavar="MAC",
        help="The guest's MAC address; the default is random with QEMU's prefix "
        "52:54:00.")] = None,
    queues: Annotated[int, typer.Option(
        "--queues", "-q", metavar="N",
        help="Queue pairs (a multi-queue tap when more than one).")] = 1,
    ip6: Annotated[str | None, typer.Option(
        "--ip6", metavar="ADDR/PREFIX",
        help="Also answer IPv6 neighbour solicitations and ping for this address.")] = None,
    duration: Annotated[float | None, typer.Option(
        "--duration", metavar="SECONDS",
        help="Stop after this many seconds instead of waiting for a signal.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Run a probe guest on vhost-net that answers ARP and ping until stopped.

    The tap NAME is created, put in bridge BR and brought up; this process owns its
    virtqueues and answers ARP and ICMP echo (and, with --ip6, IPv6 neighbour
    solicitations and echo) for the guest's address, with live counters.  SIGINT or SIGTERM
    stops it: the tap disappears and the exit status is 0.
    """
    from ..probe import ProbeConfig, plan, run_probe
    from ..render import print_json, print_line

    cfg = ProbeConfig.make(name, bridge=bridge, ip=ip, mac=mac, queues=queues, ip6=ip6,
                           duration=duration)
    with stop_on_signals() as stop:
        p = plan(cfg)
        for w in p.warnings:
            print_line(f"vhostctl: warning: {w}", err=True)
        if json_:
            report = run_probe(p, stop=stop)
        else:
            from ..render_probe import live_probe, print_probe_end

            with live_probe() as show:
                report = run_probe(p, stop=stop, on_tick=show)
            print_probe_end(report)
    if json_:
        print_json(report.to_dict())
