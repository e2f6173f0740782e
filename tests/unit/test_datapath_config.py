"""Datapath configuration: what is negotiated and validated before any syscall."""

from __future__ import annotations

import pytest

from vhostctl._uapi.virtio_net import FEATURES
from vhostctl.datapath import DatapathConfig
from vhostctl.errors import ValidationError


def names(cfg: DatapathConfig) -> set[str]:
    return {n for joined in FEATURES.decode(cfg.features, aliases=True) for n in joined.split("/")}


def test_default_acks_version_1_mrg_event_idx_with_12_byte_header():
    cfg = DatapathConfig()
    assert {"VIRTIO_F_VERSION_1", "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_RING_F_EVENT_IDX"} <= names(cfg)
    assert "VHOST_NET_F_VIRTIO_NET_HDR" not in names(cfg)
    assert cfg.hdr_len == 12
    assert cfg.rx_buffer == 2048


def test_legacy_header_is_10_bytes_and_buffers_hold_a_whole_frame():
    cfg = DatapathConfig(version_1=False, mrg_rxbuf=False)
    assert cfg.hdr_len == 10
    assert cfg.rx_buffer >= 10 + 1500 + 18 and cfg.rx_buffer % 64 == 0


def test_vhost_header_mode_acks_bit_27():
    cfg = DatapathConfig(hdr_mode="vhost")
    assert cfg.features >> 27 & 1
    assert "VHOST_NET_F_VIRTIO_NET_HDR" in names(cfg)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(queues=0), "queues"),
        (dict(queues=257), "queues"),
        (dict(ring_size=0), "power of two"),
        (dict(ring_size=300), "power of two"),
        (dict(ring_size=65536), "power of two"),
        (dict(mtu=67), "MTU"),
        (dict(mtu=65522), "MTU"),
        (dict(hdr_mode="both"), "hdr_mode"),
        (dict(mrg_rxbuf=False, rx_buf_size=1024), "MRG_RXBUF"),
        (dict(rx_buf_size=32), "at least 64"),
        (dict(busyloop_usec=-1), "busy-poll"),
    ],
)
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ValidationError, match=match):
        DatapathConfig(**kw).validate()
