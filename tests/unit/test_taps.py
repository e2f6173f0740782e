"""Tap composition without a kernel: validation, holder scans over fake /proc, netlink parsing
and error mapping, comparison for --exist-ok, and the create order with its undo."""

from __future__ import annotations

import errno
import os
import re
import threading
from pathlib import Path

import pytest
from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

from vhostctl import taps
from vhostctl._uapi import if_tun as T
from vhostctl.errors import IoctlError, UnsupportedError, ValidationError
from vhostctl.netlink import (
    Link,
    Netlink,
    NetlinkError,
    TunAttrs,
    parse_link,
    validate_mac,
    wait_udev,
)

# -- validation ------------------------------------------------------------------------------


def test_make_spec_resolves_names_up_front():
    s = taps.make_spec("vt0", queues=4, owner="root", group="0", mac="FE:00:00:00:00:01",
                       offloads="csum,tso4,tso6,tso_ecn")
    assert (s.owner, s.group, s.mac, s.multi_queue) == (0, 0, "fe:00:00:00:00:01", True)
    assert s.offloads == T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO6 | T.TUN_F_TSO_ECN
    assert taps.make_spec("vt0", owner=4242).owner == 4242  # numeric ids need no entry


@pytest.mark.parametrize("kw, needle", [
    ({"name": "a" * 16}, "IFNAMSIZ"),
    ({"name": "bad name"}, "use letters"),
    ({"name": "vt%d"}, "'%' is not allowed"),
    ({"queues": 0}, "1..256"),
    ({"queues": 257}, "1..256"),
    ({"mtu": 67}, "68..65521"),
    ({"mtu": 65522}, "68..65521"),
    ({"mac": "fe:00:00:00:00"}, "six hex pairs"),
    ({"mac": "03:00:00:00:00:01"}, "multicast"),
    ({"mac": "00:00:00:00:00:00"}, "all-zero"),
    ({"owner": "no-such-user-here"}, "no such user"),
    ({"group": "no-such-group-here"}, "no such group"),
    ({"owner": 2**32 - 1}, "out of range"),
    ({"bridge": "br0", "netns": "x"}, "exclude each other"),
    ({"bridge": "b" * 16}, "IFNAMSIZ"),
    ({"netns": "../etc"}, "not a namespace name"),
    ({"offloads": "tso4"}, "needs csum"),
    ({"offloads": "csum,tso_ecn"}, "tso_ecn needs tso4 or tso6"),
    ({"offloads": "csum,uso4"}, "only together"),
    ({"offloads": "csum", "vnet_hdr": False}, "need a vnet header"),
    ({"offloads": "csum,nope"}, "unknown tun offload"),
])
def test_make_spec_rejects(kw, needle):
    kw = {"name": "vt0", **kw}
    with pytest.raises(ValidationError) as ei:
        taps.make_spec(**kw)
    assert needle in str(ei.value)
    assert ei.value.code == 2


def test_netns_must_exist(tmp_path):
    from vhostctl.netlink import validate_netns

    with pytest.raises(ValidationError, match="ip netns add blue"):
        validate_netns("blue", str(tmp_path))
    (tmp_path / "blue").write_text("")
    assert validate_netns("blue", str(tmp_path)) == "blue"


def test_random_mac_is_fe_unicast_and_valid():
    macs = {taps.random_mac() for _ in range(50)}
    assert len(macs) > 45
    for m in macs:
        assert re.fullmatch(r"fe(:[0-9a-f]{2}){5}", m)
        assert validate_mac(m) == m


# -- holders over a fake /proc ---------------------------------------------------------------


def fake_proc(root: Path, procs: dict[int, dict]) -> str:
    """procs: pid -> {"comm": str|None, "fds": {fd: (link target, fdinfo text|None)}}."""
    for pid, p in procs.items():
        base = root / str(pid)
        (base / "fd").mkdir(parents=True)
        (base / "fdinfo").mkdir()
        if p.get("comm") is not None:
            (base / "comm").write_text(p["comm"] + "\n")
        for fd, (target, info) in p["fds"].items():
            os.symlink(target, base / "fd" / str(fd))
            if info is not None:
                (base / "fdinfo" / str(fd)).write_text(info)
    (root / "self").mkdir(exist_ok=True)  # non-numeric entries are ignored
    return str(root)


def tun_info(name: str) -> str:
    return f"pos:\t0\nflags:\t02\nmnt_id:\t25\nino:\t1049\niff:\t{name}\n"


def test_scan_holders_finds_tun_fds_by_name(tmp_path):
    proc = fake_proc(tmp_path, {
        100: {"comm": "qemu-system-x86", "fds": {
            0: ("/dev/null", "pos:\t0\n"),
            27: ("/dev/net/tun", tun_info("vm0")),
            28: ("/dev/net/tun", tun_info("vm0")),
            29: ("/dev/net/tun", tun_info("vm1"))}},
        200: {"comm": "sshd", "fds": {3: ("socket:[1234]", "pos:\t0\n")}},
        300: {"comm": "unattached", "fds": {5: ("/dev/net/tun", "pos:\t0\nflags:\t02\n")}},
    })
    scan = taps.scan_holders(proc)
    assert scan.by_name == {
        "vm0": [taps.Holder(100, "qemu-system-x86", 27), taps.Holder(100, "qemu-system-x86", 28)],
        "vm1": [taps.Holder(100, "qemu-system-x86", 29)],
    }
    assert scan.unreadable == 0


def test_scan_holders_survives_vanishing_fds_and_processes(tmp_path):
    proc = fake_proc(tmp_path, {
        100: {"comm": "a", "fds": {3: ("/dev/net/tun", None),  # fd closed before fdinfo read
                                   4: ("/dev/net/tun", tun_info("vm0"))}},
        200: {"comm": None, "fds": {3: ("/dev/net/tun", tun_info("vm0"))}},  # exited
    })
    (tmp_path / "300").mkdir()  # exited between listdir(/proc) and listdir(fd)
    scan = taps.scan_holders(proc)
    assert scan.by_name == {"vm0": [taps.Holder(100, "a", 4)]}


def test_scan_holders_counts_unreadable_processes(tmp_path, monkeypatch):
    proc = fake_proc(tmp_path, {
        100: {"comm": "a", "fds": {4: ("/dev/net/tun", tun_info("vm0"))}},
        200: {"comm": "b", "fds": {4: ("/dev/net/tun", tun_info("vm0"))}},
    })
    real = os.listdir

    def listdir(path):
        if str(path).endswith(os.path.join("200", "fd")):
            raise PermissionError(errno.EACCES, "denied")
        return real(path)

    monkeypatch.setattr(taps.os, "listdir", listdir)
    scan = taps.scan_holders(proc)
    assert scan.by_name == {"vm0": [taps.Holder(100, "a", 4)]}
    assert scan.unreadable == 1


# -- netlink parsing and errors --------------------------------------------------------------


class Msg:
    """Just enough of a pyroute2 nla: get_attr() and item access."""

    def __init__(self, attrs: dict, **fields) -> None:
        self.attrs, self.fields = attrs, fields

    def get_attr(self, name):
        return self.attrs.get(name)

    def __getitem__(self, key):
        return self.fields[key]


def tap_msg(name="vt0", index=7, flags=0x1003, master=None, **tun) -> Msg:
    data = {"IFLA_TUN_TYPE": 2, "IFLA_TUN_PI": 0, "IFLA_TUN_VNET_HDR": 1,
            "IFLA_TUN_PERSIST": 1, "IFLA_TUN_MULTI_QUEUE": 0, "IFLA_TUN_NUM_QUEUES": 0,
            "IFLA_TUN_NUM_DISABLED_QUEUES": 0, **tun}
    attrs = {"IFLA_IFNAME": name, "IFLA_MTU": 1500, "IFLA_ADDRESS": "fe:00:00:00:00:01",
             "IFLA_OPERSTATE": "UP", "IFLA_MIN_MTU": 68, "IFLA_MAX_MTU": 65521,
             "IFLA_STATS64": {"rx_packets": 5, "tx_packets": 6, "rx_bytes": 7},
             "IFLA_LINKINFO": Msg({"IFLA_INFO_KIND": "tun", "IFLA_INFO_DATA": Msg(data)})}
    if master is not None:
        attrs["IFLA_MASTER"] = master
    return Msg(attrs, index=index, flags=flags)


def test_parse_link_reads_tun_attributes():
    link = parse_link(tap_msg(IFLA_TUN_OWNER=1000, IFLA_TUN_MULTI_QUEUE=1,
                              IFLA_TUN_NUM_QUEUES=3, master=4))
    assert (link.name, link.ifindex, link.mtu, link.up, link.kind) == ("vt0", 7, 1500, True, "tun")
    assert link.master_ifindex == 4 and link.max_mtu == 65521
    assert link.stats["tx_packets"] == 6
    assert link.tun == TunAttrs(type="tap", pi=False, vnet_hdr=True, persist=True,
                                multi_queue=True, num_queues=3, num_disabled_queues=0,
                                owner=1000, group=None)
    assert "UP" in link.flag_names


def test_parse_link_of_a_bridge_has_no_tun_attributes():
    msg = Msg({"IFLA_IFNAME": "br0", "IFLA_LINKINFO": Msg({"IFLA_INFO_KIND": "bridge",
                                                           "IFLA_INFO_DATA": Msg({})})},
              index=3, flags=0)
    link = parse_link(msg)
    assert link.is_bridge and link.tun is None and not link.up


class FakeIPRoute:
    def __init__(self, msgs, fail=None):
        self.msgs = {m.get_attr("IFLA_IFNAME"): m for m in msgs}
        self.fail = fail
        self.calls = []
        self.closed = False

    def link(self, cmd, **kw):
        self.calls.append((cmd, kw))
        if cmd == "get":
            if "ifname" in kw:
                if kw["ifname"] not in self.msgs:
                    raise PyNetlinkError(errno.ENODEV)
                return [self.msgs[kw["ifname"]]]
            return [m for m in self.msgs.values() if m["index"] == kw["index"]]
        if self.fail:
            raise PyNetlinkError(self.fail)
        return []

    def get_links(self):
        return list(self.msgs.values())

    def close(self):
        self.closed = True


def test_netlink_error_names_the_step():
    ipr = FakeIPRoute([tap_msg(name="vt1")], fail=errno.EINVAL)
    with Netlink(ipr) as nl, pytest.raises(NetlinkError) as ei:
        nl.set_mtu("vt1", 9000)
    assert str(ei.value).startswith("RTM_NEWLINK set mtu 9000 on vt1: Invalid argument")
    assert ei.value.errno == errno.EINVAL and ei.value.code == 1
    assert not ipr.closed, "an injected IPRoute belongs to the caller"


def test_netlink_eperm_is_exit_3():
    nl = Netlink(FakeIPRoute([tap_msg(name="vt1")], fail=errno.EPERM))
    with pytest.raises(NetlinkError) as ei:
        nl.set_up("vt1")
    assert ei.value.code == 3 and "CAP_NET_ADMIN" in str(ei.value)


def test_netlink_find_and_master_name():
    br = Msg({"IFLA_IFNAME": "br0", "IFLA_LINKINFO": Msg({"IFLA_INFO_KIND": "bridge"})},
             index=4, flags=1)
    nl = Netlink(FakeIPRoute([tap_msg(master=4), br]))
    assert nl.find("nope") is None
    assert nl.link("vt0").master == "br0"
    assert nl.is_bridge("br0") and not nl.is_bridge("vt0")
    assert [x.name for x in nl.tun_links()] == ["vt0"]
    assert nl.tun_links()[0].master == "br0"
    with pytest.raises(NetlinkError, match="No such device"):
        nl.link("nope")


# -- --exist-ok comparison -------------------------------------------------------------------


def existing(**kw) -> Link:
    tun = TunAttrs(type="tap", pi=False, vnet_hdr=True, persist=True, multi_queue=False,
                   num_queues=0, num_disabled_queues=0, owner=kw.pop("owner", None),
                   group=kw.pop("group", None))
    base = {"name": "vt0", "ifindex": 7, "flags": 1, "mtu": 1500, "mac": "fe:00:00:00:00:01",
            "operstate": "UP", "kind": "tun", "tun": tun}
    return Link(**{**base, **kw})


def test_differences_identical_is_empty():
    spec = taps.make_spec("vt0", owner=0, mac="fe:00:00:00:00:01")
    assert taps.differences(spec, existing(owner=0), mtu=1500) == []


def test_differences_lists_each_mismatch():
    spec = taps.make_spec("vt0", queues=2, owner=0, group=0, mac="fe:00:00:00:00:02")
    diff = taps.differences(spec, existing(flags=0, master="br0"), mtu=9000)
    text = "; ".join(diff)
    for needle in ("multi_queue is False, want True", "owner is none, want 0 (root)",
                   "group is none, want 0", "master is br0, want none", "up is False",
                   "mtu is 1500, want 9000", "mac is fe:00:00:00:00:01, want fe:00:00:00:00:02"):
        assert needle in text, text
    assert len(diff) == 7


def test_differences_other_kind():
    spec = taps.make_spec("vt0")
    assert taps.differences(spec, existing(kind="bridge", tun=None), mtu=None) == [
        "kind is bridge, want tun (tap)"]


def test_tap_info_warns_on_persistent_tap_without_owner_or_group():
    info = taps.tap_info(existing(), [])
    assert info.warnings and "neither owner nor group" in info.warnings[0]
    assert "IFF_PERSIST" in info.flags and "IFF_NO_PI" in info.flags
    assert taps.tap_info(existing(owner=1000), []).warnings == []


# -- create: order and undo ------------------------------------------------------------------


class FakeTap:
    def __init__(self, log):
        self.log, self.closed = log, False

    def set_owner(self, uid):
        self.log.append(f"owner {uid}")

    def set_group(self, gid):
        self.log.append(f"group {gid}")

    def set_offload(self, bits):
        self.log.append(f"offload {bits:#x}")
        if self.log_fail == "offload":
            raise IoctlError("TUNSETOFFLOAD", errno.EINVAL)

    def set_persist(self, on):
        self.log.append(f"persist {on}")

    def close(self):
        self.closed = True

    log_fail = ""


class FakeNetlink:
    def __init__(self, log, fail=""):
        self.log, self.fail = log, fail

    def _do(self, what):
        self.log.append(what)
        if what.split()[0] == self.fail:
            raise NetlinkError(f"RTM_NEWLINK {what}", errno.EINVAL)

    def set_mtu(self, name, mtu):
        self._do(f"mtu {mtu}")

    def wait_udev(self, name):
        self._do("udev")

    def set_mac(self, name, mac):
        self._do(f"mac {mac}")

    def set_master(self, name, br):
        self._do(f"master {br}")

    def set_up(self, name):
        self._do("up")


@pytest.fixture
def fake_queues(monkeypatch):
    made: list[FakeTap] = []
    log: list[str] = []

    def open_queues(name, queues, **kw):
        assert kw["exclusive"] is True, "tap add must create with IFF_TUN_EXCL"
        log.append(f"create {name} x{queues}")
        made.extend(FakeTap(log) for _ in range(queues))
        return list(made)

    monkeypatch.setattr(taps.Tap, "open_queues", staticmethod(open_queues))
    return made, log


def test_create_order_persist_last(fake_queues):
    made, log = fake_queues
    spec = taps.make_spec("vt0", queues=2, owner=0, group=0, bridge="br0",
                          mac="fe:00:00:00:00:09", offloads="csum")
    out = taps.create(spec, FakeNetlink(log), persist=True, mtu=1400)
    assert log == ["create vt0 x2", "owner 0", "group 0", "offload 0x1", "mtu 1400", "udev",
                   "mac fe:00:00:00:00:09", "master br0", "up", "persist True"]
    assert out == made and not any(t.closed for t in made)


@pytest.mark.parametrize("step", ["mtu", "mac", "master", "up"])
def test_create_undoes_everything_when_a_step_fails(fake_queues, step):
    made, log = fake_queues
    spec = taps.make_spec("vt0", queues=3, bridge="br0")
    with pytest.raises(NetlinkError):
        taps.create(spec, FakeNetlink(log, fail=step), persist=True, mtu=1500)
    assert all(t.closed for t in made) and len(made) == 3
    assert "persist True" not in log


def test_create_maps_refused_offloads_to_unsupported(fake_queues, monkeypatch):
    made, log = fake_queues
    monkeypatch.setattr(FakeTap, "log_fail", "offload")
    spec = taps.make_spec("vt0", offloads="csum,uso4,uso6")
    with pytest.raises(UnsupportedError) as ei:
        taps.create(spec, FakeNetlink(log), persist=True)
    assert ei.value.code == 4 and "uso4" in str(ei.value)
    assert all(t.closed for t in made)


def test_wait_udev_returns_once_udevd_has_handled_the_link(tmp_path) -> None:
    assert wait_udev(7, timeout=0, run=tmp_path)  # no udevd: nothing to wait for
    (tmp_path / "control").touch()
    (tmp_path / "data").mkdir()
    assert not wait_udev(7, timeout=0.05, run=tmp_path)  # udevd runs, link not handled yet
    timer = threading.Timer(0.05, (tmp_path / "data" / "n7").touch)
    timer.start()
    try:
        assert wait_udev(7, timeout=5, run=tmp_path)
    finally:
        timer.cancel()
    assert not wait_udev(8, timeout=0, run=tmp_path)  # another link's entry does not count
