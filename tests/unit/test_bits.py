"""BitNames: decoding and encoding feature/flag words, aliases, unknown bits and names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostctl._uapi import if_tun, vhost, virtio_config, virtio_net
from vhostctl._uapi.bits import BitNames
from vhostctl.errors import ValidationError

FEATURES = virtio_net.FEATURES
IFF = if_tun.IFF_FLAGS
OFFLOADS = if_tun.OFFLOADS

ALL_TABLES = [
    FEATURES,
    IFF,
    OFFLOADS,
    vhost.FEATURES,
    vhost.BACKEND_FEATURES,
    virtio_config.TRANSPORT_FEATURES,
    virtio_config.STATUS,
    virtio_net.HDR_FLAGS,
]


def test_decode_canonical_names_lowest_first() -> None:
    word = (1 << virtio_net.VIRTIO_NET_F_MRG_RXBUF) | (1 << virtio_config.VIRTIO_F_VERSION_1)
    assert FEATURES.decode(word) == ["VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_F_VERSION_1"]
    assert FEATURES.decode(0) == []


def test_bit_27_has_two_names_decoded_once() -> None:
    assert FEATURES.decode(1 << 27) == ["VIRTIO_F_ANY_LAYOUT"]
    assert FEATURES.decode(1 << 27, aliases=True) == [
        "VIRTIO_F_ANY_LAYOUT/VHOST_NET_F_VIRTIO_NET_HDR"
    ]
    assert FEATURES.names(27) == ["VIRTIO_F_ANY_LAYOUT", "VHOST_NET_F_VIRTIO_NET_HDR"]
    for alias in ("VIRTIO_F_ANY_LAYOUT", "VHOST_NET_F_VIRTIO_NET_HDR", "any_layout",
                  "virtio_net_hdr", "Virtio_Net_Hdr"):
        assert FEATURES.encode([alias]) == 1 << 27, alias


def test_iommu_platform_alias() -> None:
    assert FEATURES.encode("iommu_platform") == FEATURES.encode("access_platform") == 1 << 33
    assert FEATURES.decode(1 << 33) == ["VIRTIO_F_ACCESS_PLATFORM"]


def test_ring_and_vhost_bits() -> None:
    assert FEATURES.encode("indirect_desc,event_idx,log_all") == (1 << 28) | (1 << 29) | (
        1 << 26
    )
    assert FEATURES.decode(1 << 26) == ["VHOST_F_LOG_ALL"]


def test_bits_above_64() -> None:
    # Only reachable through VHOST_GET_FEATURES_ARRAY; Python ints have no width limit.
    word = FEATURES.encode("host_udp_tunnel_gso guest_udp_tunnel_gso_csum")
    assert word == (1 << 67) | (1 << 66)
    assert FEATURES.decode(word) == [
        "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM",
        "VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO",
    ]


def test_unknown_bits_rendered() -> None:
    assert FEATURES.decode((1 << 4) | (1 << 42)) == ["bit4", "bit42"]
    assert IFF.decode(0x0004 | 0x0001) == ["IFF_TUN", "0x4"]
    assert OFFLOADS.decode(0x200) == ["0x200"]


def test_encode_accepts_decode_renderings() -> None:
    assert FEATURES.encode(["bit4", "bit42"]) == (1 << 4) | (1 << 42)
    assert IFF.encode("0x4|tap") == 0x4 | if_tun.IFF_TAP


def test_encode_forms() -> None:
    assert FEATURES.encode("version_1, mrg_rxbuf") == (1 << 32) | (1 << 15)
    assert FEATURES.encode("VERSION_1 | MRG_RXBUF") == (1 << 32) | (1 << 15)
    assert FEATURES.encode(["VIRTIO_F_VERSION_1", "virtio_net_f_mrg_rxbuf"]) == (1 << 32) | (
        1 << 15
    )
    assert FEATURES.encode("") == 0
    assert FEATURES.encode([]) == 0
    # csum is VIRTIO_NET_F_CSUM, not GUEST_CSUM: a prefix is stripped whole, not matched.
    assert FEATURES.encode("csum") == 1 << 0
    assert FEATURES.encode("guest_csum") == 1 << 1


def test_tun_flags_and_nofilter_alias() -> None:
    assert IFF.encode("tap no_pi vnet_hdr") == (
        if_tun.IFF_TAP | if_tun.IFF_NO_PI | if_tun.IFF_VNET_HDR
    )
    assert IFF.encode("nofilter") == IFF.encode("IFF_NO_PI") == 0x1000
    assert IFF.decode(0x1000) == ["IFF_NO_PI"]
    assert IFF.names(0x1000) == ["IFF_NO_PI", "IFF_NOFILTER"]
    assert IFF.decode(if_tun.IFF_TAP | if_tun.IFF_MULTI_QUEUE) == ["IFF_TAP", "IFF_MULTI_QUEUE"]


def test_offload_short_names() -> None:
    for short, mask in [
        ("csum", if_tun.TUN_F_CSUM),
        ("tso4", if_tun.TUN_F_TSO4),
        ("tso6", if_tun.TUN_F_TSO6),
        ("tso_ecn", if_tun.TUN_F_TSO_ECN),
        ("ufo", if_tun.TUN_F_UFO),
        ("uso4", if_tun.TUN_F_USO4),
        ("uso6", if_tun.TUN_F_USO6),
    ]:
        assert OFFLOADS.encode(short) == mask, short
        assert OFFLOADS.encode(short.upper()) == mask, short
    assert OFFLOADS.decode(0x7F) == [
        "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN", "TUN_F_UFO",
        "TUN_F_USO4", "TUN_F_USO6",
    ]


def test_unknown_name_raises_validation_error() -> None:
    with pytest.raises(ValidationError) as ei:
        FEATURES.encode("version_1, mrg_rxbufz")
    err = ei.value
    assert "mrg_rxbufz" in str(err)
    assert "mrg_rxbuf" in err.hint and "version_1" in err.hint
    assert err.code == 2  # EXIT_USAGE


def test_unknown_offload_lists_valid_names() -> None:
    with pytest.raises(ValidationError) as ei:
        OFFLOADS.encode(["tso5"])
    assert "tso5" in str(ei.value)
    for s in ("csum", "tso4", "tso6", "tso_ecn", "ufo", "uso4", "uso6"):
        assert s in ei.value.hint


@pytest.mark.parametrize("bad", ["bitx", "0x3", "0xzz", "bit", "-1"])
def test_malformed_tokens_rejected(bad: str) -> None:
    with pytest.raises(ValidationError):
        IFF.encode([bad])


def test_non_string_rejected() -> None:
    with pytest.raises(ValidationError):
        IFF.encode([1])  # type: ignore[list-item]


def test_negative_word_rejected() -> None:
    with pytest.raises(ValueError):
        FEATURES.decode(-1)


def test_construction_rejects_bad_tables() -> None:
    with pytest.raises(ValueError):
        BitNames.from_masks({"A": 0x3})
    with pytest.raises(ValueError):
        BitNames.from_masks([("A", 1), ("A", 2)])


def test_ambiguous_short_name_needs_full_name() -> None:
    t = BitNames.from_bits([("X_F_ONE", 0), ("Y_F_ONE", 1)], prefixes=("X_F_", "Y_F_"))
    assert t.encode("X_F_ONE") == 1 and t.encode("y_f_one") == 2
    with pytest.raises(ValidationError, match="ambiguous"):
        t.encode("one")


@pytest.mark.parametrize("table", ALL_TABLES, ids=repr)
def test_shipped_tables_have_no_ambiguous_short_names(table: BitNames) -> None:
    assert not table.ambiguous


@pytest.mark.parametrize("table", ALL_TABLES, ids=repr)
def test_every_alias_encodes_to_its_bit(table: BitNames) -> None:
    for name, mask in table.items():
        assert table.encode(name) == mask
        assert table.encode(name.lower()) == mask
    for short in table.short_names():
        assert table.encode(short) in {m for _, m in table}


def test_iteration_and_mask() -> None:
    assert len(vhost.BACKEND_FEATURES) == 8
    assert [n for n, _ in vhost.FEATURES] == ["VHOST_F_LOG_ALL", "VHOST_NET_F_VIRTIO_NET_HDR"]
    assert vhost.FEATURES.mask == (1 << 26) | (1 << 27)
    assert "mrg_rxbuf" in FEATURES and "nope" not in FEATURES


@given(st.integers(min_value=0, max_value=(1 << 80) - 1))
def test_round_trip_features(word: int) -> None:
    assert FEATURES.encode(FEATURES.decode(word)) == word
    assert FEATURES.encode(FEATURES.decode(word, aliases=True)) == word


@given(st.integers(min_value=0, max_value=0xFFFF))
def test_round_trip_masks(word: int) -> None:
    assert IFF.encode(IFF.decode(word)) == word
    assert OFFLOADS.encode(OFFLOADS.decode(word)) == word


@given(st.sets(st.sampled_from([n for n, _ in FEATURES.items()])))
def test_encode_then_decode_gives_canonical_names(names: set[str]) -> None:
    word = FEATURES.encode(names)
    assert set(FEATURES.decode(word)) == {FEATURES.names(m.bit_length() - 1)[0]
                                          for m in (FEATURES.encode([n]) for n in names)}


# -- tables built here: the shipped ones are built at import, before a test could see a change ---


def test_a_table_from_a_mapping_of_bit_numbers() -> None:
    t = BitNames.from_bits({"A_F_X": 0, "A_F_Y": 3}, prefixes=("A_", "A_F_"), what="feature")
    assert t.numbered and t.names(3) == ["A_F_Y"] and t.names(5) == []
    assert t.decode(1 << 5 | 1) == ["A_F_X", "bit5"]
    assert t.encode("x,y") == 0b1001  # the longest prefix comes off first: "X", not "F_X"
    assert t.short_names() == ["x", "y"] and not t.ambiguous
    with pytest.raises(ValueError, match="negative feature word -1"):
        t.decode(-1)
    with pytest.raises(ValidationError) as ei:
        t.encode("x,z")
    assert ei.value.op == "feature names" and "unknown feature 'z'" in str(ei.value)
    assert "valid: x, y" in str(ei.value)


def test_a_table_from_a_mapping_of_masks() -> None:
    t = BitNames.from_masks({"B_ONE": 0x1, "B_FOUR": 0x4}, prefixes=("B_",))
    assert not t.numbered and t.names(4) == ["B_FOUR"] and t.names(2) == []
    assert t.decode(0x8 | 0x1) == ["B_ONE", "0x8"]
    assert t.encode(["one", "", "four"]) == 0x5  # an empty name is skipped, not the end
    assert t.encode("bit0|0x4") == 0x5  # decode's renderings of single bits
    assert t.encode("0x1") == 0x1 and t.names(2, numbered=True) == ["B_FOUR"]
    with pytest.raises(ValidationError, match="unknown flag '0x3'"):
        t.encode("0x3")
    with pytest.raises(ValidationError, match="not a name: 4") as ei:
        t.encode(["one", 4])
    assert ei.value.op == "flag names"


def test_table_construction_edges() -> None:
    with pytest.raises(ValueError, match="A: 0x0 is not a single bit"):
        BitNames.from_masks({"A": 0})
    with pytest.raises(ValueError, match="a given two different bits"):
        BitNames.from_masks([("A", 1), ("a", 2)])
    t = BitNames.from_masks([("A", 1), ("A", 1), ("C_", 2)], prefixes=("C_",))
    assert t.names(1) == ["A"]  # a repeated name is kept once
    assert t.encode("c_") == 2  # a name that is only the prefix keeps it
