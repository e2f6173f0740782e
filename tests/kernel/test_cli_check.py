"""``vhostctl check`` and ``vhostctl features`` against the real kernel."""

from __future__ import annotations

import os

from vhostctl._uapi.virtio_net import FEATURES
from vhostctl.hostcheck import kernel_version
from vhostctl.vhost import VhostNet


def test_check_json_reports_ready_with_real_devices(cli, no_fd_leak):
    r = cli("check", "--json")
    data = r.json()
    failed = [c for c in data["checks"] if c["ok"] is False]
    assert r.code == 0 and data["ready"] is True, failed
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["vhost-net device"]["data"]["rdev"] == "10:238"
    assert checks["tun device"]["data"]["rdev"] == "10:200"
    names = checks["vhost features"]["data"]["names"]
    assert "VIRTIO_F_VERSION_1" in names and "VIRTIO_NET_F_MRG_RXBUF" in names
    with VhostNet() as dev:
        assert int(checks["vhost features"]["data"]["value"], 16) == dev.get_features()
    assert "IFF_VNET_HDR" in checks["tun features"]["data"]["names"]
    assert checks["CAP_NET_ADMIN"]["ok"] is True
    assert checks["vhost_net module"]["ok"] is True
    assert "max_mem_regions" in checks["module parameters"]["data"]


def test_check_worker_model_matches_the_running_kernel(cli):
    checks = {c["name"]: c for c in cli("check", "--json").json()["checks"]}
    model = checks["vhost workers"]["data"]["model"]
    assert model == ("kthread" if kernel_version(os.uname().release) < (6, 4) else "task")


def test_check_text_one_line_per_check_and_ready(cli):
    r = cli("check")
    assert r.code == 0, r.stdout
    lines = r.stdout.splitlines()
    assert lines[-1] == "ready"
    assert any(line.startswith("✓ vhost-net device") for line in lines)
    assert not any(line.startswith("✗") for line in lines)


def test_features_json_decodes_every_bit_by_name(cli, no_fd_leak):
    r = cli("features", "--json")
    assert r.code == 0, r.stderr
    data = r.json()
    with VhostNet() as dev:
        offered = dev.get_features()
    assert int(data["vhost"]["value"], 16) == offered
    names = data["vhost"]["names"]
    assert "VIRTIO_F_VERSION_1" in names and "VIRTIO_NET_F_MRG_RXBUF" in names
    assert "VIRTIO_F_ANY_LAYOUT/VHOST_NET_F_VIRTIO_NET_HDR" in names
    assert not any(n.startswith("bit") for n in names), names
    assert FEATURES.encode(names) == offered
    assert {"IFF_TAP", "IFF_NO_PI", "IFF_VNET_HDR", "IFF_MULTI_QUEUE"} <= set(data["tun"]["names"])
    assert {o["name"] for o in data["tun_offloads"]} >= {"TUN_F_CSUM", "TUN_F_TSO4"}


def test_features_text(cli):
    r = cli("features")
    assert r.code == 0
    assert "VIRTIO_F_VERSION_1" in r.stdout and "IFF_VNET_HDR" in r.stdout
