"""Mirror of ``<linux/sock_diag.h>`` and ``<linux/unix_diag.h>``: the netlink dump that names
each unix socket's peer (``ss -x`` asks the same), and the netlink header it travels in
(``<linux/netlink.h>``).  /proc/net/unix shows no peers; this does."""

from __future__ import annotations

import struct

NETLINK_SOCK_DIAG = 4  # include/uapi/linux/netlink.h
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLMSG_HDR = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")  # struct nlattr: len, type

SOCK_DIAG_BY_FAMILY = 20  # include/uapi/linux/sock_diag.h

# struct unix_diag_req: sdiag_family, sdiag_protocol, pad, udiag_states, udiag_ino,
# udiag_show, udiag_cookie[2]
UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")
# struct unix_diag_msg: udiag_family, udiag_type, udiag_state, pad, udiag_ino, udiag_cookie[2]
UNIX_DIAG_MSG = struct.Struct("=BBBBI2I")

UDIAG_SHOW_NAME = 0x00000001
UDIAG_SHOW_PEER = 0x00000004

UNIX_DIAG_NAME = 0
UNIX_DIAG_PEER = 2
