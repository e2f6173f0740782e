"""Mirror of ``<linux/virtio_config.h>``: device status bits and transport feature bits.

Feature bits are bit *numbers* (``1 << VIRTIO_F_VERSION_1`` is the mask), as in the C.
The device-specific bits live beside their device (:mod:`.virtio_net`), which also holds the
one name table for everything vhost-net offers.
"""

from __future__ import annotations

from .bits import BitNames

# Status byte (include/uapi/linux/virtio_config.h); vhost-vdpa passes it through.
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# Bits VIRTIO_TRANSPORT_F_START..END are the transport's; the rest are the device's.
# END became 42 when VIRTIO_F_ADMIN_VQ took bit 41; older headers (v6.1) say 41.
VIRTIO_TRANSPORT_F_START = 28
VIRTIO_TRANSPORT_F_END = 42

# Legacy (#ifndef VIRTIO_CONFIG_NO_LEGACY) but still offered by vhost (VHOST_FEATURES in
# drivers/vhost/vhost.h).
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27

VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_IOMMU_PLATFORM = VIRTIO_F_ACCESS_PLATFORM  # legacy name, same bit
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41

#: Transport bits only (no ring bits 28/29: those are virtio_ring.h's; see virtio_net.FEATURES).
TRANSPORT_FEATURES = BitNames.from_bits(
    [
        ("VIRTIO_F_NOTIFY_ON_EMPTY", VIRTIO_F_NOTIFY_ON_EMPTY),
        ("VIRTIO_F_ANY_LAYOUT", VIRTIO_F_ANY_LAYOUT),
        ("VIRTIO_F_VERSION_1", VIRTIO_F_VERSION_1),
        ("VIRTIO_F_ACCESS_PLATFORM", VIRTIO_F_ACCESS_PLATFORM),
        ("VIRTIO_F_IOMMU_PLATFORM", VIRTIO_F_IOMMU_PLATFORM),
        ("VIRTIO_F_RING_PACKED", VIRTIO_F_RING_PACKED),
        ("VIRTIO_F_IN_ORDER", VIRTIO_F_IN_ORDER),
        ("VIRTIO_F_ORDER_PLATFORM", VIRTIO_F_ORDER_PLATFORM),
        ("VIRTIO_F_SR_IOV", VIRTIO_F_SR_IOV),
        ("VIRTIO_F_NOTIFICATION_DATA", VIRTIO_F_NOTIFICATION_DATA),
        ("VIRTIO_F_NOTIF_CONFIG_DATA", VIRTIO_F_NOTIF_CONFIG_DATA),
        ("VIRTIO_F_RING_RESET", VIRTIO_F_RING_RESET),
        ("VIRTIO_F_ADMIN_VQ", VIRTIO_F_ADMIN_VQ),
    ],
    prefixes=("VIRTIO_F_",),
    what="feature",
)

#: Device status byte names.
STATUS = BitNames.from_masks(
    [
        ("VIRTIO_CONFIG_S_ACKNOWLEDGE", VIRTIO_CONFIG_S_ACKNOWLEDGE),
        ("VIRTIO_CONFIG_S_DRIVER", VIRTIO_CONFIG_S_DRIVER),
        ("VIRTIO_CONFIG_S_DRIVER_OK", VIRTIO_CONFIG_S_DRIVER_OK),
        ("VIRTIO_CONFIG_S_FEATURES_OK", VIRTIO_CONFIG_S_FEATURES_OK),
        ("VIRTIO_CONFIG_S_NEEDS_RESET", VIRTIO_CONFIG_S_NEEDS_RESET),
        ("VIRTIO_CONFIG_S_FAILED", VIRTIO_CONFIG_S_FAILED),
    ],
    prefixes=("VIRTIO_CONFIG_S_",),
    what="status bit",
)
