"""Prometheus metrics for vhost-net NICs, built from the survey and the host checks.

One scan per scrape and no background thread (:class:`VhostCollector`), so a series is never
older than the scrape that returned it.  Names and labels follow what existing dashboards
join on (USER-NEEDS §3): ``vhostctl_nic_info`` carries the descriptive labels once, with both
``device`` (node_exporter) and ``target_device`` (libvirt exporters) set to the tap; every
other per-NIC series has only ``domain`` and ``target_device`` (``netdev`` for a NIC without a
tap, vhost-user); thread ids never become labels (``queue`` does).  A label with no value is
left out, never sent empty.  Traffic is counted from the guest's side, as libvirt's exporter
does: tap ``tx`` is the guest's receive.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric

from .errors import ValidationError, VhostctlError
from .hostcheck import HostPaths, HostReport, host_report
from .survey import PATH_VHOST_NET, PATH_VHOST_USER, PATH_VIRTIO, Nic, Scanner, Survey, VmProcess

BACKENDS = {PATH_VHOST_NET: "vhost-net", PATH_VIRTIO: "userspace",
            PATH_VHOST_USER: "vhost-user"}
# Guest perspective: what the guest receives is what the tap transmits (S-TS).
TRAFFIC = (("receive", "tx"), ("transmit", "rx"))
# Checks about vhostctl's own process, not the host: an exporter needs no CAP_NET_ADMIN.
SELF_CHECKS = {"CAP_NET_ADMIN"}
COUNTERS = (("bytes", "bytes", "Bytes"), ("packets", "packets", "Packets"),
            ("drops", "dropped", "Packets dropped"), ("errors", "errors", "Errors"))


class _Family:
    """One metric family whose samples may carry different label sets (a label without a
    value is left out); a repeated label set is dropped, so two holders of one tap never
    produce a duplicate series."""

    def __init__(self, name: str, doc: str, typ: str = "gauge") -> None:
        self.metric = Metric(name, doc, typ)
        self.sample = name + {"counter": "_total", "info": "_info"}.get(typ, "")
        self._seen: set[tuple[tuple[str, str], ...]] = set()

    def add(self, labels: dict[str, Any], value: float) -> None:
        clean = {k: str(v) for k, v in labels.items() if v is not None and v != ""}
        key = tuple(sorted(clean.items()))
        if key in self._seen:
            return
        self._seen.add(key)
        self.metric.add_sample(self.sample, clean, value)


def check_label(name: str) -> str:
    """``vhost-net device`` -> ``vhost_net_device``: a host check's name as a label value."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _nic_labels(proc: VmProcess, nic: Nic) -> dict[str, Any] | None:
    """The two labels every per-NIC series carries; None when the NIC has neither a tap
    nor a netdev id to tell it apart."""
    if nic.tap:
        return {"domain": proc.label, "target_device": nic.tap}
    if nic.id:
        return {"domain": proc.label, "netdev": nic.id}
    return None


def families(survey: Survey, report: HostReport | None, *,
             scrape_seconds: float | None = None) -> list[Metric]:
    """Every series of one scrape, from one survey and one host report."""
    F = _Family
    info = F("vhostctl_nic", "One per VM NIC (value 1): the join hub. device (node_exporter) "
             "and target_device (libvirt exporters) are the tap; domain is the libvirt name, "
             "QEMU's -name or the process name; backend is vhost-net, userspace or "
             "vhost-user; qemu_pid is the process holding the NIC.", "info")
    requested = F("vhostctl_nic_vhost_requested", "1 when vhost-net was asked for this NIC "
                  "(vhost=on, vhostfd(s)= or vhostforce on the command line, or vhost-net fds "
                  "held), 0 when it was turned off; absent when unknown.")
    active = F("vhostctl_nic_vhost_active", "1 when the process holds /dev/vhost-net fds for "
               "this NIC's queues (the kernel moves its packets), 0 when the VMM moves them "
               "in userspace.")
    enabled = F("vhostctl_nic_queues_enabled", "Queues of the tap attached and enabled "
                "(IFLA_TUN_NUM_QUEUES); fewer than queues_configured means the guest has not "
                "enabled them all.")
    disabled = F("vhostctl_nic_queues_disabled", "Queues of the tap attached but disabled "
                 "(IFLA_TUN_NUM_DISABLED_QUEUES), e.g. by a guest using fewer queue pairs.")
    traffic = {(d, k): F(f"vhostctl_nic_{d}_{k}",
                         f"{label} the guest {'received' if d == 'receive' else 'sent'}, in "
                         f"the guest's perspective (tap {tap}_{stat}: receive = into the "
                         f"guest = tap tx); node_exporter has the host's view.", "counter")
               for d, tap in TRAFFIC for k, stat, label in COUNTERS}
    cpu = F("vhostctl_vhost_worker_cpu_seconds", "CPU time of the vhost worker thread of one "
            "queue pair, by mode (user, system).", "counter")
    wait = F("vhostctl_vhost_worker_runqueue_wait_seconds", "Time the vhost worker of one "
             "queue pair spent runnable but waiting for a CPU (schedstat).", "counter")
    loose = F("vhostctl_vhost_worker_unattributed_cpu_seconds", "CPU time of vhost workers "
              "not matched to a queue pair (worker and vhost fd counts differ, or the owner "
              "is not listed), by mode.", "counter")
    workers = F("vhostctl_vhost_workers", "vhost worker threads of each process.")
    checks = F("vhostctl_host_check", "1 when the `vhostctl check` check passes, 0 when it "
               "fails (`vhostctl check` says why and how to fix it).")
    params = F("vhostctl_vhost_module_parameter", "vhost and vhost_net module parameters "
               "(max_mem_regions, max_iotlb_entries, experimental_zcopytx, "
               "fork_from_owner_default as 1/0).")
    host = F("vhostctl_host", "The kernel and where it puts vhost workers (kthread "
             "before 6.4, task since), value 1.", "info")
    procs = F("vhostctl_processes", "Processes holding vhost-net, tun or macvtap fds, and "
              "QEMUs.")
    skipped = F("vhostctl_scrape_skipped_reads", "Reads skipped in this scrape because a "
                "process, thread or fd vanished (or was unreadable) while it was scanned.")
    took = F("vhostctl_scrape_duration_seconds", "How long this scrape's scan took.")

    host.add({"kernel": survey.kernel, "worker_model": survey.worker_model}, 1)
    procs.add({}, len(survey.processes))
    skipped.add({}, len(survey.skipped))
    if scrape_seconds is not None:
        took.add({}, scrape_seconds)
    for c in report.checks if report else ():
        if c.ok is not None and c.name not in SELF_CHECKS:
            checks.add({"check": check_label(c.name)}, 1 if c.ok else 0)
        elif c.name == "module parameters":
            for param, text in sorted(c.data.items()):
                value = {"Y": 1, "N": 0}.get(text.upper(), text)
                if isinstance(value, int) or text.isdigit():
                    params.add({"parameter": param}, int(value))
    tck = survey.clk_tck
    stray = {"user": 0, "system": 0}
    for p in survey.processes:
        by_tid = {w.tid: w for w in p.workers}
        workers.add({"domain": p.label}, len(p.workers))
        for nic in p.nics:
            key = _nic_labels(p, nic)
            link = nic.link
            info.add({**(key or {"domain": p.label}), "device": nic.tap,
                      "netdev": nic.id, "source_bridge": link.master if link else None,
                      "mac_address": nic.mac, "model_type": nic.device,
                      "backend": BACKENDS.get(nic.path, nic.path),
                      "interface_type": nic.tap_kind, "socket": nic.socket,
                      "queues_configured": nic.queues, "qemu_pid": p.pid}, 1)
            if key is None:
                continue
            if nic.path != PATH_VHOST_USER:
                req = nic.vhost_requested
                if req is None and nic.path == PATH_VHOST_NET:
                    req = True
                if req is not None:
                    requested.add(key, int(req))
                active.add(key, int(nic.path == PATH_VHOST_NET))
            if link and link.queues_enabled is not None:
                enabled.add(key, link.queues_enabled)
                disabled.add(key, link.queues_disabled or 0)
            if link and link.stats:
                for d, tap in TRAFFIC:
                    for k, stat, _ in COUNTERS:
                        v = link.stats.get(f"{tap}_{stat}")
                        if v is not None:
                            traffic[(d, k)].add(key, v)
            for i, q in enumerate(nic.queue_pairs):
                w = by_tid.pop(q.get("worker_tid") or -1, None)
                if w is None:
                    continue
                qkey = {**key, "queue": i}
                cpu.add({**qkey, "mode": "user"}, w.utime / tck)
                cpu.add({**qkey, "mode": "system"}, w.stime / tck)
                if w.runqueue_wait_ns is not None:
                    wait.add(qkey, w.runqueue_wait_ns / 1e9)
        for w in by_tid.values():  # not matched to a queue pair
            stray["user"] += w.utime
            stray["system"] += w.stime
    for w in survey.unmatched_workers:
        stray["user"] += w.utime
        stray["system"] += w.stime
    for mode, ticks in stray.items():
        loose.add({"mode": mode}, ticks / tck)
    return [f.metric for f in (info, requested, active, enabled, disabled, *traffic.values(),
                               cpu, wait, loose, workers, checks, params, host, procs,
                               skipped, took)]


class VhostCollector:
    """A prometheus_client collector: every ``collect()`` scans once, nothing is cached.

    ``scanner`` and ``paths`` default to the real host; ``checks=False`` leaves the host
    checks out (they open /dev/vhost-net and /dev/net/tun each scrape).
    """

    def __init__(self, scanner: Scanner | None = None, paths: HostPaths | None = None, *,
                 checks: bool = True) -> None:
        self.scanner = scanner or Scanner()
        self.paths = paths
        self.checks = checks
        self._lock = threading.Lock()  # one scan at a time: the Scanner keeps per-scan state

    def describe(self) -> Iterable[Metric]:
        return ()  # registering must not scan

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            t0 = time.monotonic()
            survey = self.scanner.scan()
            report = host_report(self.paths) if self.checks else None
            took = time.monotonic() - t0
        yield from families(survey, report, scrape_seconds=took)


def registry(collector: VhostCollector | None = None) -> CollectorRegistry:
    """A registry holding only our collector (no process or platform series)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector or VhostCollector())
    return reg


def exposition(reg: CollectorRegistry | None = None) -> bytes:
    """One scrape in the Prometheus text format (0.0.4)."""
    return generate_latest(reg or registry())


def samples(reg: CollectorRegistry | None = None) -> list[dict[str, Any]]:
    """One scrape as plain data (``metrics --json``): name, type, labels, value."""
    return [{"name": s.name, "type": m.type, "labels": dict(s.labels), "value": s.value}
            for m in (reg or registry()).collect() for s in m.samples]


# -- node_exporter's textfile collector -------------------------------------------------------

def write_textfile(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a hidden temporary file in the same directory,
    fsync, then rename(2), so node_exporter never reads half a file (it reads only
    ``*.prom``, so the temporary file is never read at all)."""
    if not path.endswith(".prom"):
        raise ValidationError("--textfile", f"{path}: node_exporter's textfile collector "
                              "reads only files ending in .prom",
                              hint="e.g. /var/lib/prometheus/node-exporter/vhostctl.prom")
    d, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ValidationError("--textfile", f"{d}: no such directory",
                              hint="give node_exporter's --collector.textfile.directory")
    tmp = os.path.join(d, f".{base}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:  # O_EXCL, and Python's open() is O_CLOEXEC
            os.fchmod(f.fileno(), 0o644)  # node_exporter may run as another user
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise VhostctlError("metrics --textfile", e.errno or errno.EIO,
                            f"{path}: {e.strerror or e}",
                            hint="run as a user that may write node_exporter's textfile "
                            "directory") from None


# -- vhostctl serve ---------------------------------------------------------------------------

def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every IPv4 address) -> (host, port);
    port 0 lets the kernel pick a free one (``serve`` says which)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValidationError("--listen", f"{text!r}: expected ADDR:PORT with a port "
                              "0-65535 (0: any free one)",
                              hint="e.g. 127.0.0.1:9917, [::1]:9917 or :9917")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValidationError("--listen", f"{text!r}: put an IPv6 address in brackets",
                              hint="e.g. [::1]:9917")
    return host, int(port)


def _bind(host: str, port: int, handler: type[BaseHTTPRequestHandler],
          listen: str) -> HTTPServer:
    try:
        infos = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValidationError("--listen", f"{listen}: {e.strerror}",
                              hint="give an address of this host, or a name that "
                              "resolves to one") from None
    family, _, _, _, addr = infos[0]
    bind = (str(addr[0]), int(addr[1]))  # AF_INET/AF_INET6 (SOCK_STREAM): host, port first

    class Server(HTTPServer):
        address_family = family
        allow_reuse_address = True  # restart while old connections sit in TIME_WAIT

    try:
        return Server(bind, handler)
    except OSError as e:
        hint = {errno.EADDRINUSE: "another process listens there (ss -ltnp); choose "
                "another --listen port or stop it",
                errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE; choose "
                "a higher port",
                errno.EADDRNOTAVAIL: "that address is not one of this host's (ip addr)"
                }.get(e.errno or 0, "")
        raise VhostctlError("serve", e.errno or errno.EIO,
                            f"cannot listen on {listen}: {e.strerror or e}",
                            hint=hint) from None


def server(listen: str, reg: CollectorRegistry | None = None) -> HTTPServer:
    """An HTTP server bound to ``listen`` that scans on every ``GET /metrics``.  One request
    at a time: concurrent scrapes queue up instead of scanning /proc in parallel."""
    host, port = parse_listen(listen)
    scraped = reg or registry()

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # a client that sends nothing does not hold the server forever

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body, ctype, code = generate_latest(scraped), CONTENT_TYPE_PLAIN_0_0_4, 200
                except Exception as e:  # a bug in a scan: say it, keep serving
                    body = f"vhostctl: scrape failed: {type(e).__name__}: {e}\n".encode()
                    ctype, code = "text/plain; charset=utf-8", 500
            elif path == "/":
                body = b"vhostctl exporter: metrics at /metrics\n"
                ctype, code = "text/plain; charset=utf-8", 200
            else:
                body, ctype, code = b"not found: try /metrics\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every few seconds is not news

    return _bind(host, port, Handler, listen)


def serve(listen: str, reg: CollectorRegistry | None = None,
          ready: Callable[[str], None] | None = None) -> None:
    """Serve ``/metrics`` on ``listen`` until SIGTERM (returns) or Ctrl-C (raises
    KeyboardInterrupt); ``ready`` is told the bound address."""
    srv = server(listen, reg)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    old = (signal.signal(signal.SIGTERM, stop)
           if threading.current_thread() is threading.main_thread() else None)
    try:
        if ready:
            bound, port = str(srv.server_address[0]), srv.server_address[1]
            ready(f"[{bound}]:{port}" if ":" in bound else f"{bound}:{port}")
        srv.serve_forever()
    except SystemExit:
        pass
    finally:
        srv.server_close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
