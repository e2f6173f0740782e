"""``vhostctl bench``: throughput, CPU and latency of vhost-net against the plain tap path."""

from __future__ import annotations

from typing import Annotated

import typer

from . import JsonOpt, app, guarded


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{value!r}: a comma-separated list of numbers") from None


def _words(value: str) -> tuple[str, ...]:
    return tuple(x.strip().lower() for x in value.split(",") if x.strip())


@app.command()
@guarded
def bench(
    direction: Annotated[str, typer.Option(
        "--direction", "-d", help="Workloads, comma-separated: tx (ring to tap), rx (tap to "
        "ring), rr (one frame in flight, round-trip latency).")] = "tx,rx",
    size: Annotated[str, typer.Option(
        "--size", "-s", help="Frame sizes in bytes, comma-separated (default 64,512,1514, "
        "plus 9000 with --mtu 9000).")] = "",
    path: Annotated[str, typer.Option(
        "--path", help="vhost (vhost-net moves frames), tap (this process reads and writes the "
        "tap, as a VMM without vhost does) or both (and print vhost/tap).")] = "vhost",
    queues: Annotated[int, typer.Option("--queues", "-q", help="Queue pairs.")] = 1,
    duration: Annotated[float, typer.Option("--duration", "-t",
                                            help="Measured seconds per run.")] = 2.0,
    warmup: Annotated[float, typer.Option("--warmup",
                                          help="Seconds before measuring, per run.")] = 0.5,
    ring_size: Annotated[int, typer.Option("--ring-size",
                                           help="Virtqueue size: a power of two.")] = 256,
    batch: Annotated[int, typer.Option("--batch", help="Frames posted per avail-index update "
                                       "and kick, and injected per send().")] = 64,
    event_idx: Annotated[bool, typer.Option("--event-idx/--no-event-idx",
                                            help="Negotiate VIRTIO_RING_F_EVENT_IDX.")] = True,
    busy_poll: Annotated[int, typer.Option(
        "--busy-poll", help="vhost busy-poll timeout in microseconds "
        "(VHOST_SET_VRING_BUSYLOOP_TIMEOUT); 0 is off.")] = 0,
    mtu: Annotated[int, typer.Option("--mtu", help="MTU of the bench tap.")] = 1500,
    verify_every: Annotated[int, typer.Option(
        "--verify-every", help="Compare one frame in N byte for byte (a power of two; 1 checks "
        "every frame, at a cost).")] = 64,
    tap: Annotated[str, typer.Option("--tap", help="Name (or %d template) of the bench tap.")
                   ] = "vhbench%d",
    plot: Annotated[str, typer.Option(
        "--plot", metavar="FILE", help="Also write a chart: FILE.svg, or FILE.png when "
        "matplotlib is installed.")] = "",
    json_: JsonOpt = False,
) -> None:
    """Measure the in-kernel datapath: packets/s, Gbit/s, CPU per packet, latency.

    Exit 0 when every run verified its frames, 1 otherwise.  Nothing is left behind.
    """
    from ..bench import BenchConfig, run_bench
    from ..render import print_json
    from ..render_bench import bench_progress, check_plot_path, print_bench, write_plot

    cfg = BenchConfig(directions=_words(direction), sizes=_ints(size), path=path.lower(),
                      queues=queues, duration=duration, warmup=warmup, ring_size=ring_size,
                      batch=batch, event_idx=event_idx, busyloop_usec=busy_poll, mtu=mtu,
                      verify_every=verify_every, tap_name=tap)
    cfg.validate()
    if plot:
        check_plot_path(plot)
    with bench_progress(not json_) as progress:
        report = run_bench(cfg, progress)
    if json_:
        print_json(report.to_dict())
    else:
        print_bench(report)
    if plot:
        write_plot(report, plot)
    if not report.ok:
        raise typer.Exit(1)
