"""``vhostctl tap add|del|list|show`` end to end, checked with ``ip`` and ``bridge``."""

from __future__ import annotations

import grp
import json
import os
import subprocess

import pytest

from tests.kernel.conftest import gone, ip, link_exists
from vhostctl import _fd
from vhostctl.tun import Tap


def link_json(name: str) -> dict:
    return json.loads(ip("-d", "-j", "link", "show", name))[0]


def all_links() -> list[tuple[str, str]]:
    return sorted((x["ifname"], x.get("address", "")) for x in json.loads(ip("-j", "link")))


@pytest.fixture
def bridge(ifname):
    br = f"{ifname}b"
    ip("link", "add", br, "type", "bridge")
    ip("link", "set", br, "mtu", "1400")
    try:
        yield br
    finally:
        gone(br)


def test_add_with_every_option_as_ip_and_bridge_see_it(cli, tap_name, bridge, no_fd_leak):
    group = grp.getgrgid(0).gr_name
    r = cli("tap", "add", tap_name, "--queues", "2", "--owner", "nobody", "--group", group,
            "--bridge", bridge, "--mac", "fe:12:34:56:78:9a", "--offload", "csum,tso4,tso6",
            "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["created"] is True and out["tap"]["name"] == tap_name

    info = link_json(tap_name)
    data = info["linkinfo"]["info_data"]
    assert data["type"] == "tap" and data["pi"] is False and data["vnet_hdr"] is True
    assert data["multi_queue"] is True and data["persist"] is True
    assert data["user"] == "nobody" and data["group"] == group
    assert info["mtu"] == 1400, "the tap takes the bridge's MTU"
    assert info["master"] == bridge
    assert info["address"] == "fe:12:34:56:78:9a"
    assert "UP" in info["flags"]
    ports = json.loads(subprocess.run(["bridge", "-j", "link", "show", "dev", tap_name],
                                      check=True, capture_output=True, text=True).stdout)
    assert ports and ports[0]["master"] == bridge
    assert link_json(bridge)["mtu"] == 1400, "enslaving must not change the bridge MTU"

    # what vhostctl reports equals what ip reports
    tap = out["tap"]
    assert (tap["owner_name"], tap["group_name"], tap["mtu"], tap["master"], tap["mac"]) == \
        ("nobody", group, 1400, bridge, "fe:12:34:56:78:9a")
    assert tap["multi_queue"] is True and tap["persist"] is True and tap["up"] is True


def test_add_defaults_random_fe_mac_and_explicit_mtu(cli, tap_name):
    r = cli("tap", "add", tap_name, "--mtu", "9000", "--no-vnet-hdr")
    assert r.code == 0, r.stderr
    info = link_json(tap_name)
    assert info["mtu"] == 9000
    assert info["address"].startswith("fe:")
    d = info["linkinfo"]["info_data"]
    assert d["vnet_hdr"] is False and d["multi_queue"] is False and d["persist"] is True


def test_exist_ok_identical_succeeds_different_lists_differences(cli, tap_name, bridge):
    args = ("tap", "add", tap_name, "--queues", "2", "--owner", "nobody", "--bridge", bridge)
    assert cli(*args).code == 0
    before = link_json(tap_name)

    again = cli(*args, "--exist-ok", "--json")
    assert again.code == 0, again.stderr
    assert again.json()["created"] is False

    other = cli("tap", "add", tap_name, "--owner", "root", "--mtu", "9000", "--exist-ok")
    assert other.code == 1
    err = " ".join(other.stderr.split())
    for needle in ("owner is 65534 (nobody), want 0 (root)", "multi_queue is True, want False",
                   f"master is {bridge}, want none", "mtu is 1400, want 9000"):
        assert needle in err, err

    plain = cli(*args)
    assert plain.code == 1 and "File exists" in plain.stderr
    after = link_json(tap_name)
    assert (after["mtu"], after["address"], after["linkinfo"]) == \
        (before["mtu"], before["address"], before["linkinfo"]), "a refused add changed the tap"


def test_exist_ok_refuses_a_link_of_another_kind(cli, bridge):
    r = cli("tap", "add", bridge, "--exist-ok")
    assert r.code == 1 and "kind is bridge" in r.stderr
    assert link_json(bridge)["linkinfo"]["info_kind"] == "bridge"


def test_del_removes_the_tap(cli, tap_name):
    assert cli("tap", "add", tap_name).code == 0
    r = cli("tap", "del", tap_name, "--json")
    assert r.code == 0, r.stderr
    assert r.json() == {"deleted": tap_name}
    assert not link_exists(tap_name)
    again = cli("tap", "del", tap_name)
    assert again.code == 1 and "no such tap" in again.stderr


def test_del_refuses_other_kinds(cli, bridge):
    r = cli("tap", "del", bridge)
    assert r.code == 2 and "not a tun/tap" in r.stderr
    assert link_exists(bridge)


def test_del_refuses_a_busy_tap_and_names_the_holder(cli, tap_name, no_fd_leak):
    assert cli("tap", "add", tap_name).code == 0
    with Tap.open(tap_name) as held:
        r = cli("tap", "del", tap_name)
        assert r.code == 1
        err = " ".join(r.stderr.split())
        assert "in use" in err and f"pid {os.getpid()}" in err and f"fd {held.fileno()}" in err
        assert link_exists(tap_name)
        shown = cli("tap", "show", tap_name, "--json").json()
        assert shown["queues"] == 1 and shown["holders"][0]["pid"] == os.getpid()
    assert cli("tap", "del", tap_name).code == 0
    assert not link_exists(tap_name)


def test_list_json_shows_the_holder_of_our_fd(cli, tap_name, no_fd_leak):
    with Tap.open(tap_name, multi_queue=True) as q0, Tap.open(tap_name, multi_queue=True) as q1:
        q0.vnet_hdr_sz = 12
        r = cli("tap", "list", "--json")
        assert r.code == 0, r.stderr
        taps = {t["name"]: t for t in r.json()["taps"]}
        t = taps[tap_name]
        assert {(h["pid"], h["fd"]) for h in t["holders"]} == \
            {(os.getpid(), q0.fileno()), (os.getpid(), q1.fileno())}
        assert t["queues"] == 2 and t["disabled_queues"] == 0
        assert t["vnet_hdr_sz"] == 12, "read through pidfd_getfd on a holder's fd"
        assert t["persist"] is False and t["multi_queue"] is True
        assert "IFF_MULTI_QUEUE" in t["flags"] and "IFF_PERSIST" not in t["flags"]

        q1.set_queue_enabled(False)
        t = cli("tap", "show", tap_name, "--json").json()
        assert (t["queues"], t["disabled_queues"]) == (1, 1)

        text = cli("tap", "list")
        assert text.code == 0 and tap_name in text.stdout
        assert f"[{os.getpid()}]:{q0.fileno()}" in text.stdout
    assert not link_exists(tap_name)


def test_list_warns_on_persistent_tap_without_owner_or_group(cli, tap_name):
    # tap add never makes one (it defaults the owner to the invoking user); ip does.
    ip("tuntap", "add", "dev", tap_name, "mode", "tap", "vnet_hdr")
    r = cli("tap", "list")
    assert "neither owner nor group" in r.stderr
    shown = cli("tap", "show", tap_name, "--json").json()
    assert shown["warnings"] and shown["holders"] == [] and shown["vnet_hdr_sz"] is None
    assert cli("tap", "del", tap_name).code == 0
    assert cli("tap", "add", tap_name).code == 0
    owned = cli("tap", "show", tap_name, "--json").json()
    assert owned["owner"] == os.geteuid() and owned["warnings"] == []
    assert "neither owner nor group" not in cli("tap", "list").stderr


@pytest.mark.parametrize("args", [
    ("tap", "add", "x" * 16),
    ("tap", "add", "{name}", "--mac", "fe:00:00:00:00:zz"),
    ("tap", "add", "{name}", "--mac", "01:00:00:00:00:01"),
    ("tap", "add", "{name}", "--offload", "csum,bogus"),
    ("tap", "add", "{name}", "--owner", "no-such-user-here"),
    ("tap", "add", "{name}", "--group", "no-such-group-here"),
    ("tap", "add", "{name}", "--bridge", "no-such-br0"),
])
def test_bad_input_exits_2_and_changes_nothing(cli, tap_name, args):
    before = all_links()
    r = cli(*(a.format(name=tap_name) for a in args))
    assert r.code == 2, r
    assert r.stderr.startswith("vhostctl: ")
    assert all_links() == before


def test_a_failure_at_any_kernel_step_leaves_nothing(cli, ifname, bridge, no_fd_leak):
    """Count the kernel calls of a good add, then fail each one in turn: the tap must vanish
    every time, since persistence is set last and closing the queues removes it."""
    args = ("--queues", "2", "--owner", "nobody", "--group", "root", "--offload", "csum",
            "--bridge", bridge)
    probe = f"{ifname}p"
    try:
        _fd.faults.arm(10**9)
        assert cli("tap", "add", probe, *args).code == 0
        steps = _fd.faults.calls
    finally:
        _fd.faults.disarm()
        gone(probe)
    assert steps >= 8  # open+SETIFF+GETIFF per queue, owner, group, offload, persist
    for n in range(1, steps + 1):
        name = f"{ifname}f"
        try:
            _fd.faults.arm(n)
            r = cli("tap", "add", name, *args)
        finally:
            _fd.faults.disarm()
        try:
            assert r.code == 1, (n, r)
            assert not link_exists(name), f"kernel step {n} failed but {name} was left behind"
        finally:
            gone(name)
    assert link_json(bridge)["mtu"] == 1400


def test_netns_move_brings_the_tap_up_there(cli, tap_name):
    ns = f"{tap_name}n"
    ip("netns", "add", ns)
    try:
        r = cli("tap", "add", tap_name, "--netns", ns, "--owner", "nobody", "--json")
        assert r.code == 0, r.stderr
        assert not link_exists(tap_name)
        inside = json.loads(ip("-n", ns, "-d", "-j", "link", "show", tap_name))[0]
        assert "UP" in inside["flags"]
        assert inside["linkinfo"]["info_data"]["persist"] is True
        assert r.json()["tap"]["owner_name"] == "nobody"

        again = cli("tap", "add", tap_name, "--netns", ns, "--owner", "nobody", "--exist-ok")
        assert again.code == 0, again.stderr
        other = cli("tap", "add", tap_name, "--netns", ns, "--exist-ok")
        assert other.code == 1 and "owner is 65534" in other.stderr
    finally:
        ip("netns", "del", ns)
