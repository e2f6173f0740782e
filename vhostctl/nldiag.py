"""Raw netlink questions the survey asks on every scan, without pyroute2's import cost:
the peer of every unix socket (sock_diag, what ``ss -x`` shows), the mode of one
macvtap/ipvtap link and every tun's queue counts (RTM_GETLINK).  Parsers are pure functions
over bytes."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

from ._uapi import if_link as L
from ._uapi import unix_diag as UD


def iter_messages(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in one datagram; stops at a short one."""
    off = 0
    while off + UD.NLMSG_HDR.size <= len(buf):
        length, mtype, _, _, _ = UD.NLMSG_HDR.unpack_from(buf, off)
        if length < UD.NLMSG_HDR.size or off + length > len(buf):
            return
        yield mtype, buf[off + UD.NLMSG_HDR.size:off + length]
        off += (length + 3) & ~3


def iter_attrs(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without the nested/byte-order flags, value) of each attribute in ``buf``."""
    off = 0
    while off + UD.NLA_HDR.size <= len(buf):
        length, atype = UD.NLA_HDR.unpack_from(buf, off)
        if length < UD.NLA_HDR.size or off + length > len(buf):
            return
        yield atype & L.NLA_TYPE_MASK, buf[off + UD.NLA_HDR.size:off + length]
        off += (length + 3) & ~3


def parse_unix_diag(payload: bytes) -> tuple[int, str | None, int]:
    """(inode, bound path or None, peer inode or 0) of one unix_diag_msg.  An abstract name
    (leading NUL) is shown as ``@name``, as ss does."""
    if len(payload) < UD.UNIX_DIAG_MSG.size:
        raise ValueError("unix_diag_msg: short")
    ino = UD.UNIX_DIAG_MSG.unpack_from(payload)[4]
    name, peer = None, 0
    for atype, value in iter_attrs(payload[UD.UNIX_DIAG_MSG.size:]):
        if atype == UD.UNIX_DIAG_NAME and value:
            raw = value.split(b"\0", 1)[0] if value[:1] != b"\0" else b"@" + value[1:]
            name = raw.decode(errors="surrogateescape")
        elif atype == UD.UNIX_DIAG_PEER and len(value) >= 4:
            peer = struct.unpack_from("=I", value)[0]
    return ino, name, peer


def _error(payload: bytes, what: str) -> OSError | None:
    err = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else errno.EIO
    return OSError(err, f"{what}: {os.strerror(err)}") if err else None


def _ask(proto: int, mtype: int, flags: int, body: bytes, what: str) -> Iterator[tuple[int, bytes]]:
    """Send one request, yield the answer's messages until DONE (a dump) or the first one."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, proto)
    try:
        s.settimeout(5.0)
        s.sendto(UD.NLMSG_HDR.pack(UD.NLMSG_HDR.size + len(body), mtype, flags, 1, 0) + body,
                 (0, 0))
        while True:
            # netlink_dump() sizes its skb to at most what the last recvmsg asked for.
            buf = s.recv(1 << 16)
            for t, payload in iter_messages(buf):
                if t == UD.NLMSG_DONE:
                    return
                if t == UD.NLMSG_ERROR:
                    err = _error(payload, what)
                    if err:
                        raise err
                    return
                yield t, payload
            if not flags & UD.NLM_F_DUMP:
                return
    finally:
        s.close()


def unix_socket_peers() -> dict[int, tuple[str | None, int]]:
    """inode -> (bound path, peer inode) of every unix socket in this network namespace
    (net/unix/diag.c; the unix_diag module loads on demand through sock_diag)."""
    req = UD.UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                                UD.UDIAG_SHOW_NAME | UD.UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF)
    out = {}
    for t, payload in _ask(UD.NETLINK_SOCK_DIAG, UD.SOCK_DIAG_BY_FAMILY,
                           UD.NLM_F_REQUEST | UD.NLM_F_DUMP, req, "sock_diag(AF_UNIX)"):
        if t == UD.SOCK_DIAG_BY_FAMILY:
            ino, name, peer = parse_unix_diag(payload)
            out[ino] = (name, peer)
    return out


def parse_link_mode(payload: bytes) -> str | None:
    """The mode name of a macvlan/macvtap or ipvlan/ipvtap RTM_NEWLINK; None for other kinds."""
    body = payload[struct.calcsize(L.IFINFOMSG):]
    for atype, value in iter_attrs(body):
        if atype != L.IFLA_LINKINFO:
            continue
        info = dict(iter_attrs(value))
        kind = info.get(L.IFLA_INFO_KIND, b"").split(b"\0", 1)[0].decode(errors="replace")
        data = dict(iter_attrs(info.get(L.IFLA_INFO_DATA, b"")))
        if kind in ("macvlan", "macvtap") and len(data.get(L.IFLA_MACVLAN_MODE, b"")) >= 4:
            mode = struct.unpack_from("=I", data[L.IFLA_MACVLAN_MODE])[0]
            return L.MACVLAN_MODES.get(mode, str(mode))
        if kind in ("ipvlan", "ipvtap") and len(data.get(L.IFLA_IPVLAN_MODE, b"")) >= 2:
            mode = struct.unpack_from("=H", data[L.IFLA_IPVLAN_MODE])[0]
            return L.IPVLAN_MODES.get(mode, str(mode))
    return None


def link_mode(ifindex: int) -> str | None:
    """Mode of the macvtap/ipvtap (or macvlan/ipvlan) with this index in our namespace."""
    req = struct.pack(L.IFINFOMSG, socket.AF_UNSPEC, 0, ifindex, 0, 0)
    for t, payload in _ask(L.NETLINK_ROUTE, L.RTM_GETLINK, UD.NLM_F_REQUEST, req,
                           f"RTM_GETLINK({ifindex})"):
        if t == L.RTM_NEWLINK:
            return parse_link_mode(payload)
    return None


def parse_tun_queues(payload: bytes) -> tuple[str, int, int] | None:
    """(name, enabled queues, disabled queues) of a tun RTM_NEWLINK; None for other kinds."""
    name, counts = None, None
    for atype, value in iter_attrs(payload[struct.calcsize(L.IFINFOMSG):]):
        if atype == L.IFLA_IFNAME:
            name = value.split(b"\0", 1)[0].decode(errors="surrogateescape")
        elif atype == L.IFLA_LINKINFO:
            info = dict(iter_attrs(value))
            if info.get(L.IFLA_INFO_KIND, b"").split(b"\0", 1)[0] != b"tun":
                return None
            data = dict(iter_attrs(info.get(L.IFLA_INFO_DATA, b"")))
            n = data.get(L.IFLA_TUN_NUM_QUEUES, b"")
            d = data.get(L.IFLA_TUN_NUM_DISABLED_QUEUES, b"")
            if len(n) >= 4 and len(d) >= 4:
                counts = (struct.unpack_from("=I", n)[0], struct.unpack_from("=I", d)[0])
    return (name, *counts) if name and counts else None


def tun_queues() -> dict[str, tuple[int, int]]:
    """name -> (enabled, disabled) queues of every tun/tap in our namespace: one dump."""
    req = struct.pack(L.IFINFOMSG, socket.AF_UNSPEC, 0, 0, 0, 0)
    out = {}
    for t, payload in _ask(L.NETLINK_ROUTE, L.RTM_GETLINK, UD.NLM_F_REQUEST | UD.NLM_F_DUMP,
                           req, "RTM_GETLINK(dump)"):
        if t == L.RTM_NEWLINK:
            got = parse_tun_queues(payload)
            if got:
                out[got[0]] = got[1:]
    return out
