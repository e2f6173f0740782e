"""tap list/show name a macvtap or ipvtap by its kind (issue 22): no tun flags, no owner."""

from __future__ import annotations

import pytest

from vhostctl.errors import ValidationError
from vhostctl.netlink import Link
from vhostctl.taps import tap_info


@pytest.mark.parametrize("kind", ["macvtap", "ipvtap"])
def test_a_vtap_is_listed_by_its_kind(kind):
    link = Link(name="mvt0", ifindex=9, flags=0x1003, mtu=1500, mac="52:54:00:00:00:09",
                operstate="UP", kind=kind, stats={"rx_packets": 5, "weird": 1})
    info = tap_info(link, [])
    assert (info.type, info.flags, info.persist, info.queues, info.owner) == \
        (kind, [], None, None, None)
    assert info.stats == {"rx_packets": 5} and info.up is True


def test_other_kinds_are_still_refused():
    with pytest.raises(ValidationError):
        tap_info(Link(name="d0", ifindex=3, flags=0, mtu=1500, mac=None, operstate=None,
                      kind="dummy"), [])
