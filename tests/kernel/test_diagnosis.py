"""Diagnosis on the real kernel: each way the host can refuse vhost-net is named by ``check``
and by the command that fails, with the fix.

- a device node that is absent or has the wrong numbers: ``check`` over a fake /dev, whose
  nodes are opened for real;
- the vhost_net module unloaded, for real (only inside the test VM, where nothing else uses
  it: ``rmmod`` on a host would pull it from under running VMs);
- ``/dev/vhost-net`` mode 0600 as an unprivileged user (a forked child that setuid()s);
- a user namespace: CapEff shows CAP_NET_ADMIN, but not over the host's network namespace,
  so TUNSETIFF answers EPERM.

A device cgroup is not set up here: on cgroup v2 it is an eBPF program attached to a cgroup
(BPF_CGROUP_DEVICE), which needs a compiled program and a cgroup of our own.  What ``check``
does about it is unit-tested (tests/unit/test_hostcheck.py: an open refused although the
mode allows it is attributed to a device cgroup; cgroup v1 devices.list is parsed).
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import subprocess
import time

import pytest

from tests.kernel.conftest import as_user, fork_call, link_snapshot, run_cli
from vhostctl.hostcheck import HostPaths, host_report

NOBODY = 65534
CLONE_NEWUSER = 0x10000000


def in_test_vm() -> bool:
    """virtme-ng boots with its own parameters on the kernel command line."""
    with open("/proc/cmdline") as f:
        return "virtme" in f.read()


def test_check_over_a_fake_dev_names_absent_and_wrong_nodes(tmp_path):
    dev = tmp_path / "dev"
    (dev / "net").mkdir(parents=True)
    os.mknod(dev / "vhost-net", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    r = host_report(HostPaths(dev=str(dev)))
    assert not r.ready
    vh, tun = r.check("vhost-net device"), r.check("tun device")
    assert vh.ok is False and "is 1:3, expected 10:238" in vh.detail
    assert "mknod -m 0660 /dev/vhost-net c 10 238" in vh.fix
    assert tun.ok is False and "/dev/net/tun is absent" in tun.detail
    assert tun.fix.startswith("modprobe tun")
    assert r.check("vhost features").ok is False


@pytest.mark.vm_only
@pytest.mark.skipif(not in_test_vm(), reason="unloads vhost_net: only inside the test VM")
def test_vhost_net_module_unloaded_for_real():
    with open("/sys/module/vhost_net/refcnt") as f:
        assert f.read().strip() == "0", "vhost_net is in use: an earlier test leaked a fd"
    before = link_snapshot()
    subprocess.run(["rmmod", "vhost_net"], check=True, capture_output=True)
    try:
        for _ in range(50):  # devtmpfs removes the node as the module goes
            if not os.path.exists("/dev/vhost-net"):
                break
            time.sleep(0.1)
        r = run_cli("check", "--json")
        assert r.code == 1, r
        checks = {c["name"]: c for c in r.json()["checks"]}
        assert checks["vhost-net device"]["ok"] is False
        assert "/dev/vhost-net is absent" in checks["vhost-net device"]["detail"]
        assert checks["vhost-net device"]["fix"].startswith("modprobe vhost_net")
        module = checks["vhost_net module"]
        assert (module["ok"], module["fix"]) == (False, "modprobe vhost_net"), module
        assert checks["tun device"]["ok"] is True
        for argv in (("selftest", "--frames", "1"), ("features",)):
            f = run_cli(*argv)
            assert f.code == 1, f
            assert "/dev/vhost-net: No such file or directory (load the module: modprobe " \
                "vhost_net)" in f.stderr, f
        assert link_snapshot() == before
    finally:
        subprocess.run(["modprobe", "vhost_net"], check=True, capture_output=True)
    assert os.path.exists("/dev/vhost-net")
    assert run_cli("check").code == 0



def _run_all() -> dict:
    out = {}
    for key, argv in (("check", ("check", "--json")), ("features", ("features",)),
                      ("tap add", ("tap", "add", "vtdiag0")),
                      ("selftest", ("selftest", "--tap", "vtdiag1", "--frames", "1"))):
        r = run_cli(*argv)
        out[key] = {"code": r.code, "stdout": r.stdout, "stderr": " ".join(r.stderr.split())}
    return out


def test_unprivileged_user_with_vhost_net_0600():
    path = "/dev/vhost-net"
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o006:
        os.chmod(path, 0o600)  # as devtmpfs makes it when no udev rule widens it
    before = link_snapshot()
    try:
        status, out = fork_call(as_user(_run_all))
    finally:
        os.chmod(path, mode)
    assert status == 0
    check = out["check"]
    assert check["code"] == 1
    checks = {c["name"]: c for c in json.loads(check["stdout"])["checks"]}
    vh = checks["vhost-net device"]
    assert vh["ok"] is False and "Permission denied" in vh["detail"]
    assert vh["data"]["access"] is False and "usermod -aG kvm" in vh["fix"]
    assert checks["tun device"]["ok"] is True  # 0666: anyone may open it
    assert checks["CAP_NET_ADMIN"]["ok"] is False
    assert "run as root" in checks["CAP_NET_ADMIN"]["fix"]
    assert out["features"]["code"] == 3
    assert "open /dev/vhost-net: Permission denied (needs root, or access to /dev/vhost-net" \
        in out["features"]["stderr"]
    for key in ("tap add", "selftest"):
        assert out[key]["code"] == 3, out[key]
        assert "TUNSETIFF: Operation not permitted" in out[key]["stderr"]
        assert "needs CAP_NET_ADMIN" in out[key]["stderr"]
    assert link_snapshot() == before


def _in_user_namespace(fn):
    """unshare -U -r: uid 0 and every capability, but only inside a new user namespace that
    does not own the (host's) network namespace."""
    def child():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
        for name, text in (("setgroups", "deny"), ("uid_map", "0 0 1"), ("gid_map", "0 0 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        with open("/proc/self/status") as f:
            capeff = next(int(x.split()[1], 16) for x in f if x.startswith("CapEff:"))
        return {"capeff": capeff, **fn()}

    return child


def test_user_namespace_has_the_capability_bit_but_not_over_the_network():
    before = link_snapshot()
    status, out = fork_call(_in_user_namespace(_run_all))
    assert status == 0
    assert out["capeff"] >> 12 & 1, "inside the user namespace CapEff has CAP_NET_ADMIN"
    check = out["check"]
    assert check["code"] == 1
    checks = {c["name"]: c for c in json.loads(check["stdout"])["checks"]}
    cap = checks["CAP_NET_ADMIN"]
    assert cap["ok"] is False and "user namespace" in cap["detail"], cap
    assert "unshare -U -n" in cap["fix"]
    assert checks["tun device"]["ok"] is True and checks["vhost-net device"]["ok"] is True
    for key in ("tap add", "selftest"):
        assert out[key]["code"] == 3, out[key]
        assert "TUNSETIFF: Operation not permitted" in out[key]["stderr"]
        assert "a user namespace of its own does not give it" in out[key]["stderr"]
    assert link_snapshot() == before
