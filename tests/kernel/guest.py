"""A real, running guest for the kernel tests: Debian's 6.1 kernel + busybox under QEMU TCG.

The image is built once per test process by ``scripts/mkguest`` under /tmp (inside the test
VM the host filesystem is read-only and /tmp is the VM's own).  A guest is started through
whatever launcher a scenario needs (``vhostctl exec``, a libvirt-like parent) with two serial
ports: ttyS0 is the kernel console (a log file), ttyS1 a unix socket on which the guest's
/init runs one shell line at a time and answers ``@@END <status>``.  A guest is ready when it
answers ping from the host; every wait is bounded (the guest is nested TCG in CI: slow).
Facts for the report go to $VHOSTCTL_RESULTS/guest_facts.jsonl.
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.kernel.conftest import stop_process, wait_until
from vhostctl.qmp import QmpClient

REPO = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
# qboot (Debian's qemu-system-data): a firmware that only loads the kernel, seconds faster
# than SeaBIOS nested.
QBOOT = "/usr/share/qemu/qboot.rom"
# Nested TCG (the guest under QEMU TCG inside the test VM, itself under TCG): minutes.
BOOT_TIMEOUT = float(os.environ.get("VHOSTCTL_GUEST_BOOT_TIMEOUT", "600"))
COMMAND_TIMEOUT = 120.0
GUEST_MEMORY = "256"


def record(**facts: object) -> None:
    """Keep what a running guest showed, for the report (no effect without VHOSTCTL_RESULTS)."""
    out = os.environ.get("VHOSTCTL_RESULTS")
    if out:
        with open(Path(out) / "guest_facts.jsonl", "a") as f:
            f.write(json.dumps({"kernel": os.uname().release, **facts}) + "\n")


@functools.cache
def image() -> dict[str, str]:
    """The guest kernel and initramfs (built once per process, under /tmp)."""
    out = Path("/tmp") / f"vhostctl-guest-{os.getpid()}"
    r = subprocess.run([sys.executable, "-I", str(REPO / "scripts" / "mkguest"), "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.fail(f"scripts/mkguest failed: {r.stderr}")
    return json.loads(r.stdout)


def vhostctl_exec(*args: str) -> list[str]:
    return [sys.executable, "-m", "vhostctl", "exec", *args]


def host_ping(addr: str, count: int = 10, interval: float = 0.2,
              timeout: float = 60.0) -> dict[str, float]:
    """iputils ping from the host: loss in percent and the average RTT in ms."""
    r = subprocess.run(["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "5",
                        addr], capture_output=True, text=True, timeout=timeout)
    return parse_ping(r.stdout)


def parse_ping(text: str) -> dict[str, float]:
    """Loss and RTTs from the summary of iputils or busybox ping."""
    loss = re.search(r"([\d.]+)% packet loss", text)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", text)
    sent = re.search(r"(\d+) packets transmitted", text)
    if not loss or not sent:
        raise AssertionError(f"no ping summary in: {text!r}")
    out = {"sent": float(sent[1]), "loss": float(loss[1])}
    if rtt:
        out.update(rtt_min=float(rtt[1]), rtt_avg=float(rtt[2]), rtt_max=float(rtt[3]))
    return out


def tap_counter(tap: str, key: str) -> int:
    return int(Path(f"/sys/class/net/{tap}/statistics/{key}").read_text())


def tap_mac(tap: str) -> str:
    return Path(f"/sys/class/net/{tap}/address").read_text().strip()


@dataclass
class Guest:
    """One running guest: its QEMU process, QMP socket, command channel and logs."""

    name: str
    proc: subprocess.Popen
    workdir: Path
    addrs: dict[str, str]  # guest interface -> its address/prefix (vg.ethN= on the cmdline)
    boot_seconds: float = 0.0
    _chan: socket.socket | None = field(default=None, repr=False)
    _buf: bytes = field(default=b"", repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def qmp_path(self) -> str:
        return str(self.workdir / f"{self.name}.qmp")

    @property
    def console_path(self) -> str:
        return str(self.workdir / f"{self.name}.cons")

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def stderr_log(self) -> Path:
        return self.workdir / f"{self.name}.stderr"

    def qmp(self, command: str, args: dict | None = None):
        with QmpClient.connect(self.qmp_path, 30) as q:
            return q.execute(command, args)

    def running(self) -> bool:
        return self.proc.poll() is None and self.qmp("query-status")["status"] == "running"

    def sh(self, line: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> str:
        """Run one shell line in the guest; its output (the guest's /init evals it)."""
        if "\n" in line:
            raise ValueError("one line only")
        if self._chan is None:
            wait_until(f"guest {self.name}'s command socket",
                       lambda: os.path.exists(self.console_path), timeout, [self.proc],
                       [self.stderr_log])
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(self.console_path)
            self._chan = s
            self._sync(timeout)
        self._chan.sendall(line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(rb"@@END (\d+)\n", self._buf)
            if m:
                out, self._buf = self._buf[:m.start()], self._buf[m.end():]
                text = out.decode(errors="replace").replace("\r", "")
                if check and m[1] != b"0":
                    raise AssertionError(f"guest {self.name}: {line!r} exited {m[1].decode()}: "
                                         f"{text}")
                return text
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise AssertionError(f"guest {self.name}: no answer to {line!r} within "
                                     f"{timeout:g}s (QEMU rc={self.proc.poll()}); got "
                                     f"{self._buf[-2000:]!r}; console: {self.console_tail()}")
            self._recv(deadline)

    def _recv(self, until: float) -> None:
        r, _, _ = select.select([self._chan], [], [], max(0.0, min(until - time.monotonic(),
                                                                   1.0)))
        if r:
            chunk = self._chan.recv(65536)
            if not chunk:
                raise AssertionError(f"guest {self.name}: command channel closed")
            self._buf += chunk

    def _sync(self, timeout: float) -> None:
        """Wait until the guest's shell loop reads whole lines: bytes sent before its /init
        opened ttyS1 (and turned echo off) are lost or echoed, so ``echo @@SYNCn`` is sent
        until its own output, not the tty's echo of it, comes back."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            n += 1
            token = f"@@SYNC{n}".encode()
            self._chan.sendall(b"\necho " + token + b"\n")
            retry = time.monotonic() + 5.0
            while time.monotonic() < min(retry, deadline):
                m = re.search(rb"(?m)^" + token + rb"\r?\n@@END 0\n", self._buf)
                if m:
                    self._buf = self._buf[m.end():]
                    return
                self._recv(min(retry, deadline))
        raise AssertionError(f"guest {self.name}: command channel silent for {timeout:g}s; "
                             f"got {self._buf[-2000:]!r}; console: {self.console_tail()}")

    def console_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def ping(self, addr: str, count: int = 10, flood: bool = False,
             iface: str | None = None) -> dict[str, float]:
        """busybox ping from the guest (``-A``: the next one as soon as a reply is in)."""
        opts = f"-c {count} -W 5 " + ("-A " if flood else "") + (f"-I {iface} " if iface else "")
        return parse_ping(self.sh(f"ping -q {opts}{addr}", check=False))

    def pktgen_start(self, dev: str, dst: str, dst_mac: str, queues: int = 1,
                     size: int = 60) -> None:
        """Line-rate UDP from the guest through ``dev`` (pktgen.ko, /proc/net/pktgen), in the
        background until :meth:`pktgen_stop`; round-robin over ``queues`` TX queues
        (pktgen's queue_map_min/max, net/core/pktgen.c set_cur_queue_map())."""
        p = f"/proc/net/pktgen/{dev}"
        self.sh("[ -d /proc/net/pktgen ] || insmod /lib/modules/pktgen.ko")
        self.sh("echo rem_device_all > /proc/net/pktgen/kpktgend_0")
        self.sh(f"echo 'add_device {dev}' > /proc/net/pktgen/kpktgend_0")
        for opt in ("count 0", f"pkt_size {size}", "delay 0", f"dst {dst}",
                    f"dst_mac {dst_mac}", "udp_dst_min 9", "udp_dst_max 9",
                    "queue_map_min 0", f"queue_map_max {queues - 1}"):
            self.sh(f"echo '{opt}' > {p}")
        self.sh("(echo start > /proc/net/pktgen/pgctrl) >/tmp/pktgen.out 2>&1 &")
        wait_until("pktgen running", lambda: "Running" in self.sh(
            "cat /proc/net/pktgen/kpktgend_0"), 60)

    def pktgen_stop(self, dev: str) -> dict[str, int]:
        self.sh("echo stop > /proc/net/pktgen/pgctrl")
        text = self.sh(f"cat /proc/net/pktgen/{dev}")
        m = re.search(r"pkts-sofar: (\d+)\s+errors: (\d+)", text)
        return {"sent": int(m[1]), "errors": int(m[2])} if m else {}

    def stop(self) -> None:
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        stop_process(self.proc, 15)


def qemu_args(name: str, workdir: Path, addrs: dict[str, str], *, machine: str = "q35",
              smp: int = 1, extra_append: str = "") -> list[str]:
    """QEMU's own arguments for a guest named ``name`` (no NIC: the scenario adds those)."""
    img = image()
    # lpj= skips the delay-loop calibration, no_timer_check the IO-APIC timer test,
    # i8042.noprobe the PS/2 probe: each costs seconds of emulated time and none matters here.
    append = " ".join(["console=ttyS0", "panic=-1", "loglevel=5", "lpj=4000000",
                       "no_timer_check", "i8042.noprobe", "nokaslr",
                       *(f"vg.{dev}={addr}" for dev, addr in addrs.items()), extra_append])
    return [QEMU, "-accel", "tcg", "-machine", machine, "-bios", QBOOT, "-m", GUEST_MEMORY,
            "-smp", str(smp),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-name", f"guest={name},debug-threads=on",
            "-qmp", f"unix:{workdir / (name + '.qmp')},server=on,wait=off",
            "-kernel", img["kernel"], "-initrd", img["initrd"], "-append", append.strip(),
            "-serial", f"file:{workdir / (name + '.log')}",
            "-serial", f"unix:{workdir / (name + '.cons')},server=on,wait=off"]


def start(name: str, workdir: Path, argv: list[str], addrs: dict[str, str],
          pass_fds: tuple[int, ...] = ()) -> Guest:
    """Start ``argv`` (which ends up as QEMU); the caller waits with :func:`wait_booted`."""
    with open(workdir / f"{name}.stderr", "w") as errf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                                pass_fds=pass_fds)
    return Guest(name=name, proc=proc, workdir=workdir, addrs=addrs)


def wait_link(guest: Guest, tap: str) -> None:
    wait_until(f"tap {tap} of {guest.name}", lambda: os.path.isdir(f"/sys/class/net/{tap}"),
               BOOT_TIMEOUT, [guest.proc], [guest.stderr_log])


def wait_booted(guest: Guest, addr: str, t0: float) -> None:
    """Ready = answers ping from the host, and its command channel answers."""
    def pings() -> bool:
        return subprocess.run(["ping", "-n", "-c", "1", "-W", "1", addr],
                              capture_output=True).returncode == 0

    wait_until(f"guest {guest.name} answering ping at {addr}", pings, BOOT_TIMEOUT,
               [guest.proc], [guest.log], step=0.5)
    guest.boot_seconds = time.monotonic() - t0
    guest.sh("true", timeout=BOOT_TIMEOUT)


def addr_of(cidr: str) -> str:
    return cidr.split("/")[0]
