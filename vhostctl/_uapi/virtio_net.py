"""Mirror of ``<linux/virtio_net.h>``: feature bits, the vnet header and its flags.

Also home of :data:`FEATURES`, the one name table for every bit a vhost-net device can
offer (virtio-net bits, transport bits, ring bits and the vhost bits 26/27), since that
is what ``VHOST_GET_FEATURES`` returns and what people want decoded.
"""

from __future__ import annotations

import ctypes

from . import vhost as _vhost
from . import virtio_config as _cfg
from .bits import BitNames

# Feature bit numbers, include/uapi/linux/virtio_net.h.
VIRTIO_NET_F_CSUM = 0  # device handles packets with partial checksum
VIRTIO_NET_F_GUEST_CSUM = 1  # driver handles packets with partial checksum
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GSO = 6  # legacy (#ifndef VIRTIO_NET_NO_LEGACY)
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_DEVICE_STATS = 50
VIRTIO_NET_F_VQ_NOTF_COAL = 52
VIRTIO_NET_F_NOTF_COAL = 53
VIRTIO_NET_F_GUEST_USO4 = 54
VIRTIO_NET_F_GUEST_USO6 = 55
VIRTIO_NET_F_HOST_USO = 56
VIRTIO_NET_F_HASH_REPORT = 57
VIRTIO_NET_F_GUEST_HDRLEN = 59
VIRTIO_NET_F_RSS = 60
VIRTIO_NET_F_RSC_EXT = 61
VIRTIO_NET_F_STANDBY = 62
VIRTIO_NET_F_SPEED_DUPLEX = 63
# Above 63: only reachable through VHOST_{GET,SET}_FEATURES_ARRAY (v6.17).
VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO = 65
VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM = 66
VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO = 67
VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM = 68
# Not feature bits: the guest-offload bits (VIRTIO_NET_CTRL_GUEST_OFFLOADS) standing for
# the two UDP tunnel features above, which do not fit in its 64-bit word.
VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_MAPPED = 46
VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM_MAPPED = 47

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# virtio_net_hdr.flags
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1  # use csum_start, csum_offset
VIRTIO_NET_HDR_F_DATA_VALID = 2  # checksum is valid
VIRTIO_NET_HDR_F_RSC_INFO = 4  # rsc info in csum_ fields
VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM = 8  # outer UDP checksum offload (v6.17)

# virtio_net_hdr.gso_type: a type in the low bits, ECN and tunnel as flags.
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 = 0x20
VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6 = 0x40
VIRTIO_NET_HDR_GSO_UDP_TUNNEL = (
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 | VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6
)
VIRTIO_NET_HDR_GSO_ECN = 0x80

# virtio_net_hdr_v1_hash.hash_report
VIRTIO_NET_HASH_REPORT_NONE = 0
VIRTIO_NET_HASH_REPORT_IPv4 = 1
VIRTIO_NET_HASH_REPORT_TCPv4 = 2
VIRTIO_NET_HASH_REPORT_UDPv4 = 3
VIRTIO_NET_HASH_REPORT_IPv6 = 4
VIRTIO_NET_HASH_REPORT_TCPv6 = 5
VIRTIO_NET_HASH_REPORT_UDPv6 = 6
VIRTIO_NET_HASH_REPORT_IPv6_EX = 7
VIRTIO_NET_HASH_REPORT_TCPv6_EX = 8
VIRTIO_NET_HASH_REPORT_UDPv6_EX = 9

# __virtio16 is the device's byte order (little endian once VERSION_1 is negotiated);
# the layout is the same either way, so plain c_uint16 is used throughout.


class virtio_net_hdr(ctypes.Structure):
    """The legacy header (10 bytes): neither VERSION_1 nor MRG_RXBUF negotiated."""

    _fields_ = [
        ("flags", ctypes.c_uint8),
        ("gso_type", ctypes.c_uint8),
        ("hdr_len", ctypes.c_uint16),
        ("gso_size", ctypes.c_uint16),
        ("csum_start", ctypes.c_uint16),
        ("csum_offset", ctypes.c_uint16),
    ]


class virtio_net_hdr_mrg_rxbuf(ctypes.Structure):
    """Legacy header plus ``num_buffers`` (12 bytes), for MRG_RXBUF."""

    _fields_ = [
        ("hdr", virtio_net_hdr),
        ("num_buffers", ctypes.c_uint16),
    ]


class _virtio_net_hdr_v1_csum_flat(ctypes.Structure):
    # The anonymous ``struct { csum_start; csum_offset; }`` of the union.
    _fields_ = [
        ("csum_start", ctypes.c_uint16),
        ("csum_offset", ctypes.c_uint16),
    ]


class _virtio_net_hdr_v1_csum(ctypes.Structure):
    # ``struct { start; offset; } csum``
    _fields_ = [
        ("start", ctypes.c_uint16),
        ("offset", ctypes.c_uint16),
    ]


class _virtio_net_hdr_v1_rsc(ctypes.Structure):
    # ``struct { segments; dup_acks; } rsc`` (__le16), valid with VIRTIO_NET_HDR_F_RSC_INFO.
    _fields_ = [
        ("segments", ctypes.c_uint16),
        ("dup_acks", ctypes.c_uint16),
    ]


class _virtio_net_hdr_v1_u(ctypes.Union):
    _anonymous_ = ("_flat",)
    _fields_ = [
        ("_flat", _virtio_net_hdr_v1_csum_flat),
        ("csum", _virtio_net_hdr_v1_csum),
        ("rsc", _virtio_net_hdr_v1_rsc),
    ]


class virtio_net_hdr_v1(ctypes.Structure):
    """The VERSION_1 header (12 bytes), bitwise the same as virtio_net_hdr_mrg_rxbuf but
    flat; the checksum words double as RSC counters (anonymous union in the C)."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("flags", ctypes.c_uint8),
        ("gso_type", ctypes.c_uint8),
        ("hdr_len", ctypes.c_uint16),
        ("gso_size", ctypes.c_uint16),
        ("_u", _virtio_net_hdr_v1_u),
        ("num_buffers", ctypes.c_uint16),
    ]


class virtio_net_hdr_v1_hash(ctypes.Structure):
    """VERSION_1 header plus hash report (20 bytes), for VIRTIO_NET_F_HASH_REPORT."""

    _fields_ = [
        ("hdr", virtio_net_hdr_v1),
        ("hash_value", ctypes.c_uint32),
        ("hash_report", ctypes.c_uint16),
        ("padding", ctypes.c_uint16),
    ]


class virtio_net_hdr_v1_hash_tunnel(ctypes.Structure):
    """Header for the UDP tunnel GSO features (24 bytes, v6.17)."""

    _fields_ = [
        ("hash_hdr", virtio_net_hdr_v1_hash),
        ("outer_th_offset", ctypes.c_uint16),
        ("inner_nh_offset", ctypes.c_uint16),
    ]


#: Every feature bit vhost-net can offer (drivers/vhost/net.c vhost_net_features[] =
#: VHOST_FEATURES of drivers/vhost/vhost.h plus the net bits), plus the rest of
#: virtio-net's so a guest-side word decodes too.  Bit 27 has two names; the ring bits
#: 28/29 are written as literals (virtio_ring.h) and checked against C by the ABI test.
FEATURES = BitNames.from_bits(
    [
        ("VIRTIO_NET_F_CSUM", VIRTIO_NET_F_CSUM),
        ("VIRTIO_NET_F_GUEST_CSUM", VIRTIO_NET_F_GUEST_CSUM),
        ("VIRTIO_NET_F_CTRL_GUEST_OFFLOADS", VIRTIO_NET_F_CTRL_GUEST_OFFLOADS),
        ("VIRTIO_NET_F_MTU", VIRTIO_NET_F_MTU),
        ("VIRTIO_NET_F_MAC", VIRTIO_NET_F_MAC),
        ("VIRTIO_NET_F_GSO", VIRTIO_NET_F_GSO),
        ("VIRTIO_NET_F_GUEST_TSO4", VIRTIO_NET_F_GUEST_TSO4),
        ("VIRTIO_NET_F_GUEST_TSO6", VIRTIO_NET_F_GUEST_TSO6),
        ("VIRTIO_NET_F_GUEST_ECN", VIRTIO_NET_F_GUEST_ECN),
        ("VIRTIO_NET_F_GUEST_UFO", VIRTIO_NET_F_GUEST_UFO),
        ("VIRTIO_NET_F_HOST_TSO4", VIRTIO_NET_F_HOST_TSO4),
        ("VIRTIO_NET_F_HOST_TSO6", VIRTIO_NET_F_HOST_TSO6),
        ("VIRTIO_NET_F_HOST_ECN", VIRTIO_NET_F_HOST_ECN),
        ("VIRTIO_NET_F_HOST_UFO", VIRTIO_NET_F_HOST_UFO),
        ("VIRTIO_NET_F_MRG_RXBUF", VIRTIO_NET_F_MRG_RXBUF),
        ("VIRTIO_NET_F_STATUS", VIRTIO_NET_F_STATUS),
        ("VIRTIO_NET_F_CTRL_VQ", VIRTIO_NET_F_CTRL_VQ),
        ("VIRTIO_NET_F_CTRL_RX", VIRTIO_NET_F_CTRL_RX),
        ("VIRTIO_NET_F_CTRL_VLAN", VIRTIO_NET_F_CTRL_VLAN),
        ("VIRTIO_NET_F_CTRL_RX_EXTRA", VIRTIO_NET_F_CTRL_RX_EXTRA),
        ("VIRTIO_NET_F_GUEST_ANNOUNCE", VIRTIO_NET_F_GUEST_ANNOUNCE),
        ("VIRTIO_NET_F_MQ", VIRTIO_NET_F_MQ),
        ("VIRTIO_NET_F_CTRL_MAC_ADDR", VIRTIO_NET_F_CTRL_MAC_ADDR),
        ("VIRTIO_F_NOTIFY_ON_EMPTY", _cfg.VIRTIO_F_NOTIFY_ON_EMPTY),
        ("VHOST_F_LOG_ALL", _vhost.VHOST_F_LOG_ALL),
        ("VIRTIO_F_ANY_LAYOUT", _cfg.VIRTIO_F_ANY_LAYOUT),
        ("VHOST_NET_F_VIRTIO_NET_HDR", _vhost.VHOST_NET_F_VIRTIO_NET_HDR),
        ("VIRTIO_RING_F_INDIRECT_DESC", 28),  # <linux/virtio_ring.h>
        ("VIRTIO_RING_F_EVENT_IDX", 29),  # <linux/virtio_ring.h>
        ("VIRTIO_F_VERSION_1", _cfg.VIRTIO_F_VERSION_1),
        ("VIRTIO_F_ACCESS_PLATFORM", _cfg.VIRTIO_F_ACCESS_PLATFORM),
        ("VIRTIO_F_IOMMU_PLATFORM", _cfg.VIRTIO_F_IOMMU_PLATFORM),
        ("VIRTIO_F_RING_PACKED", _cfg.VIRTIO_F_RING_PACKED),
        ("VIRTIO_F_IN_ORDER", _cfg.VIRTIO_F_IN_ORDER),
        ("VIRTIO_F_ORDER_PLATFORM", _cfg.VIRTIO_F_ORDER_PLATFORM),
        ("VIRTIO_F_SR_IOV", _cfg.VIRTIO_F_SR_IOV),
        ("VIRTIO_F_NOTIFICATION_DATA", _cfg.VIRTIO_F_NOTIFICATION_DATA),
        ("VIRTIO_F_NOTIF_CONFIG_DATA", _cfg.VIRTIO_F_NOTIF_CONFIG_DATA),
        ("VIRTIO_F_RING_RESET", _cfg.VIRTIO_F_RING_RESET),
        ("VIRTIO_F_ADMIN_VQ", _cfg.VIRTIO_F_ADMIN_VQ),
        ("VIRTIO_NET_F_DEVICE_STATS", VIRTIO_NET_F_DEVICE_STATS),
        ("VIRTIO_NET_F_VQ_NOTF_COAL", VIRTIO_NET_F_VQ_NOTF_COAL),
        ("VIRTIO_NET_F_NOTF_COAL", VIRTIO_NET_F_NOTF_COAL),
        ("VIRTIO_NET_F_GUEST_USO4", VIRTIO_NET_F_GUEST_USO4),
        ("VIRTIO_NET_F_GUEST_USO6", VIRTIO_NET_F_GUEST_USO6),
        ("VIRTIO_NET_F_HOST_USO", VIRTIO_NET_F_HOST_USO),
        ("VIRTIO_NET_F_HASH_REPORT", VIRTIO_NET_F_HASH_REPORT),
        ("VIRTIO_NET_F_GUEST_HDRLEN", VIRTIO_NET_F_GUEST_HDRLEN),
        ("VIRTIO_NET_F_RSS", VIRTIO_NET_F_RSS),
        ("VIRTIO_NET_F_RSC_EXT", VIRTIO_NET_F_RSC_EXT),
        ("VIRTIO_NET_F_STANDBY", VIRTIO_NET_F_STANDBY),
        ("VIRTIO_NET_F_SPEED_DUPLEX", VIRTIO_NET_F_SPEED_DUPLEX),
        ("VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO", VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO),
        ("VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM", VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM),
        ("VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO", VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO),
        ("VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM", VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM),
    ],
    prefixes=("VIRTIO_NET_F_", "VIRTIO_F_", "VIRTIO_RING_F_", "VHOST_NET_F_", "VHOST_F_"),
    what="feature",
)

#: virtio_net_hdr.flags
HDR_FLAGS = BitNames.from_masks(
    [
        ("VIRTIO_NET_HDR_F_NEEDS_CSUM", VIRTIO_NET_HDR_F_NEEDS_CSUM),
        ("VIRTIO_NET_HDR_F_DATA_VALID", VIRTIO_NET_HDR_F_DATA_VALID),
        ("VIRTIO_NET_HDR_F_RSC_INFO", VIRTIO_NET_HDR_F_RSC_INFO),
        ("VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM", VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM),
    ],
    prefixes=("VIRTIO_NET_HDR_F_",),
    what="header flag",
)


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


def vnet_hdr_len(features: int) -> int:
    """Length of the vnet header vhost-net puts before each frame, for acked ``features``.

    Mirrors drivers/vhost/net.c vhost_net_set_features(): sizeof(virtio_net_hdr_mrg_rxbuf)
    (12) if MRG_RXBUF or VERSION_1 is acked, else sizeof(virtio_net_hdr) (10); since
    v6.17 sizeof(virtio_net_hdr_v1_hash_tunnel) (24) if a UDP tunnel GSO bit is acked.
    The same length must be set on the tap with TUNSETVNETHDRSZ when the tap, not vhost,
    provides the header (VHOST_NET_F_VIRTIO_NET_HDR not acked).
    """
    if _has(features, VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO) or _has(
        features, VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO
    ):
        return ctypes.sizeof(virtio_net_hdr_v1_hash_tunnel)
    if _has(features, VIRTIO_NET_F_MRG_RXBUF) or _has(features, _cfg.VIRTIO_F_VERSION_1):
        return ctypes.sizeof(virtio_net_hdr_mrg_rxbuf)
    return ctypes.sizeof(virtio_net_hdr)
