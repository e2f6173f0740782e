"""Fixtures for tests that run against a real kernel (scripts/vmtest boots one)."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

_seq = itertools.count()


@pytest.fixture
def ifname() -> str:
    """A tap name unique to this test run (pid + counter), 15 bytes at most."""
    return f"vt{os.getpid() % 100000}x{next(_seq)}"


def gone(*names: str) -> None:
    """Delete these links if they exist (test clean-up: errors ignored)."""
    for name in names:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


@pytest.fixture
def tap_name(ifname):
    """``ifname``, deleted again after the test whatever it left."""
    try:
        yield ifname
    finally:
        gone(ifname)


def fds_but_sockets(pid: int) -> dict[int, str]:
    """A process's fds and their targets, less sockets: a QMP client's connection closes
    asynchronously, so it must not count as a change."""
    out = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            out[int(n)] = target
    return out


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak():
    """Fail the test if it leaves an fd open (the listdir's own fd closes before we compare)."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"leaked fds: {sorted(leaked)}"


def udev_settle(*names: str) -> None:
    """Wait (bounded) for udev to finish with new links: with MACAddressPolicy=persistent
    (systemd's 99-default.link, active in the VM) it gives a new link that has a random
    address its own some time after creation.  ``names``: links just made; wait until udevd
    has recorded each (:func:`vhostctl.netlink.wait_udev`), since ``udevadm settle`` can
    return before udevd has even read the kernel's event for a link made a moment ago."""
    from vhostctl.netlink import wait_udev

    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "settle", "--timeout=10"], capture_output=True, check=False)
    for name in names:
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            continue  # not there (a clean-up call): nothing for udev to do
        assert wait_udev(index, timeout=60), f"udevd did not handle {name} within 60 s"


def link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def json(self):
        import json

        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


def _build_once() -> None:
    """typer.testing.CliRunner rebuilds the click command from the app on every invoke
    (``typer.testing._get_command``), which costs seconds in the VM and would dominate the
    table-driven and fault-injection loops: memoize it per app, once per test process."""
    import typer.testing as tt

    real = tt._get_command
    if getattr(real, "memoized", False):
        return
    built: dict[int, object] = {}

    def get_command(app):
        if id(app) not in built:
            built[id(app)] = real(app)
        return built[id(app)]

    get_command.memoized = True
    tt._get_command = get_command


def run_cli(*args: str) -> CliResult:
    """Run vhostctl in-process (a Python start costs seconds in the VM)."""
    from typer.testing import CliRunner

    from vhostctl.cli import (
        app,
        commands,  # noqa: F401
    )

    _build_once()
    r = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return CliResult(r.exit_code, r.stdout, r.stderr)


@pytest.fixture
def cli():
    return run_cli


def link_snapshot(ipr=None) -> dict[str, object]:
    """Every link in this namespace as rtnetlink reports it (what ``ip -j -d link`` shows,
    less counters and carrier), plus the named network namespaces: the host state a refused
    or failed command must leave exactly as it was.  ``ipr``: an open pyroute2 IPRoute to
    reuse (opening one costs a few hundred ms in the VM)."""
    from pyroute2 import IPRoute

    keys = ("IFLA_IFNAME", "IFLA_MTU", "IFLA_ADDRESS", "IFLA_MASTER", "IFLA_TXQLEN",
            "IFLA_GROUP", "IFLA_NUM_TX_QUEUES", "IFLA_PROMISCUITY")
    # Carrier follows the kernel, not us: a bridge that had a port for a moment keeps
    # RUNNING/LOWER_UP (and its operstate) for a while after the port is gone.
    carrier = 0x40 | 0x10000 | 0x20000  # IFF_RUNNING | IFF_LOWER_UP | IFF_DORMANT
    out: dict[str, object] = {}
    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        for m in ipr.get_links():
            info = m.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
            tun = (tuple((a[0], a[1]) for a in data["attrs"])
                   if kind == "tun" and data is not None else None)
            out[m.get_attr("IFLA_IFNAME")] = (m["index"], m["flags"] & ~carrier, kind, tun,
                                              *(m.get_attr(k) for k in keys))
    finally:
        if own:
            ipr.close()
    netns = "/var/run/netns"
    out["<netns>"] = sorted(os.listdir(netns)) if os.path.isdir(netns) else []
    return out


def fork_call(fn, timeout: float = 120.0):
    """Run ``fn()`` in a forked child (no Python start-up, nothing re-imported) and return
    ``(status, result)``: status is the exit code, or minus the signal that killed it;
    result is what ``fn`` returned (JSON-able), or None.  The wait is bounded."""
    import json
    import select
    import signal
    import time
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            payload = json.dumps({"result": fn()})
        except BaseException:
            payload, code = json.dumps({"error": traceback.format_exc()}), 70
        try:
            os.write(w, payload.encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"forked child {pid} did not finish in {timeout}s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    data = json.loads(b"".join(chunks) or b"{}")
    if "error" in data:
        raise AssertionError(f"forked child failed:\n{data['error']}")
    return code, data.get("result")


def _warm_imports() -> None:
    """Import every vhostctl module and what the CLI prints errors with, while still root:
    after a drop to an unprivileged uid the interpreter's own files (under /root/.pyenv)
    may be unreadable, so a lazy import there would fail instead of the code under test."""
    import encodings.ascii
    import encodings.idna
    import encodings.latin_1  # noqa: F401
    import importlib
    import pkgutil

    import vhostctl
    from vhostctl.render import console, err_console

    for mod in pkgutil.walk_packages(vhostctl.__path__, "vhostctl."):
        if not mod.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(mod.name)
    console()
    err_console()
    run_cli("--version")


def as_user(fn, uid: int = 65534, gid: int = 65534):
    """``fn`` wrapped to run as ``uid``/``gid`` with no supplementary groups (for
    :func:`fork_call`: the drop happens in the child only; the imports are warmed here, in
    the parent, so that every child inherits them)."""
    _warm_imports()

    def child():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        return fn()

    return child


def _tails(logs: Sequence[Path]) -> str:
    return " | ".join(f.read_text(errors="replace")[-2000:] for f in logs if f.exists())


def wait_until(what: str, cond: Callable[[], object], timeout: float,
               procs: Sequence[subprocess.Popen] = (), logs: Sequence[Path] = (),
               step: float = 0.2) -> object:
    """``cond()``'s first true value, polled every ``step`` s; the test fails, quoting the
    ``logs``, when ``timeout`` passes or one of ``procs`` (what should make it true) exits."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: {p.args[0]} exited with {p.returncode}: {_tails(logs)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s: {_tails(logs)}")
        time.sleep(step)


def stop_process(p: subprocess.Popen, timeout: float = 20.0) -> None:
    """End a child a test started: its stdin closed (the programs that stop at EOF stop
    cleanly), SIGTERM, SIGKILL after ``timeout`` s."""
    if p.stdin:
        p.stdin.close()
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def scratch_dir(prefix: str) -> Iterator[Path]:
    """A short directory under /tmp (sun_path is 108 bytes) for sockets and logs; the
    consoles (``*.log``) are kept in $VHOSTCTL_RESULTS for a failure's post-mortem."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    yield d
    out = os.environ.get("VHOSTCTL_RESULTS")
    if out:
        for log in d.glob("*.log"):
            shutil.copy(log, Path(out) / f"guest-{log.name}")
    shutil.rmtree(d, ignore_errors=True)
