"""Tap objects against the real tun driver: flags read back, exclusivity, queues, tunables."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from tests.kernel.conftest import ip, link_exists
from vhostctl._uapi import if_tun as T
from vhostctl.errors import IoctlError, ValidationError
from vhostctl.tun import Tap


def sysfs(name: str, attr: str) -> str:
    return Path(f"/sys/class/net/{name}/{attr}").read_text().strip()


def test_template_name_is_filled_in_by_the_kernel(no_fd_leak):
    with Tap.open("vhtpl%d") as tap:
        assert tap.name.startswith("vhtpl") and tap.name[5:].isdigit()
        assert link_exists(tap.name)


def test_exclusive_create_refuses_an_existing_name(ifname, no_fd_leak):
    with Tap.open(ifname, multi_queue=True):
        with pytest.raises(IoctlError) as ei:
            Tap.open(ifname, multi_queue=True, exclusive=True)
        assert ei.value.errno == errno.EBUSY


def test_single_queue_tap_is_busy_while_held(ifname, no_fd_leak):
    with Tap.open(ifname):
        with pytest.raises(IoctlError) as ei:
            Tap.open(ifname)
    assert ei.value.errno == errno.EBUSY
    assert str(ei.value).startswith("TUNSETIFF: Device or resource busy")


def test_multi_queue_flag_mismatch_is_einval(ifname, no_fd_leak):
    with Tap.open(ifname, multi_queue=True):
        with pytest.raises(IoctlError) as ei:
            Tap.open(ifname, multi_queue=False)
    assert ei.value.errno == errno.EINVAL


def test_second_queue_with_other_flags_is_caught_by_readback(ifname, no_fd_leak):
    """The kernel ignores a second queue's flags; TUNGETIFF shows it and we refuse."""
    with Tap.open(ifname, multi_queue=True, vnet_hdr=True):
        with pytest.raises(ValidationError, match="kernel reports flags"):
            Tap.open(ifname, multi_queue=True, vnet_hdr=False)


def test_open_queues_all_or_nothing_and_queue_toggle(ifname, no_fd_leak):
    taps = Tap.open_queues(ifname, 4)
    try:
        assert len({t.fileno() for t in taps}) == 4
        assert all(t.flags & T.IFF_MULTI_QUEUE for t in taps)
        info = json.loads(ip("-d", "-j", "link", "show", ifname))[0]["linkinfo"]["info_data"]
        assert info["multi_queue"] is True
        taps[3].set_queue_enabled(False)
        with pytest.raises(IoctlError) as ei:
            taps[3].set_queue_enabled(False)  # already detached
        assert ei.value.errno == errno.EINVAL
        taps[3].set_queue_enabled(True)
    finally:
        for t in taps:
            t.close()
    assert not link_exists(ifname)


def test_persist_owner_group_and_cleanup(ifname, no_fd_leak):
    with Tap.open(ifname) as tap:
        tap.set_owner(4242)
        tap.set_group(4343)
        tap.set_persist(True)
        assert tap.refresh() & T.IFF_PERSIST
    assert link_exists(ifname), "persistent tap must outlive its fd"
    assert sysfs(ifname, "owner") == "4242" and sysfs(ifname, "group") == "4343"
    with Tap.open(ifname) as tap:
        tap.set_persist(False)
    assert not link_exists(ifname)


def test_tunables_round_trip(ifname, no_fd_leak):
    with Tap.open(ifname) as tap:
        tap.sndbuf = 1 << 20
        assert tap.sndbuf == 1 << 20
        tap.vnet_le = True
        assert tap.vnet_le is True
        tap.vnet_le = False
        tap.set_offload(T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO6)
        with pytest.raises(IoctlError) as ei:
            tap.set_offload(1 << 30)  # tun_set_offload(): unknown bits are EINVAL
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(ValidationError):
            tap.vnet_hdr_sz = 8
        try:
            tap.vnet_be = True
            assert tap.vnet_be is True
        except IoctlError as e:  # only with CONFIG_TUN_VNET_CROSS_LE
            assert e.errno == errno.EINVAL


@pytest.mark.parametrize("bad", ["", "a" * 16, "a/b", "a:b", "a b", "-x", "é", "x;y", ".", "..",
                                 "x%s", "%d%d"])
def test_bad_names_never_reach_the_kernel(bad):
    from vhostctl import _fd

    _fd.faults.arm(1)  # any kernel call would now fail with EIO instead of ValidationError
    try:
        with pytest.raises(ValidationError):
            Tap.open(bad)
    finally:
        _fd.faults.disarm()
