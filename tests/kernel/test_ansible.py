"""The Ansible collection under ``ansible/`` on the real kernel: ansible-core (from PyPI, in
the repo's venv) runs a playbook against localhost using ``vhostctl.host.tap`` and
``vhostctl.host.spec``: check mode reports the change and makes none, the first run changes,
the second reports ``changed=0`` and leaves every link as it was.

Three ``ansible-playbook`` starts cost most of this test in the VM (Python start-up, then a
module process per task); that is why there is one playbook and one test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.kernel.conftest import gone, ip, link_snapshot, udev_settle

REPO = Path(__file__).resolve().parents[2]
P = f"an{os.getpid() % 10000}"

PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: one tap
      vhostctl.host.tap:
        name: {a}
        queues: 2
        owner: "0"
        mtu: "9000"
        txqueuelen: 222
    - name: a spec with a managed bridge
      vhostctl.host.spec:
        spec:
          id: ans{pid}
          bridges:
            - name: {br}
              managed: true
          taps:
            - name: {b}
              owner: 0
              bridge: {br}
              mtu: {{inherit: bridge}}
"""


def playbook(path: str, tmp: str, *extra: str) -> tuple[dict[str, int], str]:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": tmp, "LC_ALL": "C.UTF-8", "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": f"{tmp}/local", "ANSIBLE_REMOTE_TMP": f"{tmp}/remote",
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / "ansible"),
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_RETRY_FILES_ENABLED": "0", "PYTHONDONTWRITEBYTECODE": "1",
    }
    r = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                        "localhost,", path, *extra], env=env, cwd=tmp, capture_output=True,
                       text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    recap = re.search(r"localhost\s*:\s*(.*)", out[out.index("PLAY RECAP"):])
    assert recap, out
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap.group(1))}, out


def test_playbook_check_then_changed_then_unchanged():
    names = {"a": f"{P}a", "b": f"{P}b", "br": f"{P}br"}
    tmp = tempfile.mkdtemp(prefix="vhans", dir="/tmp")
    path = os.path.join(tmp, "play.yml")
    Path(path).write_text(PLAYBOOK.format(pid=os.getpid() % 10000, **names))
    try:
        before = link_snapshot()
        stats, out = playbook(path, tmp, "--check", "--diff")
        assert stats["changed"] == 2 and stats["failed"] == 0, out
        assert f"tap {names['a']} mtu: 9000" in out, out  # the diff's after side
        assert link_snapshot() == before, "check mode changed the host"

        stats, out = playbook(path, tmp)
        assert stats["changed"] == 2 and stats["failed"] == 0, out
        a = json.loads(ip("-j", "-d", "link", "show", names["a"]))[0]
        assert a["mtu"] == 9000 and a["txqlen"] == 222
        assert a["linkinfo"]["info_data"]["multi_queue"] is True
        b = json.loads(ip("-j", "-d", "link", "show", names["b"]))[0]
        assert b["master"] == names["br"]
        assert b["ifalias"] == f"vhostctl-apply:ans{os.getpid() % 10000}"
        udev_settle()
        after = link_snapshot()

        stats, out = playbook(path, tmp)
        assert stats["changed"] == 0 and stats["ok"] == 2 and stats["failed"] == 0, out
        assert link_snapshot() == after
    finally:
        gone(*names.values())
        udev_settle()
