"""vhost.py and tun.py through a spy on the ``_fd.ioctl`` choke point: every public method,
what it refuses before the kernel is asked (no ioctl recorded) and the structure it builds."""

from __future__ import annotations

import ctypes
import errno

import pytest

from tests.unit.fakekernel import BACKEND_OFFERED, OFFERED, install
from vhostctl import _fd
from vhostctl._uapi import if_tun as T
from vhostctl._uapi import vhost as V
from vhostctl.errors import IoctlError, UnsupportedError, ValidationError
from vhostctl.memory import GuestMemory
from vhostctl.tun import Tap, tun_features
from vhostctl.vhost import VRING_MAX_NUM, VhostDevice, VhostNet, offered_features


@pytest.fixture
def kernel(monkeypatch):
    return install(monkeypatch)


@pytest.fixture
def dev(kernel):
    with VhostNet() as d:
        d.set_owner()
        yield d


# -- vhost: ownership and features -----------------------------------------------------------------

def test_owner_and_reset_owner(kernel) -> None:
    with VhostNet() as d:
        d.set_owner()
        with pytest.raises(IoctlError, match="already has an owner") as e:
            d.set_owner()
        assert e.value.errno == errno.EBUSY
        d.reset_owner()
        d.set_owner()
    assert kernel.names() == ["VHOST_SET_OWNER", "VHOST_SET_OWNER", "VHOST_RESET_OWNER",
                              "VHOST_SET_OWNER"]


def test_an_ioctl_before_set_owner_is_named_with_its_fix(kernel) -> None:
    with VhostNet() as d, pytest.raises(IoctlError, match="VHOST_SET_OWNER was not called"):
        d.set_vring_num(0, 256)


def test_features_are_checked_against_the_offer_before_the_kernel(dev, kernel) -> None:
    assert dev.get_features() == OFFERED
    dev.set_features(1 << 32)
    assert kernel.last("VHOST_SET_FEATURES") == 1 << 32
    n = len(kernel.calls)
    with pytest.raises(UnsupportedError, match=r"not offered by this kernel: "):
        dev.set_features(1 << 40 | 1 << 32)
    assert len(kernel.calls) == n  # refused here, not by the kernel


def test_set_features_asks_for_the_offer_once_when_nobody_did(kernel) -> None:
    with VhostNet() as d:
        d.set_owner()
        d.set_features(1 << 32)
        d.set_features(1 << 32)
    assert kernel.names().count("VHOST_GET_FEATURES") == 1


def test_backend_features(dev, kernel) -> None:
    assert dev.get_backend_features() == BACKEND_OFFERED
    dev.set_backend_features(0x3)
    assert kernel.last("VHOST_SET_BACKEND_FEATURES") == 0x3


def test_offered_features_needs_no_ownership(kernel) -> None:
    assert offered_features() == (OFFERED, BACKEND_OFFERED)
    assert "VHOST_SET_OWNER" not in kernel.names()
    kernel.fail["VHOST_GET_BACKEND_FEATURES"] = errno.ENOTTY
    assert offered_features() == (OFFERED, None)


# -- vhost: memory and logging -----------------------------------------------------------------

def test_mem_table_is_passed_as_built(dev, kernel) -> None:
    with GuestMemory() as mem:
        a = mem.add_region(1 << 16)
        b = mem.add_region(1 << 16)
        dev.set_mem_table(mem.table())
    got = kernel.last("VHOST_SET_MEM_TABLE")
    assert got["nregions"] == 2
    assert [(r["guest_phys_addr"], r["memory_size"], r["userspace_addr"])
            for r in got["regions"][:2]] == [(a.gpa, a.size, a.hva), (b.gpa, b.size, b.hva)]


def _table(*regions: tuple[int, int]) -> ctypes.Structure:
    t = V.vhost_memory_with(len(regions))
    t.nregions = len(regions)
    for i, (gpa, size) in enumerate(regions):
        t.regions[i].guest_phys_addr, t.regions[i].memory_size = gpa, size
        t.regions[i].userspace_addr = 0x10000
    return t


@pytest.mark.parametrize("regions, words", [
    ([(0, 0)], "bad region at GPA 0x0"),
    ([(2**64 - 4096, 8192)], "bad region"),
    ([(0x2000, 0x1000), (0, 0x3000)], "regions at 0x0 and 0x2000 overlap"),
])
def test_bad_mem_tables_never_reach_the_kernel(dev, kernel, regions, words) -> None:
    n = len(kernel.calls)
    with pytest.raises(ValidationError, match=words):
        dev.set_mem_table(_table(*regions))
    assert len(kernel.calls) == n


def test_log_base_and_log_fd(dev, kernel) -> None:
    dev.set_log_base(0x7F0000001000)
    dev.set_log_fd(7)
    dev.set_log_fd(-1)
    assert kernel.last("VHOST_SET_LOG_BASE") == 0x7F0000001000
    assert [f for n, f in kernel.calls if n == "VHOST_SET_LOG_FD"] == [7, -1]
    st = next(iter(kernel.vhost.values()))
    assert (st.log_base, st.log_fd) == (0x7F0000001000, -1)


# -- vhost: virtqueues ---------------------------------------------------------------------

def test_vring_state_structs(dev, kernel) -> None:
    dev.set_vring_num(1, 256)
    dev.set_vring_base(1, 65535)
    assert dev.get_vring_base(1) == 65535
    assert kernel.last("VHOST_SET_VRING_NUM") == {"index": 1, "num": 256}
    assert kernel.last("VHOST_SET_VRING_BASE") == {"index": 1, "num": 65535}
    assert kernel.last("VHOST_GET_VRING_BASE") == {"index": 1, "num": 0}  # as built, asked


@pytest.mark.parametrize("call, words", [
    (lambda d: d.set_vring_num(2, 256), r"virtqueue index out of range 0\.\.1"),
    (lambda d: d.set_vring_num(-1, 256), "out of range"),
    (lambda d: d.set_vring_num(0.5, 256), "out of range"),
    (lambda d: d.set_vring_num(0, 0), "power of two"),
    (lambda d: d.set_vring_num(0, 384), "power of two"),
    (lambda d: d.set_vring_num(0, VRING_MAX_NUM * 2), "power of two"),
    (lambda d: d.set_vring_base(0, 65536), r"base 65536: 0\.\.65535"),
    (lambda d: d.set_vring_base(0, -1), "base -1"),
    (lambda d: d.get_vring_base(5), "out of range"),
    (lambda d: d.set_vring_addr(0, 0, 0x1000, 0x2000), "desc address 0x0"),
    (lambda d: d.set_vring_addr(0, 0x1008, 0x2000, 0x3000), "16-byte aligned"),
    (lambda d: d.set_vring_addr(0, 0x1000, 0x2001, 0x3000), "avail address 0x2001"),
    (lambda d: d.set_vring_addr(0, 0x1000, 0x2000, 0x3002), "used address 0x3002"),
    (lambda d: d.set_vring_addr(0, 0x1000, 0x2000, 0x3000, flags=2), "unknown flags 0x2"),
    (lambda d: d.set_vring_kick(0, -2), "bad fd -2"),
    (lambda d: d.set_vring_call(3, 5), "out of range"),
    (lambda d: d.set_vring_err(0, -5), "bad fd"),
    (lambda d: d.set_vring_busyloop_timeout(0, -1), "out of range"),
    (lambda d: d.set_vring_busyloop_timeout(0, 2**32), "out of range"),
    (lambda d: d.set_vring_endian(2, True), "out of range"),
    (lambda d: d.get_vring_endian(2), "out of range"),
    (lambda d: d.get_vring_busyloop_timeout(2), "out of range"),
    (lambda d: d.attach_vring_worker(2, 1), "out of range"),
    (lambda d: d.get_vring_worker(2), "out of range"),
    (lambda d: d.set_backend(2, 5), "out of range"),
    (lambda d: d.set_backend(0, -3), "bad fd"),
])
def test_bad_vring_requests_never_reach_the_kernel(dev, kernel, call, words) -> None:
    n = len(kernel.calls)
    with pytest.raises(ValidationError, match=words):
        call(dev)
    assert len(kernel.calls) == n


def test_vring_addr_struct(dev, kernel) -> None:
    dev.set_vring_addr(1, 0x1000, 0x2002, 0x3004, log=0x9000, flags=1 << V.VHOST_VRING_F_LOG)
    assert kernel.last("VHOST_SET_VRING_ADDR") == {
        "index": 1, "flags": 1, "desc_user_addr": 0x1000, "used_user_addr": 0x3004,
        "avail_user_addr": 0x2002, "log_guest_addr": 0x9000}


def test_vring_files(dev, kernel) -> None:
    dev.set_vring_kick(0, 5)
    dev.set_vring_call(1, 6)
    dev.set_vring_err(1, -1)  # -1: stop signalling
    assert kernel.last("VHOST_SET_VRING_KICK") == {"index": 0, "fd": 5}
    assert kernel.last("VHOST_SET_VRING_CALL") == {"index": 1, "fd": 6}
    assert kernel.last("VHOST_SET_VRING_ERR") == {"index": 1, "fd": -1}


def test_vring_endian_both_ways(dev, kernel) -> None:
    dev.set_vring_endian(0, True)
    assert kernel.last("VHOST_SET_VRING_ENDIAN") == {"index": 0, "num":
                                                     V.VHOST_VRING_BIG_ENDIAN}
    assert dev.get_vring_endian(0) is True
    dev.set_vring_endian(0, False)
    assert kernel.last("VHOST_SET_VRING_ENDIAN")["num"] == V.VHOST_VRING_LITTLE_ENDIAN
    assert dev.get_vring_endian(0) is False


def test_vring_endian_while_a_backend_is_attached_names_the_fix(dev, kernel) -> None:
    with Tap.open("t0") as tap, GuestMemory() as mem:
        r = mem.add_region(1 << 16)
        dev.set_mem_table(mem.table())
        dev.set_vring_num(0, 8)
        dev.set_vring_addr(0, r.hva, r.hva + 128, r.hva + 4096)
        tap_fd = tap.fileno()
        dev.set_backend(0, tap_fd)
        with pytest.raises(IoctlError, match="a backend is attached; detach it first"):
            dev.set_vring_endian(0, True)
        dev.set_backend(0, -1)
        dev.set_vring_endian(0, True)  # detached: allowed again
    assert [f for n, f in kernel.calls if n == "VHOST_NET_SET_BACKEND"] == [
        {"index": 0, "fd": tap_fd}, {"index": 0, "fd": -1}]


def test_busyloop_timeout_round_trip(dev, kernel) -> None:
    dev.set_vring_busyloop_timeout(1, 0xFFFFFFFF)
    assert kernel.last("VHOST_SET_VRING_BUSYLOOP_TIMEOUT") == {"index": 1, "num": 0xFFFFFFFF}
    assert dev.get_vring_busyloop_timeout(1) == 0xFFFFFFFF
    assert dev.get_vring_busyloop_timeout(0) == 0


def test_worker_ioctls(dev, kernel) -> None:
    w = dev.new_worker()
    assert w == 1 and kernel.last("VHOST_NEW_WORKER") == {"worker_id": 0}
    dev.attach_vring_worker(1, w)
    assert kernel.last("VHOST_ATTACH_VRING_WORKER") == {"index": 1, "worker_id": 1}
    assert dev.get_vring_worker(1) == 1
    assert kernel.last("VHOST_GET_VRING_WORKER") == {"index": 1, "worker_id": 0}
    dev.free_worker(w)
    assert kernel.last("VHOST_FREE_WORKER") == {"worker_id": 1}
    with pytest.raises(IoctlError) as e:
        dev.free_worker(w)
    assert e.value.errno == errno.ENODEV


def test_generic_vhost_device_takes_any_queue_index(kernel) -> None:
    with VhostDevice("/dev/vhost-vsock") as d:
        d.set_owner()
        with pytest.raises(IoctlError):  # the kernel decides: no local range
            d.set_vring_num(7, 8)
    assert kernel.last("VHOST_SET_VRING_NUM") == {"index": 7, "num": 8}


def test_an_adopted_fd_is_closed_with_the_device(kernel) -> None:
    fd = kernel.open_dev("/dev/vhost-net")
    d = VhostNet(fd=fd)
    assert d.fileno() == fd and d.path == "/dev/vhost-net"
    d.close()
    assert d.closed
    d.close()  # idempotent


# -- tun -------------------------------------------------------------------------------------

def test_tap_open_sets_and_reads_back_flags(kernel) -> None:
    with Tap.open("vt%d", multi_queue=True, exclusive=True) as t:
        assert t.name == "vt0"
        assert t.flags == T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR | T.IFF_MULTI_QUEUE
    setiff = kernel.last("TUNSETIFF")
    assert setiff["ifr_name"] == b"vt%d"
    assert setiff["ifr_flags"] == (T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR
                                   | T.IFF_MULTI_QUEUE | T.IFF_TUN_EXCL)
    assert kernel.names() == ["TUNSETIFF", "TUNGETIFF"]


def test_tun_without_pi_or_header(kernel) -> None:
    with Tap.open("tn0", tap=False, vnet_hdr=False, no_pi=False) as t:
        assert t.flags == T.IFF_TUN
    assert kernel.last("TUNSETIFF")["ifr_flags"] == T.IFF_TUN


def test_flags_the_kernel_dropped_are_refused_and_closed(monkeypatch, kernel) -> None:
    real = kernel._tun

    def drop_vnet_hdr(t, fd, name, arg):
        out = real(t, fd, name, arg)
        if name == "TUNSETIFF":
            t.flags &= ~T.IFF_VNET_HDR
        return out

    monkeypatch.setattr(kernel, "_tun", drop_vnet_hdr)
    with pytest.raises(ValidationError, match=r"kernel reports flags .* but .* were asked"):
        Tap.open("vt0")
    assert all(_closed(fd) for fd in kernel.fds)


def _closed(fd: int) -> bool:
    import os

    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_setiff_failure_is_explained_and_closes_the_fd(kernel) -> None:
    kernel.fail["TUNSETIFF"] = errno.EPERM
    with pytest.raises(IoctlError) as e:
        Tap.open("vt0")
    assert e.value.errno == errno.EPERM and e.value.hint
    assert all(_closed(fd) for fd in kernel.fds)


@pytest.mark.parametrize("name", ["", "a" * 16, "bad/name", "x y"])
def test_bad_names_never_reach_the_kernel(kernel, name) -> None:
    with pytest.raises(ValidationError):
        Tap.open(name)
    assert kernel.calls == [] and kernel.fds == []


def test_open_queues_is_all_or_nothing(kernel) -> None:
    taps = Tap.open_queues("mq%d", 3, exclusive=True)
    try:
        assert [t.name for t in taps] == ["mq0"] * 3
        setiffs = [f for n, f in kernel.calls if n == "TUNSETIFF"]
        assert setiffs[0]["ifr_flags"] & T.IFF_TUN_EXCL
        assert not setiffs[1]["ifr_flags"] & T.IFF_TUN_EXCL  # queues join the first
        assert [f["ifr_name"] for f in setiffs] == [b"mq%d", b"mq0", b"mq0"]
        assert all(f["ifr_flags"] & T.IFF_MULTI_QUEUE for f in setiffs)
    finally:
        for t in taps:
            t.close()
    with pytest.raises(ValidationError, match="must be 1"):
        Tap.open_queues("mq%d", 0)
    kernel.fail["TUNGETIFF"] = errno.EIO
    with pytest.raises(IoctlError):
        Tap.open_queues("mq%d", 2)
    assert all(_closed(fd) for fd in kernel.fds)


def test_tap_value_and_pointer_ioctls(kernel) -> None:
    """Value or pointer per ioctl as __tun_chr_ioctl() takes them."""
    with Tap.open("vt0") as t:
        t.set_persist()
        t.set_persist(False)
        t.set_owner(1000)
        t.set_group(100)
        t.set_offload(T.TUN_F_CSUM)
        t.set_carrier(False)
        t.vnet_hdr_sz = 12
        t.sndbuf = 4096
        t.vnet_le = True
        t.vnet_be = False
        assert (t.vnet_hdr_sz, t.sndbuf, t.vnet_le, t.vnet_be) == (12, 4096, True, False)
        t.set_queue_enabled(False)
        t.set_queue_enabled(True)
        assert t.refresh() == t.flags
    got = dict(kernel.calls)
    assert [f for n, f in kernel.calls if n == "TUNSETPERSIST"] == [1, 0]  # by value
    assert got["TUNSETOWNER"] == 1000 and got["TUNSETGROUP"] == 100
    assert got["TUNSETOFFLOAD"] == T.TUN_F_CSUM
    assert got["TUNSETCARRIER"] == 0  # by pointer (an int the kernel reads)
    assert got["TUNSETVNETHDRSZ"] == 12 and got["TUNSETSNDBUF"] == 4096
    assert got["TUNSETVNETLE"] == 1 and got["TUNSETVNETBE"] == 0
    assert [f["ifr_flags"] for n, f in kernel.calls if n == "TUNSETQUEUE"] == [
        T.IFF_DETACH_QUEUE, T.IFF_ATTACH_QUEUE]
    tap = next(iter(kernel.taps.values()))
    assert (tap.carrier, tap.queue_enabled, tap.owner, tap.group) == (0, True, 1000, 100)


@pytest.mark.parametrize("setter, words", [
    (lambda t: setattr(t, "vnet_hdr_sz", 9), "the minimum is 10"),
    (lambda t: setattr(t, "sndbuf", 0), "must be positive"),
])
def test_bad_tap_values_never_reach_the_kernel(kernel, setter, words) -> None:
    with Tap.open("vt0") as t:
        n = len(kernel.calls)
        with pytest.raises(ValidationError, match=words):
            setter(t)
        assert len(kernel.calls) == n


def test_tun_features(kernel) -> None:
    assert tun_features() & T.IFF_MULTI_QUEUE
    assert kernel.names() == ["TUNGETFEATURES"] and all(_closed(fd) for fd in kernel.fds)


def test_tap_repr_and_ifindex(kernel, monkeypatch) -> None:
    import socket

    monkeypatch.setattr(socket, "if_nametoindex", lambda name: 42 if name == "vt0" else 0)
    t = Tap.open("vt0")
    assert t.ifindex == 42
    assert "vt0" in repr(t) and "IFF_TAP" in repr(t) and "fd=" in repr(t)
    t.close()
    assert "closed" in repr(t)


def test_the_fault_injector_fails_the_nth_call(kernel) -> None:
    _fd.faults.arm(2, errno.ENOMEM)
    try:
        with pytest.raises(IoctlError, match="TUNSETIFF") as e:
            Tap.open("vt0")
        assert e.value.errno == errno.ENOMEM
    finally:
        _fd.faults.disarm()
    assert all(_closed(fd) for fd in kernel.fds)
