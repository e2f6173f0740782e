"""Mirror of the parts of ``<linux/if_link.h>`` the survey reads: macvlan/macvtap and
ipvlan/ipvtap modes (IFLA_MACVLAN_MODE, IFLA_IPVLAN_MODE) and a tun's queue counts."""

from __future__ import annotations

MACVLAN_MODE_PRIVATE = 1
MACVLAN_MODE_VEPA = 2
MACVLAN_MODE_BRIDGE = 4
MACVLAN_MODE_PASSTHRU = 8
MACVLAN_MODE_SOURCE = 16

IPVLAN_MODE_L2 = 0
IPVLAN_MODE_L3 = 1
IPVLAN_MODE_L3S = 2

MACVLAN_MODES = {MACVLAN_MODE_PRIVATE: "private", MACVLAN_MODE_VEPA: "vepa",
                 MACVLAN_MODE_BRIDGE: "bridge", MACVLAN_MODE_PASSTHRU: "passthru",
                 MACVLAN_MODE_SOURCE: "source"}
IPVLAN_MODES = {IPVLAN_MODE_L2: "l2", IPVLAN_MODE_L3: "l3", IPVLAN_MODE_L3S: "l3s"}

# include/uapi/linux/rtnetlink.h, if_link.h: one RTM_GETLINK by index and the nested
# IFLA_LINKINFO -> IFLA_INFO_DATA -> mode attribute of a macvlan/macvtap or ipvlan/ipvtap.
NETLINK_ROUTE = 0
RTM_NEWLINK = 16
RTM_GETLINK = 18
IFINFOMSG = "=BxHiII"  # struct ifinfomsg: family, pad, type, index, flags, change
IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_MACVLAN_MODE = 1  # u32
IFLA_IPVLAN_MODE = 1  # u16
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

# include/uapi/linux/if_link.h enum IFLA_TUN_*: the queue counts tun_fill_info() reports (u32).
IFLA_TUN_NUM_QUEUES = 8
IFLA_TUN_NUM_DISABLED_QUEUES = 9
