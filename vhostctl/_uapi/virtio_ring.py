"""Mirror of ``include/uapi/linux/virtio_ring.h``: split (and packed) ring constants, the
ring structures and the two inline helpers, C names verbatim.

The ``__virtio16/32/64`` fields are declared with native byte order here, exactly like the C
header (to the compiler they are plain ``__u16``/``__u32``/``__u64``).  What byte order the *device*
uses is a property of the negotiated features (little-endian with VIRTIO_F_VERSION_1, virtio
1.2 §2.4; guest-native for legacy), handled by :mod:`vhostctl.vring`, not by these types.

Flexible array members (``ring[]``) are zero-length ctypes arrays so that ``sizeof`` and every
field offset match what a C compiler reports for the struct.
"""

from __future__ import annotations

import ctypes

__all__ = [
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VRING_AVAIL_ALIGN_SIZE",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_ALIGN_SIZE",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_PACKED_DESC_F_AVAIL",
    "VRING_PACKED_DESC_F_USED",
    "VRING_PACKED_EVENT_FLAG_DESC",
    "VRING_PACKED_EVENT_FLAG_DISABLE",
    "VRING_PACKED_EVENT_FLAG_ENABLE",
    "VRING_PACKED_EVENT_F_WRAP_CTR",
    "VRING_USED_ALIGN_SIZE",
    "VRING_USED_F_NO_NOTIFY",
    "vring_avail",
    "vring_desc",
    "vring_need_event",
    "vring_packed_desc",
    "vring_packed_desc_event",
    "vring_size",
    "vring_used",
    "vring_used_elem",
]

# This marks a buffer as continuing via the next field.
VRING_DESC_F_NEXT = 1
# This marks a buffer as write-only (otherwise read-only).
VRING_DESC_F_WRITE = 2
# This means the buffer contains a list of buffer descriptors.
VRING_DESC_F_INDIRECT = 4

# Packed ring: avail/used flag *bit positions* (shifts, not masks).
VRING_PACKED_DESC_F_AVAIL = 7
VRING_PACKED_DESC_F_USED = 15

# Device -> driver in used->flags: "don't kick me".  Only a hint (virtio 1.2 §2.7.10).
VRING_USED_F_NO_NOTIFY = 1
# Driver -> device in avail->flags: "don't interrupt me".  Only a hint (virtio 1.2 §2.7.7).
VRING_AVAIL_F_NO_INTERRUPT = 1

# Packed ring event suppression flags.
VRING_PACKED_EVENT_FLAG_ENABLE = 0x0
VRING_PACKED_EVENT_FLAG_DISABLE = 0x1
VRING_PACKED_EVENT_FLAG_DESC = 0x2
# Wrap counter bit shift in the packed ring's event suppression structure.
VRING_PACKED_EVENT_F_WRAP_CTR = 15

# Feature bits (transport independent, virtio 1.2 §6).
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

# Alignment requirements of the three split ring areas (virtio 1.2 §2.7, table).
VRING_AVAIL_ALIGN_SIZE = 2
VRING_USED_ALIGN_SIZE = 4
VRING_DESC_ALIGN_SIZE = 16


class vring_desc(ctypes.Structure):
    """One descriptor: guest-physical buffer, length, flags, next index (16 bytes)."""

    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("next", ctypes.c_uint16),
    ]


class vring_avail(ctypes.Structure):
    """Driver area header; ``ring[num]`` and then ``used_event`` follow in memory."""

    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("idx", ctypes.c_uint16),
        ("ring", ctypes.c_uint16 * 0),
    ]


class vring_used_elem(ctypes.Structure):
    """One completion: head id (u32 "for padding reasons") and bytes written."""

    _fields_ = [
        ("id", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
    ]


class vring_used(ctypes.Structure):
    """Device area header; ``ring[num]`` and then ``avail_event`` follow in memory.

    C gives ``sizeof(struct vring_used) == 4`` (the element array is flexible) and the
    struct 4-byte alignment through ``vring_used_elem_t``; the u32 members of
    :class:`vring_used_elem` give ctypes the same alignment, so ``ring`` lands at offset 4.
    """

    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("idx", ctypes.c_uint16),
        ("ring", vring_used_elem * 0),
    ]


class vring_packed_desc_event(ctypes.Structure):
    """Packed ring driver/device event suppression area."""

    _fields_ = [
        ("off_wrap", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
    ]


class vring_packed_desc(ctypes.Structure):
    """Packed ring descriptor (16 bytes)."""

    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("id", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
    ]


def vring_size(num: int, align: int) -> int:
    """Bytes of a legacy contiguous ring of ``num`` entries whose used ring is ``align``-ed.

    Same arithmetic as the header's ``vring_size()`` (including both event-index trailers),
    truncated to ``unsigned`` like the C return type.
    """
    desc = ctypes.sizeof(vring_desc) * num
    head = (desc + 2 * (3 + num) + align - 1) & ~(align - 1)
    return (head + 2 * 3 + ctypes.sizeof(vring_used_elem) * num) & 0xFFFFFFFF


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """Should the side that just moved its index from ``old`` to ``new_idx`` notify?

    True iff ``event_idx`` lies in the half-open window ``[old, new_idx)`` modulo 2**16:
    the header's ``(__u16)(new_idx - event_idx - 1) < (__u16)(new_idx - old)``.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)
