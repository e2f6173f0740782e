"""Every option the datapath sets, read back from the kernel where the kernel can tell.

"Traffic still flows" does not show that an option took: a wrong header size or a busy-poll
timeout that was never set leaves frames flowing.  Here each is asked of the kernel after
setup.  What the kernel cannot tell is said so: VHOST_GET_FEATURES answers with the offered
set, not the acked one (vhost_net_ioctl: ``features = VHOST_NET_FEATURES``).
"""

from __future__ import annotations

import pytest

from tests.kernel.conftest import run_cli
from vhostctl._uapi import if_tun as T
from vhostctl.datapath import Datapath, DatapathConfig
from vhostctl.vhost import VHOST_NET_VQ_RX, VHOST_NET_VQ_TX, VhostNet


@pytest.mark.parametrize("queues", [1, 2])
def test_tap_flags_and_header_size_in_tap_mode(ifname, no_fd_leak, queues):
    with Datapath(DatapathConfig(tap_name=ifname, queues=queues)) as dp:
        for q in dp.queues:
            flags = q.tap.refresh()  # TUNGETIFF
            assert flags & (T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR) == \
                T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR
            assert bool(flags & T.IFF_MULTI_QUEUE) == (queues > 1)
            assert q.tap.vnet_hdr_sz == 12  # TUNGETVNETHDRSZ: VERSION_1 header
    with Datapath(DatapathConfig(tap_name=ifname, version_1=False, mrg_rxbuf=False)) as dp:
        assert dp.queues[0].tap.vnet_hdr_sz == 10  # legacy virtio_net_hdr


def test_vhost_header_mode_leaves_the_tap_without_one(ifname, no_fd_leak):
    with Datapath(DatapathConfig(tap_name=ifname, hdr_mode="vhost")) as dp:
        assert not dp.queues[0].tap.refresh() & T.IFF_VNET_HDR


@pytest.mark.parametrize("usec", [0, 1, 50, 0xFFFFFFFF])
def test_busy_poll_timeout_reads_back_on_both_rings(ifname, no_fd_leak, usec):
    with Datapath(DatapathConfig(tap_name=ifname, busyloop_usec=usec)) as dp:
        dev = dp.queues[0].dev
        assert [dev.get_vring_busyloop_timeout(vq) for vq in (VHOST_NET_VQ_RX,
                                                              VHOST_NET_VQ_TX)] == [usec, usec]


def test_vnet_le_reads_back(ifname, no_fd_leak):
    with Datapath(DatapathConfig(tap_name=ifname)) as dp:
        tap = dp.queues[0].tap
        for on in (True, False, True):
            tap.vnet_le = on  # TUNSETVNETLE
            assert tap.vnet_le is on  # TUNGETVNETLE


def test_get_features_after_set_is_still_the_offered_set(no_fd_leak):
    """The kernel keeps the acked set to itself: GET_FEATURES before and after SET_FEATURES
    is VHOST_NET_FEATURES, so an acked set cannot be read back, only its acceptance."""
    with VhostNet() as dev:
        dev.set_owner()
        offered = dev.get_features()
        dev.set_features(offered & (1 << 32))  # VIRTIO_F_VERSION_1 alone
        assert dev.get_features() == offered


# tun_set_offload() (drivers/net/tun.c) turns TUN_F_* into netdev features, named as ethtool
# names them (netdev_features_strings, net/ethtool/common.c).  USO is left out: 6.1 has none.
ETHTOOL_NAME = {"csum": "tx-checksum-ip-generic", "tso4": "tx-tcp-segmentation",
                "tso6": "tx-tcp6-segmentation", "tso_ecn": "tx-tcp-ecn-segmentation"}


@pytest.mark.parametrize("offloads", ["csum", "csum,tso4", "csum,tso6",
                                      "csum,tso4,tso6,tso_ecn"])
def test_tap_add_offloads_read_back_as_ethtool_features(tap_name, offloads):
    """``tap add --offload`` as the kernel's ethtool features of the tap (ETHTOOL_MSG_FEATURES
    over genetlink): exactly the asked ones on, the others off."""
    from pyroute2.ethtool import Ethtool

    r = run_cli("tap", "add", tap_name, "--offload", offloads)
    assert r.code == 0, r.stderr
    et = Ethtool()
    try:
        features = et.get_features(tap_name).features
    finally:
        et.close()
    active = {name for name in ETHTOOL_NAME.values() if features[name].enable}
    assert active == {ETHTOOL_NAME[o] for o in offloads.split(",")}
