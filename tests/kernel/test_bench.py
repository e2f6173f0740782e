"""``vhostctl bench`` on the real kernel, briefly, in-process: frames verified, JSON schema.

No timing assertions: throughput and CPU ratios are checked by scripts/bench, which runs long
enough and alternates with the C driver.  Here only correctness: every frame that was sent was
seen and compared byte for byte, and nothing is left behind.
"""

from __future__ import annotations

import json

import pytest

from tests.kernel.conftest import ip

RUN_KEYS = {"path", "direction", "size", "queues", "seconds", "packets", "bytes", "pps", "gbps",
            "total_packets", "verified", "bad", "foreign", "lost", "sample_drops",
            "cpu_user_us", "cpu_sys_us", "cpu_us", "total_cpu_us", "worker_us", "workers",
            "kicks", "interrupts", "latency"}
REPORT_KEYS = {"kernel", "tap", "features", "config", "zcopytx", "runs", "ratios", "problems",
               "ok"}
SHORT = ["--duration", "0.5", "--warmup", "0"]


def links() -> set[str]:
    return {x["ifname"] for x in json.loads(ip("-j", "link", "show"))}


def bench(cli, *args: str) -> dict:
    before = links()
    r = cli("bench", "--json", *args)
    assert r.code in (0, 1), r
    rep = r.json()
    assert r.code == 0, rep["problems"]
    assert links() == before, "bench must leave no tap behind"
    return rep


def assert_every_frame_verified(run: dict) -> None:
    where = f"{run['path']} {run['direction']} {run['size']}"
    # How many land in the (short) measured window depends on the machine: not asserted.
    assert run["total_packets"] > 0 and run["packets"] <= run["total_packets"], where
    assert run["bad"] == 0 and run["lost"] == 0 and run["sample_drops"] == 0, (where, run)
    assert run["verified"] > 0, where
    if run["direction"] == "rr":  # total_packets: round trips, each verified on its way back
        assert run["verified"] == run["total_packets"], (where, run)
    else:  # RX may also carry the kernel's own IPv6 ND/MLD frames for the fresh tap
        assert run["verified"] == run["total_packets"] - run["foreign"], (where, run)


def test_every_frame_verified_in_all_three_workloads(cli, ifname, no_fd_leak):
    rep = bench(cli, "--tap", ifname, "--size", "64", "--direction", "tx,rx,rr",
                "--verify-every", "1", *SHORT)
    assert set(rep) >= REPORT_KEYS and rep["ok"] is True and rep["problems"] == []
    assert rep["tap"] == ifname and "VIRTIO_RING_F_EVENT_IDX" in rep["features"]
    assert [(r["direction"], r["size"]) for r in rep["runs"]] == [("tx", 64), ("rx", 64),
                                                                    ("rr", 64)]
    for run in rep["runs"]:
        assert set(run) >= RUN_KEYS, RUN_KEYS - set(run)
        assert run["path"] == "vhost" and run["queues"] == 1
        assert_every_frame_verified(run)
        assert run["workers"] == 1 and run["worker_us"] > 0, "the vhost worker was not found"
        assert run["cpu_us"] > 0 and run["kicks"] is not None
    rr = rep["runs"][2]["latency"]
    assert set(rr) == {"count", "p50_us", "p99_us", "p999_us", "min_us", "mean_us", "max_us"}
    assert 0 < rr["min_us"] <= rr["p50_us"] <= rr["p99_us"] <= rr["p999_us"] <= rr["max_us"]
    assert rr["count"] == rep["runs"][2]["packets"]


def test_path_both_runs_the_tap_path_and_prints_ratios(cli, ifname, no_fd_leak):
    rep = bench(cli, "--tap", ifname, "--path", "both", "--size", "128",
                "--direction", "tx,rx,rr", "--verify-every", "1", *SHORT)
    assert [(r["path"], r["direction"]) for r in rep["runs"]] == [
        ("vhost", "tx"), ("vhost", "rx"), ("vhost", "rr"), ("tap", "tx"), ("tap", "rx"),
        ("tap", "rr")]
    for run in rep["runs"]:
        assert_every_frame_verified(run)
    for run in rep["runs"][3:]:
        assert run["worker_us"] is None and run["workers"] == 0 and run["kicks"] is None
    ratios = {(x["direction"], x["size"]): x for x in rep["ratios"]}
    assert set(ratios) == {("tx", 128), ("rx", 128), ("rr", 128)}
    assert ratios["rr", 128]["p50"] > 0  # each path did at least one round trip


@pytest.mark.parametrize("args", [
    ["--queues", "2", "--size", "60,1514", "--direction", "rx,tx", "--batch", "32"],
    ["--mtu", "9000", "--size", "9000", "--ring-size", "64", "--verify-every", "4"],
    ["--no-event-idx", "--busy-poll", "20", "--size", "512", "--ring-size", "128"],
], ids=["2q-sampled", "jumbo", "no-event-idx-busy-poll"])
def test_sampled_verification_and_tuning_options(cli, ifname, no_fd_leak, args):
    rep = bench(cli, "--tap", ifname, *args, *SHORT)
    assert rep["ok"] is True, rep["problems"]
    for run in rep["runs"]:
        assert run["total_packets"] > 0 and run["verified"] > 0
        assert run["bad"] == run["lost"] == 0 and run["verified"] <= run["total_packets"]
    assert rep["config"]["queues"] == rep["runs"][0]["queues"]


def test_table_output_and_svg_plot(cli, ifname, tmp_path):
    svg = tmp_path / "bench.svg"
    r = cli("bench", "--tap", ifname, "--size", "64,256", "--direction", "tx",
            "--path", "both", "--plot", str(svg), "--duration", "0.3", "--warmup", "0")
    assert r.code == 0, r
    assert "vhost-net bench on" in r.stdout and "vhost / tap" in r.stdout
    text = svg.read_text()
    assert text.startswith("<svg") and "vhost tx" in text and "tap tx" in text


@pytest.mark.parametrize("args, words", [
    (["--verify-every", "3"], "verify every 3"),
    (["--size", "20"], "frame size 20"),
    (["--size", "2000"], "frame size 2000"),
    (["--path", "nope"], "path 'nope'"),
    (["--direction", "up"], "direction up"),
    (["--batch", "512"], "batch 512"),
    (["--ring-size", "100"], "power of two"),
    (["--plot", "chart.gif"], ".svg or .png"),
])
def test_bad_input_fails_before_anything_is_set_up(cli, no_fd_leak, args, words):
    before = links()
    r = cli("bench", *args)
    assert r.code == 2, r
    assert words in r.stderr and r.stderr.startswith("vhostctl: ")
    assert links() == before
