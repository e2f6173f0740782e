"""``vhostctl export`` without a kernel (the files it writes, what they say they leave out)
and the shipped ``vhostctl-apply.service`` through ``systemd-analyze verify``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vhostctl.apply import load_spec
from vhostctl.errors import ValidationError
from vhostctl.export import export, write_files

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "vhostctl-apply.service"

SPEC = """id: x
bridges:
  - name: br0
    managed: true
    mtu: 9000
taps:
  - name: t0
    queues: 4
    owner: 0
    group: 0
    bridge: br0
    mtu: {inherit: bridge}
    txqueuelen: 77
    offloads: [csum]
  - name: t1
    owner: 0
    vnet_hdr: false
    mac: fe:00:00:00:00:01
"""


def files(fmt: str) -> dict[str, str]:
    return {f.name: f.content for f in export(load_spec(SPEC, "s.yaml"), fmt).files}


def test_networkd_files_say_what_the_spec_says_and_what_they_cannot():
    f = files("networkd")
    assert sorted(f) == ["10-vhostctl-br0.netdev", "10-vhostctl-br0.network",
                         "10-vhostctl-t0.netdev", "10-vhostctl-t0.network",
                         "10-vhostctl-t1.netdev", "10-vhostctl-t1.network"]
    t0 = f["10-vhostctl-t0.netdev"]
    assert "Kind=tap\n" in t0 and "MultiQueue=yes\n" in t0 and "VNetHeader=yes\n" in t0
    assert "User=root\n" in t0 and "Group=root\n" in t0 and "PacketInfo=no\n" in t0
    assert "not expressible here: offloads" in t0 and "MTU and txqueuelen" in t0
    assert "MTUBytes" not in t0  # [Tap] has none: it is in the .network file
    assert "MTUBytes=9000\n" in f["10-vhostctl-t0.network"]  # inherited from br0
    assert "Bridge=br0\n" in f["10-vhostctl-t0.network"]
    t1 = f["10-vhostctl-t1.netdev"]
    assert "MultiQueue=no\n" in t1 and "VNetHeader=no\n" in t1
    assert "MACAddress" not in t1 and "not expressible" not in t1  # networkd ignores it there
    assert "MACAddress=fe:00:00:00:00:01\n" in f["10-vhostctl-t1.network"]
    assert "MTUBytes=9000\n" in f["10-vhostctl-br0.netdev"]


def test_networkd_notes_name_txqueuelen_for_udev():
    notes = export(load_spec(SPEC, "s.yaml"), "networkd").notes
    assert any("t0: txqueuelen 77" in n and "--format udev" in n for n in notes), notes


def test_udev_rule_sets_mtu_and_txqueuelen_of_tun_devices_only():
    (rules,) = files("udev").values()
    line = next(x for x in rules.splitlines() if 'KERNEL=="t0"' in x)
    assert 'ATTR{tun_flags}=="?*"' in line  # a tun/tap: only they have tun_flags
    assert 'ATTR{mtu}="9000"' in line and 'ATTR{tx_queue_len}="77"' in line
    assert 'KERNEL=="t1"' not in rules


def test_unknown_format_and_missing_directory_are_usage_errors(tmp_path):
    with pytest.raises(ValidationError):
        export(load_spec(SPEC), "netplan")
    with pytest.raises(ValidationError):
        write_files(export(load_spec(SPEC), "udev"), str(tmp_path / "nope"))
    write_files(export(load_spec(SPEC), "udev"), str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["70-vhostctl.rules"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_shipped_unit_passes_systemd_analyze_verify(tmp_path):
    """Verified with ExecStart pointing at this venv's vhostctl (verify checks that the
    command exists; /usr/bin/vhostctl is where a package installs it).  verify exits 0
    even for a line it ignores, so its output must be empty too."""
    vhostctl = Path(sys.executable).parent / "vhostctl"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/bin/vhostctl", str(vhostctl)))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    bad = tmp_path / "bad" / UNIT.name
    bad.parent.mkdir()
    bad.write_text(unit.read_text().replace("Type=oneshot", "Type=oneshoot"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert "oneshoot" in r.stderr  # the check above can fail


def test_the_units_commands_are_vhostctl_commands():
    from typer.testing import CliRunner

    from vhostctl.cli import app
    from vhostctl.cli import commands as _commands  # noqa: F401

    execs = [x.split("=", 1)[1].split()[1:] for x in UNIT.read_text().splitlines()
             if x.startswith(("ExecStart=", "ExecReload="))]
    assert len(execs) == 2
    for argv in execs:
        r = CliRunner().invoke(app, [*argv, "--help"])
        assert r.exit_code == 0, (argv, r.output)
