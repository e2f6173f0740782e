"""The files in examples/: the systemd unit for `vhostctl serve` passes systemd-analyze verify."""

from __future__ import annotations

import os
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
