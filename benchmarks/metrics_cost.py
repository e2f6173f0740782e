"""What one scrape of the vhostctl exporter costs on a host with many VMs.

Stands up ``--vms`` fake QEMUs (default 100), each a sleeping process whose command line is
QEMU's (``-name guest=vmN``, ``-netdev tap,...,vhost=on``, ``-device virtio-net-pci``) and
which holds one queue fd of each of its ``--nics`` taps (default 4, so 400 NICs), then times
``--scrapes`` full scrapes (scan, host checks, text exposition) in this process.  Prints one
JSON object: CPU seconds per scrape (median, max) and the share of one core that a scrape
every ``--interval`` seconds costs.  Needs root and /dev/net/tun; the taps vanish with their
holders.  Where /dev/vhost-net exists each holder also holds one vhost-net fd per NIC.

    .venv/bin/python benchmarks/metrics_cost.py --vms 100 --nics 4 --scrapes 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vhostctl import metrics
from vhostctl.tun import Tap


def start_holders(vms: int, nics: int, prefix: str) -> list[subprocess.Popen]:
    vhost = os.path.exists("/dev/vhost-net")
    procs = []
    for v in range(vms):
        fds, args, taps, vfds = [], [], [], []
        for n in range(nics):
            tap = Tap.open(f"{prefix}{v}n{n}")
            taps.append(tap)
            vfd = os.open("/dev/vhost-net", os.O_RDWR | os.O_CLOEXEC) if vhost else None
            if vfd is not None:
                vfds.append(vfd)
            fds += [tap.fileno()] + ([vfd] if vfd is not None else [])
            vh = f",vhostfd={vfd}" if vfd is not None else ""
            args += ["-netdev", f"tap,id=n{n},fd={tap.fileno()}{vh},vhost=on",
                     "-device", f"virtio-net-pci,netdev=n{n},mac=52:54:00:00:{v:02x}:{n:02x}"]
        # bash (not dash: it moves fds 3-9 up) waits for a sleep that does not get the fds;
        # the arguments after its command are QEMU's.
        closed = " ".join(f"{fd}<&-" for fd in fds)
        procs.append(subprocess.Popen(
            ["bash", "-c", f"exec -a qemu-system-x86_64 bash -c 'sleep 3600 {closed}; "
             "exit 0' \"$@\"", "bash", "-name", f"guest=vm{v}", *args], pass_fds=fds,
            stdin=subprocess.DEVNULL))
        for t in taps:
            t.close()
        for fd in vfds:
            os.close(fd)
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--nics", type=int, default=4)
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--prefix", default=f"mc{os.getpid() % 1000}v")
    a = ap.parse_args()
    procs = start_holders(a.vms, a.nics, a.prefix)
    try:
        reg = metrics.registry()
        time.sleep(1)  # let the last holders exec
        text = metrics.exposition(reg).decode()
        nics = text.count("vhostctl_nic_info{")
        cpu, wall = [], []
        for _ in range(a.scrapes):
            c0, w0 = time.process_time(), time.monotonic()
            metrics.exposition(reg)
            cpu.append(time.process_time() - c0)
            wall.append(time.monotonic() - w0)
        med = statistics.median(cpu)
        print(json.dumps({
            "kernel": os.uname().release, "vms": a.vms, "nics_per_vm": a.nics,
            "nics_seen": nics, "series": sum(1 for ln in text.splitlines()
                                             if ln and not ln.startswith("#")),
            "bytes": len(text), "scrapes": a.scrapes,
            "cpu_s_median": round(med, 4), "cpu_s_max": round(max(cpu), 4),
            "wall_s_median": round(statistics.median(wall), 4),
            "interval_s": a.interval, "core_share": round(med / a.interval, 5)}))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


if __name__ == "__main__":
    main()
