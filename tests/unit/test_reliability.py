"""Unit tests of what issue 7 added to the library: no device or privileges needed.

- ``tap add`` takes back a tap it created when a later step (the read-back) fails, and its
  ``--exist-ok`` waits for a concurrent creator to finish (persistence is set last);
- persistent taps always get an owner: the invoking user by default;
- a refused TUNSETIFF is explained from sysfs and procfs (who holds it, which flags differ);
- fds from outside are identified by the kernel before any TUN ioctl;
- ``check`` sees through a user namespace; netlink requests pass the fault injector.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace

import pytest

from vhostctl import _fd, hostcheck, taps, tun
from vhostctl._uapi import if_tun as T
from vhostctl.errors import ValidationError, VhostctlError
from vhostctl.netlink import Link, Netlink, NetlinkError, TunAttrs


def tap_link(name: str = "vt0", persist: bool = True, **kw) -> Link:
    t = TunAttrs(type="tap", pi=False, vnet_hdr=True, persist=persist, multi_queue=False,
                 owner=kw.pop("owner", 0))
    return Link(name=name, ifindex=7, flags=1, mtu=1500, mac="fe:00:00:00:00:01",
                operstate="UP", kind="tun", tun=t, **kw)


class FakeNl:
    """Links by name; ``reads_fail`` makes every lookup fail (the read-back)."""

    def __init__(self, links=(), reads_fail: bool = False) -> None:
        self.links = {x.name: x for x in links}
        self.reads_fail = reads_fail
        self.deleted: list[str] = []
        self.finds = 0

    def find(self, name):
        self.finds += 1
        if self.reads_fail:
            raise NetlinkError(f"RTM_GETLINK {name}", errno.EIO)
        return self.links.get(name)

    def link(self, name):
        found = self.find(name)
        if found is None:
            raise NetlinkError(f"RTM_GETLINK {name}", errno.ENODEV)
        return found

    def wait_udev(self, name):
        return True  # no udevd here

    def delete(self, name):
        self.deleted.append(name)
        self.links.pop(name, None)

    def close(self):
        pass


@pytest.fixture
def created(monkeypatch):
    """taps.create replaced: records that it ran, makes the link appear."""
    made = []

    def create(spec, nl, *, persist, mtu=None, bridge_mac=None):
        made.append(spec.name)
        nl.links[spec.name] = tap_link(spec.name, owner=spec.owner)
        return []

    monkeypatch.setattr(taps, "create", create)
    return made


def test_a_failed_read_back_takes_the_new_tap_away(created):
    nl = FakeNl()
    real_find = nl.find

    def find(name):  # the read-back after create fails
        if created:
            raise NetlinkError(f"RTM_GETLINK {name}", errno.EIO)
        return real_find(name)

    nl.find = find
    with pytest.raises(NetlinkError) as ei:
        taps.add(taps.make_spec("vt0", owner=0), nl=nl)
    assert created == ["vt0"] and nl.deleted == ["vt0"]
    assert ei.value.code == 1


def test_a_tap_that_cannot_be_taken_back_is_named_in_the_error(created):
    nl = FakeNl()

    def find(name):
        if created:
            raise NetlinkError(f"RTM_GETLINK {name}", errno.EIO)
        return None

    def delete(name):
        raise NetlinkError(f"RTM_DELLINK {name}", errno.EPERM)

    nl.find, nl.delete = find, delete
    with pytest.raises(NetlinkError) as ei:
        taps.add(taps.make_spec("vt0", owner=0), nl=nl)
    assert "vt0 was created but could not be removed again" in str(ei.value)
    assert "vhostctl tap del vt0" in str(ei.value)


def test_exist_ok_waits_for_a_concurrent_creator_to_finish(monkeypatch):
    """The first look sees the other creator's tap before it is persistent; add waits,
    then compares the finished tap and accepts it."""
    half = tap_link(persist=False)
    done = tap_link(persist=True)
    seen = iter([half, half, done, done])
    nl = FakeNl()
    nl.find = lambda name: next(seen)

    def busy(spec, nl, *, persist, mtu=None, bridge_mac=None):
        raise taps.IoctlError("TUNSETIFF", errno.EBUSY)

    monkeypatch.setattr(taps, "create", busy)
    monkeypatch.setattr(taps.time, "sleep", lambda s: None)
    monkeypatch.setattr(taps, "scan_holders", lambda proc="/proc": tun.HolderScan({}))
    r = taps.add(taps.make_spec("vt0", owner=0), exist_ok=True, nl=nl)
    assert r.created is False and r.tap.persist is True


def test_exist_ok_gives_up_waiting_at_the_deadline(monkeypatch):
    nl = FakeNl([tap_link(persist=False)])
    monkeypatch.setattr(taps, "create",
                        lambda *a, **k: (_ for _ in ()).throw(taps.IoctlError("TUNSETIFF",
                                                                             errno.EBUSY)))
    monkeypatch.setattr(taps, "SETTLE_SECONDS", 0.0)
    with pytest.raises(VhostctlError) as ei:
        taps.add(taps.make_spec("vt0", owner=0), exist_ok=True, nl=nl)
    assert "persist is False, want True" in str(ei.value)


def test_an_existing_link_of_another_kind_is_named(monkeypatch):
    nl = FakeNl([replace(tap_link(), kind="bridge", tun=None)])
    monkeypatch.setattr(taps, "create",
                        lambda *a, **k: (_ for _ in ()).throw(taps.IoctlError("TUNSETIFF",
                                                                             errno.EBUSY)))
    with pytest.raises(VhostctlError) as ei:
        taps.add(taps.make_spec("vt0", owner=0), nl=nl)
    assert "not a tap (kind is bridge)" in str(ei.value) and "choose another name" in \
        str(ei.value)


def test_a_failed_add_gives_the_bridge_its_address_back(monkeypatch):
    """A bridge with no address of its own took our tap's and kept zeros when the tap went:
    the failure path sets the old address again."""
    bridge = replace(tap_link("br0"), kind="bridge", tun=None, mac="9e:00:00:00:00:01")
    log: list[str] = []

    class Nl(FakeNl):
        def set_mtu(self, name, mtu):
            log.append(f"mtu {name}")

        def set_mac(self, name, mac):
            log.append(f"mac {name} {mac}")
            if name == "br0":
                self.links["br0"] = replace(self.links["br0"], mac=mac)

        def set_master(self, name, master):
            log.append(f"master {name}")
            self.links["br0"] = replace(self.links["br0"], mac="00:00:00:00:00:00")

        def set_up(self, name):
            raise NetlinkError(f"RTM_NEWLINK set up on {name}", errno.EIO)

    class Q:
        def set_owner(self, uid):
            pass

        def close(self):
            log.append("close")

    monkeypatch.setattr(taps.Tap, "open_queues", staticmethod(lambda *a, **k: [Q()]))
    nl = Nl([bridge])
    with pytest.raises(NetlinkError, match="set up"):
        taps.add(taps.make_spec("vt0", owner=0, bridge="br0"), nl=nl)
    assert log[-2:] == ["close", "mac br0 9e:00:00:00:00:01"]
    assert nl.links["br0"].mac == "9e:00:00:00:00:01"


# -- owner by default ---------------------------------------------------------------------------

def test_owner_defaults_to_the_invoking_user(monkeypatch):
    monkeypatch.delenv("SUDO_UID", raising=False)
    assert taps.make_spec("vt0").owner == os.geteuid()
    if os.geteuid() == 0:
        monkeypatch.setenv("SUDO_UID", "1234")
        assert taps.make_spec("vt0").owner == 1234
        monkeypatch.setenv("SUDO_UID", "garbage")
        assert taps.make_spec("vt0").owner == 0
    assert taps.make_spec("vt0", group=5).owner is None  # a group alone restricts too
    assert taps.make_spec("vt0", owner=7).owner == 7


def test_numeric_ids_are_ascii_and_in_range():
    with pytest.raises(ValidationError, match="out of range"):
        taps.resolve_user(2**32 - 1)
    with pytest.raises(ValidationError, match="out of range"):
        taps.resolve_group(-1)
    with pytest.raises(ValidationError, match="no such user"):
        taps.resolve_user("²")  # a digit to str.isdigit(), not to int()
    with pytest.raises(ValidationError, match="no such group"):
        taps.resolve_group("a\0b")


def test_warning_for_an_ownerless_persistent_tap_says_anyone_may_attach():
    link = replace(tap_link(), tun=replace(tap_link().tun, owner=None))
    (w,) = taps.tap_info(link, []).warnings
    assert "any process that can open /dev/net/tun may attach" in w


# -- TUNSETIFF explained ------------------------------------------------------------------------

@pytest.fixture
def sysnet(tmp_path, monkeypatch):
    monkeypatch.setattr(tun, "SYS_NET", str(tmp_path))

    def make(name, **attrs):
        (tmp_path / name).mkdir()
        for k, v in attrs.items():
            (tmp_path / name / k).write_text(v + "\n")

    return make


def test_busy_single_queue_tap_names_its_holder(sysnet, monkeypatch):
    sysnet("vt0", tun_flags="0x1002")
    monkeypatch.setattr(tun, "scan_holders", lambda proc="/proc": tun.HolderScan(
        {"vt0": [tun.Holder(4242, "qemu-system-x86", 31)]}))
    hint = tun.explain_setiff("vt0", T.IFF_TAP, errno.EBUSY)
    assert hint == "vt0 is a single-queue tap and its queue is held by pid 4242 " \
        "(qemu-system-x86) fd 31"
    assert "already exists" in tun.explain_setiff("vt0", T.IFF_TAP, errno.EBUSY,
                                                  exclusive=True)


def test_flag_mismatches_are_named(sysnet):
    sysnet("mq", tun_flags=f"{T.IFF_TAP | T.IFF_NO_PI | T.IFF_MULTI_QUEUE:#x}")
    sysnet("sq", tun_flags=f"{T.IFF_TAP | T.IFF_NO_PI:#x}")
    sysnet("tn", tun_flags=f"{T.IFF_TUN | T.IFF_NO_PI:#x}")
    sysnet("br0")  # a link without tun_flags: not a tun/tap
    assert "is a multi-queue tap" in tun.explain_setiff("mq", T.IFF_TAP, errno.EINVAL)
    assert "single-queue tap: it takes exactly one queue" in tun.explain_setiff(
        "sq", T.IFF_TAP | T.IFF_MULTI_QUEUE, errno.EINVAL)
    assert "is a tun device" in tun.explain_setiff("tn", T.IFF_TAP, errno.EINVAL)
    assert "is not a tun/tap device" in tun.explain_setiff("br0", T.IFF_TAP, errno.EINVAL)


def test_eperm_names_owner_and_group(sysnet):
    sysnet("vt0", tun_flags="0x1002", owner="1000", group="-1")
    assert "match its owner 1000" in tun.explain_setiff("vt0", T.IFF_TAP, errno.EPERM)
    assert "user namespace" in tun.explain_setiff("nope", T.IFF_TAP, errno.EPERM)


def test_adopt_refuses_an_fd_that_is_not_tun(tmp_path):
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    with pytest.raises(ValidationError, match="not a tun/tap queue"):
        tun.Tap.adopt(fd, "vt0")
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


# -- check in a user namespace; netlink through the fault injector -----------------------------

def test_cap_net_admin_in_a_foreign_network_namespace(tmp_path, monkeypatch):
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text("CapEff:\t000001ffffffffff\n")
    paths = hostcheck.HostPaths(proc=str(tmp_path))
    monkeypatch.setattr(hostcheck, "netns_in_scope", lambda proc: False)
    c = hostcheck._cap(paths)
    assert c.ok is False and "user namespace" in c.detail and "unshare -U -n" in c.fix
    monkeypatch.setattr(hostcheck, "netns_in_scope", lambda proc: None)  # unknown: trust CapEff
    assert hostcheck._cap(paths).ok is True


def test_netns_scope_of_this_process_is_known():
    assert hostcheck.netns_in_scope("/proc") in (True, False)
    assert hostcheck.netns_in_scope("/nonexistent") is None


class Ipr:
    def link(self, *a, **kw):
        return []

    def get_links(self):
        return []


def test_netlink_requests_are_kernel_calls_for_the_fault_injector():
    nl = Netlink(Ipr())
    _fd.faults.arm(1)
    try:
        with pytest.raises(NetlinkError) as ei:
            nl.links()
    finally:
        _fd.faults.disarm()
    assert str(ei.value).startswith("RTM_GETLINK dump: Input/output error")
    _fd.faults.arm(1)
    try:
        with pytest.raises(NetlinkError, match="RTM_GETLINK vt0"):
            nl.find("vt0")
    finally:
        _fd.faults.disarm()


def test_inspect_warning_for_an_ownerless_tap_says_anyone_may_attach():
    from vhostctl import survey

    link = survey.TapLink("vt0", visible=True, tun_flags=T.IFF_TAP | T.IFF_PERSIST, up=True)
    nic = survey.Nic(survey.PATH_VHOST_NET, id="n0", tap="vt0", tap_fds=[3], vhost_fds=[4],
                     link=link)
    (w,) = survey.nic_warnings(nic)
    assert "any process that can open /dev/net/tun" in w
