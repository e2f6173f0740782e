"""Mirror of ``<linux/if_tun.h>`` plus the bits of ``<net/if.h>`` / ``<linux/filter.h>``
that tun uses (``struct ifreq``, ``struct sock_fprog``).

Ioctl types are copied exactly as the header declares them, even where they lie about the
argument: TUNSETIFF is ``_IOW('T', 202, int)`` yet takes a ``struct ifreq``, and
TUNSETSTEERINGEBPF/TUNSETFILTEREBPF are declared ``_IOR`` though they read an fd.  The
number is what matters, and it is the declared one.
"""

from __future__ import annotations

import ctypes

from .bits import BitNames
from .ioc import _IO, _IOR, _IOW

IFNAMSIZ = 16  # <net/if.h>, <linux/if.h>

TUN_READQ_SIZE = 500
TUN_TYPE_MASK = 0x000F


# <linux/filter.h>
class sock_filter(ctypes.Structure):
    """One classic BPF instruction."""

    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class sock_fprog(ctypes.Structure):
    """A classic BPF program: TUNATTACHFILTER/TUNDETACHFILTER/TUNGETFILTER's argument,
    16 bytes on 64-bit (8 on 32-bit)."""

    _fields_ = [
        ("len", ctypes.c_ushort),
        # Implicit in C: the pointer is pointer-aligned (6 bytes on LP64, 2 on ILP32).
        ("_pad0", ctypes.c_uint8 * (ctypes.alignment(ctypes.c_void_p) - 2)),
        ("filter", ctypes.POINTER(sock_filter)),
    ]


# Ioctls, 'T' = 0x54.
TUNSETNOCSUM = _IOW(ord("T"), 200, ctypes.c_int)
TUNSETDEBUG = _IOW(ord("T"), 201, ctypes.c_int)
TUNSETIFF = _IOW(ord("T"), 202, ctypes.c_int)  # argument is really struct ifreq
TUNSETPERSIST = _IOW(ord("T"), 203, ctypes.c_int)
TUNSETOWNER = _IOW(ord("T"), 204, ctypes.c_int)
TUNSETLINK = _IOW(ord("T"), 205, ctypes.c_int)
TUNSETGROUP = _IOW(ord("T"), 206, ctypes.c_int)
TUNGETFEATURES = _IOR(ord("T"), 207, ctypes.c_uint)
TUNSETOFFLOAD = _IOW(ord("T"), 208, ctypes.c_uint)
TUNSETTXFILTER = _IOW(ord("T"), 209, ctypes.c_uint)
TUNGETIFF = _IOR(ord("T"), 210, ctypes.c_uint)  # argument is really struct ifreq
TUNGETSNDBUF = _IOR(ord("T"), 211, ctypes.c_int)
TUNSETSNDBUF = _IOW(ord("T"), 212, ctypes.c_int)
TUNATTACHFILTER = _IOW(ord("T"), 213, sock_fprog)
TUNDETACHFILTER = _IOW(ord("T"), 214, sock_fprog)
TUNGETVNETHDRSZ = _IOR(ord("T"), 215, ctypes.c_int)
TUNSETVNETHDRSZ = _IOW(ord("T"), 216, ctypes.c_int)
TUNSETQUEUE = _IOW(ord("T"), 217, ctypes.c_int)  # argument is really struct ifreq
TUNSETIFINDEX = _IOW(ord("T"), 218, ctypes.c_uint)
TUNGETFILTER = _IOR(ord("T"), 219, sock_fprog)
TUNSETVNETLE = _IOW(ord("T"), 220, ctypes.c_int)
TUNGETVNETLE = _IOR(ord("T"), 221, ctypes.c_int)
TUNSETVNETBE = _IOW(ord("T"), 222, ctypes.c_int)
TUNGETVNETBE = _IOR(ord("T"), 223, ctypes.c_int)
TUNSETSTEERINGEBPF = _IOR(ord("T"), 224, ctypes.c_int)  # sic: _IOR
TUNSETFILTEREBPF = _IOR(ord("T"), 225, ctypes.c_int)  # sic: _IOR
TUNSETCARRIER = _IOW(ord("T"), 226, ctypes.c_int)
TUNGETDEVNETNS = _IO(ord("T"), 227)

# TUNSETIFF ifr_flags
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NAPI = 0x0010
IFF_NAPI_FRAGS = 0x0020
IFF_NO_CARRIER = 0x0040  # create without carrier
IFF_NO_PI = 0x1000
IFF_ONE_QUEUE = 0x2000  # no effect
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200  # TUNSETQUEUE
IFF_DETACH_QUEUE = 0x0400  # TUNSETQUEUE
IFF_PERSIST = 0x0800  # read-only, reported by TUNGETIFF
IFF_NOFILTER = 0x1000  # == IFF_NO_PI

# Deprecated aliases of IFF_TUN/IFF_TAP.
TUN_TUN_DEV = IFF_TUN
TUN_TAP_DEV = IFF_TAP

TUN_TX_TIMESTAMP = 1  # socket option

# TUNSETOFFLOAD bits
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20  # v6.2
TUN_F_USO6 = 0x40  # v6.2
TUN_F_UDP_TUNNEL_GSO = 0x080  # v6.17
TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100  # v6.17

TUN_PKT_STRIP = 0x0001  # tun_pi.flags


class tun_pi(ctypes.Structure):
    """Packet info prepended to each frame unless IFF_NO_PI; ``proto`` is big endian."""

    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("proto", ctypes.c_uint16),  # __be16
    ]


TUN_FLT_ALLMULTI = 0x0001


class tun_filter(ctypes.Structure):
    """TUNSETTXFILTER header; ``count`` 6-byte MAC addresses follow (flexible ``addr[]``)."""

    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("count", ctypes.c_uint16),
        ("addr", (ctypes.c_uint8 * 6) * 0),
    ]


# <net/if.h> / <linux/if.h>


class sockaddr(ctypes.Structure):
    """Generic ``struct sockaddr`` (16 bytes), for ifr_hwaddr."""

    _fields_ = [
        ("sa_family", ctypes.c_ushort),
        ("sa_data", ctypes.c_char * 14),
    ]


_ULONG = ctypes.sizeof(ctypes.c_ulong)


class ifmap(ctypes.Structure):
    """Sets ``struct ifreq``'s size: its union is as large as this (24 bytes on LP64)."""

    _fields_ = [
        ("mem_start", ctypes.c_ulong),
        ("mem_end", ctypes.c_ulong),
        ("base_addr", ctypes.c_ushort),
        ("irq", ctypes.c_ubyte),
        ("dma", ctypes.c_ubyte),
        ("port", ctypes.c_ubyte),
        # Implicit tail padding to a multiple of sizeof(unsigned long): 3 bytes on LP64
        # (21 -> 24) and on ILP32 (13 -> 16).
        ("_pad0", ctypes.c_uint8 * (-(2 * _ULONG + 5) % _ULONG)),
    ]


class _ifr_ifru(ctypes.Union):
    # ``union { ... } ifr_ifru``: only the members tun and vhostctl use, plus ifr_map which
    # fixes the size and ifr_data which fixes the alignment on every ABI.
    _fields_ = [
        ("ifr_addr", sockaddr),
        ("ifr_hwaddr", sockaddr),
        ("ifr_flags", ctypes.c_short),
        ("ifr_ifindex", ctypes.c_int),
        ("ifr_mtu", ctypes.c_int),
        ("ifr_map", ifmap),
        ("ifr_newname", ctypes.c_char * IFNAMSIZ),
        ("ifr_data", ctypes.c_void_p),
    ]


class ifreq(ctypes.Structure):
    """``struct ifreq`` (40 bytes on LP64): the real argument of TUNSETIFF, TUNGETIFF and
    TUNSETQUEUE.  The union members are reachable directly (``req.ifr_flags``)."""

    _anonymous_ = ("ifr_ifru",)
    _fields_ = [
        ("ifr_name", ctypes.c_char * IFNAMSIZ),
        ("ifr_ifru", _ifr_ifru),
    ]


#: TUNSETIFF/TUNGETIFF/TUNGETFEATURES flag names; IFF_NOFILTER is an alias of IFF_NO_PI.
IFF_FLAGS = BitNames.from_masks(
    [
        ("IFF_TUN", IFF_TUN),
        ("IFF_TAP", IFF_TAP),
        ("IFF_NAPI", IFF_NAPI),
        ("IFF_NAPI_FRAGS", IFF_NAPI_FRAGS),
        ("IFF_NO_CARRIER", IFF_NO_CARRIER),
        ("IFF_MULTI_QUEUE", IFF_MULTI_QUEUE),
        ("IFF_ATTACH_QUEUE", IFF_ATTACH_QUEUE),
        ("IFF_DETACH_QUEUE", IFF_DETACH_QUEUE),
        ("IFF_PERSIST", IFF_PERSIST),
        ("IFF_NO_PI", IFF_NO_PI),
        ("IFF_NOFILTER", IFF_NOFILTER),
        ("IFF_ONE_QUEUE", IFF_ONE_QUEUE),
        ("IFF_VNET_HDR", IFF_VNET_HDR),
        ("IFF_TUN_EXCL", IFF_TUN_EXCL),
    ],
    prefixes=("IFF_",),
    what="tun flag",
)

#: TUNSETOFFLOAD bits; short names ("csum", "tso4", "tso_ecn", "uso6", ...) accepted.
OFFLOADS = BitNames.from_masks(
    [
        ("TUN_F_CSUM", TUN_F_CSUM),
        ("TUN_F_TSO4", TUN_F_TSO4),
        ("TUN_F_TSO6", TUN_F_TSO6),
        ("TUN_F_TSO_ECN", TUN_F_TSO_ECN),
        ("TUN_F_UFO", TUN_F_UFO),
        ("TUN_F_USO4", TUN_F_USO4),
        ("TUN_F_USO6", TUN_F_USO6),
        ("TUN_F_UDP_TUNNEL_GSO", TUN_F_UDP_TUNNEL_GSO),
        ("TUN_F_UDP_TUNNEL_GSO_CSUM", TUN_F_UDP_TUNNEL_GSO_CSUM),
    ],
    prefixes=("TUN_F_",),
    what="tun offload",
)
