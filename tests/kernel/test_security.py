"""Security properties on the real kernel: no fd reaches an exec'd child unless handed over,
persistent taps are never open to everyone, and fds from outside are identified by the kernel.

(``vhostctl exec``'s own hand-off -- exactly the handed fds, uid/gid/groups dropped, no
capability left -- is proven in test_vm.py::test_exec_child_gets_exactly_the_fds_and_ids.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess

import pytest

from tests.kernel.conftest import as_user, fork_call, gone, link_exists, open_fds, run_cli
from vhostctl import _fd
from vhostctl.datapath import Datapath, DatapathConfig
from vhostctl.errors import VhostctlError
from vhostctl.hostcheck import host_report
from vhostctl.netlink import Netlink
from vhostctl.selftest import host_socket
from vhostctl.tun import Tap
from vhostctl.vhost import VhostNet

NOBODY = 65534


def record(**facts: object) -> None:
    out = os.environ.get("VHOSTCTL_RESULTS")
    if out:
        with open(os.path.join(out, "security.jsonl"), "a") as f:
            f.write(json.dumps({"kernel": os.uname().release, **facts}) + "\n")


def child_fds() -> set[int]:
    """The fds an exec'd child inherits: ``ls`` lists its own /proc/self/fd (its own
    directory fd is in the listing too), with close_fds=False so nothing is closed for us."""
    r = subprocess.run(["ls", "/proc/self/fd"], close_fds=False, capture_output=True,
                       text=True, check=True)
    return {int(x) for x in r.stdout.split()}


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_no_fd_of_ours_reaches_an_exec_child(ifname, no_fd_leak):
    """A datapath (taps, vhost-net, memfd mappings, eventfds), an extra tap queue, a bare
    vhost-net fd, an rtnetlink socket and an AF_PACKET socket, all open: a child started
    without close_fds sees exactly what it saw before (fds the test process inherited from
    its own parent may be in both); each of our fds is O_CLOEXEC."""
    baseline = child_fds()
    before = open_fds()
    with Datapath(DatapathConfig(queues=2, ring_size=16, tap_name=ifname)) as dp, \
            Tap.open(f"{ifname}x") as extra, VhostNet() as vh, Netlink() as nl:
        nl.links()
        s = host_socket(dp.ifindex)
        try:
            ours = {fd for fd in open_fds() - before if is_open(fd)}  # not listdir's own
            assert len(ours) >= 2 * 7 + 4, ours  # per queue: tap, vhost, 5 eventfds; + extras
            assert {extra.fileno(), vh.fileno(), s.fileno()} <= ours
            for fd in sorted(ours):
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, \
                    f"fd {fd} -> {os.readlink(f'/proc/self/fd/{fd}')} is inheritable"
            assert child_fds() == baseline
        finally:
            s.close()



def test_tap_add_never_leaves_a_tap_open_to_everyone(ifname, monkeypatch):
    """A persistent tap with neither owner nor group (as ``ip tuntap add`` makes one) can be
    attached by *any* user where tun_not_capable() refuses only when an owner or group is set
    (6.1 here); kernels with commit 3ca459eaba1b (6.12.117 here; reverted upstream in 2025)
    ask for CAP_NET_ADMIN instead.  ``tap add`` therefore defaults the owner to the invoking
    user (here root): an unprivileged user is refused on every kernel, with exit 3."""
    monkeypatch.delenv("SUDO_UID", raising=False)
    bare, made = ifname, f"{ifname}v"
    try:
        with Tap.open(bare, exclusive=True) as t:
            t.set_persist(True)
        r = run_cli("tap", "add", made, "--json")
        assert r.code == 0, r
        assert r.json()["tap"]["owner"] == 0 and r.json()["tap"]["warnings"] == []
        shown = run_cli("tap", "show", bare)
        assert "any process that can open /dev/net/tun may attach" in \
            " ".join(shown.stderr.split())

        def attempts() -> dict:
            out = {}
            for key, name in (("bare", bare), ("made", made)):
                try:
                    Tap.open(name).close()
                    out[key] = "attached"
                except VhostctlError as e:
                    out[key] = e.errno
            d = run_cli("tap", "del", made)
            out["del"] = [d.code, d.stderr]
            return out

        status, out = fork_call(as_user(attempts))
        assert status == 0
        assert out["bare"] in ("attached", errno.EPERM), out
        record(test="ownerless-tap-attach-as-nobody", result=out["bare"])
        assert out["made"] == errno.EPERM
        assert out["del"][0] == 3 and "CAP_NET_ADMIN" in out["del"][1], out
        assert link_exists(made)
    finally:
        gone(bare, made)


def test_tap_add_under_sudo_gives_the_tap_to_the_sudo_user(ifname, monkeypatch):
    monkeypatch.setenv("SUDO_UID", str(NOBODY))
    try:
        r = run_cli("tap", "add", ifname, "--json")
        assert r.code == 0, r
        assert r.json()["tap"]["owner"] == NOBODY

        def attach() -> str:
            Tap.open(ifname).close()
            return "attached"

        assert fork_call(as_user(attach)) == (0, "attached")
    finally:
        gone(ifname)


def test_fds_from_outside_are_identified_by_the_kernel(ifname, no_fd_leak):
    """Tap.adopt() asks fstat (rdev 10:200) and TUNGETIFF before any TUN ioctl: /dev/null,
    an eventfd, /dev/vhost-net, a tun fd without an interface and a queue of another tap are
    refused and closed; a queue of the named tap is taken."""
    def refused(fd: int, name: str | None = ifname) -> str:
        with pytest.raises(VhostctlError) as ei:
            Tap.adopt(fd, name)
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF, "a refused fd must be closed"
        return str(ei.value)

    assert "not a tun/tap queue" in refused(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
    assert "not a tun/tap queue" in refused(_fd.eventfd())
    assert "not a tun/tap queue" in refused(_fd.open_dev("/dev/vhost-net"))
    assert "TUNGETIFF" in refused(_fd.open_dev("/dev/net/tun"))
    with Tap.open(ifname) as mine, Tap.open(f"{ifname}o") as other:
        assert f"not of {ifname!r}" in refused(os.dup(other.fileno()))
        with Tap.adopt(os.dup(mine.fileno()), ifname) as copy:
            assert copy.name == ifname and copy.vnet_hdr_sz == mine.vnet_hdr_sz


def test_check_opens_devices_and_reports_their_numbers():
    """check identifies the device nodes by the numbers of the opened fd, not by path."""
    r = host_report()
    assert r.check("vhost-net device").data["rdev"] == "10:238"
    assert r.check("tun device").data["rdev"] == "10:200"
