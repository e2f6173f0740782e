"""``vhostctl selftest``: stand up the in-kernel datapath, push frames both ways, verify."""

from __future__ import annotations

from typing import Annotated

import typer

from . import JsonOpt, app, guarded


def _sizes(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r}: a comma-separated list of byte counts") from None


@app.command()
@guarded
def selftest(
    queues: Annotated[int, typer.Option("--queues", "-q", help="Queue pairs to test.")] = 1,
    frames: Annotated[int, typer.Option("--frames", "-n",
                                        help="Frames per direction and queue pair.")] = 256,
    size: Annotated[str, typer.Option("--size", "-s",
                                      help="Frame sizes in bytes, comma-separated, cycled.")
                    ] = "60,512,1514",
    mtu: Annotated[int, typer.Option("--mtu", help="MTU of the test tap (9000 for jumbo).")
                   ] = 1500,
    ring_size: Annotated[int, typer.Option("--ring-size",
                                           help="Virtqueue size: a power of two up to 32768.")
                         ] = 256,
    event_idx: Annotated[bool, typer.Option("--event-idx/--no-event-idx",
                                            help="Negotiate VIRTIO_RING_F_EVENT_IDX.")] = True,
    mrg_rxbuf: Annotated[bool, typer.Option("--mrg-rxbuf/--no-mrg-rxbuf",
                                            help="Negotiate VIRTIO_NET_F_MRG_RXBUF.")] = True,
    hdr_mode: Annotated[str, typer.Option(
        "--hdr-mode", help="Who carries the virtio-net header: 'tap' (IFF_VNET_HDR) or 'vhost' "
        "(VHOST_NET_F_VIRTIO_NET_HDR).")] = "tap",
    tap: Annotated[str, typer.Option("--tap", help="Name (or %d template) of the test tap.")
                   ] = "vhtest%d",
    json_: JsonOpt = False,
) -> None:
    """Stand up tap + vhost-net + our rings, push frames both ways, verify every byte.

    Exit 0 when every frame crossed intact, 1 otherwise.  Nothing is left behind.
    """
    from ..datapath import DatapathConfig
    from ..render import print_json
    from ..render_datapath import print_selftest
    from ..selftest import run_selftest

    cfg = DatapathConfig(queues=queues, ring_size=ring_size, mtu=mtu, event_idx=event_idx,
                         mrg_rxbuf=mrg_rxbuf, hdr_mode=hdr_mode, tap_name=tap)
    report = run_selftest(cfg, frames=frames, sizes=_sizes(size))
    if json_:
        print_json(report.to_dict())
    else:
        print_selftest(report)
    if not report.ok:
        raise typer.Exit(1)
