"""First contact with the real kernel: vhost-net and tun answer, and we decode what they say."""

from __future__ import annotations

import errno
import json

import pytest

from tests.kernel.conftest import ip, link_exists
from vhostctl._uapi import if_tun as T
from vhostctl._uapi.virtio_net import FEATURES
from vhostctl.errors import IoctlError
from vhostctl.tun import Tap, tun_features
from vhostctl.vhost import VhostNet


def test_open_vhost_net_is_the_misc_device(no_fd_leak):
    import os

    with VhostNet() as dev:
        st = os.fstat(dev.fileno())
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (10, 238)


def test_set_owner_twice_is_ebusy_as_typed_error(no_fd_leak):
    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(IoctlError) as ei:
            dev.set_owner()
    assert ei.value.errno == errno.EBUSY
    assert str(ei.value).startswith("VHOST_SET_OWNER: Device or resource busy")
    assert "already has an owner" in str(ei.value)


def test_get_features_decodes_version_1_and_mrg_rxbuf(no_fd_leak):
    with VhostNet() as dev:
        names = FEATURES.decode(dev.get_features())
    assert "VIRTIO_F_VERSION_1" in names
    assert "VIRTIO_NET_F_MRG_RXBUF" in names
    assert "VIRTIO_RING_F_EVENT_IDX" in names
    assert not any(n.startswith("bit") for n in names), names


def test_tap_with_vnet_hdr_reads_its_flags_back(ifname, no_fd_leak):
    with Tap.open(ifname, vnet_hdr=True) as tap:
        assert tap.name == ifname
        assert tap.flags & T.IFF_VNET_HDR
        assert tap.flags & T.IFF_TAP and tap.flags & T.IFF_NO_PI
        assert not tap.flags & T.IFF_MULTI_QUEUE
        info = json.loads(ip("-d", "-j", "link", "show", ifname))[0]
        tun = info["linkinfo"]["info_data"]
        assert tun["type"] == "tap" and tun["vnet_hdr"] is True and tun["pi"] is False
        assert tap.vnet_hdr_sz == 10  # the kernel default, sizeof(struct virtio_net_hdr)
        tap.vnet_hdr_sz = 12
        assert tap.vnet_hdr_sz == 12
    assert not link_exists(ifname), "a non-persistent tap must vanish with its last fd"


def test_tungetfeatures_decodes(no_fd_leak):
    names = T.IFF_FLAGS.decode(tun_features())
    for flag in ("IFF_TAP", "IFF_TUN", "IFF_NO_PI", "IFF_VNET_HDR", "IFF_MULTI_QUEUE"):
        assert flag in names, names
