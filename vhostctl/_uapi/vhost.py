"""Mirror of ``<linux/vhost.h>`` and ``<linux/vhost_types.h>`` (upstream as of v6.17).

C names verbatim.  Every ioctl number is built by the ``_IO*`` helpers from the type the
header names, so it is right on every architecture; ``tests/unit/test_abi.py`` compiles the
real headers and compares each number, constant and structure layout.
"""

from __future__ import annotations

import ctypes
from functools import cache

from .bits import BitNames
from .ioc import _IO, _IOR, _IOW, _IOWR

VHOST_FILE_UNBIND = -1  # vhost_vring_file.fd value that detaches

# ---------------------------------------------------------------------------------------
# vhost_types.h: structures
# ---------------------------------------------------------------------------------------


class vhost_vring_state(ctypes.Structure):
    """(virtqueue index, number): ring size, base index, endianness, busyloop timeout..."""

    _fields_ = [
        ("index", ctypes.c_uint),
        ("num", ctypes.c_uint),
    ]


class vhost_vring_file(ctypes.Structure):
    """(virtqueue index, fd): kick/call/err eventfds and the net backend; fd -1 unbinds."""

    _fields_ = [
        ("index", ctypes.c_uint),
        ("fd", ctypes.c_int),
    ]


VHOST_VRING_F_LOG = 0  # vhost_vring_addr.flags bit number: log_guest_addr is valid


class vhost_vring_addr(ctypes.Structure):
    """Userspace addresses of one split ring's three parts (and the used-ring log)."""

    _fields_ = [
        ("index", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("desc_user_addr", ctypes.c_uint64),
        ("used_user_addr", ctypes.c_uint64),
        ("avail_user_addr", ctypes.c_uint64),
        ("log_guest_addr", ctypes.c_uint64),
    ]


class vhost_worker_state(ctypes.Structure):
    """VHOST_NEW_WORKER returns, VHOST_FREE_WORKER takes, a worker id (v6.5)."""

    _fields_ = [
        ("worker_id", ctypes.c_uint),
    ]


class vhost_vring_worker(ctypes.Structure):
    """Binds a virtqueue to a worker (VHOST_{ATTACH,GET}_VRING_WORKER, v6.5)."""

    _fields_ = [
        ("index", ctypes.c_uint),
        ("worker_id", ctypes.c_uint),
    ]


# vhost_iotlb_msg.perm
VHOST_ACCESS_RO = 0x1
VHOST_ACCESS_WO = 0x2
VHOST_ACCESS_RW = 0x3
# vhost_iotlb_msg.type
VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
VHOST_IOTLB_BATCH_BEGIN = 5
VHOST_IOTLB_BATCH_END = 6


class vhost_iotlb_msg(ctypes.Structure):
    """One device-IOTLB message (read/written on the vhost fd with VIRTIO_F_ACCESS_PLATFORM).

    32 bytes: the two __u8 fields are followed by 6 bytes of tail padding in C.
    """

    _fields_ = [
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("perm", ctypes.c_uint8),
        ("type", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8 * 6),
    ]


# vhost_msg{,_v2}.type
VHOST_IOTLB_MSG = 0x1
VHOST_IOTLB_MSG_V2 = 0x2


class _vhost_msg_payload(ctypes.Union):
    # The anonymous ``union { struct vhost_iotlb_msg iotlb; __u8 padding[64]; }``.
    _fields_ = [
        ("iotlb", vhost_iotlb_msg),
        ("padding", ctypes.c_uint8 * 64),
    ]


class vhost_msg(ctypes.Structure):
    """IOTLB message framing v1 (72 bytes): ``int type``, 4 bytes of padding, the union."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("type", ctypes.c_int),
        ("_pad0", ctypes.c_uint8 * 4),  # implicit in C: the union is 8-byte aligned
        ("_u", _vhost_msg_payload),
    ]


class vhost_msg_v2(ctypes.Structure):
    """IOTLB message framing v2 (72 bytes), negotiated with VHOST_BACKEND_F_IOTLB_MSG_V2."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("asid", ctypes.c_uint32),
        ("_u", _vhost_msg_payload),
    ]


class vhost_features_array(ctypes.Structure):
    """Header of the VHOST_{GET,SET}_FEATURES_ARRAY argument (v6.17): ``count`` __u64
    words follow (flexible ``features[]``); use :func:`vhost_features_array_with`."""

    _fields_ = [
        ("count", ctypes.c_uint64),
        ("features", ctypes.c_uint64 * 0),
    ]


class vhost_memory_region(ctypes.Structure):
    """One guest-physical -> userspace mapping of the memory table."""

    _fields_ = [
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("flags_padding", ctypes.c_uint64),
    ]


VHOST_PAGE_SIZE = 0x1000  # region addresses and sizes must be 4K aligned


class vhost_memory(ctypes.Structure):
    """Header of the VHOST_SET_MEM_TABLE argument; regions follow (flexible
    ``regions[]``).  Build the whole thing with :func:`vhost_memory_with`."""

    _fields_ = [
        ("nregions", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("regions", vhost_memory_region * 0),
    ]


@cache
def _vhost_memory_n(n: int) -> type[ctypes.Structure]:
    return type(
        f"vhost_memory_{n}",
        (ctypes.Structure,),
        {
            "_fields_": [
                ("nregions", ctypes.c_uint32),
                ("padding", ctypes.c_uint32),
                ("regions", vhost_memory_region * n),
            ]
        },
    )


def vhost_memory_with(n: int) -> ctypes.Structure:
    """A zeroed memory table with room for ``n`` regions and ``nregions = n``.

    The kernel copies ``sizeof(struct vhost_memory)`` first, then ``nregions`` regions
    (drivers/vhost/vhost.c vhost_set_memory), so the buffer must hold all of them.
    """
    if n < 0:
        raise ValueError(f"negative region count {n}")
    mem = _vhost_memory_n(n)()
    mem.nregions = n
    return mem


@cache
def _vhost_features_array_n(n: int) -> type[ctypes.Structure]:
    return type(
        f"vhost_features_array_{n}",
        (ctypes.Structure,),
        {"_fields_": [("count", ctypes.c_uint64), ("features", ctypes.c_uint64 * n)]},
    )


def vhost_features_array_with(n: int) -> ctypes.Structure:
    """A zeroed VHOST_*_FEATURES_ARRAY argument with ``count = n`` 64-bit words."""
    if n < 0:
        raise ValueError(f"negative word count {n}")
    arr = _vhost_features_array_n(n)()
    arr.count = n
    return arr


# vhost-scsi / vhost-vdpa argument structures, so their ioctls get the right size.
VHOST_SCSI_ABI_VERSION = 1


class vhost_scsi_target(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_int),
        ("vhost_wwpn", ctypes.c_char * 224),  # TRANSPORT_IQN_LEN
        ("vhost_tpgt", ctypes.c_ushort),
        ("reserved", ctypes.c_ushort),
    ]


class vhost_vdpa_config(ctypes.Structure):
    _fields_ = [
        ("off", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("buf", ctypes.c_uint8 * 0),
    ]


class vhost_vdpa_iova_range(ctypes.Structure):
    _fields_ = [
        ("first", ctypes.c_uint64),
        ("last", ctypes.c_uint64),
    ]


# Feature bits (bit numbers) that vhost itself defines in the transport range.
VHOST_F_LOG_ALL = 26  # log all write descriptors; may change while running
VHOST_NET_F_VIRTIO_NET_HDR = 27  # vhost adds/strips the vnet header, not the socket

# Backend feature bits (VHOST_{GET,SET}_BACKEND_FEATURES), bit numbers.
VHOST_BACKEND_F_IOTLB_MSG_V2 = 0x1
VHOST_BACKEND_F_IOTLB_BATCH = 0x2
VHOST_BACKEND_F_IOTLB_ASID = 0x3
VHOST_BACKEND_F_SUSPEND = 0x4
VHOST_BACKEND_F_RESUME = 0x5
VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK = 0x6
VHOST_BACKEND_F_DESC_ASID = 0x7
VHOST_BACKEND_F_IOTLB_PERSIST = 0x8

# ---------------------------------------------------------------------------------------
# vhost.h: ioctls.  Types exactly as declared (several GETs are declared _IOW).
# ---------------------------------------------------------------------------------------

VHOST_VIRTIO = 0xAF

VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, ctypes.c_uint64)
VHOST_SET_FEATURES = _IOW(VHOST_VIRTIO, 0x00, ctypes.c_uint64)
VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER = _IO(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE = _IOW(VHOST_VIRTIO, 0x03, vhost_memory)
VHOST_SET_LOG_BASE = _IOW(VHOST_VIRTIO, 0x04, ctypes.c_uint64)
VHOST_SET_LOG_FD = _IOW(VHOST_VIRTIO, 0x07, ctypes.c_int)
VHOST_NEW_WORKER = _IOR(VHOST_VIRTIO, 0x8, vhost_worker_state)
VHOST_FREE_WORKER = _IOW(VHOST_VIRTIO, 0x9, vhost_worker_state)

VHOST_SET_VRING_NUM = _IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
VHOST_SET_VRING_ADDR = _IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
VHOST_SET_VRING_BASE = _IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_GET_VRING_BASE = _IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)

# Legacy cross-endian rings; ignored once VIRTIO_F_VERSION_1 is acked.
VHOST_VRING_LITTLE_ENDIAN = 0
VHOST_VRING_BIG_ENDIAN = 1
VHOST_SET_VRING_ENDIAN = _IOW(VHOST_VIRTIO, 0x13, vhost_vring_state)
VHOST_GET_VRING_ENDIAN = _IOW(VHOST_VIRTIO, 0x14, vhost_vring_state)  # sic: _IOW
VHOST_ATTACH_VRING_WORKER = _IOW(VHOST_VIRTIO, 0x15, vhost_vring_worker)
VHOST_GET_VRING_WORKER = _IOWR(VHOST_VIRTIO, 0x16, vhost_vring_worker)

VHOST_SET_VRING_KICK = _IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
VHOST_SET_VRING_CALL = _IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
VHOST_SET_VRING_ERR = _IOW(VHOST_VIRTIO, 0x22, vhost_vring_file)
VHOST_SET_VRING_BUSYLOOP_TIMEOUT = _IOW(VHOST_VIRTIO, 0x23, vhost_vring_state)
VHOST_GET_VRING_BUSYLOOP_TIMEOUT = _IOW(VHOST_VIRTIO, 0x24, vhost_vring_state)  # sic: _IOW

VHOST_SET_BACKEND_FEATURES = _IOW(VHOST_VIRTIO, 0x25, ctypes.c_uint64)
VHOST_GET_BACKEND_FEATURES = _IOR(VHOST_VIRTIO, 0x26, ctypes.c_uint64)

VHOST_NET_SET_BACKEND = _IOW(VHOST_VIRTIO, 0x30, vhost_vring_file)

VHOST_SCSI_SET_ENDPOINT = _IOW(VHOST_VIRTIO, 0x40, vhost_scsi_target)
VHOST_SCSI_CLEAR_ENDPOINT = _IOW(VHOST_VIRTIO, 0x41, vhost_scsi_target)
VHOST_SCSI_GET_ABI_VERSION = _IOW(VHOST_VIRTIO, 0x42, ctypes.c_int)
VHOST_SCSI_SET_EVENTS_MISSED = _IOW(VHOST_VIRTIO, 0x43, ctypes.c_uint32)
VHOST_SCSI_GET_EVENTS_MISSED = _IOW(VHOST_VIRTIO, 0x44, ctypes.c_uint32)

VHOST_VSOCK_SET_GUEST_CID = _IOW(VHOST_VIRTIO, 0x60, ctypes.c_uint64)
VHOST_VSOCK_SET_RUNNING = _IOW(VHOST_VIRTIO, 0x61, ctypes.c_int)

VHOST_VDPA_GET_DEVICE_ID = _IOR(VHOST_VIRTIO, 0x70, ctypes.c_uint32)
VHOST_VDPA_GET_STATUS = _IOR(VHOST_VIRTIO, 0x71, ctypes.c_uint8)
VHOST_VDPA_SET_STATUS = _IOW(VHOST_VIRTIO, 0x72, ctypes.c_uint8)
VHOST_VDPA_GET_CONFIG = _IOR(VHOST_VIRTIO, 0x73, vhost_vdpa_config)
VHOST_VDPA_SET_CONFIG = _IOW(VHOST_VIRTIO, 0x74, vhost_vdpa_config)
VHOST_VDPA_SET_VRING_ENABLE = _IOW(VHOST_VIRTIO, 0x75, vhost_vring_state)
VHOST_VDPA_GET_VRING_NUM = _IOR(VHOST_VIRTIO, 0x76, ctypes.c_uint16)
VHOST_VDPA_SET_CONFIG_CALL = _IOW(VHOST_VIRTIO, 0x77, ctypes.c_int)
VHOST_VDPA_GET_IOVA_RANGE = _IOR(VHOST_VIRTIO, 0x78, vhost_vdpa_iova_range)
VHOST_VDPA_GET_CONFIG_SIZE = _IOR(VHOST_VIRTIO, 0x79, ctypes.c_uint32)
VHOST_VDPA_GET_AS_NUM = _IOR(VHOST_VIRTIO, 0x7A, ctypes.c_uint)
VHOST_VDPA_GET_VRING_GROUP = _IOWR(VHOST_VIRTIO, 0x7B, vhost_vring_state)
VHOST_VDPA_SET_GROUP_ASID = _IOW(VHOST_VIRTIO, 0x7C, vhost_vring_state)
VHOST_VDPA_SUSPEND = _IO(VHOST_VIRTIO, 0x7D)
VHOST_VDPA_RESUME = _IO(VHOST_VIRTIO, 0x7E)
VHOST_VDPA_GET_VRING_DESC_GROUP = _IOWR(VHOST_VIRTIO, 0x7F, vhost_vring_state)
VHOST_VDPA_GET_VQS_COUNT = _IOR(VHOST_VIRTIO, 0x80, ctypes.c_uint32)
VHOST_VDPA_GET_GROUP_NUM = _IOR(VHOST_VIRTIO, 0x81, ctypes.c_uint32)
VHOST_VDPA_GET_VRING_SIZE = _IOWR(VHOST_VIRTIO, 0x82, vhost_vring_state)

# Feature words beyond 64 bits (v6.17); size is the array header's, the words follow.
VHOST_GET_FEATURES_ARRAY = _IOR(VHOST_VIRTIO, 0x83, vhost_features_array)
VHOST_SET_FEATURES_ARRAY = _IOW(VHOST_VIRTIO, 0x83, vhost_features_array)

# Worker threads as kthreads vs tasks forked from the owner (v6.17, before SET_OWNER;
# only with CONFIG_VHOST_ENABLE_FORK_OWNER_CONTROL).
VHOST_FORK_OWNER_KTHREAD = 0
VHOST_FORK_OWNER_TASK = 1
VHOST_SET_FORK_FROM_OWNER = _IOW(VHOST_VIRTIO, 0x84, ctypes.c_uint8)
VHOST_GET_FORK_FROM_OWNER = _IOR(VHOST_VIRTIO, 0x85, ctypes.c_uint8)

# ---------------------------------------------------------------------------------------
# Name tables
# ---------------------------------------------------------------------------------------

#: The feature bits vhost itself defines (for the full vhost-net word see
#: :data:`vhostctl._uapi.virtio_net.FEATURES`).
FEATURES = BitNames.from_bits(
    [
        ("VHOST_F_LOG_ALL", VHOST_F_LOG_ALL),
        ("VHOST_NET_F_VIRTIO_NET_HDR", VHOST_NET_F_VIRTIO_NET_HDR),
    ],
    prefixes=("VHOST_F_", "VHOST_NET_F_"),
    what="vhost feature",
)

#: VHOST_{GET,SET}_BACKEND_FEATURES bits.
BACKEND_FEATURES = BitNames.from_bits(
    [
        ("VHOST_BACKEND_F_IOTLB_MSG_V2", VHOST_BACKEND_F_IOTLB_MSG_V2),
        ("VHOST_BACKEND_F_IOTLB_BATCH", VHOST_BACKEND_F_IOTLB_BATCH),
        ("VHOST_BACKEND_F_IOTLB_ASID", VHOST_BACKEND_F_IOTLB_ASID),
        ("VHOST_BACKEND_F_SUSPEND", VHOST_BACKEND_F_SUSPEND),
        ("VHOST_BACKEND_F_RESUME", VHOST_BACKEND_F_RESUME),
        ("VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK", VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK),
        ("VHOST_BACKEND_F_DESC_ASID", VHOST_BACKEND_F_DESC_ASID),
        ("VHOST_BACKEND_F_IOTLB_PERSIST", VHOST_BACKEND_F_IOTLB_PERSIST),
    ],
    prefixes=("VHOST_BACKEND_F_",),
    what="backend feature",
)
