"""Scenario 4 of issue 16: a running guest started the way libvirt starts VMs.

The parent (this test, as libvirtd would) opens the tap and ``/dev/vhost-net`` itself and
passes them as ``-netdev tap,fd=N,vhost=on,vhostfd=M``; the VM is named with
``-name guest=vm1,debug-threads=on``.  A second NIC is a macvtap (libvirt ``type='direct'``):
``ip link add link LOWER name MVT type macvtap mode bridge``, QEMU handed ``/dev/tapN`` and a
vhost fd.  The host talks to it through a macvlan sibling on the same lower device (bridge
mode switches between siblings; the lower device itself cannot reach a macvtap guest).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.conftest import gone, ip, link_exists, scratch_dir, wait_until
from tests.kernel.guest import (
    Guest,
    host_ping,
    qemu_args,
    record,
    start,
    wait_booted,
)
from vhostctl.tun import Tap
from vhostctl.vhost import VhostNet

pytestmark = pytest.mark.kernel

VM = "vm1"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    yield from scratch_dir("vl")


def open_macvtap(name: str, workdir: Path) -> int:
    """The macvtap's queue device /dev/tapN (N = its ifindex), as libvirt opens it; a node
    is made from sysfs's dev number if devtmpfs has none."""
    index = Path(f"/sys/class/net/{name}/ifindex").read_text().strip()
    node = f"/dev/tap{index}"
    if not os.path.exists(node):
        major, minor = Path(f"/sys/class/net/{name}/macvtap/tap{index}/dev").read_text(
            ).strip().split(":")
        node = str(workdir / f"tap{index}")
        os.mknod(node, 0o600 | 0o020000, os.makedev(int(major), int(minor)))
    return os.open(node, os.O_RDWR)


@pytest.fixture(scope="module")
def vm1(workdir) -> Iterator[dict]:
    tag = os.getpid() % 10000
    tap, lower, mvt, peer = f"vl{tag}t", f"vl{tag}d", f"vl{tag}m", f"vl{tag}v"
    addrs = {"eth0": "10.164.1.2/24", "eth1": "10.164.2.2/24"}
    ip("link", "add", lower, "type", "dummy")
    ip("link", "set", lower, "up")
    ip("link", "add", "link", lower, "name", mvt, "type", "macvtap", "mode", "bridge")
    ip("link", "set", mvt, "up")
    ip("link", "add", "link", lower, "name", peer, "type", "macvlan", "mode", "bridge")
    ip("addr", "add", "10.164.2.1/24", "dev", peer)
    ip("link", "set", peer, "up")
    mvt_mac = Path(f"/sys/class/net/{mvt}/address").read_text().strip()
    g = None
    fds: list[int] = []
    try:
        t = Tap.open(tap, vnet_hdr=True, exclusive=True)  # non-persistent: lives with QEMU
        v1, v2 = VhostNet(), VhostNet()
        m = open_macvtap(mvt, workdir)
        owned = [t, v1, v2]
        fds = [t.fileno(), v1.fileno(), m, v2.fileno()]
        ip("link", "set", tap, "up")
        ip("addr", "add", "10.164.1.1/24", "dev", tap)
        argv = [*qemu_args(VM, workdir, addrs),
                "-netdev", f"tap,id=hostnet0,fd={fds[0]},vhost=on,vhostfd={fds[1]}",
                "-device", "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:16:04:02",
                "-netdev", f"tap,id=hostnet1,fd={fds[2]},vhost=on,vhostfd={fds[3]}",
                "-device", f"virtio-net-pci,netdev=hostnet1,id=net1,mac={mvt_mac}"]
        t0 = time.monotonic()
        g = start(VM, workdir, argv, addrs, pass_fds=tuple(fds))
        for o in owned:  # libvirtd closes its copies once QEMU runs
            o.close()
        os.close(m)
        wait_booted(g, "10.164.1.2", t0)
        record(test="boot", guest=VM, boot_seconds=round(g.boot_seconds, 1), style="libvirt")
        yield {"guest": g, "tap": tap, "lower": lower, "macvtap": mvt, "fds": fds}
    finally:
        if g is not None:
            g.stop()
        gone(mvt, peer, lower, tap)
    wait_until(f"tap {tap} gone with QEMU", lambda: not link_exists(tap), 30)


def inspect_vm1(cli, g: Guest) -> dict:
    r = cli("inspect", "--json", VM)
    assert r.code == 0, r
    (proc,) = r.json()["processes"]
    assert (proc["pid"], proc["name"], proc["kind"]) == (g.pid, VM, "qemu")
    return proc


def test_libvirt_style_fds_and_name(vm1, cli):
    g, tap, fds = vm1["guest"], vm1["tap"], vm1["fds"]
    out = g.ping("10.164.1.1", count=10)
    assert out["loss"] == 0, out
    back = host_ping("10.164.1.2", count=10)
    assert back["loss"] == 0, back
    p = inspect_vm1(cli, g)
    nic = next(n for n in p["nics"] if n["id"] == "hostnet0")
    assert (nic["path"], nic["tap"], nic["tap_fds"], nic["vhost_fds"]) == \
        ("vhost-net", tap, [fds[0]], [fds[1]]), nic
    assert len(p["workers"]) == 2, p["workers"]  # one per vhost fd, both NICs
    record(test="libvirt", guest=VM, guest_to_host_rtt_ms=out.get("rtt_avg"),
           host_to_guest_rtt_ms=back.get("rtt_avg"))


def test_macvtap_nic(vm1, cli):
    g, lower, mvt, fds = vm1["guest"], vm1["lower"], vm1["macvtap"], vm1["fds"]
    out = g.ping("10.164.2.1", count=10, iface="eth1")
    assert out["loss"] == 0, out
    p = inspect_vm1(cli, g)
    nic = next((n for n in p["nics"] if n["id"] == "hostnet1"), None)
    assert nic is not None, json.dumps(p["nics"])
    assert (nic["path"], nic["tap"], nic["tap_fds"], nic["vhost_fds"]) == \
        ("vhost-net", mvt, [fds[2]], [fds[3]]), nic
    assert nic.get("tap_kind") == "macvtap", nic
    assert (nic["link"]["lower"], nic["link"]["mode"]) == (lower, "bridge"), nic["link"]
    text = cli("tap", "list").stdout
    assert all("unknown" not in line for line in text.splitlines() if mvt in line), text
    shown = cli("inspect", VM).stdout
    assert all("unknown" not in line for line in shown.splitlines() if mvt in line), shown
    record(test="macvtap", guest=VM, guest_to_host_rtt_ms=out.get("rtt_avg"))
