"""The probe guest without a kernel: golden packets, validation, the run loop over a fake port.

Checksums in the golden frames were worked out by hand (shown next to them); everything else
is checked against :func:`ref_checksum`, a word-by-word RFC 1071 sum independent of the
module's big-integer version.
"""

from __future__ import annotations

import io
import os
import signal
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vhostctl import probe
from vhostctl.cli import app
from vhostctl.cli import commands as _commands  # noqa: F401  (registers every command)
from vhostctl.cli.up import stop_on_signals
from vhostctl.errors import ValidationError
from vhostctl.netlink import Link
from vhostctl.probe import (
    ARP,
    DROPPED,
    ECHO,
    ECHO6,
    IGNORED,
    NA,
    Identity,
    ProbeConfig,
    ProbeCounters,
    ProbeReport,
    handle,
)

MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("020000000001")
IP = bytes([10, 0, 0, 2])
PEER_IP = bytes([10, 0, 0, 1])
IP6 = bytes.fromhex("20010db8000000000000000000000002")
PEER6 = bytes.fromhex("20010db8000000000000000000000001")
SNM6 = bytes.fromhex("ff0200000000000000000001ff000002")
SNM_MAC = bytes.fromhex("3333ff000002")
ME = Identity(MAC, IP, IP6)
ME4 = Identity(MAC, IP)
VERDICTS = {ARP, ECHO, NA, ECHO6, IGNORED, DROPPED}


def ref_checksum(data: bytes) -> int:
    """RFC 1071 §4.1, word by word with end-around carry."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_packet(src: bytes, dst: bytes, proto: int, payload: bytes, *, frag: int = 0x4000,
                ttl: int = 64) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1C46, frag, ttl, proto,
                      0, src, dst)
    return hdr[:10] + ref_checksum(hdr).to_bytes(2, "big") + hdr[12:] + payload


def icmp_echo(ident: int, seq: int, data: bytes, kind: int = 8) -> bytes:
    msg = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    return msg[:2] + ref_checksum(msg).to_bytes(2, "big") + msg[4:]


def echo_frame(data: bytes = b"abc", dst_mac: bytes = MAC, src: bytes = PEER_IP,
               dst: bytes = IP) -> bytes:
    return dst_mac + PEER + b"\x08\x00" + ipv4_packet(src, dst, 1, icmp_echo(0x1234, 1, data))


def arp_frame(op: int = 1, spa: bytes = PEER_IP, tpa: bytes = IP, dst: bytes = b"\xff" * 6,
              sha: bytes = PEER) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, spa, bytes(6), tpa)
    return (dst + PEER + b"\x08\x06" + arp).ljust(60, b"\0")


def icmp6(src: bytes, dst: bytes, msg: bytes) -> bytes:
    pseudo = src + dst + len(msg).to_bytes(4, "big") + b"\0\0\x00\x3a"
    return msg[:2] + ref_checksum(pseudo + msg).to_bytes(2, "big") + msg[4:]


def ipv6_frame(src: bytes, dst: bytes, msg: bytes, *, hlim: int = 255, dst_mac: bytes = SNM_MAC,
               nh: int = 58) -> bytes:
    body = icmp6(src, dst, msg)
    return (dst_mac + PEER + b"\x86\xdd"
            + struct.pack("!IHBB16s16s", 0x60000000, len(body), nh, hlim, src, dst) + body)


def ns_msg(target: bytes = IP6, opts: bytes = b"\x01\x01" + PEER) -> bytes:
    return struct.pack("!BBHI16s", 135, 0, 0, 0, target) + opts


def ns_frame(src: bytes = PEER6, dst: bytes = SNM6, **kw) -> bytes:
    opts = kw.pop("opts", b"\x01\x01" + PEER)
    return ipv6_frame(src, dst, ns_msg(kw.pop("target", IP6), opts), **kw)


def echo6_frame(data: bytes = b"hello", dst: bytes = IP6, src: bytes = PEER6) -> bytes:
    return ipv6_frame(src, dst, struct.pack("!BBHHH", 128, 0, 0, 7, 9) + data, hlim=64,
                      dst_mac=MAC)


# -- checksum ---------------------------------------------------------------------------------


def test_checksum_rfc1071_example():
    # RFC 1071 §3: these 8 bytes sum to ddf2, so the checksum is 220d.
    assert probe.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_checksum_zero_and_negative_zero():
    assert probe.checksum(b"") == probe.checksum(bytes(10)) == 0xFFFF
    assert probe.checksum(b"\xff\xff") == 0  # one's complement -0: a verified message
    assert probe.checksum(b"\xff\xff\xff\xff") == 0


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_checksum_matches_the_word_by_word_reference(data):
    assert probe.checksum(data) == ref_checksum(data)


@settings(deadline=None)
@given(st.binary(min_size=2, max_size=300).filter(lambda d: len(d) % 2 == 0))
def test_a_message_carrying_its_checksum_verifies(data):
    msg = data[:-2] + probe.checksum(data[:-2] + b"\0\0").to_bytes(2, "big")
    assert probe.checksum(msg) == 0


# -- ARP --------------------------------------------------------------------------------------


def test_arp_request_gets_the_exact_reply():
    request = bytes.fromhex(
        "ffffffffffff" "020000000001" "0806"      # broadcast from the peer, ARP
        "0001" "0800" "06" "04" "0001"            # Ethernet/IPv4, request
        "020000000001" "0a000001"                 # sender 02:..:01 10.0.0.1
        "000000000000" "0a000002"                 # who has 10.0.0.2?
    ) + bytes(18)
    assert request == arp_frame()
    verdict, reply = handle(request, ME4)
    assert verdict == ARP
    assert reply == bytes.fromhex(
        "020000000001" "525400123456" "0806"      # to the asker, from us
        "0001" "0800" "06" "04" "0002"            # reply
        "525400123456" "0a000002"                 # 10.0.0.2 is at 52:54:00:12:34:56
        "020000000001" "0a000001"
    ) + bytes(18)


def test_arp_probe_is_answered_with_target_0_0_0_0():
    verdict, reply = handle(arp_frame(spa=bytes(4)), ME4)
    assert verdict == ARP and reply[38:42] == bytes(4) and reply[32:38] == PEER


def test_unicast_arp_request_to_our_mac_is_answered():
    assert handle(arp_frame(dst=MAC), ME4)[0] == ARP


@pytest.mark.parametrize("frame, verdict", [
    (arp_frame(tpa=bytes([10, 0, 0, 9])), IGNORED),
    (arp_frame(op=2), IGNORED),
    (arp_frame(dst=bytes.fromhex("020000000009")), IGNORED),
    (arp_frame()[:14 + 27], DROPPED),
    (arp_frame()[:14] + b"\x00\x06" + arp_frame()[16:], IGNORED),   # htype 6 (IEEE 802)
    (arp_frame(sha=bytes(6)), DROPPED),
    (arp_frame(sha=bytes.fromhex("010000000001")), DROPPED),
])
def test_arp_not_for_us_or_malformed(frame, verdict):
    assert handle(frame, ME4) == (verdict, None)


# -- IPv4 ICMP echo ---------------------------------------------------------------------------


def test_echo_with_odd_payload_gets_the_exact_reply():
    # ICMP: 0000 + 0000 + 1234 + 0001 + 6162 + 6300 = d697 -> checksum 2968.
    # IP: 4500 + 001f + 0000 + 4000 + 4001 + 0a00 + 0002 + 0a00 + 0001 = d923 -> 26dc.
    verdict, reply = handle(echo_frame(b"abc"), ME4)
    assert verdict == ECHO
    assert reply == bytes.fromhex(
        "020000000001" "525400123456" "0800"
        "4500001f" "00004000" "400126dc" "0a000002" "0a000001"
        "00002968" "12340001" "616263"
    ) + bytes(15)


@pytest.mark.parametrize("size", [0, 1, 55, 56, 1471, 1472, 8971])
def test_echo_payload_is_returned_byte_for_byte_with_valid_checksums(size):
    data = bytes((i * 37 + 11) & 0xFF for i in range(size))
    verdict, reply = handle(echo_frame(data), ME4)
    assert verdict == ECHO
    ip = reply[14:]
    total = int.from_bytes(ip[2:4], "big")
    assert total == 28 + size
    assert ref_checksum(ip[:20]) == 0 and ref_checksum(ip[20:total]) == 0
    assert ip[12:16] == IP and ip[16:20] == PEER_IP and ip[8] == 64
    assert ip[20] == 0 and ip[24:28] == bytes.fromhex("12340001")
    assert ip[28:total] == data
    assert len(reply) == max(60, 14 + total)


def test_ethernet_padding_after_the_ip_packet_is_not_echoed():
    frame = echo_frame(b"").ljust(60, b"\xee")  # 42 bytes of packet, 18 of padding
    verdict, reply = handle(frame, ME4)
    assert verdict == ECHO and int.from_bytes(reply[16:18], "big") == 28


def _corrupt(frame: bytes, at: int) -> bytes:
    return frame[:at] + bytes([frame[at] ^ 0x40]) + frame[at + 1:]


@pytest.mark.parametrize("frame, verdict", [
    (echo_frame(dst=bytes([10, 0, 0, 3])), IGNORED),
    (echo_frame(dst=bytes([10, 0, 0, 255]), dst_mac=b"\xff" * 6), IGNORED),
    (echo_frame(dst_mac=bytes.fromhex("020000000009")), IGNORED),
    (_corrupt(echo_frame(), 14 + 8), DROPPED),           # TTL changed: header checksum
    (_corrupt(echo_frame(), 14 + 20 + 8), DROPPED),      # payload changed: ICMP checksum
    (echo_frame()[:-1], DROPPED),                        # total length beyond the frame
    (echo_frame(src=bytes([255, 255, 255, 255])), DROPPED),
    (echo_frame(src=bytes([224, 0, 0, 1])), DROPPED),
    (echo_frame(src=bytes(4)), DROPPED),
    (echo_frame(src=IP), DROPPED),
    (MAC + PEER + b"\x08\x00" + ipv4_packet(PEER_IP, IP, 1, icmp_echo(1, 1, b"x"), frag=0x2000),
     IGNORED),                                           # first fragment
    (MAC + PEER + b"\x08\x00" + ipv4_packet(PEER_IP, IP, 17, bytes(12)), IGNORED),
    (MAC + PEER + b"\x08\x00" + ipv4_packet(PEER_IP, IP, 1, icmp_echo(1, 1, b"", kind=0)),
     IGNORED),                                           # an echo reply to us
    (MAC + PEER + b"\x08\x00" + ipv4_packet(PEER_IP, IP, 1, b"\x08\x00\xf7"), DROPPED),
    (MAC + PEER + b"\x08\x00" + b"\x65" + echo_frame()[15:], DROPPED),  # version 6 in v4
    (MAC + PEER + b"\x08\x00" + b"\x44" + echo_frame()[15:], DROPPED),  # IHL 4
    (MAC + bytes.fromhex("030000000001") + b"\x08\x00", DROPPED),  # group source
    (MAC + PEER + b"\x81\x00" + bytes(46), IGNORED),                        # VLAN tag
    (MAC + PEER, DROPPED),
])
def test_ipv4_not_for_us_or_malformed(frame, verdict):
    assert handle(frame, ME4) == (verdict, None)


# -- IPv6 -------------------------------------------------------------------------------------


def _check_icmp6(reply: bytes) -> tuple[bytes, bytes, bytes]:
    ip = reply[14:]
    plen = int.from_bytes(ip[4:6], "big")
    src, dst, msg = ip[8:24], ip[24:40], ip[40:40 + plen]
    pseudo = src + dst + plen.to_bytes(4, "big") + b"\0\0\x00\x3a"
    assert ip[0] >> 4 == 6 and ip[6] == 58
    assert ref_checksum(pseudo + msg) == 0
    return src, dst, msg


def test_neighbour_solicitation_gets_a_solicited_advert():
    verdict, reply = handle(ns_frame(), ME)
    assert verdict == NA
    assert reply[:14] == PEER + MAC + b"\x86\xdd"
    assert reply[14 + 7] == 255
    src, dst, msg = _check_icmp6(reply)
    assert (src, dst) == (IP6, PEER6)
    assert msg[0:2] == b"\x88\x00"
    assert msg[4:8] == bytes.fromhex("60000000")  # Solicited + Override, not Router
    assert msg[8:24] == IP6
    assert msg[24:] == b"\x02\x01" + MAC
    assert len(reply) == 14 + 40 + 32


def test_unicast_solicitation_for_reachability_is_answered():
    assert handle(ns_frame(dst=IP6, dst_mac=MAC), ME)[0] == NA


def test_duplicate_address_detection_is_answered_to_all_nodes():
    verdict, reply = handle(ns_frame(src=bytes(16), opts=b""), ME)
    assert verdict == NA
    assert reply[:6] == bytes.fromhex("333300000001")
    src, dst, msg = _check_icmp6(reply)
    assert (src, dst) == (IP6, bytes.fromhex("ff020000000000000000000000000001"))
    assert msg[4:8] == bytes.fromhex("20000000")  # Override only


@pytest.mark.parametrize("frame, verdict", [
    (ns_frame(hlim=64), DROPPED),                                   # not from on-link
    (ns_frame(target=bytes.fromhex("20010db8000000000000000000000003"),
              dst=bytes.fromhex("ff0200000000000000000001ff000003"),
              dst_mac=bytes.fromhex("3333ff000003")), IGNORED),     # other group
    (ns_frame(target=bytes.fromhex("20010db80000000000000000ff000002")), IGNORED),
    (ns_frame(target=SNM6), DROPPED),                               # multicast target
    (ns_frame(opts=b"\x01\x00" + PEER), DROPPED),                   # zero-length option
    (ns_frame(opts=b"\x01\x02" + PEER), DROPPED),                   # option beyond the end
    (ns_frame(src=bytes(16)), DROPPED),                             # DAD with an SLLA
    (ns_frame(src=bytes(16), dst=IP6, dst_mac=MAC, opts=b""), DROPPED),  # DAD to unicast
    (ns_frame(src=SNM6), DROPPED),                                  # multicast source
    (_corrupt(ns_frame(), 14 + 40 + 10), DROPPED),                  # checksum
    (ns_frame()[:-1], DROPPED),                                     # payload length
    (ipv6_frame(PEER6, IP6, ns_msg(), nh=0, dst_mac=MAC), IGNORED),  # extension header
])
def test_solicitations_not_for_us_or_malformed(frame, verdict):
    got = handle(frame, ME)
    assert got[0] == verdict
    assert (got[1] is None) == (verdict != NA)


def test_echo6_payload_is_returned_with_a_valid_checksum():
    verdict, reply = handle(echo6_frame(b"x" * 1001), ME)
    assert verdict == ECHO6
    assert reply[:12] == PEER + MAC
    src, dst, msg = _check_icmp6(reply)
    assert (src, dst) == (IP6, PEER6)
    assert msg[:2] == b"\x81\x00" and msg[4:8] == struct.pack("!HH", 7, 9)
    assert msg[8:] == b"x" * 1001


@pytest.mark.parametrize("frame, verdict", [
    (echo6_frame(dst=bytes.fromhex("20010db8000000000000000000000003")), IGNORED),
    (echo6_frame(src=bytes(16)), DROPPED),
    (ipv6_frame(PEER6, SNM6, struct.pack("!BBHHH", 128, 0, 0, 7, 9)), IGNORED),  # to a group
])
def test_echo6_not_for_us_or_malformed(frame, verdict):
    assert handle(frame, ME) == (verdict, None)


def test_ipv6_is_ignored_without_an_ipv6_address():
    assert handle(ns_frame(), ME4) == (IGNORED, None)
    assert handle(echo6_frame(), ME4) == (IGNORED, None)


# -- announcements ----------------------------------------------------------------------------


def test_announcements_are_an_arp_announcement_and_an_unsolicited_advert():
    arp, na = probe.announcements(ME)
    assert arp == bytes.fromhex(
        "ffffffffffff" "525400123456" "0806" "0001" "0800" "06" "04" "0001"
        "525400123456" "0a000002" "000000000000" "0a000002") + bytes(18)
    assert na[:6] == bytes.fromhex("333300000001")
    src, dst, msg = _check_icmp6(na)
    assert (src, dst) == (IP6, bytes.fromhex("ff020000000000000000000000000001"))
    assert msg[4:8] == bytes.fromhex("20000000")
    assert probe.announcements(ME4) == [arp]


# -- never raises -----------------------------------------------------------------------------

GOLDEN = [arp_frame(), echo_frame(b"abcd" * 30), ns_frame(), echo6_frame(),
          ns_frame(src=bytes(16), opts=b"")]


def test_every_truncation_of_every_request_is_handled_quietly():
    for frame in GOLDEN:
        for n in range(len(frame)):
            verdict, reply = handle(frame[:n], ME)
            assert verdict in VERDICTS
            assert reply is None or n >= 42


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    verdict, reply = handle(data, ME)
    assert verdict in VERDICTS and (reply is None or len(reply) >= 60)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from([MAC, b"\xff" * 6, SNM_MAC]),
       st.sampled_from([b"\x08\x00", b"\x08\x06", b"\x86\xdd"]),
       st.binary(max_size=120))
def test_fuzz_frames_that_reach_the_parsers(dst, ethertype, body):
    verdict, reply = handle(dst + PEER + ethertype + body, ME)
    assert verdict in VERDICTS and (reply is None or len(reply) >= 60)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(GOLDEN), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                         max_size=4), st.integers(0, 200))
def test_fuzz_mutated_requests(frame, edits, cut):
    b = bytearray(frame)
    for at, value in edits:
        b[at % len(b)] = value
    verdict, reply = handle(bytes(b[:len(b) - cut % 8]), ME)
    assert verdict in VERDICTS
    if reply is not None:
        assert reply[6:12] == MAC and len(reply) >= 60


# -- configuration ----------------------------------------------------------------------------


def test_config_defaults_and_identity():
    cfg = ProbeConfig.make("vp0", bridge="br0", ip="10.0.0.2/24", ip6="2001:db8::2/64")
    assert cfg.mac.startswith("52:54:00:") and cfg.queues == 1 and cfg.duration is None
    me = cfg.identity()
    assert me.ip4 == IP and me.ip6 == IP6 and me.snm6 == SNM6 and me.snm_mac == SNM_MAC
    assert me.mac == bytes.fromhex(cfg.mac.replace(":", ""))


def test_tap_mac_starts_with_fe_and_differs_from_the_guest(monkeypatch):
    draws = iter([b"\xfe\x01\x02\x03\x04", bytes(5)])
    monkeypatch.setattr(probe.os, "urandom", lambda n: next(draws))
    assert probe.random_tap_mac("fe:fe:01:02:03:04") == "fe:00:00:00:00:00"
    monkeypatch.undo()
    assert probe.random_tap_mac("52:54:00:00:00:01").startswith("fe:")


@pytest.mark.parametrize("kw, words", [
    ({"ip": "10.0.0.2"}, "give ADDR/PREFIX"),
    ({"ip": "10.0.0.2/33"}, "10.0.0.2/33"),
    ({"ip": "10.0.0.0/24"}, "network address of 10.0.0.0/24"),
    ({"ip": "10.0.0.255/24"}, "broadcast address"),
    ({"ip": "224.0.0.1/4"}, "not a unicast"),
    ({"ip": "127.0.0.1/8"}, "not a unicast"),
    ({"ip": "0.0.0.0/0"}, "not a unicast"),
    ({"ip": "2001:db8::2/64"}, "not an IPv4 address"),
    ({"ip6": "10.0.0.3/24"}, "not an IPv6 address"),
    ({"ip6": "ff02::1/64"}, "not a unicast"),
    ({"ip6": "2001:db8::2"}, "give ADDR/PREFIX"),
    ({"mac": "01:00:5e:00:00:01"}, "multicast"),
    ({"mac": "52:54:00:00:00"}, "six hex pairs"),
    ({"queues": 0}, "1..256"),
    ({"queues": 257}, "1..256"),
    ({"duration": 0.0}, "positive"),
    ({"duration": float("inf")}, "positive"),
    ({"name": "a/b"}, "a/b"),
    ({"name": "tap%d"}, "'%'"),
    ({"bridge": "x" * 16}, "IFNAMSIZ"),
])
def test_config_validation(kw, words):
    args = {"name": "vp0", "bridge": "br0", "ip": "10.0.0.2/24"} | kw
    with pytest.raises(ValidationError) as e:
        ProbeConfig.make(args.pop("name"), **args)
    assert words in str(e.value)


def test_point_to_point_prefixes_allow_every_address():
    assert str(ProbeConfig.make("v", bridge="b", ip="10.0.0.0/31").ipv4) == "10.0.0.0/31"
    assert str(ProbeConfig.make("v", bridge="b", ip="10.0.0.7/32").ipv4) == "10.0.0.7/32"


class FakeNetlink:
    def __init__(self, links):
        self.links = {x.name: x for x in links}
        self.closed = False

    def find(self, name):
        return self.links.get(name)

    def close(self):
        self.closed = True


def _link(name, kind, *, up=True, mtu=1500):
    return Link(name=name, ifindex=7, flags=1 if up else 0, mtu=mtu, mac=None, operstate=None,
                kind=kind)


def test_plan_takes_the_bridge_mtu_and_warns_when_it_is_down():
    cfg = ProbeConfig.make("vp0", bridge="br0", ip="10.0.0.2/24")
    p = probe.plan(cfg, FakeNetlink([_link("br0", "bridge", mtu=9000)]))
    assert p.mtu == 9000 and p.tap_mac.startswith("fe:") and p.warnings == ()
    p = probe.plan(cfg, FakeNetlink([_link("br0", "bridge", up=False)]))
    assert "br0 is down" in p.warnings[0]


@pytest.mark.parametrize("links, words", [
    ([_link("vp0", "tun"), _link("br0", "bridge")], "a link named vp0 already exists"),
    ([], "br0 does not exist"),
    ([_link("br0", "veth")], "br0 is not a bridge (it is a veth link)"),
    ([_link("br0", None)], "br0 is not a bridge"),
])
def test_plan_refuses(links, words):
    cfg = ProbeConfig.make("vp0", bridge="br0", ip="10.0.0.2/24")
    with pytest.raises(ValidationError) as e:
        probe.plan(cfg, FakeNetlink(links))
    assert words in str(e.value) and e.value.code == 2


# -- the loop over a fake port ----------------------------------------------------------------


class FakePort:
    """Scripted batches for recv_any; send records frames and takes at most ``room``."""

    def __init__(self, batches, room=1000):
        self.batches = list(batches)
        self.sent: list[tuple[int, list[bytes]]] = []
        self.room = room
        self.timeouts: list[float] = []

    def recv_any(self, timeout=1.0):
        self.timeouts.append(timeout)
        return self.batches.pop(0) if self.batches else []

    def send(self, frames, queue=0):
        frames = list(frames)
        self.sent.append((queue, frames))
        return min(len(frames), self.room)


def _report(queues=2):
    return ProbeReport("vp0", 5, "br0", 1500, "52:54:00:12:34:56", "fe:00:00:00:00:01",
                       "10.0.0.2/24", None, [ProbeCounters(i) for i in range(queues)])


def _stop_when_drained(port):
    return lambda: "test" if not port.batches else None


def test_replies_leave_on_the_queue_their_request_came_in_on():
    port = FakePort([[(1, arp_frame()), (0, echo_frame()), (1, echo_frame(b"zz")),
                      (0, b"short")]])
    report = _report()
    probe.serve(port, ME4, report, stop=_stop_when_drained(port))
    assert report.stopped_by == "test"
    sent = dict(port.sent)
    assert sent[0] == [handle(echo_frame(), ME4)[1]]
    assert sent[1] == [handle(arp_frame(), ME4)[1], handle(echo_frame(b"zz"), ME4)[1]]
    q0, q1 = report.queues
    assert (q0.rx_frames, q0.echo_replies, q0.dropped, q0.tx_frames) == (2, 1, 1, 1)
    assert (q1.rx_frames, q1.arp_replies, q1.echo_replies, q1.tx_frames) == (2, 1, 1, 2)
    assert report.totals()["rx_frames"] == 4


def test_a_full_tx_ring_counts_drops_instead_of_waiting():
    port = FakePort([[(0, echo_frame()), (0, echo_frame(b"q"))]], room=1)
    report = _report(1)
    probe.serve(port, ME4, report, stop=_stop_when_drained(port))
    (q,) = report.queues
    assert (q.echo_replies, q.tx_frames, q.tx_dropped) == (2, 1, 1)


def test_the_loop_never_sleeps_longer_than_wake_and_stops_after_duration():
    port = FakePort([])
    ticks = []
    report = _report(1)
    probe.serve(port, ME4, report, stop=lambda: None, duration=0.5, on_tick=ticks.append,
                refresh=0.1)
    assert report.stopped_by == "duration" and 0.5 <= report.seconds < 2
    assert port.timeouts and max(port.timeouts) <= probe.WAKE
    assert len(ticks) >= 3 and ticks[0] is report


def test_a_stop_before_the_first_batch_ends_at_once():
    port = FakePort([[(0, arp_frame())]])
    report = _report(1)
    probe.serve(port, ME4, report, stop=lambda: "SIGTERM")
    assert report.stopped_by == "SIGTERM" and port.timeouts == []


def test_report_json_has_totals_and_rounded_seconds():
    report = _report(2)
    report.queues[1].echo_replies = 5
    report.seconds = 1.23456
    d = report.to_dict()
    assert d["totals"]["echo_replies"] == 5 and d["seconds"] == 1.235
    assert set(d["totals"]) == set(probe.COUNTER_NAMES)
    assert d["queues"][1] == {"queue": 1, **{k: 0 for k in probe.COUNTER_NAMES},
                              "echo_replies": 5}


# -- CLI and signals --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_become_a_stop_reason_and_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with stop_on_signals() as stop:
        assert stop() is None
        os.kill(os.getpid(), sig)
        assert stop() == sig.name
    assert signal.getsignal(sig) is before


@pytest.mark.parametrize("args, words", [
    (["vp0", "--bridge", "br0", "--ip", "10.0.0.2"], "give ADDR/PREFIX"),
    (["vp0", "--bridge", "br0", "--ip", "10.0.0.2/24", "--mac", "zz"], "six hex pairs"),
    (["vp0", "--bridge", "br0", "--ip", "10.0.0.2/24", "--queues", "0"], "1..256"),
    (["vp0", "--bridge", "br0", "--ip", "10.0.0.2/24", "--duration", "-1"], "positive"),
    (["vp0", "--bridge", "br0", "--ip", "10.0.0.2/24", "--ip6", "fe80::1"], "ADDR/PREFIX"),
    (["bad/name", "--bridge", "br0", "--ip", "10.0.0.2/24"], "bad/name"),
])
def test_cli_validation_exits_2_with_one_line(args, words):
    r = CliRunner().invoke(app, ["up", *args], catch_exceptions=False)
    assert r.exit_code == 2, r.stdout
    assert r.stderr.startswith("vhostctl: ") and words in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["vp0", "--ip", "10.0.0.2/24"], ["vp0", "--bridge", "br0"]])
def test_cli_requires_bridge_and_ip(args):
    assert CliRunner().invoke(app, ["up", *args]).exit_code == 2


def test_live_table_and_closing_line_render(capsys):
    from rich.console import Console

    from vhostctl import render_probe

    report = _report(2)
    report.ipv6 = "2001:db8::2/64"
    report.queues[0].echo6_replies = 3
    report.stopped_by, report.seconds = "SIGINT", 4.0
    c = Console(width=200, record=True, file=io.StringIO())
    c.print(render_probe.probe_table(report))
    text = c.export_text()
    assert "probe guest 52:54:00:12:34:56 10.0.0.2/24 2001:db8::2/64 on vp0" in text
    header = next(line for line in text.splitlines() if "queue" in line).split("┃")
    assert [h.strip() for h in header[1:-1]] == ["queue", "RX", "TX", "ARP", "echo", "NA",
                                                 "echo6", "ignored", "dropped", "ring full"]
    rows = [line.split("│") for line in text.splitlines() if "│" in line]
    assert [r[1].strip() for r in rows] == ["0", "1", "all"]
    assert [r[7].strip() for r in rows] == ["3", "0", "3"]
    render_probe.print_probe_end(report)
    out = capsys.readouterr().out
    assert out.startswith("stopped by SIGINT after 4.0s: 0 ARP, 0 echo, 0 NA, 3 echo6 replies")
