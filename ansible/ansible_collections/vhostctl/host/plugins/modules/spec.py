#!/usr/bin/python
# GNU General Public License v2.0+ (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: spec
short_description: Apply a vhostctl spec of taps and bridges
version_added: "0.1.0"
description:
  - Makes the managed host's tun/tap devices (and the bridges the spec manages) what a
    vhostctl spec says, as C(vhostctl apply) does; see vhostctl(8), APPLY SPEC.
  - Plans first and reports C(changed) from the plan, so a run that needs nothing makes no
    netlink write at all.
  - A tap whose fixed flags differ is recreated only when nothing holds it; otherwise the
    task fails naming the holder and changes nothing.
options:
  path:
    description: A spec file on the managed host. Exactly one of O(path) and O(spec).
    type: path
  spec:
    description: The spec itself, as YAML data. Exactly one of O(path) and O(spec).
    type: dict
  prune:
    description: Also delete taps marked with this spec's id that it no longer lists.
    type: bool
    default: false
requirements:
  - vhostctl (the Python library) and PyYAML on the managed host
author:
  - vhostctl developers (!UNKNOWN)
notes:
  - Needs root (CAP_NET_ADMIN) on the managed host.
attributes:
  check_mode:
    description: Plans and reports what would change; makes no change.
    support: full
  diff_mode:
    description: Shows every attribute that changes, before and after.
    support: full
"""

EXAMPLES = r"""
- name: Taps of this hypervisor
  vhostctl.host.spec:
    path: /etc/vhostctl/taps.yaml
    prune: true

- name: Inline
  vhostctl.host.spec:
    spec:
      id: lab
      taps:
        - name: web1-net0
          queues: 4
          owner: qemu
"""

RETURN = r"""
items:
  description: One entry per tap or bridge, as C(vhostctl apply --json) prints them.
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 (docs first, as ansible-doc reads them)
from ansible_collections.vhostctl.host.plugins.module_utils.vhostctl_common import (  # noqa: E402
    dump,
    require,
    run,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path"),
            spec=dict(type="dict"),
            prune=dict(type="bool", default=False),
        ),
        required_one_of=[("path", "spec")],
        mutually_exclusive=[("path", "spec")],
        supports_check_mode=True,
    )
    require(module)
    if module.params["path"]:
        path = module.params["path"]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            module.fail_json(msg=f"vhostctl: read {path}: {e}")
    else:
        path, text = "<spec>", dump(module.params["spec"])
    run(module, text, path, module.params["prune"])


if __name__ == "__main__":
    main()
