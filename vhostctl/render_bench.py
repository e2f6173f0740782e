"""Rendering of ``vhostctl bench``: progress bar, result tables, and the chart (SVG or PNG).

The SVG is written by hand, so ``--plot`` needs no new dependency; PNG is offered only when
matplotlib happens to be importable (it is not a dependency of vhostctl).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from html import escape
from pathlib import Path
from typing import Any

from .errors import UnsupportedError, ValidationError
from .render import console, err_console

_COLOURS = {"vhost tx": "#1f77b4", "tap tx": "#9ecae1", "vhost rx": "#d62728",
            "tap rx": "#fc9272"}


@contextlib.contextmanager
def bench_progress(enabled: bool = True) -> Iterator[Callable[[str, float], None] | None]:
    """A transient rich progress bar on stderr; yields the callback for run_bench (or None)."""
    con = err_console()
    if not enabled or not con.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description:<22}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(),
                  console=con, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)

        def update(label: str, fraction: float) -> None:
            bar.update(task, description=label, completed=fraction)

        yield update


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _pps(v: float) -> str:
    return f"{v / 1e6:.3f} M" if v >= 1e6 else f"{v / 1e3:.1f} k"


def print_bench(report: Any) -> None:
    """One row per run, then vhost/tap ratios, tuning notes and problems."""
    from rich.table import Table

    c = console()
    t = Table(title=f"vhost-net bench on {report.tap} (kernel {report.kernel})",
              title_justify="left")
    for col in ("path", "dir", "size", "pkt/s", "Gbit/s", "verified", "CPU µs/pkt",
                "of it checks", "worker µs/pkt", "kicks/pkt", "irqs/pkt", "RTT p50/p99/p99.9 µs"):
        t.add_column(col, justify="left" if col in ("path", "dir") else "right")
    for r in report.runs:
        lat = r.latency
        t.add_row(r.path, r.direction, str(r.size), _pps(r.pps), f"{r.gbps:.3f}",
                  f"{r.verified}/{r.total_packets}",
                  f"{r.cpu_us:.2f} ({r.cpu_user_us:.2f}u+{r.cpu_sys_us:.2f}s)",
                  f"{r.verify_us:.2f}", _num(r.worker_us), _num(r.kicks, "{:.4f}"),
                  _num(r.interrupts, "{:.4f}"),
                  "-" if lat is None else f"{lat.p50_us:.0f}/{lat.p99_us:.0f}/{lat.p999_us:.0f}")
    c.print(t)
    if report.ratios:
        rt = Table(title="vhost-net against the tap path (vhost / tap)", title_justify="left")
        for col in ("dir", "size", "pkt/s", "CPU per packet", "RTT p50"):
            rt.add_column(col, justify="right")
        for x in report.ratios:
            rt.add_row(x.direction, str(x.size), _num(x.pps, "{:.2f}x"), _num(x.cpu, "{:.2f}x"),
                       _num(x.p50, "{:.2f}x"))
        c.print(rt)
    cfg = report.config
    c.print(f"ring {cfg['ring_size']}, batch {cfg['batch']}, "
            f"EVENT_IDX {'on' if cfg['event_idx'] else 'off'}, busy-poll "
            f"{cfg['busyloop_usec']} µs, {cfg['queues']} queue pair(s), "
            f"{cfg['duration']} s per run after {cfg['warmup']} s warm-up, "
            f"1 frame in {cfg['verify_every']} verified", markup=False, highlight=False)
    if report.zcopytx:
        c.print(f"vhost_net experimental_zcopytx={report.zcopytx}: zero-copy TX for large "
                "frames is on", markup=False)
    for p in report.problems:
        c.print(f"[red]✗[/] {escape(p, quote=False)}")


# -- chart ------------------------------------------------------------------------------------

def _ticks(top: float) -> tuple[float, list[float]]:
    """A 'nice' axis maximum and its tick values (1, 2 or 5 times a power of ten)."""
    if top <= 0:
        return 1.0, [0.0, 1.0]
    raw = top / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    n = math.ceil(top / step)
    return n * step, [i * step for i in range(n + 1)]


# The two charts, each a title and what it plots of one run (a bench RunResult).
_PANELS: tuple[tuple[str, Callable[[Any], float]], ...] = (
    ("packets/s (millions)", lambda r: r.pps / 1e6), ("Gbit/s", lambda r: r.gbps))


def _series(report: Any) -> tuple[list[int], dict[str, dict[int, Any]]]:
    sizes = sorted({r.size for r in report.runs if r.direction != "rr"})
    series: dict[str, dict[int, Any]] = {}
    for r in report.runs:
        if r.direction != "rr":
            series.setdefault(f"{r.path} {r.direction}", {})[r.size] = r
    return sizes, series


def svg_chart(report: Any) -> str:
    """Packets/s and Gbit/s by frame size, one bar per path and direction, as SVG text."""
    sizes, series = _series(report)
    if not sizes:
        raise ValidationError("--plot", "nothing to plot: the chart shows tx and rx runs")
    names = list(series)
    w_panel, h, left, top, bottom = 420, 300, 60, 40, 50
    width = 2 * w_panel + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 40}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="10" y="18" font-size="14">vhost-net bench, kernel '
           f'{escape(report.kernel)} ({escape(report.tap)})</text>']
    for k, (label, value) in enumerate(_PANELS):
        x0 = 10 + k * (w_panel + 20)
        plot_w, plot_h = w_panel - left - 10, h - top - bottom
        vmax = max((value(r) for s in series.values() for r in s.values()), default=0.0)
        axis, ticks = _ticks(vmax)
        out.append(f'<text x="{x0 + left}" y="{top - 10}">{label}</text>')
        for tv in ticks:
            y = top + plot_h - tv / axis * plot_h
            out.append(f'<line x1="{x0 + left}" y1="{y:.1f}" x2="{x0 + left + plot_w}" '
                       f'y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 + left - 5}" y="{y + 4:.1f}" text-anchor="end">'
                       f'{tv:g}</text>')
        group = plot_w / len(sizes)
        bar = group * 0.8 / max(1, len(names))
        for i, size in enumerate(sizes):
            gx = x0 + left + i * group + group * 0.1
            out.append(f'<text x="{gx + group * 0.4:.1f}" y="{top + plot_h + 16}" '
                       f'text-anchor="middle">{size} B</text>')
            for j, name in enumerate(names):
                r = series[name].get(size)
                if r is None:
                    continue
                bh = value(r) / axis * plot_h
                colour = _COLOURS.get(name, "#777")
                out.append(f'<rect x="{gx + j * bar:.1f}" y="{top + plot_h - bh:.1f}" '
                           f'width="{bar * 0.95:.1f}" height="{bh:.1f}" fill="{colour}">'
                           f'<title>{escape(name)} {size} B: {value(r):.4g}</title></rect>')
        out.append(f'<line x1="{x0 + left}" y1="{top + plot_h}" x2="{x0 + left + plot_w}" '
                   f'y2="{top + plot_h}" stroke="#000"/>')
    for j, name in enumerate(names):
        lx = 10 + left + j * 110
        out.append(f'<rect x="{lx}" y="{h + 12}" width="12" height="12" '
                   f'fill="{_COLOURS.get(name, "#777")}"/>')
        out.append(f'<text x="{lx + 16}" y="{h + 22}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _png(report: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, series = _series(report)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(series))
    for ax, (label, value) in zip(axes, _PANELS, strict=True):
        for j, (name, runs) in enumerate(series.items()):
            xs = [i + j * width for i, s in enumerate(sizes) if s in runs]
            ax.bar(xs, [value(runs[s]) for s in sizes if s in runs], width, label=name,
                   color=_COLOURS.get(name))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))],
                      [f"{s} B" for s in sizes])
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle(f"vhost-net bench, kernel {report.kernel}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_plot_path(path: str) -> None:
    """Refuse a chart file we cannot write before the bench runs, not after."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".svg", ".png"):
        raise ValidationError("--plot", f"{path}: the file name must end in .svg or .png")
    if suffix == ".png":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UnsupportedError("--plot", "PNG needs matplotlib, which is not installed",
                                   hint="write an .svg file instead (no dependency)") from None


def write_plot(report: Any, path: str) -> None:
    """SVG for ``*.svg`` (always available), PNG for ``*.png`` (only with matplotlib)."""
    check_plot_path(path)
    p = Path(path)
    if p.suffix.lower() == ".png":
        if not _series(report)[0]:
            raise ValidationError("--plot", "nothing to plot: the chart shows tx and rx runs")
        _png(report, p)
        return
    text = svg_chart(report)
    try:
        p.write_text(text)
    except OSError as e:
        raise ValidationError("--plot", f"{path}: {e.strerror}") from None
