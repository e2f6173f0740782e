"""``vhostctl selftest`` on the real kernel, in-process, checked through its JSON."""

from __future__ import annotations

import json

import pytest

from tests.kernel.conftest import ip


def taps_now() -> set[str]:
    return {x["ifname"] for x in json.loads(ip("-j", "link", "show"))}


@pytest.mark.parametrize("args", [
    ["--queues", "2", "--frames", "40"],
    ["--mtu", "9000", "--size", "60,1514,9014", "--frames", "12", "--ring-size", "128"],
    ["--hdr-mode", "vhost", "--no-event-idx", "--frames", "24"],
], ids=["2q", "jumbo", "vhost-hdr"])
def test_selftest_verifies_every_frame(cli, ifname, no_fd_leak, args):
    before = taps_now()
    r = cli("selftest", "--json", "--tap", ifname, *args)
    assert r.code == 0, r
    rep = r.json()
    assert rep["ok"] is True and rep["problems"] == []
    assert rep["tap"] == ifname
    frames = rep["frames_per_queue"]
    for q in rep["queues"]:
        assert q["tx_frames"] == q["tx_verified"] == frames
    assert sum(q["rx_verified"] for q in rep["queues"]) == frames * len(rep["queues"])
    assert "VIRTIO_F_VERSION_1" in rep["features"]
    assert taps_now() == before, "selftest must leave no tap behind"


def test_selftest_table_output(cli, ifname):
    r = cli("selftest", "--tap", ifname, "--frames", "8")
    assert r.code == 0, r
    assert "every frame crossed vhost-net intact" in r.stdout


@pytest.mark.parametrize("args, code, words", [
    (["--ring-size", "300"], 2, "power of two"),
    (["--queues", "0"], 2, "queues"),
    (["--size", "20"], 2, "frame size 20"),
    (["--mtu", "9000", "--size", "9100"], 2, "frame size 9100"),
    (["--hdr-mode", "nope"], 2, "hdr_mode"),
    (["--tap", "bad/name"], 2, "bad/name"),
])
def test_selftest_bad_input(cli, no_fd_leak, args, code, words):
    before = taps_now()
    r = cli("selftest", *args)
    assert r.code == code, r
    assert words in r.stderr and r.stderr.startswith("vhostctl: ")
    assert "Traceback" not in r.stderr
    assert taps_now() == before
