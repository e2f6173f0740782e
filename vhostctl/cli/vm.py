"""VM commands: ``exec`` (hand-off to QEMU), ``hotplug``/``unplug`` (QMP), ``inspect``, ``top``."""

from __future__ import annotations

from typing import Annotated

import typer

from . import JsonOpt, app, guarded, verbose

QmpOpt = Annotated[str, typer.Option("--qmp", metavar="SOCKET",
                                     help="QEMU's QMP unix socket (-qmp unix:SOCKET,server=on).")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for "
                                           "each QMP answer.")]


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
)
@guarded
def exec_(
    command: Annotated[list[str], typer.Argument(
        metavar="-- CMD ARGS...",
        help="The command to run; {tapfds} and {vhostfds} become colon-separated fd numbers.")],
    tap: Annotated[str | None, typer.Option(
        "--tap", help="Use this tap (created, up, if it does not exist; a new tap vanishes "
        "with the command).")] = None,
    bridge: Annotated[str | None, typer.Option(
        "--bridge", help="Create a new tap vh%d, up, enslaved to this bridge.")] = None,
    queues: Annotated[int, typer.Option("--queues", min=1, help="Queue pairs: tap fds and "
                                        "vhost-net fds to open.")] = 1,
    user: Annotated[str | None, typer.Option("--user", help="Run the command as this user "
                                             "(setgroups, setgid, setuid; no capabilities "
                                             "left).")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Primary group instead of the "
                                              "user's (needs --user).")] = None,
) -> None:
    """Open a ready vhost-net datapath and exec a VMM with it: no shell, no VHOST_SET_OWNER.

    \b
    Example:
      vhostctl exec --bridge br0 --queues 2 --user qemu -- qemu-system-x86_64 ...
        -netdev tap,id=n0,fds={tapfds},vhostfds={vhostfds},vhost=on
        -device virtio-net-pci,netdev=n0,mq=on,vectors=6
    """
    from ..handoff import run

    run(list(command), tap=tap, bridge=bridge, queues=queues, user=user, group=group)


@app.command()
@guarded
def hotplug(
    qmp: QmpOpt,
    tap: Annotated[str, typer.Option("--tap", help="The tap to plug (created, up, if "
                                     "absent).")],
    queues: Annotated[int, typer.Option("--queues", min=1, help="Queue pairs.")] = 1,
    nic_id: Annotated[str | None, typer.Option("--id", help="Id of the new netdev and device "
                                               "(default net-TAP).")] = None,
    mac: Annotated[str | None, typer.Option("--mac", help="Guest MAC address.")] = None,
    device: Annotated[str, typer.Option("--device", help="Guest NIC model (a virtio-net "
                                        "device).")] = "virtio-net-pci",
    bus: Annotated[str | None, typer.Option("--bus", help="Bus to plug into, e.g. a "
                                            "pcie-root-port's id on q35.")] = None,
    timeout: TimeoutOpt = 5.0,
    json_: JsonOpt = False,
) -> None:
    """Add a vhost-net NIC to a running QEMU: getfd, netdev_add (vhost=on), device_add.

    Any failure undoes what was done (device_del, netdev_del, closefd).
    """
    from ..hotplug import hotplug as plug
    from ..render import console, print_json

    r = plug(qmp, tap, queues=queues, nic_id=nic_id, mac=mac, device=device, bus=bus,
             timeout=timeout)
    if json_:
        print_json(r.as_dict())
    else:
        console().print(f"plugged {r.device} {r.id} on tap {r.tap} ({r.queues} queue pair"
                        f"{'s' if r.queues > 1 else ''}, vhost=on"
                        f"{', tap created' if r.created else ''})", markup=False)


@app.command()
@guarded
def unplug(
    qmp: QmpOpt,
    nic_id: Annotated[str, typer.Option("--id", help="Id given at hotplug (device and "
                                        "netdev).")],
    timeout: TimeoutOpt = 5.0,
    wait: Annotated[float, typer.Option("--wait", min=0.1, help="Seconds to wait for the "
                                        "guest to release the device.")] = 10.0,
    json_: JsonOpt = False,
) -> None:
    """Remove a NIC: device_del, wait for DEVICE_DELETED, netdev_del."""
    from ..hotplug import unplug as unplug_
    from ..render import console, print_json

    r = unplug_(qmp, nic_id, timeout=timeout, unplug_timeout=wait)
    if json_:
        print_json(r.as_dict())
    else:
        console().print(f"unplugged {r.id} (device {'removed' if r.device_removed else 'absent'}"
                        f", netdev {'removed' if r.netdev_removed else 'absent'})", markup=False)


@app.command()
@guarded
def inspect(
    select: Annotated[list[str] | None, typer.Argument(
        metavar="[PID|NAME]...", help="Only these processes (pid, VM name or command name).")
    ] = None,
    qmp: Annotated[str | None, typer.Option("--qmp", metavar="SOCKET", help="Add this QEMU's "
                                            "own view (x-query-virtio-status, netdevs).")
                   ] = None,
    timeout: TimeoutOpt = 5.0,
    json_: JsonOpt = False,
) -> None:
    """Show which VM uses which tap, whether vhost-net moves its packets, and which threads.

    Per NIC the I/O path: vhost-net (tap + vhost fds), virtio (the VMM reads the tap itself)
    or vhost-user (a socket backend); tap flags, bridge, MTU, counters; vhost workers with
    CPU time and last CPU; warnings.
    """
    from ..render import print_json
    from ..render_vm import print_survey
    from ..survey import inspect as survey

    result = survey(select or (), qmp_path=qmp, timeout=timeout)
    if json_:
        print_json(result.as_dict())
    else:
        print_survey(result, verbose())


@app.command()
@guarded
def top(
    sort: Annotated[str, typer.Option("--sort", help="Sort by pps, bps, drops, cpu or name.")
                    ] = "pps",
    interval: Annotated[float, typer.Option("--interval", "-n", min=0.1,
                                            help="Seconds between samples.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="One sample, printed, then exit.")
                    ] = False,
    iterations: Annotated[int | None, typer.Option("--iterations", min=1, help="This many "
                                                   "samples, printed, then exit.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per sample, one per "
                                        "line (NDJSON), until --iterations or Ctrl-C.")
                     ] = False,
) -> None:
    """Live packets/s, bits/s, drops per VM and NIC, and vhost worker CPU; q or Ctrl-C quits.

    Every process inspect lists is shown, QEMU or not; each NIC's CPU is that of whoever
    moves its packets: the vhost workers, the VMM's own threads, or the vhost-user backend.
    """
    from ..render_vm import run_top, run_top_json
    from ..survey import SORT_KEYS, TopSampler, sort_rows

    sort_rows([], sort)  # validate --sort before the first scan
    if json_:
        run_top_json(TopSampler().sample, sort=sort, interval=interval,
                     iterations=1 if once else iterations)
        return
    run_top(TopSampler(), SORT_KEYS, sort=sort, interval=interval,
            iterations=1 if once else iterations)
