"""Property-based fuzzing of every parser that reads what other programs or the kernel wrote,
and of the split ring against a hostile device.

The rule under test: hostile or garbled input gives a clean :class:`VhostctlError` (or, for
the pure survey parsers, their documented ValueError / a skip), never another exception,
never corrupted state, never an unbounded wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.vclock import VirtualClock
from vhostctl import hostcheck, netlink, qmp, survey, taps, tun
from vhostctl._uapi import if_tun as T
from vhostctl.errors import IntegrityError, ValidationError, VhostctlError
from vhostctl.qemu_cmdline import parse_argv, parse_opts, split_opts
from vhostctl.qmp import QmpClient
from vhostctl.vring import RingFull, RingLayout, SplitVring

NODEADLINE = settings(deadline=None)  # a loaded CI host makes single examples slow
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\0")
TEXT = st.text(CHARS, max_size=200)
LINES = st.lists(st.one_of(TEXT, st.sampled_from([
    "iff:\tvm0", "iff:", "iff:\t", "iff: a b", "Uid:\t0\t0\t0\t0", "Tgid:\t7", "CapEff:\tzz",
    "CapEff:\t0000003fffffffff", "flags:\t02", "c 10:238 rwm", "a *:* rwm", "c *:200 r"])),
    max_size=12).map("\n".join)


# -- names, addresses, lists: validation never lets anything else escape --------------------

@NODEADLINE
@given(st.text(max_size=40))
def test_validate_ifname_accepts_only_what_the_kernel_keeps_verbatim(name):
    try:
        out = tun.validate_ifname(name)
    except ValidationError:
        return
    raw = out.encode()
    assert out == name and 1 <= len(raw) <= T.IFNAMSIZ - 1 and out.isascii()
    assert out not in (".", "..") and not out.startswith("-")
    assert not any(c in out for c in "/:% \t\n\r\v\f;$`|&<>'\"\\*?()[]{}!#~")


@NODEADLINE
@given(st.text(max_size=40), st.booleans())
def test_template_names_have_at_most_one_percent_d(name, template):
    try:
        tun.validate_ifname(name, template=template)
    except ValidationError:
        return
    assert name.count("%") == (1 if "%d" in name and template else 0)


@NODEADLINE
@given(st.text(max_size=30))
def test_validate_mac_normalises_or_refuses(mac):
    try:
        out = netlink.validate_mac(mac)
    except ValidationError:
        return
    octets = bytes.fromhex(out.replace(":", ""))
    assert len(octets) == 6 and not octets[0] & 1 and any(octets) and out == mac.lower()


@NODEADLINE
@given(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=12), max_size=5)),
       st.booleans())
def test_offload_lists_are_known_bits_or_refused(text, vnet_hdr):
    try:
        value = taps.parse_offloads(text, vnet_hdr=vnet_hdr)
    except ValidationError:
        return
    assert value >= 0 and not value & ~T.OFFLOADS.mask
    assert vnet_hdr or value == 0


@NODEADLINE
@given(st.one_of(st.text(max_size=20), st.integers(-5, 2**33)))
def test_users_and_groups_resolve_or_are_refused(who):
    for resolve in (taps.resolve_user, taps.resolve_group):
        try:
            got = resolve(who)
        except ValidationError:
            continue
        assert 0 <= got < 2**32 - 1


@NODEADLINE
@given(st.text(max_size=30))
def test_netns_names_never_escape_the_run_directory(name):
    try:
        netlink.validate_netns(name, run_dir="/nonexistent-run-dir")
    except ValidationError as e:
        assert e.code == 2
        return
    raise AssertionError("nothing exists in a missing run directory")


# -- procfs / sysfs readers over fake trees --------------------------------------------------

def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


FDTARGETS = st.sampled_from(["/dev/net/tun", "/dev/vhost-net", "socket:[17]", "pipe:[3]",
                             "/dev/null", "anon_inode:[eventfd]", "/dev/net/tunnel",
                             "net/tun", "/dev/kvm"])


@FAST
@given(procs=st.dictionaries(
    st.integers(1, 40),
    st.tuples(st.one_of(st.none(), TEXT),  # comm, None: exited while scanned
              st.dictionaries(st.integers(0, 30),
                              st.tuples(FDTARGETS, st.one_of(st.none(), LINES)),
                              max_size=5)),
    max_size=6))
def test_scan_holders_over_garbage(tmp_path_factory, procs):
    root = tmp_path_factory.mktemp("proc")
    for pid, (comm, fds) in procs.items():
        base = root / str(pid)
        (base / "fd").mkdir(parents=True)
        (base / "fdinfo").mkdir()
        if comm is not None:
            (base / "comm").write_text(comm)
        for fd, (target, info) in fds.items():
            os.symlink(target, base / "fd" / str(fd))
            if info is not None:
                (base / "fdinfo" / str(fd)).write_text(info)
    scan = tun.scan_holders(str(root))
    for name, holders in scan.by_name.items():
        assert name and name == name.strip()
        for h in holders:
            comm, fds = procs[h.pid]
            target, info = fds[h.fd]
            assert comm is not None and target.endswith("net/tun")
            assert any(k == "iff" and v.strip() == name
                       for k, _, v in (x.partition(":") for x in info.splitlines()))


@FAST
@given(tun_flags=st.one_of(st.none(), TEXT, st.integers(0, 0xFFFF).map(lambda v: f"0x{v:04x}")),
       owner=st.one_of(st.none(), TEXT, st.sampled_from(["-1", "0", "1000"])),
       group=st.one_of(st.none(), TEXT, st.sampled_from(["-1", "0"])),
       exists=st.booleans(), err=st.sampled_from([16, 22, 1, 5]),
       flags=st.integers(0, 0xFFFF), exclusive=st.booleans())
def test_explain_setiff_over_garbage_sysfs(tmp_path_factory, monkeypatch, tun_flags, owner,
                                           group, exists, err, flags, exclusive):
    root = tmp_path_factory.mktemp("sysnet")
    monkeypatch.setattr(tun, "SYS_NET", str(root))
    monkeypatch.setattr(tun, "scan_holders", lambda proc="/proc": tun.HolderScan({}))
    if exists:
        files = {k: v for k, v in (("tun_flags", tun_flags), ("owner", owner),
                                   ("group", group)) if v is not None}
        (root / "vt0").mkdir()
        for k, v in files.items():
            (root / "vt0" / k).write_text(v)
    hint = tun.explain_setiff("vt0", flags, err, exclusive=exclusive)
    assert isinstance(hint, str)


@FAST
@given(status=LINES, cgroup=LINES, devices=st.one_of(st.none(), LINES),
       params=st.dictionaries(st.sampled_from(["max_mem_regions", "max_iotlb_entries",
                                               "fork_from_owner_default"]), TEXT, max_size=3),
       builtin=LINES,
       release=st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0/"),
                       max_size=30),
       initstate=st.one_of(st.none(), TEXT))
def test_host_report_never_raises_over_garbage(tmp_path_factory, status, cgroup, devices,
                                               params, builtin, release, initstate):
    root = tmp_path_factory.mktemp("host")
    files = {"proc/self/status": status.encode(), "proc/1/cgroup": cgroup.encode(),
             f"lib/modules/{release or 'x'}/modules.builtin": builtin.encode()}
    if devices is not None:
        files["sys/fs/cgroup/devices/devices.list"] = devices.encode()
    for k, v in params.items():
        files[f"sys/module/vhost/parameters/{k}"] = v.encode()
    if initstate is not None:
        files["sys/module/vhost_net/initstate"] = initstate.encode()
    _tree(root, files)
    (root / "dev" / "net").mkdir(parents=True, exist_ok=True)
    paths = hostcheck.HostPaths(dev=str(root / "dev"), proc=str(root / "proc"),
                                sys=str(root / "sys"), root=str(root), release=release or "x")
    report = hostcheck.host_report(paths)
    json.dumps(report.to_dict())
    assert not report.ready  # no devices in the fake tree
    for c in report.checks:
        assert c.ok in (True, False, None) and isinstance(c.detail, str)


@NODEADLINE
@given(LINES, st.integers(0, 300), st.integers(0, 300))
def test_devices_list_parser_never_raises(text, major, minor):
    assert hostcheck.devices_list_allows(text, major, minor) in (True, False)


# -- survey parsers (read-only use of the VM engineer's module) ------------------------------

@NODEADLINE
@given(st.text(max_size=400))
def test_survey_text_parsers_never_raise_unexpectedly(text):
    with contextlib.suppress(ValueError):
        survey.parse_stat(text)
    assert isinstance(survey.parse_fdinfo(text), dict)
    uid, _ = survey.parse_status_ids(text)
    assert uid is None or uid >= 0
    for path, inodes in survey.parse_unix_listeners(text).items():
        assert isinstance(path, str) and all(i >= 0 for i in inodes)
    for e in survey.parse_info_network(text):
        assert {"id", "type", "info"} <= set(e)


@NODEADLINE
@given(st.lists(st.sampled_from(["tap,id=n0,fds=3:4,vhostfds=5:6,vhost=on",
                                 "n0", "tap,,id=x", "{\"type\":\"tap\",\"id\":\"n1\"}",
                                 "{bad json", "-netdev", "-device", "-name", "-nic", "-qmp",
                                 "virtio-net-pci,netdev=n0,mq=on", "guest=vm1,debug-threads=on",
                                 "=", ",", ",,", "id=", "queues=x"]) | st.text(max_size=30),
                max_size=12))
def test_qemu_command_lines_never_raise(argv):
    args = parse_argv(argv)
    for spec in args.netdevs:
        assert isinstance(spec.fds, tuple)


@NODEADLINE
@given(st.text(max_size=80), st.one_of(st.none(), st.just("type")))
def test_qemu_option_lists_never_raise(text, implied):
    assert isinstance(split_opts(text, implied), dict)
    assert isinstance(parse_opts(text, implied), dict)


@FAST
@given(procs=st.dictionaries(
    st.integers(2, 30),
    st.fixed_dictionaries({
        "stat": st.one_of(TEXT, st.builds(
            lambda comm, flags: f"1 ({comm}) S 1 1 1 0 -1 {flags} " + "0 " * 30,
            st.sampled_from(["qemu-system-x86", "vhost-7", "a) (b", ""]),
            st.sampled_from([0, 0x00200000]))),
        "status": LINES,
        "cmdline": st.binary(max_size=80),
        "fds": st.dictionaries(st.integers(0, 20),
                               st.tuples(FDTARGETS, st.one_of(st.none(), LINES)),
                               max_size=4)}),
    max_size=5))
def test_survey_scanner_over_garbage(tmp_path_factory, procs):
    root = tmp_path_factory.mktemp("sproc")
    sys_root = tmp_path_factory.mktemp("ssys")
    for pid, p in procs.items():
        base = root / str(pid)
        for d in ("fd", "fdinfo", "task"):
            (base / d).mkdir(parents=True)
        (base / "stat").write_text(p["stat"])
        (base / "status").write_text(p["status"])
        (base / "cmdline").write_bytes(p["cmdline"])
        for fd, (target, info) in p["fds"].items():
            os.symlink(target, base / "fd" / str(fd))
            if info is not None:
                (base / "fdinfo" / str(fd)).write_text(info)
    result = survey.Scanner(str(root), str(sys_root), clk_tck=100).scan()
    json.dumps(result.as_dict(), default=str)


@FAST
@given(files=st.dictionaries(
    st.sampled_from(["tun_flags", "owner", "group", "mtu", "flags", "operstate", "address",
                     "statistics/rx_packets", "statistics/tx_bytes"]),
    st.one_of(TEXT, st.sampled_from(["0x1002", "-1", "1000", "0x1003", "1500", "up"])),
    max_size=9), name=st.sampled_from(["vt0", "", ".", "..", "a/b"]))
def test_survey_sysfs_reader_over_garbage(tmp_path_factory, files, name):
    root = tmp_path_factory.mktemp("sys")
    if name == "vt0":
        (root / "class" / "net" / "vt0").mkdir(parents=True)
        _tree(root / "class" / "net" / "vt0", {k: v.encode() for k, v in files.items()})
    link = survey.Scanner(str(tmp_path_factory.mktemp("p")), str(root), clk_tck=100) \
        .tap_link(name)
    assert link.visible == (name == "vt0")
    assert link.owner is None or link.owner >= 0
    json.dumps(link.as_dict())


def test_survey_sysfs_reader_survives_a_negative_flag_word(tmp_path):
    _tree(tmp_path / "class" / "net" / "vt0", {"tun_flags": b"-1\n"})
    link = survey.Scanner(str(tmp_path), str(tmp_path), clk_tck=100).tap_link("vt0")
    assert link.visible and link.flags == []


# -- QMP replies: bounded waits, typed errors ---------------------------------------------------

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\r\n'
REPLY = st.one_of(
    st.binary(max_size=120),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                     max_size=3),
                 max_leaves=8).map(lambda o: json.dumps(o).encode() + b"\n"),
    st.sampled_from([b'{"return": {}}\n', b'{"error": {"class": "X", "desc": "y"}}\n',
                     b'{"error": "flat"}\n', b'{"event": "STOP"}\n', b'{"id": "other"}\n',
                     b"(qemu) \n", b"\n\n", b'{"QMP": 1}\n']))


@FAST
@given(greet=st.one_of(st.just(GREETING), REPLY), replies=st.lists(REPLY, max_size=4),
       close=st.booleans())
def test_qmp_client_against_garbage(greet, replies, close):
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(greet + b"".join(replies))
        if close:
            theirs.shutdown(socket.SHUT_WR)
        client = QmpClient(ours, "fuzz", timeout=0.05)
        with pytest.MonkeyPatch.context() as mp:
            clock = VirtualClock().install(mp, qmp)
            try:
                client._greet()
                client.execute("query-status")
            except VhostctlError:
                pass
        # Two waits (greeting, reply), each bounded by the timeout, in virtual seconds.
        assert clock.now - 1000.0 <= 2 * 0.05 + 1e-9, "a QMP wait was not bounded"
    finally:
        ours.close()
        theirs.close()


# -- the ring against a hostile device ----------------------------------------------------------

def _put_used(buf: bytearray, lay: RingLayout, idx: int, entry: tuple[int, int]) -> None:
    struct.pack_into("<II", buf, lay.used + 4 + 8 * (idx % lay.num), *entry)


def _set_used_idx(buf: bytearray, lay: RingLayout, idx: int) -> None:
    struct.pack_into("<H", buf, lay.used + 2, idx & 0xFFFF)


U32 = st.integers(0, 2**32 - 1)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), num=st.sampled_from([1, 2, 4, 8, 16]), event_idx=st.booleans(),
       base=st.sampled_from([0, 0xFFF0]))
def test_split_ring_survives_a_hostile_device(data, num, event_idx, base):
    """Random adds, publishes, honest and hostile completions (ids and lengths out of range,
    non-heads, duplicates, zero lengths, used->idx jumps), harvests and resets: every call
    returns or raises a VhostctlError; a raising harvest changes nothing; every token comes
    back exactly once with a length within its writable bytes."""
    lay = RingLayout.compute(num, 0, event_idx=True)
    buf = bytearray(lay.end)
    vr = SplitVring(buf, lay, event_idx=event_idx)
    vr.reset(base)
    inflight: dict[int, tuple[int, int, int]] = {}  # head -> (token, descriptors, writable)
    returned: set[int] = set()
    used = base  # the device's used->idx
    tok = 0
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["add", "add", "publish", "good", "hostile", "jump",
                                        "harvest", "harvest", "reset"]))
        free_before, out_before = vr.num_free, vr.outstanding
        if op == "add":
            outs = data.draw(st.lists(st.integers(1, 4096), max_size=3))
            ins = data.draw(st.lists(st.integers(0, 4096), max_size=3))
            try:
                head = vr.add([(0x1000, n) for n in outs], [(0x2000, n) for n in ins], tok)
            except (RingFull, ValidationError):
                assert (vr.num_free, vr.outstanding) == (free_before, out_before)
                continue
            assert 0 not in ins and outs + ins
            inflight[head] = (tok, len(outs) + len(ins), sum(ins))
            tok += 1
        elif op == "publish":
            vr.publish()
        elif op == "good" and inflight:
            head = data.draw(st.sampled_from(sorted(inflight)))
            _put_used(buf, lay, used, (head, data.draw(st.integers(0, inflight[head][2]))))
            used = (used + 1) & 0xFFFF
            _set_used_idx(buf, lay, used)
        elif op == "hostile":
            entry = data.draw(st.one_of(
                st.tuples(st.integers(num, 2**32 - 1), U32),  # id out of range
                st.tuples(st.integers(0, num - 1), U32),  # maybe not a head / len too big
                st.tuples(st.sampled_from(sorted(inflight) or [0]), st.integers(2**20, 2**32 - 1)),
            ))
            _put_used(buf, lay, used, entry)
            used = (used + 1) & 0xFFFF
            _set_used_idx(buf, lay, used)
        elif op == "jump":
            used = data.draw(st.integers(0, 0xFFFF))
            _set_used_idx(buf, lay, used)
        elif op == "harvest":
            limit = data.draw(st.one_of(st.none(), st.integers(-1, num + 2)))
            try:
                got = vr.harvest(limit)
            except IntegrityError as e:
                assert e.errno == 5
                assert (vr.num_free, vr.outstanding) == (free_before, out_before)
                continue
            by_token = {t: (h, d, w) for h, (t, d, w) in inflight.items()}
            for t, ln in got:
                assert t in by_token and t not in returned, (t, returned)
                head, _, writable = by_token.pop(t)
                assert 0 <= ln <= writable
                del inflight[head]
                returned.add(t)
            assert vr.num_free == num - sum(d for _, d, _ in inflight.values())
        elif op == "reset":
            base = data.draw(st.integers(0, 0xFFFF))
            dropped = vr.reset(base)
            assert sorted(dropped) == sorted(t for t, _, _ in inflight.values())
            returned.update(dropped)
            inflight.clear()
            used = base
            assert vr.num_free == num and vr.outstanding == 0
        assert vr.outstanding == len(inflight)
        assert vr.num_free == num - sum(d for _, d, _ in inflight.values())

