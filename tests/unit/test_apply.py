"""``vhostctl apply`` without a kernel: the spec parser's errors (file:line, the key, the
reason), and the plan against fake links (what is compared, what is blocked, what is pruned)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostctl import apply as A
from vhostctl.errors import ValidationError
from vhostctl.netlink import IFF_LOWER_UP, IFF_UP, Link, TunAttrs
from vhostctl.tun import Holder, HolderScan

REPO = Path(__file__).resolve().parents[2]

# (what is wrong, spec text, line the error must name, text the error must contain)
BAD = [
    ("not YAML", "taps:\n  - name: a\n   bad: [\n", 3, "not valid YAML"),
    ("top level a list", "- name: a\n", 1, "expected a mapping"),
    ("empty document", "", 1, "empty"),
    ("unknown top key", "taps: []\nnetworks: []\n", 2, "unknown key 'networks'"),
    ("no taps", "version: 1\n", 1, "missing key 'taps'"),
    ("taps a mapping", "taps:\n  name: a\n", 2, "expected a list"),
    ("unknown tap key", "taps:\n  - name: a\n    colour: red\n", 3, "unknown key 'colour'"),
    ("tap without name", "taps:\n  - queues: 2\n", 2, "missing key 'name'"),
    ("name over IFNAMSIZ", "taps:\n  - name: abcdefghijklmnop\n", 2, "IFNAMSIZ"),
    ("name with a slash", "taps:\n  - name: a/b\n", 2, "'/'"),
    ("duplicate names", "taps:\n  - name: a\n  - name: b\n  - name: a\n", 4,
     "listed twice (first at line 2)"),
    ("repeated key", "taps:\n  - name: a\n    mtu: 1500\n    mtu: 9000\n", 4, "repeated key"),
    ("queues a string", "taps:\n  - name: a\n    queues: four\n", 3, "expected an integer"),
    ("queues a bool", "taps:\n  - name: a\n    queues: true\n", 3, "expected an integer"),
    ("queues too many", "taps:\n  - name: a\n    queues: 257\n", 3, "1..256"),
    ("mtu too small", "taps:\n  - name: a\n    mtu: 40\n", 3, "68..65521"),
    ("mtu inherit without bridge", "taps:\n  - name: a\n    mtu: {inherit: bridge}\n", 3,
     "needs a bridge"),
    ("mtu inherit from what", "taps:\n  - name: a\n    bridge: b\n    mtu: {inherit: x}\n",
     4, "'inherit: bridge'"),
    ("bad MAC", "taps:\n  - name: a\n    mac: 01:02:03:04:05\n", 3, "six hex pairs"),
    ("multicast MAC", "taps:\n  - name: a\n    mac: 01:00:5e:00:00:01\n", 3, "multicast"),
    ("unknown owner", "taps:\n  - name: a\n    owner: no-such-user-x\n", 3, "no such user"),
    ("unknown offload", "taps:\n  - name: a\n    offloads: [csum, warp]\n", 3, "warp"),
    ("offload without csum", "taps:\n  - name: a\n    offloads: tso4\n", 3, "needs csum"),
    ("offloads without vnet_hdr",
     "taps:\n  - name: a\n    vnet_hdr: false\n    offloads: [csum]\n", 4, "vnet header"),
    ("persist false", "taps:\n  - name: a\n    persist: false\n", 3, "persistent"),
    ("vnet_hdr a string", "taps:\n  - name: a\n    vnet_hdr: maybe\n", 3, "true or false"),
    ("txqueuelen negative", "taps:\n  - name: a\n    txqueuelen: -1\n", 3, "0..2^32-1"),
    ("version 2", "version: 2\ntaps: []\n", 1, "reads version 1"),
    ("bad id", "id: 'a b'\ntaps: []\n", 1, "letters, digits"),
    ("tap named like a bridge", "bridges:\n  - name: br\n    managed: true\ntaps:\n"
     "  - name: br\n", 5, "also a bridge of this spec (line 2)"),
    ("mtu of an unmanaged bridge", "bridges:\n  - name: br\n    mtu: 9000\ntaps: []\n", 3,
     "managed"),
    ("bridge listed twice", "bridges:\n  - name: br\n  - name: br\ntaps: []\n", 3,
     "listed twice"),
    ("tap its own bridge", "taps:\n  - name: a\n    bridge: a\n", 3, "its own bridge"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_spec_names_the_line_and_reason(case):
    _, text, line, needle = case
    with pytest.raises(ValidationError) as e:
        A.load_spec(text, "s.yaml")
    msg = str(e.value)
    assert msg.startswith(f"s.yaml:{line}: "), msg
    assert needle in msg, msg
    assert e.value.code == 2


def test_good_spec_resolves_everything():
    s = A.load_spec("id: lab\nbridges:\n  - name: br0\n    managed: true\n    mtu: 9000\n"
                    "taps:\n  - name: t0\n    queues: 4\n    owner: 0\n    group: root\n"
                    "    mtu: {inherit: bridge}\n    bridge: br0\n    txqueuelen: 10\n"
                    "    offloads: csum,tso4\n  - name: t1\n    mac: FE:00:00:00:00:01\n")
    assert s.mark == "vhostctl-apply:lab"
    t0, t1 = s.taps
    assert (t0.spec.queues, t0.spec.owner, t0.spec.group, t0.spec.bridge) == (4, 0, 0, "br0")
    assert (t0.mtu_from_bridge, t0.txqlen, t0.spec.offloads, t0.line) == (True, 10, 3, 7)
    assert t1.spec.mac == "fe:00:00:00:00:01" and t1.spec.owner is not None
    assert s.bridges[0].mtu == 9000 and s.bridges[0].managed


def test_the_shipped_example_is_valid():
    s = A.read_spec(str(REPO / "examples" / "taps.yaml"))
    assert s.taps


# -- the plan against fake links -------------------------------------------------------------


def tap(name, *, vnet_hdr=True, mq=False, owner=0, mtu=1500, master=None, up=True,
        alias=None, carrier=False, txqlen=1000):
    flags = (IFF_UP if up else 0) | (IFF_LOWER_UP if carrier else 0)
    return Link(name, 10, flags, mtu, "fe:00:00:00:00:01", "down", kind="tun", master=master,
                tun=TunAttrs(type="tap", pi=False, vnet_hdr=vnet_hdr, persist=True,
                             multi_queue=mq, owner=owner), txqlen=txqlen, alias=alias)


def bridge(name, mtu=1500):
    return Link(name, 5, IFF_UP, mtu, "02:00:00:00:00:01", "up", kind="bridge")


class FakeNl:
    def __init__(self, *links):
        self._links = list(links)

    def links(self):
        return self._links


def plan(text, *links, holders=None, prune=False, monkeypatch=None):
    monkeypatch.setattr(A, "scan_holders", lambda proc: HolderScan(holders or {}))
    return A.make_plan(A.load_spec(text, "s.yaml"), FakeNl(*links), prune=prune)


def test_identical_tap_needs_nothing(monkeypatch):
    p = plan("taps:\n  - name: a\n    owner: 0\n", tap("a"), monkeypatch=monkeypatch)
    assert [(i.name, i.action, i.changes) for i in p.items] == [("a", "none", [])]
    assert not p.changes


def test_changes_in_place_are_listed_per_attribute(monkeypatch):
    p = plan("taps:\n  - name: a\n    owner: 0\n    mtu: 9000\n    txqueuelen: 5\n",
             tap("a", up=False), monkeypatch=monkeypatch)
    (i,) = p.items
    assert i.action == "update"
    assert {(c.attr, c.before, c.after) for c in i.changes} == {
        ("mtu", 1500, 9000), ("txqueuelen", 1000, 5), ("up", False, True)}


def test_mtu_inherit_follows_the_bridge(monkeypatch):
    p = plan("taps:\n  - name: a\n    owner: 0\n    bridge: br\n    mtu: {inherit: bridge}\n",
             bridge("br", 9000), tap("a", master="br"), monkeypatch=monkeypatch)
    assert [(c.attr, c.after) for c in p.items[0].changes] == [("mtu", 9000)]


def test_fixed_flag_drift_recreates_only_when_free(monkeypatch):
    text = "taps:\n  - name: a\n    owner: 0\n    vnet_hdr: false\n"
    free = plan(text, tap("a"), monkeypatch=monkeypatch)
    assert free.items[0].action == "recreate" and "vnet_hdr" in free.items[0].reason
    from vhostctl.survey import Scanner

    monkeypatch.setattr(Scanner, "qemu_name", lambda self, pid: "web1")
    held = plan(text, tap("a"), holders={"a": [Holder(4242, "qemu-system-x86", 7)]},
                monkeypatch=monkeypatch)
    i = held.items[0]
    assert i.action == "blocked" and "pid 4242 (web1)" in i.reason
    assert held.blocked == [i]


def test_single_queue_tap_with_carrier_counts_as_held(monkeypatch):
    p = plan("taps:\n  - name: a\n    owner: 0\n    queues: 2\n", tap("a", carrier=True),
             monkeypatch=monkeypatch)
    assert p.items[0].action == "blocked" and "vhost backend" in p.items[0].reason


def test_prune_takes_only_taps_with_this_specs_mark(monkeypatch):
    links = [tap("a"), tap("old", alias="vhostctl-apply:default"),
             tap("other", alias="vhostctl-apply:lab"), tap("hand", alias=None),
             bridge("br")]
    p = plan("taps:\n  - name: a\n    owner: 0\n", *links, prune=True,
             monkeypatch=monkeypatch)
    assert [(i.name, i.action) for i in p.items] == [("a", "none"), ("old", "delete")]
    no = plan("taps:\n  - name: a\n    owner: 0\n", *links, monkeypatch=monkeypatch)
    assert [i.name for i in no.items] == ["a"]


@pytest.mark.parametrize("links,needle", [
    ((bridge("x"),), "'x' exists and is a bridge link, not a tap"),
    ((tap("br"),), "'br' is a tun link, not a bridge"),
    ((), "bridge 'br' does not exist"),
])
def test_plan_refuses_what_the_kernel_contradicts_with_the_line(links, needle, monkeypatch):
    text = "taps:\n  - name: ok\n  - name: x\n" if needle.startswith("'x'") else \
        "taps:\n  - name: ok\n  - name: t\n    bridge: br\n"
    with pytest.raises(ValidationError) as e:
        plan(text, *links, monkeypatch=monkeypatch)
    assert str(e.value).startswith("s.yaml:3: ") and needle in str(e.value), str(e.value)
