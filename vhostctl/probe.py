"""A resident probe guest on vhost-net: answers ARP and ping so a host's path can be proven.

    ping (elsewhere) -> bridge -> tap -> vhost-net worker -> our RX ring -> handle() -> our TX ring

The packet half is pure: :func:`handle` takes one Ethernet frame and the guest's
:class:`Identity` and returns a verdict and, for a request we answer, the reply frame.  It
never raises on bad input (a truncated or malformed frame is a ``dropped`` verdict), so the
run loop needs no catch-all.  The guest keeps no neighbour table: every reply goes back to the
link-layer address the request came from (ARP: the sender hardware address, RFC 826).

The composition half stands the datapath up on a new tap (:class:`~vhostctl.datapath.Datapath`),
gives the tap a host-side MAC with first octet 0xfe (a Linux bridge adopts the numerically
lowest port address, br_stp_recalculate_bridge_id() in net/bridge/br_stp_if.c), enslaves it to
an existing bridge with the bridge's MTU, and serves until told to stop.  The guest's own MAC
defaults to QEMU's locally administered prefix 52:54:00, so ``bridge fdb`` shows it as what it
plays: a VM NIC.
"""

from __future__ import annotations

import ipaddress
import math
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any, Protocol, TypeVar

from .errors import ValidationError
from .netlink import Netlink, validate_mac
from .tun import MAX_TAP_QUEUES, validate_ifname

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD  # include/uapi/linux/if_ether.h
ETH_ZLEN = 60  # minimum frame without FCS; shorter replies are padded (IEEE 802.3 §3.2.8)
BROADCAST = b"\xff" * 6
IPPROTO_ICMP, IPPROTO_ICMPV6 = 1, 58
ICMP_ECHOREPLY, ICMP_ECHO = 0, 8  # RFC 792
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129  # RFC 4443 §4
NDISC_NEIGHBOUR_SOLICITATION, NDISC_NEIGHBOUR_ADVERTISEMENT = 135, 136  # RFC 4861 §4
ND_OPT_SOURCE_LL_ADDR, ND_OPT_TARGET_LL_ADDR = 1, 2
QEMU_OUI = "52:54:00"
TTL = 64  # default IP TTL / hop limit (net.ipv4.ip_default_ttl, RFC 1700)
WAKE = 0.2  # longest sleep in the run loop: signals are noticed within this
REFRESH = 0.5  # seconds between live updates

_ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")  # RFC 4291 §2.7.1
_ALL_NODES_MAC = bytes.fromhex("333300000001")  # 33:33 + low 32 bits (RFC 2464 §7)
_UNSPECIFIED = bytes(16)

# Verdicts of handle(); each names the ProbeCounters field it increments.
ARP = "arp_replies"
ECHO = "echo_replies"
NA = "nd_adverts"
ECHO6 = "echo6_replies"
IGNORED = "ignored"  # well formed, but not for us or not something we answer
DROPPED = "dropped"  # truncated, bad checksum, invalid addresses or fields


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of ``data`` (odd length padded with a zero byte).

    Summing 16-bit words in one's complement is the same as taking the big-endian integer
    modulo 0xffff (2**16 == 1 mod 0xffff), which Python does in C; a non-zero sum that is a
    multiple of 0xffff is one's complement "negative zero", 0xffff.  A message that carries a
    correct checksum sums to 0xffff, so this returns 0 for it.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF
    if s == 0 and n:
        s = 0xFFFF
    return ~s & 0xFFFF


def solicited_node(addr: bytes) -> bytes:
    """ff02::1:ffXX:XXXX from the low 24 bits of an IPv6 address (RFC 4291 §2.7.1)."""
    return bytes.fromhex("ff0200000000000000000001ff") + addr[13:]


def multicast_mac(group: bytes) -> bytes:
    """Ethernet address of an IPv6 multicast group: 33:33 + its low 32 bits (RFC 2464 §7)."""
    return b"\x33\x33" + group[12:]


@dataclass(frozen=True)
class Identity:
    """The guest's addresses as the packet code compares them: raw bytes."""

    mac: bytes
    ip4: bytes
    ip6: bytes | None = None

    @cached_property
    def snm6(self) -> bytes | None:
        """Our solicited-node group, where neighbour solicitations for us arrive."""
        return solicited_node(self.ip6) if self.ip6 else None

    @cached_property
    def snm_mac(self) -> bytes | None:
        return multicast_mac(self.snm6) if self.snm6 else None


# -- frame builders --------------------------------------------------------------------------


def _pad(frame: bytes) -> bytes:
    return frame + bytes(ETH_ZLEN - len(frame)) if len(frame) < ETH_ZLEN else frame


def _eth(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big")


def _arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    """An Ethernet/IPv4 ARP packet (RFC 826): htype 1, ptype 0x0800, hlen 6, plen 4."""
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa)


def _ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, tos: int = 0) -> bytes:
    """A 20-byte IPv4 header (RFC 791) with DF set and ID 0 (atomic datagram, RFC 6864 §4.1)."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), 0, 0x4000, TTL, proto, 0,
                      src, dst)
    return hdr[:10] + checksum(hdr).to_bytes(2, "big") + hdr[12:] + payload


def _ipv6(src: bytes, dst: bytes, icmp: bytes, hop_limit: int, tclass: int = 0) -> bytes:
    """IPv6 header (RFC 8200 §3) + an ICMPv6 message, its checksum filled in."""
    msg = icmp[:2] + _icmp6_sum(src, dst, icmp).to_bytes(2, "big") + icmp[4:]
    return struct.pack("!IHBB16s16s", 0x60000000 | tclass << 20, len(msg), IPPROTO_ICMPV6,
                       hop_limit, src, dst) + msg


def _icmp6_sum(src: bytes, dst: bytes, icmp: bytes) -> int:
    """ICMPv6 checksum over the pseudo-header (RFC 8200 §8.1, RFC 4443 §2.3)."""
    pseudo = src + dst + len(icmp).to_bytes(4, "big") + b"\0\0\0" + bytes([IPPROTO_ICMPV6])
    return checksum(pseudo + icmp)


def _neighbour_advert(mac: bytes, ip6: bytes, dst_mac: bytes, dst: bytes, *,
                      solicited: bool) -> bytes:
    """NA for ``ip6`` with the Target Link-Layer Address option (RFC 4861 §4.4, §7.2.4).

    Router flag clear (we are a host), Override set (our address is not anycast).
    """
    flags = (0x40000000 if solicited else 0) | 0x20000000
    icmp = struct.pack("!BBHI16sBB6s", NDISC_NEIGHBOUR_ADVERTISEMENT, 0, 0, flags, ip6,
                       ND_OPT_TARGET_LL_ADDR, 1, mac)
    return _pad(_eth(dst_mac, mac, ETH_P_IPV6) + _ipv6(ip6, dst, icmp, 255))


def announcements(me: Identity) -> list[bytes]:
    """Frames a guest sends when its link comes up, so the bridge and neighbours learn it.

    An ARP announcement (RFC 5227 §2.3: a request with sender = target = our address) and,
    with IPv6, an unsolicited NA to all-nodes (RFC 4861 §7.2.6: Solicited clear).
    """
    out = [_pad(_eth(BROADCAST, me.mac, ETH_P_ARP) + _arp(1, me.mac, me.ip4, bytes(6), me.ip4))]
    if me.ip6 is not None:
        out.append(_neighbour_advert(me.mac, me.ip6, _ALL_NODES_MAC, _ALL_NODES,
                                     solicited=False))
    return out


# -- the guest -------------------------------------------------------------------------------


def handle(frame: bytes, me: Identity) -> tuple[str, bytes | None]:
    """Classify one received Ethernet frame; return (verdict, reply frame or None).

    Never raises: every length is checked before it is used.
    """
    if len(frame) < 14:
        return DROPPED, None
    dst, src = frame[:6], frame[6:12]
    if src[0] & 1:  # a group address is never a valid source (IEEE 802-2014 §8.2)
        return DROPPED, None
    if dst != me.mac and dst != BROADCAST and (me.snm_mac is None or dst != me.snm_mac):
        return IGNORED, None  # flooded unicast for other stations, other groups
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETH_P_ARP:
        return _handle_arp(frame, me)
    if ethertype == ETH_P_IP:
        return _handle_ipv4(frame, me)
    if ethertype == ETH_P_IPV6 and me.ip6 is not None:
        return _handle_ipv6(frame, me, me.ip6)
    return IGNORED, None  # VLAN tags, LLDP, IPv6 without --ip6 ...


def _handle_arp(frame: bytes, me: Identity) -> tuple[str, bytes | None]:
    arp = frame[14:]
    if len(arp) < 28:
        return DROPPED, None
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", arp)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        return IGNORED, None
    sha, spa, tpa = arp[8:14], arp[14:18], arp[24:28]
    if op != 1 or tpa != me.ip4:
        return IGNORED, None
    if sha[0] & 1 or not any(sha):
        return DROPPED, None
    # A probe (RFC 5227 §2.1.1, sender IP 0.0.0.0) gets the same reply, target IP 0.0.0.0,
    # as Linux's arp_process() answers it.
    reply = _eth(sha, me.mac, ETH_P_ARP) + _arp(2, me.mac, me.ip4, sha, spa)
    return ARP, _pad(reply)


def _bad_ipv4_source(addr: bytes) -> bool:
    """0.0.0.0/8, 127.0.0.0/8, multicast, class E and broadcast (RFC 1122 §3.2.1.3)."""
    return addr[0] in (0, 127) or addr[0] >= 224


def _handle_ipv4(frame: bytes, me: Identity) -> tuple[str, bytes | None]:
    ip = frame[14:]
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return DROPPED, None
    ihl = (ip[0] & 0xF) * 4
    total = int.from_bytes(ip[2:4], "big")
    if ihl < 20 or total < ihl or total > len(ip):  # (bytes after ``total`` are padding)
        return DROPPED, None
    if checksum(ip[:ihl]):
        return DROPPED, None
    if ip[16:20] != me.ip4:
        return IGNORED, None  # broadcast pings too (icmp_echo_ignore_broadcasts' default)
    if int.from_bytes(ip[6:8], "big") & 0x3FFF or ip[9] != IPPROTO_ICMP:
        return IGNORED, None  # fragments (no reassembly here), TCP, UDP ...
    icmp = ip[ihl:total]
    if len(icmp) < 8 or checksum(icmp):
        return DROPPED, None
    if icmp[0] != ICMP_ECHO:
        return IGNORED, None
    src = ip[12:16]
    if _bad_ipv4_source(src) or src == me.ip4:
        return DROPPED, None
    # RFC 792 / RFC 1122 §3.2.2.6: same identifier, sequence and data; IP options are not
    # reflected (a SHOULD for Record Route and Timestamp that a probe can do without).
    body = bytes([ICMP_ECHOREPLY, 0, 0, 0]) + icmp[4:]
    body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
    reply = _eth(frame[6:12], me.mac, ETH_P_IP) + _ipv4(me.ip4, src, IPPROTO_ICMP, body,
                                                        tos=ip[1])
    return ECHO, _pad(reply)


def _nd_options_valid(opts: bytes) -> tuple[bool, bool]:
    """(every option has a non-zero length within the message, a source LL option present)."""
    i, slla = 0, False
    while i < len(opts):
        if i + 2 > len(opts):
            return False, slla
        size = opts[i + 1] * 8
        if size == 0 or i + size > len(opts):
            return False, slla
        slla = slla or opts[i] == ND_OPT_SOURCE_LL_ADDR
        i += size
    return True, slla


def _handle_ipv6(frame: bytes, me: Identity, ip6: bytes) -> tuple[str, bytes | None]:
    ip = frame[14:]
    if len(ip) < 40 or ip[0] >> 4 != 6:
        return DROPPED, None
    plen = int.from_bytes(ip[4:6], "big")
    if 40 + plen > len(ip):
        return DROPPED, None
    src, dst = ip[8:24], ip[24:40]
    if ip[6] != IPPROTO_ICMPV6 or (dst != ip6 and dst != me.snm6):
        return IGNORED, None  # extension headers (MLD's hop-by-hop), other hosts' traffic
    icmp = ip[40:40 + plen]
    if len(icmp) < 8 or _icmp6_sum(src, dst, icmp):
        return DROPPED, None
    if src[0] == 0xFF:
        return DROPPED, None  # a multicast source (RFC 4291 §2.7)
    kind = icmp[0]
    if kind == NDISC_NEIGHBOUR_SOLICITATION:
        return _handle_ns(frame, ip, icmp, me, ip6)
    if kind == ICMPV6_ECHO_REQUEST and dst == ip6:
        if src == _UNSPECIFIED:
            return DROPPED, None
        body = bytes([ICMPV6_ECHO_REPLY, 0, 0, 0]) + icmp[4:]  # RFC 4443 §4.2
        tclass = (int.from_bytes(ip[0:2], "big") >> 4) & 0xFF
        return ECHO6, _pad(_eth(frame[6:12], me.mac, ETH_P_IPV6)
                           + _ipv6(ip6, src, body, TTL, tclass))
    return IGNORED, None


def _handle_ns(frame: bytes, ip: bytes, icmp: bytes, me: Identity,
               ip6: bytes) -> tuple[str, bytes | None]:
    """Neighbour Solicitation, validated as RFC 4861 §7.1.1 says, answered as §7.2.4 says."""
    src, dst = ip[8:24], ip[24:40]
    if ip[7] != 255 or icmp[1] != 0 or len(icmp) < 24:
        return DROPPED, None  # hop limit 255 proves the sender is on-link
    target = icmp[8:24]
    if target[0] == 0xFF:
        return DROPPED, None
    ok, slla = _nd_options_valid(icmp[24:])
    if not ok:
        return DROPPED, None
    dad = src == _UNSPECIFIED
    if dad and (dst != me.snm6 or slla):
        return DROPPED, None
    if target != ip6:
        return IGNORED, None
    if dad:  # someone probes our address: defend it to all-nodes, Solicited clear
        return NA, _neighbour_advert(me.mac, ip6, _ALL_NODES_MAC, _ALL_NODES, solicited=False)
    return NA, _neighbour_advert(me.mac, ip6, frame[6:12], src, solicited=True)


# -- counters and report ---------------------------------------------------------------------


@dataclass
class ProbeCounters:
    """What one queue pair saw and did.  ``tx_frames`` counts replies and announcements put
    on the TX ring; ``tx_dropped`` replies for which the ring had no free slot."""

    queue: int
    rx_frames: int = 0
    tx_frames: int = 0
    arp_replies: int = 0
    echo_replies: int = 0
    nd_adverts: int = 0
    echo6_replies: int = 0
    ignored: int = 0
    dropped: int = 0
    tx_dropped: int = 0

    def count(self, verdict: str) -> None:
        setattr(self, verdict, getattr(self, verdict) + 1)


COUNTER_NAMES = tuple(f.name for f in fields(ProbeCounters) if f.name != "queue")


@dataclass
class ProbeReport:
    """The probe guest's identity and counters; updated live, final after the loop."""

    tap: str
    ifindex: int
    bridge: str
    mtu: int
    mac: str
    tap_mac: str
    ipv4: str
    ipv6: str | None
    queues: list[ProbeCounters]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stopped_by: str = ""

    def totals(self) -> dict[str, int]:
        return {k: sum(getattr(q, k) for q in self.queues) for k in COUNTER_NAMES}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"] = self.totals()
        d["seconds"] = round(self.seconds, 3)
        return d


# -- configuration ---------------------------------------------------------------------------


def random_guest_mac() -> str:
    """52:54:00:xx:xx:xx, QEMU's locally administered unicast prefix (0x52: bit 1 set)."""
    return QEMU_OUI + "".join(f":{b:02x}" for b in os.urandom(3))


def random_tap_mac(avoid: str) -> str:
    """fe:xx:xx:xx:xx:xx for the host side, never equal to the guest's address.

    A frame addressed to a bridge port's own MAC is delivered to the host (a local fdb entry),
    not forwarded to the port: the two must differ.
    """
    while True:
        mac = "fe:" + ":".join(f"{b:02x}" for b in os.urandom(5))
        if mac != avoid:
            return mac


_IP = TypeVar("_IP", ipaddress.IPv4Interface, ipaddress.IPv6Interface)


def _parse_ip(text: str, kind: type[_IP], option: str) -> _IP:
    """A unicast host address with its prefix length, as ``ip addr add`` takes it."""
    v4 = kind is ipaddress.IPv4Interface
    example = "10.0.0.2/24" if v4 else "2001:db8::2/64"
    if "/" not in text:
        raise ValidationError(option, f"{text!r}: give ADDR/PREFIX, e.g. {example}")
    try:
        parsed = ipaddress.ip_interface(text)
    except ValueError as e:
        raise ValidationError(option, f"{text!r}: {e}") from None
    if not isinstance(parsed, kind):
        raise ValidationError(option, f"{text!r} is not an IPv{4 if v4 else 6} address, "
                              f"e.g. {example}")
    a = parsed.ip
    if a.is_multicast or a.is_loopback or a.is_unspecified or (v4 and a.is_reserved):
        raise ValidationError(option, f"{a} is not a unicast host address")
    net = parsed.network
    if v4 and net.prefixlen < 31 and a in (net.network_address, net.broadcast_address):
        what = "network" if a == net.network_address else "broadcast"
        raise ValidationError(option, f"{a} is the {what} address of {net}")
    return parsed


@dataclass(frozen=True)
class ProbeConfig:
    """A validated ``up`` request; nothing in it has been checked against the kernel yet."""

    name: str
    bridge: str
    ipv4: ipaddress.IPv4Interface
    mac: str
    queues: int = 1
    ipv6: ipaddress.IPv6Interface | None = None
    duration: float | None = None

    @classmethod
    def make(cls, name: str, *, bridge: str, ip: str, mac: str | None = None, queues: int = 1,
             ip6: str | None = None, duration: float | None = None) -> ProbeConfig:
        """Validate every argument without asking the kernel anything."""
        validate_ifname(name, op="tap name")
        validate_ifname(bridge, op="bridge")
        ipv4 = _parse_ip(ip, ipaddress.IPv4Interface, "--ip")
        ipv6 = _parse_ip(ip6, ipaddress.IPv6Interface, "--ip6") if ip6 is not None else None
        mac = validate_mac(mac) if mac is not None else random_guest_mac()
        if not isinstance(queues, int) or not 1 <= queues <= MAX_TAP_QUEUES:
            raise ValidationError("--queues", f"{queues}: must be 1..{MAX_TAP_QUEUES}")
        if duration is not None and not (duration > 0 and math.isfinite(duration)):
            raise ValidationError("--duration", f"{duration}: must be a positive number of "
                                  "seconds")
        return cls(name, bridge, ipv4, mac, queues, ipv6, duration)

    def identity(self) -> Identity:
        return Identity(bytes.fromhex(self.mac.replace(":", "")), self.ipv4.ip.packed,
                        self.ipv6.ip.packed if self.ipv6 else None)


@dataclass(frozen=True)
class ProbePlan:
    """A config checked against the links that exist: what :func:`run_probe` will do."""

    config: ProbeConfig
    mtu: int
    tap_mac: str
    warnings: tuple[str, ...] = ()


def plan(cfg: ProbeConfig, nl: Netlink | None = None) -> ProbePlan:
    """Check the links (read-only): NAME must be free, BR must be a bridge; take its MTU."""
    own = nl is None
    nl = nl or Netlink()
    try:
        if nl.find(cfg.name) is not None:
            raise ValidationError("tap name", f"a link named {cfg.name} already exists",
                                  hint="up creates its own tap: pick a free name")
        br = nl.find(cfg.bridge)
    finally:
        if own:
            nl.close()
    if br is None:
        raise ValidationError("--bridge", f"{cfg.bridge} does not exist",
                              hint=f"ip link add {cfg.bridge} type bridge")
    if not br.is_bridge:
        kind = f" (it is a {br.kind} link)" if br.kind else ""
        raise ValidationError("--bridge", f"{cfg.bridge} is not a bridge{kind}")
    warnings = () if br.up else (f"bridge {cfg.bridge} is down: nothing reaches the probe "
                                 f"until 'ip link set {cfg.bridge} up'",)
    return ProbePlan(cfg, br.mtu or 1500, random_tap_mac(cfg.mac), warnings)


# -- the run loop ----------------------------------------------------------------------------


class Port(Protocol):
    """What the loop needs from a datapath (a :class:`~vhostctl.datapath.Datapath`)."""

    def recv_any(self, timeout: float = ...) -> list[tuple[int, bytes]]: ...

    def send(self, frames: Sequence[bytes], queue: int = ...) -> int: ...


def transmit(port: Port, queue: int, frames: list[bytes], c: ProbeCounters) -> None:
    """Put frames on one TX ring without waiting; what does not fit is counted, not queued."""
    n = port.send(frames, queue)
    c.tx_frames += n
    c.tx_dropped += len(frames) - n


def answer(port: Port, me: Identity, counters: list[ProbeCounters],
           got: list[tuple[int, bytes]]) -> None:
    """Handle one batch; replies leave on the queue their request came in on."""
    out: dict[int, list[bytes]] = {}
    for qi, frame in got:
        c = counters[qi]
        c.rx_frames += 1
        verdict, reply = handle(frame, me)
        c.count(verdict)
        if reply is not None:
            out.setdefault(qi, []).append(reply)
    for qi, replies in out.items():
        transmit(port, qi, replies, counters[qi])


def serve(port: Port, me: Identity, report: ProbeReport, *, stop: Callable[[], str | None],
          duration: float | None = None,
          on_tick: Callable[[ProbeReport], None] | None = None,
          refresh: float = REFRESH) -> None:
    """Answer until ``stop()`` names a reason or ``duration`` runs out.

    Wakes at least every :data:`WAKE` seconds to ask ``stop()``; reads the clock once per
    batch, never per frame (a clock read is a syscall under emulation).
    """
    start = now = time.monotonic()
    end = start + duration if duration else math.inf
    next_tick = start + refresh
    counters = report.queues
    while not (reason := stop()):
        if now >= end:
            reason = "duration"
            break
        got = port.recv_any(timeout=max(0.0, min(WAKE, next_tick - now, end - now)))
        if got:
            answer(port, me, counters, got)
        now = time.monotonic()
        report.seconds = now - start
        if now >= next_tick:
            next_tick = now + refresh
            if on_tick is not None:
                on_tick(report)
    report.seconds = time.monotonic() - start
    report.stopped_by = reason


def run_probe(p: ProbePlan, *, stop: Callable[[], str | None],
              on_tick: Callable[[ProbeReport], None] | None = None,
              refresh: float = REFRESH) -> ProbeReport:
    """Stand the probe guest up, serve until stopped, tear down; return the final report.

    The tap exists only while this runs: the datapath's context exit closes its queues (and
    with them the non-persistent tap) and every fd, also when anything fails.
    """
    from .datapath import Datapath, DatapathConfig

    cfg = p.config
    me = cfg.identity()
    with Datapath(DatapathConfig(queues=cfg.queues, mtu=p.mtu, tap_name=cfg.name,
                                 mac=p.tap_mac, master=cfg.bridge)) as dp:
        report = ProbeReport(dp.tap_name, dp.ifindex, cfg.bridge, p.mtu, cfg.mac, p.tap_mac,
                             str(cfg.ipv4), str(cfg.ipv6) if cfg.ipv6 else None,
                             [ProbeCounters(i) for i in range(cfg.queues)], list(p.warnings))
        transmit(dp, 0, announcements(me), report.queues[0])
        if on_tick is not None:
            on_tick(report)
        serve(dp, me, report, stop=stop, duration=cfg.duration, on_tick=on_tick,
              refresh=refresh)
    return report
