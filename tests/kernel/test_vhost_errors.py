"""Every errno the issue names, provoked on the real kernel and surfaced as our typed error.

Where our own validation would stop a bad request first (queue index, unoffered feature), the
kernel's answer is provoked through the raw choke point, so both layers are proven.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from vhostctl import _fd
from vhostctl._uapi import vhost as V
from vhostctl.errors import IoctlError, UnsupportedError, ValidationError
from vhostctl.memory import GuestMemory, max_mem_regions
from vhostctl.tun import Tap
from vhostctl.vhost import VhostNet
from vhostctl.vring import RingLayout, SplitVring


@pytest.fixture
def owned(no_fd_leak):
    with VhostNet() as dev:
        dev.set_owner()
        yield dev


def ready_ring(dev: VhostNet, mem: GuestMemory, vq: int) -> SplitVring:
    """Mem table + one initialised ring, as SET_BACKEND needs."""
    region = mem.add_region(64 * 1024)
    lay = RingLayout.compute(64)
    ring = SplitVring(region.mm, lay)
    dev.set_mem_table(mem.table())
    dev.set_vring_num(vq, 64)
    dev.set_vring_base(vq, 0)
    dev.set_vring_addr(vq, region.hva + lay.desc, region.hva + lay.avail, region.hva + lay.used)
    return ring


def test_eperm_from_a_process_that_did_not_set_owner(owned):
    """A forked child shares the fd but not the address space: not the owner."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what SET_VRING_NUM said, then leave without cleanup
        try:
            owned.set_vring_num(0, 256)
            msg = b"ok"
        except IoctlError as e:
            msg = f"{e.errno}|{e}".encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    out = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    code, text = out.split("|", 1)
    assert int(code) == errno.EPERM
    assert text.startswith("VHOST_SET_VRING_NUM(vq=0): Operation not permitted")
    assert "not the owner" in text


def test_ebusy_ring_size_change_with_backend_attached(owned, ifname):
    with GuestMemory() as mem, Tap.open(ifname) as tap:
        ring = ready_ring(owned, mem, 0)
        owned.set_backend(0, tap.fileno())
        with pytest.raises(IoctlError) as ei:
            owned.set_vring_num(0, 128)
        assert ei.value.errno == errno.EBUSY
        assert str(ei.value).startswith("VHOST_SET_VRING_NUM(vq=0): Device or resource busy")
        assert "VHOST_NET_SET_BACKEND(-1)" in str(ei.value)
        owned.set_backend(0, -1)
        owned.set_vring_num(0, 128)  # detached: allowed again
        ring.close()


def test_efault_backend_without_mem_table(owned, ifname):
    with Tap.open(ifname) as tap:
        with pytest.raises(IoctlError) as ei:
            owned.set_backend(1, tap.fileno())
    assert ei.value.errno == errno.EFAULT and ei.value.vq == 1
    assert "no memory table" in str(ei.value)


def test_e2big_more_regions_than_max_mem_regions(owned):
    n = max_mem_regions() + 1
    table = V.vhost_memory_with(n)
    for i in range(n):  # bypass GuestMemory's own limit check to hear the kernel say it
        table.regions[i].guest_phys_addr = i << 20
        table.regions[i].memory_size = 4096
        table.regions[i].userspace_addr = 0x10000000 + (i << 20)
    with pytest.raises(IoctlError) as ei:
        _fd.ioctl(owned.fileno(), V.VHOST_SET_MEM_TABLE, table)
    assert ei.value.errno == errno.E2BIG
    assert "max_mem_regions" in str(ei.value)
    # and our own validation says so before the kernel is asked
    mem = GuestMemory(limit=2)
    mem.add_region(4096)
    mem.add_region(4096)
    with pytest.raises(ValidationError, match="max_mem_regions"):
        mem.add_region(4096)
    mem.close()


def test_enotsock_backend_that_is_not_a_tap(owned):
    with GuestMemory() as mem:
        ring = ready_ring(owned, mem, 0)
        efd = _fd.eventfd()
        try:
            with pytest.raises(IoctlError) as ei:
                owned.set_backend(0, efd)
        finally:
            _fd.close(efd)
        ring.close()
    assert ei.value.errno == errno.ENOTSOCK
    assert "not a tap" in str(ei.value)


def test_enobufs_queue_index_out_of_range(owned):
    with pytest.raises(ValidationError):
        owned.set_backend(2, -1)  # caught before the kernel is asked
    with pytest.raises(IoctlError) as ei:
        _fd.ioctl(owned.fileno(), V.VHOST_NET_SET_BACKEND, V.vhost_vring_file(index=2, fd=-1),
                  vq=2)
    assert ei.value.errno == errno.ENOBUFS
    assert str(ei.value).startswith("VHOST_NET_SET_BACKEND(vq=2): No buffer space available")


def test_eopnotsupp_unoffered_feature(owned):
    offered = owned.get_features()
    bogus = next(b for b in range(63, 0, -1) if not offered >> b & 1)
    with pytest.raises(UnsupportedError, match=f"bit{bogus}|not offered"):
        owned.set_features(offered | 1 << bogus)
    with pytest.raises(IoctlError) as ei:
        _fd.ioctl(owned.fileno(), V.VHOST_SET_FEATURES, ctypes.c_uint64(offered | 1 << bogus))
    assert ei.value.errno == errno.EOPNOTSUPP


def test_validation_before_the_kernel(owned):
    with pytest.raises(ValidationError, match="power of two"):
        owned.set_vring_num(0, 300)
    with pytest.raises(ValidationError, match="power of two"):
        owned.set_vring_num(0, 65536)
    with pytest.raises(ValidationError, match="aligned"):
        owned.set_vring_addr(0, 0x1008, 0x2000, 0x3000)
    with pytest.raises(ValidationError, match="aligned"):
        owned.set_vring_addr(0, 0x1000, 0x2001, 0x3000)
    with pytest.raises(ValidationError, match="aligned"):
        owned.set_vring_addr(0, 0x1000, 0x2000, 0x3002)


def test_get_vring_base_after_stop_is_where_we_left(owned, ifname):
    with GuestMemory() as mem, Tap.open(ifname) as tap:
        ring = ready_ring(owned, mem, 1)
        owned.set_vring_base(1, 7)
        assert owned.get_vring_base(1) == 7
        owned.set_backend(1, tap.fileno())
        owned.set_backend(1, -1)
        assert owned.get_vring_base(1) == 7
        ring.close()


def test_worker_ioctls_are_not_wired_for_vhost_net(owned):
    """VHOST_NEW_WORKER exists since 6.4 but only vhost-scsi routes it (vhost_worker_ioctl()
    in drivers/vhost/scsi.c); vhost-net keeps one worker per device, so on every kernel the
    ioctl ends in -ENOIOCTLCMD, which the VFS reports as ENOTTY.  Our error says so."""
    with pytest.raises(IoctlError) as ei:
        owned.new_worker()
    assert ei.value.errno == errno.ENOTTY
    assert "not supported by this kernel's vhost driver" in str(ei.value)
