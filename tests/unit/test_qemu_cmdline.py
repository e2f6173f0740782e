"""Example tests for the QEMU command-line reader: each pins one rule of QEMU's own parser
(a mutation probe found that the fuzz tests, which only check that nothing raises, let these
rules go)."""

from __future__ import annotations

import pytest

from vhostctl import qemu_cmdline as qc


def test_double_dash_options_are_read_like_single_dash() -> None:
    """qemu_options.h: QEMU accepts ``--netdev`` for ``-netdev`` (vl.c strips one dash)."""
    one = qc.parse_argv(["qemu", "-netdev", "tap,id=n0,ifname=t0", "-device",
                         "virtio-net-pci,netdev=n0"])
    two = qc.parse_argv(["qemu", "--netdev", "tap,id=n0,ifname=t0", "--device",
                         "virtio-net-pci,netdev=n0"])
    assert one == two
    assert [(n.type, n.id, n.ifname) for n in two.netdevs] == [("tap", "n0", "t0")]
    assert two.device_for("n0") == qc.DeviceSpec("virtio-net-pci", None, "n0")


def test_legacy_net_nic_is_the_guest_half_not_a_backend() -> None:
    args = qc.parse_argv(["qemu", "-net", "nic,model=virtio", "-net", "tap,ifname=t0,vhost=on"])
    assert [(n.type, n.ifname, n.vhost) for n in args.netdevs] == [("tap", "t0", True)]


def test_nic_shorthand_is_a_backend() -> None:
    """``-nic tap,...`` is a backend and its device in one; only ``-net nic`` is not."""
    args = qc.parse_argv(["qemu", "-nic", "tap,id=n1,fd=5"])
    assert [(n.type, n.id, n.fds) for n in args.netdevs] == [("tap", "n1", (5,))]


@pytest.mark.parametrize("word", ["off", "no", "false", "n", "OFF", " No "])
def test_every_false_spelling_turns_vhost_off(word: str) -> None:
    assert qc.as_bool(word) is False
    nd = qc.parse_argv(["qemu", "-netdev", f"tap,id=n0,vhostfd=4,vhost={word}"]).netdevs[0]
    assert nd.vhost is False and nd.vhostfds == (4,)
    assert not nd.vhost_requested  # vhost=off wins over a vhostfd (net_init_tap_one)


@pytest.mark.parametrize("word", ["on", "yes", "true", "y", "ON"])
def test_every_true_spelling_turns_vhost_on(word: str) -> None:
    assert qc.as_bool(word) is True
    assert qc.parse_argv(["qemu", "-netdev", f"tap,vhost={word}"]).netdevs[0].vhost_requested


@pytest.mark.parametrize("value", ["maybe", "", "1", "0", 1, None])
def test_other_booleans_are_unknown(value: object) -> None:
    assert qc.as_bool(value) is None


def test_vhost_not_written_is_none_and_json_booleans_count() -> None:
    nd = qc.parse_argv(["qemu", "-netdev", "tap,id=n0"]).netdevs[0]
    assert nd.vhost is None and not nd.vhost_requested
    js = qc.parse_argv(["qemu", "-netdev", '{"type":"tap","id":"n0","vhost":false,'
                        '"vhostfds":"3:4","fds":"5:6","queues":2}']).netdevs[0]
    assert (js.vhost, js.vhostfds, js.fds, js.queues) == (False, (3, 4), (5, 6), 2)


def test_fds_forms() -> None:
    assert qc.as_fds("3:4") == (3, 4)
    assert qc.as_fds(["3", "4"]) == (3, 4)
    assert qc.as_fds(7) == (7,)
    assert qc.as_fds(-1) == ()
    assert qc.as_fds(True) == ()
    assert qc.as_fds("tapfd0:5") == (5,)  # getfd names are not numbers


def test_an_option_without_its_value_at_the_end_is_skipped() -> None:
    assert qc.parse_argv(["qemu", "-netdev"]).netdevs == []
    assert qc.parse_argv(["qemu", "-m", "512", "-netdev", "user,id=u"]).netdevs[0].id == "u"


def test_chardev_qmp_and_name() -> None:
    args = qc.parse_argv(["qemu", "-name", "guest=vm1,process=qemu-vm1", "-chardev",
                          "socket,id=mon,path=/run/m.sock,server=on,wait=off", "-qmp",
                          "unix:/run/q.sock,server,nowait", "-qmp", "tcp:127.0.0.1:4444"])
    assert (args.name, args.process_name) == ("vm1", "qemu-vm1")
    assert args.chardevs["mon"] == qc.ChardevSpec("socket", "mon", "/run/m.sock", True, None)
    assert args.qmp_paths == ["/run/q.sock"]


def test_fd_zero_is_an_fd() -> None:
    assert qc.as_fds(0) == (0,) and qc.as_fds("0:1") == (0, 1)


def test_legacy_net_name_is_the_id_and_vhostforce_is_read() -> None:
    nd = qc.parse_argv(["qemu", "-net", "tap,name=hub0,vhostforce=on"]).netdevs[0]
    assert (nd.id, nd.vhostforce, nd.vhost) == ("hub0", True, None)
    assert nd.vhost_requested
    assert not qc.parse_argv(["qemu", "-netdev", "tap,id=a"]).netdevs[0].vhostforce


def test_chardev_fd_and_defaults() -> None:
    args = qc.parse_argv(["qemu", "-chardev", "socket,id=c0,fd=7", "-chardev",
                          "socket,id=c1,path=/x"])
    assert args.chardevs["c0"].fd == 7 and args.chardevs["c1"].fd is None
    assert not args.chardevs["c1"].server


def test_device_keeps_its_id_and_an_empty_id_is_none() -> None:
    args = qc.parse_argv(["qemu", "-netdev", "tap,id=n0", "-device",
                          "virtio-net-pci,id=nic0,netdev=n0", "-netdev", "tap,id=n1",
                          "-device", "virtio-net-pci,id=,netdev=n1"])
    assert args.device_for("n0") == qc.DeviceSpec("virtio-net-pci", "nic0", "n0")
    assert args.device_for("n1") == qc.DeviceSpec("virtio-net-pci", None, "n1")


def test_is_qemu_by_the_executables_name_when_comm_is_another() -> None:
    """comm is what the process set (``-name guest,process=vm1``), argv[0] the path run."""
    assert qc.is_qemu("vm1", ["/usr/bin/qemu-system-x86_64", "-m", "64"])
    assert qc.is_qemu("qemu-kvm", [])
    assert not qc.is_qemu("vm1", ["/usr/bin/python3", "qemu.py"])
    assert not qc.is_qemu("bash", [])


@pytest.mark.parametrize(("text", "want"), [
    ("id=n0,script=/etc/a=b", {"id": "n0", "script": "/etc/a=b"}),  # split at the first '='
    (",id=n0,,x", {"id": "n0,x"}),  # an empty part is skipped, the rest still read
    ("no", {"no": "on"}),  # "no" alone is a flag, not "no" + an empty name
    ("nowait", {"wait": "off"}),
    ("noa", {"a": "off"}),  # any name after "no", one letter too
])
def test_split_opts_edges(text: str, want: dict[str, str]) -> None:
    assert qc.split_opts(text) == want


def test_json_options_after_blanks_and_broken_json() -> None:
    assert qc.parse_opts('  {"id": "n0", "vhost": true}') == {"id": "n0", "vhost": True}
    assert qc.parse_opts('{"id": ') == {}


def test_device_and_netdev_keep_every_option_for_doctor() -> None:
    """doctor reads properties the parser has no field for (mq, vectors, host_mtu, poll-us)."""
    args = qc.parse_argv(["qemu", "-smp", "cpus=2,sockets=1", "-netdev",
                          "tap,id=n0,fd=3,poll-us=50", "-device",
                          '{"driver": "virtio-net-pci", "netdev": "n0", "mq": true, '
                          '"vectors": 6, "iommu_platform": "off"}'])
    dev = args.device_for("n0")
    assert dev is not None
    assert (dev.opt("mq"), dev.bool_opt("mq"), dev.int_opt("vectors")) == ("on", True, 6)
    assert dev.bool_opt("iommu_platform") is False and dev.bool_opt("host_mtu") is None
    assert args.netdevs[0].opts["poll-us"] == "50" and args.cpus == 2
    assert qc.parse_argv(["qemu", "-smp", "4"]).cpus == 4
    assert qc.parse_argv(["qemu"]).cpus is None
