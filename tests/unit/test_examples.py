"""The files in examples/: the systemd unit for `vhostctl serve` passes systemd-analyze verify,
the alert rules pass promtool, and the dashboard and rules query only series we emit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "examples" / "vhostctl-serve.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_serve_unit_passes_systemd_analyze_verify(tmp_path):
    # Where pip would put vhostctl is this venv's bin here; man:vhostctl(8) is this tree's page.
    exe = Path(sys.executable).parent / "vhostctl"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/vhostctl serve --listen 127.0.0.1:9917" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/usr/local/bin/vhostctl", str(exe)))
    (tmp_path / "man" / "man8").mkdir(parents=True)
    os.symlink(REPO / "man" / "vhostctl.8", tmp_path / "man" / "man8" / "vhostctl.8")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=120,
                       env={**os.environ, "MANPATH": str(tmp_path / "man")})
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def _emitted(tmp_path) -> set[str]:
    """Every sample name one scrape of a host with a vhost-net VM emits."""
    from tests.unit.test_metrics import FakeHost, vhost_vm
    from vhostctl import metrics as m
    from vhostctl.hostcheck import Check, HostReport

    host = FakeHost(tmp_path, release="6.12.117+deb12-amd64")
    vhost_vm(host)
    report = HostReport((Check("vhost-net device", True, "ok"),))
    return {s.name for fam in m.families(host.scanner().scan(), report, scrape_seconds=0.1)
            for s in fam.samples}


def _names(expr: str) -> set[str]:
    return set(re.findall(r"\bvhostctl_[a-z_]+", expr))


def test_dashboard_and_alerts_use_only_series_the_exporter_emits(tmp_path):
    emitted = _emitted(tmp_path)
    dash = json.loads((REPO / "examples" / "grafana-vhostctl.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    rules = (REPO / "examples" / "vhostctl-alerts.yml").read_text()
    exprs += re.findall(r"^\s+expr: (.+)$", rules, re.M)
    used = set().union(*map(_names, exprs))
    assert len(exprs) >= 15 and used
    assert not used - emitted, f"not emitted: {sorted(used - emitted)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool")
def test_alert_rules_pass_promtool():
    r = subprocess.run(["promtool", "check", "rules", str(REPO / "examples" /
                                                         "vhostctl-alerts.yml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS: 5 rules found" in r.stdout, r.stdout + r.stderr
