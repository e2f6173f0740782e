"""``vhostctl export --format networkd`` against a real systemd-networkd: the taps a spec
makes with ``apply`` are deleted, networkd (the host's binary, started in a private mount
namespace with the exported files as its only configuration in /run/systemd/network)
creates them again, and ``apply --check`` then finds every tap and the bridge as the spec
says: nothing to do.  udevd runs in the VM; networkd applies a .network only to links udev
has initialised."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

from tests.kernel.conftest import gone, link_exists, run_cli, udev_settle

NETWORKD = "/lib/systemd/systemd-networkd"
P = f"n{os.getpid() % 10000}"


def test_exported_networkd_files_recreate_the_same_taps():
    assert os.path.exists(NETWORKD), f"{NETWORKD} is needed (Debian: systemd)"
    names = {"br": f"{P}br", "t0": f"{P}t0", "t1": f"{P}t1"}
    tmp = tempfile.mkdtemp(prefix="vhnd", dir="/tmp")
    spec = os.path.join(tmp, "spec.yaml")
    with open(spec, "w") as f:
        f.write(f"id: nd\nbridges:\n  - name: {names['br']}\n    managed: true\n"
                f"    mtu: 9000\ntaps:\n  - name: {names['t0']}\n    queues: 2\n"
                f"    owner: nobody\n    bridge: {names['br']}\n    mtu: {{inherit: bridge}}\n"
                f"  - name: {names['t1']}\n    vnet_hdr: false\n    group: root\n"
                f"    mac: fe:00:00:00:00:11\n")
    conf = os.path.join(tmp, "network")
    os.mkdir(conf)
    nd = None
    try:
        r = run_cli("export", "-f", spec, "--format", "networkd", "-o", conf)
        assert r.code == 0, r
        assert len(os.listdir(conf)) == 6
        # what apply makes is what the spec means; networkd must make the same
        r = run_cli("apply", "-f", spec, "--json")
        assert r.code == 0 and r.json()["changes"], r
        gone(*names.values())
        udev_settle()
        assert not any(link_exists(n) for n in names.values())

        script = (f"mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd && "
                  f"mkdir -p /run/systemd/network "
                  f"/run/systemd/netif && chown systemd-network: /run/systemd/netif && "
                  f"cp {conf}/* /run/systemd/network/ && exec {NETWORKD}")
        log = os.path.join(tmp, "networkd.log")
        with open(log, "w") as out:  # a file, not a pipe nobody reads while it runs
            nd = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                   script], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + 90
        plan = None
        while time.monotonic() < deadline:
            if all(link_exists(n) for n in names.values()):
                r = run_cli("apply", "-f", spec, "--check", "--json")
                plan = r.json() if r.code == 0 else None
                if plan is not None and not plan["changes"]:
                    break
            if nd.poll() is not None:
                break
            time.sleep(1)
        with open(log) as f:
            said = f.read()[-3000:]
        assert nd.poll() is None, f"networkd exited: {said}"
        assert plan is not None and not plan["changes"], (
            f"networkd's taps differ from the spec: {plan}; networkd: {said}")
        assert {i["name"]: i["action"] for i in plan["items"]} == {
            n: "none" for n in names.values()}
    finally:
        if nd is not None and nd.poll() is None:
            os.killpg(nd.pid, signal.SIGTERM)
            try:
                nd.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(nd.pid, signal.SIGKILL)
                nd.wait()
        gone(*names.values())
        udev_settle()
        shutil.rmtree(tmp, ignore_errors=True)
