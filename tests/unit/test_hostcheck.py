"""Host readiness over fake /dev, /proc and /sys trees: no devices, no privileges needed."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from vhostctl import hostcheck
from vhostctl.errors import OpenError
from vhostctl.hostcheck import HostPaths, devices_list_allows, host_report, kernel_version


def tree(tmp_path: Path, release: str = "6.1.0-56-amd64") -> HostPaths:
    for d in ("dev/net", "proc/self", "proc/1", "sys/module", "lib/modules"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    return HostPaths(dev=str(tmp_path / "dev"), proc=str(tmp_path / "proc"),
                     sys=str(tmp_path / "sys"), root=str(tmp_path), release=release)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_empty_host_is_not_ready_and_every_failure_has_a_fix(tmp_path):
    r = host_report(tree(tmp_path))
    assert not r.ready
    dev = r.check("vhost-net device")
    assert dev.ok is False and "absent" in dev.detail
    assert dev.fix.startswith("modprobe vhost_net")
    assert r.check("tun device").fix.startswith("modprobe tun")
    assert r.check("vhost_net module").fix == "modprobe vhost_net"
    feats = r.check("vhost features")
    assert feats.ok is False and feats.fix == dev.fix
    assert r.check("vhost backend features").ok is None
    for c in r.checks:
        if c.ok is False:
            assert c.fix, c
    json.dumps(r.to_dict())  # serialisable as is


def test_regular_file_is_not_a_character_device(tmp_path):
    p = tree(tmp_path)
    write(tmp_path / "dev" / "vhost-net", "")
    c = host_report(p).check("vhost-net device")
    assert c.ok is False and "not a character device" in c.detail
    assert "mknod -m 0660 /dev/vhost-net c 10 238" in c.fix


def test_wrong_device_numbers_found_by_fstat_of_the_opened_fd(tmp_path):
    p = tree(tmp_path)
    os.symlink("/dev/null", tmp_path / "dev" / "vhost-net")  # a char device, 1:3
    c = host_report(p).check("vhost-net device")
    assert c.ok is False
    assert "is 1:3, expected 10:238" in c.detail
    assert c.data["rdev"] == "1:3"


def test_denied_open_despite_mode_points_at_device_cgroup(tmp_path, monkeypatch):
    p = tree(tmp_path)
    os.symlink("/dev/null", tmp_path / "dev" / "vhost-net")

    def deny(path, flags=os.O_RDWR):
        raise OpenError(f"open {path}", errno.EPERM)

    monkeypatch.setattr(hostcheck._fd, "open_dev", deny)
    c = host_report(p).check("vhost-net device")
    assert c.ok is False and c.data["access"] is True
    assert "device cgroup" in c.fix and "--device /dev/vhost-net" in c.fix


def test_denied_open_by_mode_suggests_group(tmp_path, monkeypatch):
    p = tree(tmp_path)
    os.symlink("/dev/null", tmp_path / "dev" / "vhost-net")

    def deny(path, flags=os.O_RDWR):
        raise OpenError(f"open {path}", errno.EACCES)

    monkeypatch.setattr(hostcheck.os, "access", lambda path, mode: False)
    monkeypatch.setattr(hostcheck._fd, "open_dev", deny)
    c = host_report(p).check("vhost-net device")
    assert c.ok is False and "usermod -aG kvm" in c.fix


def test_mode_allows():
    class St:
        st_uid, st_gid = 0, 36
        st_mode = 0o20660

    assert hostcheck.mode_allows(St, 0, [])
    assert hostcheck.mode_allows(St, 1000, [1000, 36])
    assert not hostcheck.mode_allows(St, 1000, [1000])
    St.st_mode = 0o20666
    assert hostcheck.mode_allows(St, 1000, [1000])


@pytest.mark.parametrize("setup, state, detail", [
    ("initstate", "module", "loaded as a module (live)"),
    ("builtin", "builtin", "built into the kernel"),
    ("sysdir", "builtin", "built into the kernel"),
    ("none", "absent", "not loaded"),
])
def test_module_states(tmp_path, setup, state, detail):
    p = tree(tmp_path)
    if setup == "initstate":
        write(tmp_path / "sys/module/vhost_net/initstate", "live\n")
    elif setup == "builtin":
        write(tmp_path / f"lib/modules/{p.release}/modules.builtin",
              "kernel/drivers/net/tun.ko\nkernel/drivers/vhost/vhost_net.ko\n")
    elif setup == "sysdir":
        (tmp_path / "sys/module/vhost_net").mkdir()
    c = host_report(p).check("vhost_net module")
    assert c.data["state"] == state and c.detail == detail
    assert c.ok is (state != "absent")


def test_module_parameters_read_from_sysfs(tmp_path):
    p = tree(tmp_path)
    write(tmp_path / "sys/module/vhost/parameters/max_mem_regions", "509\n")
    write(tmp_path / "sys/module/vhost/parameters/max_iotlb_entries", "2048\n")
    write(tmp_path / "sys/module/vhost_net/parameters/experimental_zcopytx", "0\n")
    c = host_report(p).check("module parameters")
    assert c.ok is None
    assert c.data == {"max_mem_regions": "509", "max_iotlb_entries": "2048",
                      "experimental_zcopytx": "0"}
    assert "max_mem_regions=509" in c.detail


@pytest.mark.parametrize("release, fork_default, model", [
    ("6.1.0-56-amd64", None, "kthread"),
    ("6.3.13", None, "kthread"),
    ("6.4.0", None, "task"),
    ("6.12.117+deb12-amd64", None, "task"),
    ("6.17.1", "Y", "task"),
    ("6.17.1", "N", "kthread"),
])
def test_worker_model_from_kernel_version(tmp_path, release, fork_default, model):
    p = tree(tmp_path, release)
    if fork_default is not None:
        write(tmp_path / "sys/module/vhost/parameters/fork_from_owner_default", fork_default)
    c = host_report(p).check("vhost workers")
    assert c.ok is None and c.data["model"] == model
    assert ("kthreadd" in c.detail) == (model == "kthread")


def test_kernel_version():
    assert kernel_version("6.12.117+deb12-amd64") == (6, 12)
    assert kernel_version("5.10.0") == (5, 10)
    with pytest.raises(ValueError):
        kernel_version("garbage")


@pytest.mark.parametrize("capeff, ok", [("000001fffeffffff", True), ("0000000000001000", True),
                                        ("0000000000000000", False),
                                        ("0000000000000800", False)])
def test_cap_net_admin_is_bit_12_of_capeff(tmp_path, capeff, ok):
    p = tree(tmp_path)
    write(tmp_path / "proc/self/status", f"Name:\tx\nCapInh:\t0\nCapEff:\t{capeff}\n")
    c = host_report(p).check("CAP_NET_ADMIN")
    assert c.ok is ok
    assert bool(c.fix) is (not ok)


def test_container_detected_with_fix_when_devices_fail(tmp_path):
    p = tree(tmp_path)
    write(tmp_path / ".dockerenv", "")
    write(tmp_path / "proc/1/cgroup", "0::/system.slice/docker-abc.scope\n")
    write(tmp_path / "sys/fs/cgroup/devices/devices.list", "c 10:200 rwm\nc 1:3 rwm\n")
    c = host_report(p).check("container")
    assert c.ok is None and c.data["container"] is True
    assert "/.dockerenv" in c.detail and "docker" in c.detail
    assert c.data["devices_cgroup_allows"] == {"vhost-net": False, "tun": True}
    assert "devices cgroup denies vhost-net" in c.detail
    assert "--device /dev/vhost-net" in c.fix


def test_no_container(tmp_path):
    c = host_report(tree(tmp_path)).check("container")
    assert c.data["container"] is False and c.detail == "none detected"


@pytest.mark.parametrize("text, allowed", [
    ("a *:* rwm\n", True),
    ("c *:* rwm\n", True),
    ("c 10:* rw\n", True),
    ("c 10:238 rwm\n", True),
    ("c 10:238 r\n", False),
    ("c 10:200 rwm\nb *:* rwm\n", False),
    ("", False),
])
def test_devices_list_allows(text, allowed):
    assert devices_list_allows(text, 10, 238) is allowed


def test_kvm_absent_is_information_only(tmp_path):
    c = host_report(tree(tmp_path)).check("/dev/kvm")
    assert c.ok is None and c.data["present"] is False


def test_ready_ignores_information_checks():
    ok = hostcheck.Check("a", True, "")
    info = hostcheck.Check("b", None, "")
    bad = hostcheck.Check("c", False, "", "fix it")
    assert hostcheck.HostReport((ok, info)).ready
    assert not hostcheck.HostReport((ok, info, bad)).ready
