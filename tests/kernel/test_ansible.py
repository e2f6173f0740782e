"""The Ansible collection under ``ansible/`` on the real kernel: ansible-core (from PyPI, in
the repo's venv) runs playbooks against localhost using ``vhostctl.host.tap`` and
``vhostctl.host.spec``.  The first playbook applies a play of both modules: both tasks
changed.  The second runs that play again (both ``ok``, ``changed=0``) and then a changed
variant of the spec in check mode with diffs: it reports the change (a txqueuelen, a new tap)
with its diff, and the host's links are what the first playbook left, to the attribute.
Check mode is run through ``spec`` only: ``tap`` builds a one-tap spec and goes through the
same ``run()`` of the collection's module_utils.

A module run is a Python process importing ansible's module_utils, vhostctl and pyroute2:
about a minute in the VM (seen on 6.1, one VM on the machine), whose host filesystem is a
read-only 9p mount.  So there are two playbooks and five module runs, and the environment
turns off what a local, fact-free run does not need (no facts, no interpreter discovery,
pipelining instead of temporary module files, no config file, no sys.path scan for
collections).

When scripts/vmtest runs both kernels it runs this on 6.12 only (``one_kernel``): the modules
reach the kernel only through vhostctl's apply (taps, bridges, link attributes over tun and
rtnetlink), which tests/kernel/test_apply.py proves on every kernel; what this adds is
Ansible's side (module arguments, changed/ok, check mode and diffs), the same on any kernel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.kernel.conftest import gone, ip, link_snapshot, udev_settle

REPO = Path(__file__).resolve().parents[2]
N = os.getpid() % 10000
P = f"an{N}"

PLAY = """
- name: {title}
  hosts: localhost
  connection: local
  gather_facts: false
  check_mode: {check}
  diff: {check}
  tasks:{tap_task}
    - name: a spec with a managed bridge ({title})
      vhostctl.host.spec:
        spec:
          id: ans{n}
          bridges:
            - name: {br}
              managed: true
          taps:
            - name: {b}
              owner: 0
              bridge: {br}
              mtu: {{inherit: bridge}}{extra}
"""

TAP_TASK = """
    - name: one tap ({title})
      vhostctl.host.tap:
        name: {a}
        queues: 2
        owner: "0"
        mtu: "9000"
        txqueuelen: 222"""


def play(names: dict, title: str, *, check: bool = False, extra_tap: str | None = None) -> str:
    """Both modules' tasks, or in check mode the spec's with a txqueuelen and a new tap."""
    tap_task = "" if check else TAP_TASK.format(title=title, **names)
    extra = (f"\n              txqueuelen: 333\n            - name: {extra_tap}\n"
             "              owner: 0" if extra_tap else "")
    return PLAY.format(title=title, check=str(check).lower(), n=N, tap_task=tap_task,
                       extra=extra, **names)


def env(tmp: str) -> dict[str, str]:
    """What ansible-playbook needs and nothing more (see the module docstring)."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": tmp, "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
        "ANSIBLE_CONFIG": f"{tmp}/ansible.cfg", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": f"{tmp}/local", "ANSIBLE_REMOTE_TMP": f"{tmp}/remote",
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / "ansible"),
        "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "0",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_PIPELINING": "1", "ANSIBLE_GATHERING": "explicit", "ANSIBLE_FORKS": "1",
        "ANSIBLE_INVENTORY_ENABLED": "host_list", "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "ANSIBLE_MODULE_COMPRESSION": "ZIP_STORED",
    }


def playbook(text: str, tmp: str) -> tuple[list[tuple[str, str]], dict[str, int], str]:
    """Run a playbook: each task's (name, status) in order, the recap's counts, the output."""
    path = os.path.join(tmp, "play.yml")
    Path(path).write_text(text)
    Path(tmp, "ansible.cfg").touch()  # this one, not one found in a working directory
    t0 = time.monotonic()
    r = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                        "localhost,", path], env=env(tmp), cwd=tmp, capture_output=True,
                       text=True, timeout=900)
    out = r.stdout + r.stderr
    print(f"ansible-playbook took {time.monotonic() - t0:.1f}s")  # in the junit's output
    assert r.returncode == 0, out
    tasks = re.findall(r"^TASK \[(.*?)\].*?^(ok|changed|failed|fatal|skipping): \[localhost\]",
                       out, re.M | re.S)
    recap = re.search(r"localhost\s*:\s*(.*)", out[out.index("PLAY RECAP"):])
    assert recap, out
    return tasks, {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap.group(1))}, out


@pytest.mark.one_kernel("6.12")
def test_playbook_applies_then_changes_nothing_and_check_mode_changes_nothing():
    names = {"a": f"{P}a", "b": f"{P}b", "br": f"{P}br"}
    new = f"{P}c"
    tmp = tempfile.mkdtemp(prefix="vhans", dir="/tmp")
    try:
        # 1: apply
        tasks, stats, out = playbook(play(names, "apply"), tmp)
        assert [s for _, s in tasks] == ["changed", "changed"], out
        assert stats["changed"] == 2 and stats["failed"] == 0, out
        a = json.loads(ip("-j", "-d", "link", "show", names["a"]))[0]
        assert a["mtu"] == 9000 and a["txqlen"] == 222
        assert a["linkinfo"]["info_data"]["multi_queue"] is True
        b = json.loads(ip("-j", "-d", "link", "show", names["b"]))[0]
        assert b["master"] == names["br"]
        assert b["ifalias"] == f"vhostctl-apply:ans{N}"
        udev_settle(*names.values())
        after = link_snapshot()

        # 2: the same play again, then a changed variant in check mode (with diffs)
        tasks, stats, out = playbook(
            play(names, "again") + play(names, "check", check=True, extra_tap=new), tmp)
        assert [s for _, s in tasks] == ["ok", "ok", "changed"], out
        assert stats["changed"] == 1 and stats["ok"] == 3 and stats["failed"] == 0, out
        assert f"-tap {names['b']} txqueuelen: 1000\n" in out, out
        assert f"+tap {names['b']} txqueuelen: 333\n" in out, out
        assert f"+tap {new} type: tap\n" in out, out  # the tap check mode would create
        assert link_snapshot() == after, "the repeat or check mode changed the host"
        assert not os.path.exists(f"/sys/class/net/{new}")
    finally:
        gone(*names.values(), new)
        udev_settle()
        shutil.rmtree(tmp, ignore_errors=True)
