"""The QMP client and the hot-plug sequence against a fake QMP server on a unix socket."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.vclock import VirtualClock
from vhostctl import hotplug as hp
from vhostctl import qmp
from vhostctl.errors import SyscallError, ValidationError, VhostctlError, WaitTimeout
from vhostctl.qmp import QmpClient, QmpCommandError, QmpError

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}},
                    "capabilities": ["oob"]}}
Reply = dict[str, Any] | list[dict[str, Any]] | str | None


class FakeQemu:
    """Accepts one client; answers each command through ``handler(cmd, args, fds)``.

    The handler returns a reply (``{"return": ...}``/``{"error": ...}``), a list of messages
    (events and then the reply), None (never answer) or "hangup" (close the connection).
    Received fds are recorded as the (st_dev, st_ino) they refer to, then closed.
    """

    def __init__(self, path: Path, handler: Callable[[str, dict, list], Reply] | None = None,
                 greeting: bytes | None = None) -> None:
        self.path = str(path)
        self.handler = handler or (lambda c, a, f: {"return": {}})
        self.greeting = json.dumps(GREETING).encode() + b"\r\n" if greeting is None \
            else greeting
        self.seen: list[tuple[str, dict, list]] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(1)
        # Before the thread starts: a test on a virtual clock can end, and close the socket,
        # before the thread first runs; then only accept() sees the closed socket, and says so.
        self.srv.settimeout(10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            if self.greeting:
                conn.sendall(self.greeting)
            buf = b""
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(conn, 65536, 8)
                except OSError:
                    return
                if not data:
                    return
                ids = []
                for fd in fds:
                    st_ = os.fstat(fd)
                    ids.append((st_.st_dev, st_.st_ino))
                    os.close(fd)
                buf += data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    msg = json.loads(line)
                    cmd, args = msg["execute"], msg.get("arguments", {})
                    self.seen.append((cmd, args, ids))
                    ids = []
                    reply = {"return": {}} if cmd == "qmp_capabilities" else \
                        self.handler(cmd, args, self.seen[-1][2])
                    if reply == "hangup":
                        return
                    if reply is None:
                        continue
                    for m in reply if isinstance(reply, list) else [reply]:
                        if "event" not in m:
                            m = {**m, "id": msg.get("id")}
                        conn.sendall(json.dumps(m).encode() + b"\r\n")

    def commands(self) -> list[str]:
        return [c for c, _, _ in self.seen]

    def close(self) -> None:
        self.srv.close()
        self.thread.join(5)


@pytest.fixture
def sockpath(tmp_path: Path):
    # sun_path is 108 bytes: tmp_path can be longer, so use a short directory.
    import tempfile

    d = tempfile.mkdtemp(prefix="vq")
    yield Path(d) / "qmp.sock"
    for f in Path(d).iterdir():
        f.unlink()
    os.rmdir(d)


@pytest.fixture
def fake(sockpath):
    servers = []

    def make(handler=None, greeting=None) -> FakeQemu:
        s = FakeQemu(sockpath, handler, greeting)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


# -- connection ------------------------------------------------------------------------------

def test_greeting_then_capabilities(fake, sockpath):
    srv = fake()
    with QmpClient.connect(str(sockpath)) as c:
        assert c.greeting["version"]["qemu"]["major"] == 7
        assert c.execute("query-status") == {}
    assert srv.commands() == ["qmp_capabilities", "query-status"]


def test_absent_path(tmp_path):
    with pytest.raises(VhostctlError) as ei:
        QmpClient.connect(str(tmp_path / "nope.sock"))
    assert ei.value.errno == errno.ENOENT and "-qmp unix:" in str(ei.value)


def test_not_a_socket(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValidationError) as ei:
        QmpClient.connect(str(f))
    assert "not a unix socket" in str(ei.value) and ei.value.code == 2


def test_stale_socket_is_refused(sockpath):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sockpath))
    s.close()  # the file stays, nobody listens
    with pytest.raises(SyscallError) as ei:
        QmpClient.connect(str(sockpath))
    assert ei.value.errno == errno.ECONNREFUSED and "QEMU exited" in str(ei.value)


def test_human_monitor_is_named(fake, sockpath):
    fake(greeting=b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
    with pytest.raises(QmpError) as ei:
        QmpClient.connect(str(sockpath))
    assert "not a QMP monitor" in str(ei.value) and "HMP" in str(ei.value)


def test_json_that_is_not_a_greeting(fake, sockpath):
    fake(greeting=b'{"hello": 1}\n')
    with pytest.raises(QmpError, match="not a QMP monitor"):
        QmpClient.connect(str(sockpath))


def test_silent_server_times_out_with_a_reason(fake, sockpath, monkeypatch):
    fake(greeting=b"")
    clock = VirtualClock().install(monkeypatch, qmp)
    t0 = clock.now
    with pytest.raises(QmpError, match="one client at a time"):
        QmpClient.connect(str(sockpath), timeout=0.3)
    assert clock.now - t0 == pytest.approx(0.3)  # waited its timeout, in virtual seconds


def test_bad_timeout_is_refused(sockpath):
    with pytest.raises(ValidationError):
        QmpClient.connect(str(sockpath), timeout=0)


# -- commands --------------------------------------------------------------------------------

def test_error_reply_is_typed(fake, sockpath):
    fake(lambda c, a, f: {"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}})
    with QmpClient.connect(str(sockpath)) as c, pytest.raises(QmpCommandError) as ei:
        c.execute("device_del", {"id": "x"})
    e = ei.value
    assert (e.error_class, e.desc, e.command) == ("DeviceNotFound", "Device 'x' not found",
                                                  "device_del")
    assert str(e) == "QMP device_del: DeviceNotFound: Device 'x' not found" and e.code == 1


def test_events_before_the_reply_are_kept(fake, sockpath):
    ev = {"event": "DEVICE_DELETED", "data": {"device": "d0", "path": "/x"},
          "timestamp": {"seconds": 0, "microseconds": 0}}
    fake(lambda c, a, f: [ev, {"return": 5}])
    with QmpClient.connect(str(sockpath)) as c:
        assert c.execute("anything") == 5
        assert c.wait_event("DEVICE_DELETED", device="d0")["data"]["path"] == "/x"
        with pytest.raises(WaitTimeout):
            c.wait_event("DEVICE_DELETED", 0.2, device="d0")


def test_getfd_carries_the_fd(fake, sockpath):
    srv = fake()
    r, w = os.pipe()
    try:
        with QmpClient.connect(str(sockpath)) as c:
            c.execute("getfd", {"fdname": "a"}, fds=[r])
            c.execute("query-status")
        st_ = os.fstat(r)
    finally:
        os.close(r)
        os.close(w)
    (_cmd, args, ids), = [s for s in srv.seen if s[0] == "getfd"]
    assert args == {"fdname": "a"} and ids == [(st_.st_dev, st_.st_ino)]
    assert [s[2] for s in srv.seen if s[0] == "query-status"] == [[]]


def test_command_timeout_is_bounded(fake, sockpath, monkeypatch):
    fake(lambda c, a, f: None)
    with QmpClient.connect(str(sockpath), timeout=0.3) as c:
        clock = VirtualClock().install(monkeypatch, qmp)
        t0 = clock.now
        with pytest.raises(WaitTimeout, match="no answer"):
            c.execute("query-status")
        assert clock.now - t0 == pytest.approx(0.3)


def test_server_hangs_up(fake, sockpath):
    fake(lambda c, a, f: "hangup")
    with QmpClient.connect(str(sockpath)) as c, pytest.raises(QmpError, match="closed"):
        c.execute("quit")


# -- hot-plug sequence and its undo ----------------------------------------------------------

def qemu_like(fail: str | None = None, *, nth_getfd_fails: int | None = None,
              listed: bool = True, release: bool = True):
    """A handler that behaves like QEMU for the hot-plug commands."""
    count = {"getfd": 0}

    def handle(cmd, args, fds):
        if cmd == "getfd":
            count["getfd"] += 1
            if count["getfd"] == nth_getfd_fails or not fds:
                return {"error": {"class": "GenericError", "desc": "No file descriptor "
                                  "supplied via SCM_RIGHTS"}}
        if cmd == fail:
            return {"error": {"class": "GenericError", "desc": f"{cmd} refused"}}
        if cmd == "human-monitor-command":
            text = ("hp0: index=0,type=nic,model=virtio-net-pci\r\n"
                    " \\ hp0: index=0,type=tap,fd=30\r\n") if listed else ""
            return {"return": text}
        if cmd == "device_del":
            return [{"return": {}}] + ([{"event": "DEVICE_DELETED",
                                         "data": {"device": args["id"]}}] if release else [])
        return {"return": {}}

    return handle


def result(queues: int = 2) -> hp.HotplugResult:
    return hp.HotplugResult(id="hp0", tap="t0", created=False, queues=queues,
                            device="virtio-net-pci", bus="rp1", mac=None)


@pytest.fixture
def pipes():
    made = [os.pipe() for _ in range(2)]
    yield [r for r, _ in made], [w for _, w in made]
    for r, w in made:
        os.close(r)
        os.close(w)


def test_plug_sequence(fake, sockpath, pipes):
    srv = fake(qemu_like())
    taps, vhosts = pipes
    with QmpClient.connect(str(sockpath)) as c:
        hp._plug(c, r := result(), taps, vhosts)
    assert srv.commands() == ["qmp_capabilities", "getfd", "getfd", "getfd", "getfd",
                              "netdev_add", "device_add", "human-monitor-command"]
    assert all(len(ids) == 1 for cmd, _, ids in srv.seen if cmd == "getfd")
    netdev = next(a for c_, a, _ in srv.seen if c_ == "netdev_add")
    assert netdev == {"type": "tap", "id": "hp0", "fds": "hp0-tap0:hp0-tap1",
                      "vhostfds": "hp0-vhost0:hp0-vhost1", "vhost": True}
    dev = next(a for c_, a, _ in srv.seen if c_ == "device_add")
    assert dev == {"driver": "virtio-net-pci", "id": "hp0", "netdev": "hp0", "bus": "rp1",
                   "mq": True, "vectors": 6}
    assert r.fdnames == {"tap": ["hp0-tap0", "hp0-tap1"], "vhost": ["hp0-vhost0", "hp0-vhost1"]}


def test_device_add_failure_removes_the_netdev(fake, sockpath, pipes):
    srv = fake(qemu_like("device_add"))
    with QmpClient.connect(str(sockpath)) as c, pytest.raises(QmpCommandError):
        hp._plug(c, result(), *pipes)
    assert srv.commands()[-2:] == ["device_add", "netdev_del"]
    assert "closefd" not in srv.commands()  # the netdev consumed the named fds


def test_netdev_add_failure_closes_every_named_fd(fake, sockpath, pipes):
    srv = fake(qemu_like("netdev_add"))
    with QmpClient.connect(str(sockpath)) as c, pytest.raises(QmpCommandError):
        hp._plug(c, result(), *pipes)
    closed = [a["fdname"] for c_, a, _ in srv.seen if c_ == "closefd"]
    assert closed == ["hp0-vhost1", "hp0-vhost0", "hp0-tap1", "hp0-tap0"]
    assert "netdev_del" not in srv.commands()


def test_getfd_failure_closes_the_earlier_ones(fake, sockpath, pipes):
    srv = fake(qemu_like(nth_getfd_fails=3))
    with QmpClient.connect(str(sockpath)) as c, pytest.raises(QmpCommandError):
        hp._plug(c, result(), *pipes)
    assert [a["fdname"] for c_, a, _ in srv.seen if c_ == "closefd"] == ["hp0-tap1", "hp0-tap0"]


def test_unverified_device_is_unplugged_again(fake, sockpath, pipes):
    srv = fake(qemu_like(listed=False))
    with QmpClient.connect(str(sockpath)) as c, pytest.raises(VhostctlError,
                                                               match="does not list it"):
        hp._plug(c, result(), *pipes)
    assert srv.commands()[-3:] == ["human-monitor-command", "device_del", "netdev_del"]


def test_incomplete_undo_is_reported(fake, sockpath, pipes):
    def handler(cmd, args, fds):
        if cmd in ("device_add", "netdev_del"):
            return {"error": {"class": "GenericError", "desc": f"{cmd} refused"}}
        return {"return": {}}

    fake(handler)
    with QmpClient.connect(str(sockpath)) as c, pytest.raises(QmpCommandError) as ei:
        hp._plug(c, result(1), *[p[:1] for p in pipes])
    assert "undo incomplete" in str(ei.value) and "netdev_del" in str(ei.value)


@pytest.mark.parametrize("kw, what", [
    ({"nic_id": "9bad"}, "--id"), ({"device": "e1000"}, "--device"),
    ({"mac": "01:00:00:00:00:01"}, "MAC"), ({"queues": 0}, "--queues"),
    ({"bus": "a b"}, "--bus")])
def test_hotplug_validates_before_connecting(tmp_path, kw, what):
    with pytest.raises(ValidationError) as ei:  # the socket path does not even exist
        hp.hotplug(str(tmp_path / "none.sock"), "t0", **kw)
    assert what in str(ei.value)


def test_device_args_single_queue_and_mac():
    assert hp.device_args("n", "virtio-net-pci", 1, "fe:00:00:00:00:01", None) == \
        {"driver": "virtio-net-pci", "id": "n", "netdev": "n", "mac": "fe:00:00:00:00:01"}


# -- unplug ----------------------------------------------------------------------------------

def test_unplug_waits_for_the_guest_then_deletes_the_netdev(fake, sockpath):
    srv = fake(qemu_like())
    r = hp.unplug(str(sockpath), "hp0")
    assert (r.device_removed, r.netdev_removed) == (True, True)
    assert srv.commands() == ["qmp_capabilities", "device_del", "netdev_del"]


def test_unplug_keeps_the_netdev_when_the_guest_holds_on(fake, sockpath):
    srv = fake(qemu_like(release=False))
    with pytest.raises(WaitTimeout) as ei:
        hp.unplug(str(sockpath), "hp0", unplug_timeout=0.3)
    assert "guest did not release" in str(ei.value)
    assert "netdev_del" not in srv.commands()


def test_unplug_of_a_netdev_only(fake, sockpath):
    def handler(cmd, args, fds):
        if cmd == "device_del":
            return {"error": {"class": "DeviceNotFound", "desc": "Device 'hp0' not found"}}
        return {"return": {}}

    fake(handler)
    r = hp.unplug(str(sockpath), "hp0")
    assert (r.device_removed, r.netdev_removed) == (False, True)


def test_unplug_of_nothing_is_an_error(fake, sockpath):
    fake(lambda c, a, f: {"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}})
    with pytest.raises(VhostctlError, match="no device or netdev"):
        hp.unplug(str(sockpath), "x")


# -- CLI boundary ----------------------------------------------------------------------------

def run_cli(*args: str):
    from typer.testing import CliRunner

    from vhostctl.cli import app, commands

    assert commands
    return CliRunner().invoke(app, list(args))


def test_cli_hotplug_bad_device_exits_2(tmp_path):
    r = run_cli("hotplug", "--qmp", str(tmp_path / "s"), "--tap", "t0", "--device", "e1000")
    assert r.exit_code == 2 and "virtio-net" in r.stderr


def test_cli_unplug_absent_socket_exits_1(tmp_path):
    r = run_cli("unplug", "--qmp", str(tmp_path / "s"), "--id", "hp0")
    assert r.exit_code == 1 and "-qmp unix:" in r.stderr


def test_cli_unplug_json(fake, sockpath):
    fake(qemu_like())
    r = run_cli("unplug", "--qmp", str(sockpath), "--id", "hp0", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"id": "hp0", "device_removed": True, "netdev_removed": True}
