"""Rendering for the VM commands: the path picture of ``inspect`` and the ``top`` screen.

No logic and no kernel access: everything shown comes from :mod:`vhostctl.survey` objects.
The picture follows the classic vhost-net diagrams, one chain per NIC::

    guest → kvm (QEMU pid) → vhost-PID x queues → tapX → brY
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from .render import console

_PATH_STYLE = {"vhost-net": "bold green", "virtio": "bold yellow", "vhost-user": "bold cyan"}


def _t(text: Any, style: str = "") -> Any:
    from rich.text import Text

    return Text(str(text), style=style)


def _si(value: float | None) -> str:
    """1234567 -> 1.2M: the unit is in the column header."""
    if value is None:
        return "-"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{prefix}"
    return f"{value:.0f}"


def _tap_label(nic: Any) -> Any:
    from rich.text import Text

    link = nic.link
    label = Text(f"{nic.tap}", style="bold")
    bits = [f"{nic.queues} queue{'s' if nic.queues != 1 else ''}",
            f"fds {','.join(map(str, nic.tap_fds))}"]
    if link is not None and link.kind != "tun":
        bits.insert(0, f"{link.kind} on {link.lower or '?'} mode {link.mode or '?'}")
    if link is not None and link.visible:
        bits.append("UP" if link.up else "DOWN")
        if link.mtu:
            bits.append(f"mtu {link.mtu}")
        bits.extend(f for f, on in (("vnet_hdr", link.vnet_hdr), ("multi_queue",
                    link.multi_queue), ("persist", link.persist)) if on)
        if link.owner is not None or link.group is not None:
            bits.append(f"owner {link.owner if link.owner is not None else '-'}/"
                        f"group {link.group if link.group is not None else '-'}")
        s = link.stats
        if s:
            bits.append(f"from guest {s.get('rx_packets', 0)} pkts, to guest "
                        f"{s.get('tx_packets', 0)} pkts, drops "
                        f"{s.get('rx_dropped', 0) + s.get('tx_dropped', 0)}")
    label.append("  " + " · ".join(bits), style="dim")
    return label


def _nic_tree(proc: Any, nic: Any, survey: Any) -> Any:
    from rich.tree import Tree

    head = _t(f"{nic.id or '(no netdev id)'}", "bold")
    head.append(f"  {nic.path}", style=_PATH_STYLE.get(nic.path, ""))
    if nic.device:
        head.append(f"  {nic.device}", style="dim")
    tree = Tree(head)
    for w in nic.warnings:
        tree.add(_t(f"⚠ {w}", "yellow"))
    guest = tree.add(_t(f"guest {proc.name or ''}".rstrip(), "magenta"))
    vmm = guest.add(_t(f"{'kvm' if proc.accel == 'kvm' else 'vmm (no kvm fd)'} · "
                       f"{proc.comm} pid {proc.pid}"))
    if nic.path == "vhost-user":
        sock = vmm.add(_t(f"vhost-user socket {nic.socket or '(passed as fd)'}"
                          + (" (QEMU listens)" if nic.socket_server else ""), "cyan"))
        b = nic.backend
        sock.add(_t(f"backend {b.comm} pid {b.pid} ({' '.join(b.argv[:1])})" if b else
                    "backend: no process holds the other end", "bold cyan" if b else "dim"))
        return tree
    if nic.path == "vhost-net":
        model = {"kthread": "kernel threads", "task": "threads of the VMM"}.get(
            survey.worker_model or "", "workers")
        fds = ",".join(map(str, nic.vhost_fds))
        names = sorted({w.name for w in proc.workers})
        label = (f"{'/'.join(names)} x{len(nic.vhost_fds)} ({model}; vhost fds {fds})" if names
                 else f"vhost fds {fds}: no worker yet (no VHOST_SET_OWNER)")
        mover = vmm.add(_t(label, "green"))
    else:
        mover = vmm.add(_t("VMM userspace reads/writes the tap (no vhost-net)", "yellow"))
    tap = mover.add(_tap_label(nic))
    if nic.link is not None and nic.link.master:
        tap.add(_t(nic.link.master, "blue"))
    if nic.qmp and nic.qmp.get("virtio"):
        st = nic.qmp["virtio"]
        vd = st.get("vhost-dev") or {}
        tree.add(_t(f"QEMU: {st.get('name', '?')} status {st.get('status', '?')}, "
                    f"vhost started {st.get('vhost-started')}, vhost nvqs {vd.get('nvqs', '-')}",
                    "dim"))
    return tree


def _workers_table(workers: list[Any]) -> Any:
    from rich.table import Table

    t = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    for col in ("worker", "tid", "model", "cpu s", "last cpu"):
        t.add_column(col)
    for w in workers:
        t.add_row(w.name, str(w.tid), w.model, f"{w.cpu_seconds:.2f}", str(w.last_cpu))
    return t


def print_survey(survey: Any, verbose: int = 0) -> None:
    """The picture: one tree per process, one chain per NIC, then its workers."""
    from rich.tree import Tree

    out = console()
    if not survey.processes:
        out.print("no QEMU and no process holding /dev/vhost-net, /dev/net/tun or macvtap "
                  "fds", style="dim")
    for p in survey.processes:
        head = _t(p.name or p.comm, "bold magenta")
        head.append(f"  {p.kind} pid {p.pid}" + (f" uid {p.uid}" if p.uid is not None else "")
                    + f" · from {', '.join(p.view)}", style="dim")
        root = Tree(head)
        for nic in p.nics:
            root.add(_nic_tree(p, nic, survey))
        for w in p.warnings:
            root.add(_t(f"⚠ {w}", "yellow"))
        if p.workers:
            root.add(_workers_table(p.workers))
        if p.qmp and verbose:
            root.add(_t(f"QMP: QEMU {p.qmp.get('version')}, {p.qmp.get('status')}", "dim"))
        out.print(root)
    for w in survey.unmatched_workers:
        where = f", thread of pid {w.tgid}" if w.tgid is not None else ""
        out.print(_t(f"unmatched worker {w.name} (tid {w.tid}, {w.model}{where}, "
                     f"{w.cpu_seconds:.2f} s CPU, last cpu {w.last_cpu}): its owner holds no "
                     "vhost fd shown", "yellow"))
    for w in survey.warnings:
        out.print(_t(f"⚠ {w}", "yellow"))
    if verbose:
        for s in survey.skipped:
            out.print(_t(f"skipped {s}", "dim"))


# -- top ----------------------------------------------------------------------------------------

def top_table(groups: list[tuple[Any, list[Any]]], sort: str, interval: float) -> Any:
    from rich import box
    from rich.table import Table

    t = Table(title=f"every {interval:g}s, by {sort}; tx/rx: the guest's; b/s: bits; cpu: vhost "
              "workers (NIC rows: whoever moves its packets); q quits, s sorts",
              title_justify="left", box=box.SIMPLE_HEAD,
              expand=False, pad_edge=False)
    t.add_column(_t("VM [pid] / NIC (path)"), min_width=16, overflow="ellipsis")
    for col in ("tx pps", "rx pps", "tx b/s", "rx b/s", "drop/s", "cpu"):
        t.add_column(col, justify="right", no_wrap=True)  # numbers never wrap
    for vm, nics in groups:
        label = _t(vm.vm, "bold")
        label.append(f" [{vm.pid}]", style="dim")
        cpu = f"{vm.cpu_pct:.1f}% x{vm.workers}" if vm.workers else "-"
        t.add_row(label, _si(vm.from_guest_pps), _si(vm.to_guest_pps), _si(vm.from_guest_bps),
                  _si(vm.to_guest_bps), _si(vm.drops_ps), cpu)
        for n in nics:
            label = _t(f"  {n.nic or '?'} ")
            label.append(f"({n.path})", style=_PATH_STYLE.get(n.path or "", ""))
            mover = (f"{n.cpu_pct:.1f}% {n.mover['by']}" if n.mover and n.cpu_pct is not None
                     else "")
            t.add_row(label, _si(n.from_guest_pps), _si(n.to_guest_pps), _si(n.from_guest_bps),
                      _si(n.to_guest_bps), _si(n.drops_ps), mover)
    if not groups:
        t.add_row("(no VM)", "", "", "", "", "", "")
    return t


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """Single keypresses from a terminal (cbreak mode), or plain sleeping without one."""
    if not sys.stdin.isatty():
        def sleep(timeout: float) -> str:
            time.sleep(timeout)
            return ""

        yield sleep
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="ignore") if ready else ""

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top_json(sample: Callable[[str], dict[str, Any]], *, sort: str, interval: float,
                 iterations: int | None) -> None:
    """NDJSON: one compact object per sample and line, flushed, so a reader can follow."""
    import json

    n = 0
    try:
        while iterations is None or n < iterations:
            time.sleep(interval)
            sys.stdout.write(json.dumps(sample(sort), sort_keys=True, separators=(",", ":"),
                                        default=str) + "\n")
            sys.stdout.flush()
            n += 1
    except KeyboardInterrupt:
        return


def run_top(sample: Callable[[str], list[tuple[Any, list[Any]]]], sort_keys: tuple[str, ...],
            *, sort: str, interval: float, iterations: int | None) -> None:
    """Live screen until q or Ctrl-C; with ``iterations`` (``--once``) plain prints instead.

    ``sample(sort)`` returns the sorted rows since its previous call (it primed itself).
    """
    if iterations is not None:
        for _ in range(iterations):
            time.sleep(interval)
            console().print(top_table(sample(sort), sort, interval))
        return
    from rich.live import Live

    with _keys() as key, Live(_t(f"measuring for {interval:g}s…", "dim"), console=console(),
                              auto_refresh=False) as live:
        live.refresh()
        try:
            while True:
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    k = key(left)
                    if k in ("q", "Q"):
                        return
                    if k in ("s", "S"):
                        sort = sort_keys[(sort_keys.index(sort) + 1) % len(sort_keys)]
                live.update(top_table(sample(sort), sort, interval), refresh=True)
        except KeyboardInterrupt:
            return
