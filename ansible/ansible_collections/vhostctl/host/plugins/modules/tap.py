#!/usr/bin/python
# GNU General Public License v2.0+ (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: tap
short_description: One persistent tun/tap device for vhost-net and QEMU
version_added: "0.1.0"
description:
  - Creates, updates or deletes one persistent tap, through the same plan as
    C(vhostctl apply) (a spec of one tap with the id C(ansible)); see vhostctl(8).
  - MTU, MAC, txqueuelen, bridge and state change in place; owner and group through an
    attached queue while nobody holds the tap; queues (multi-queue or not) and vnet_hdr need
    the tap recreated, which is done only when nothing holds it.
  - O(state=absent) deletes the tap only if nothing holds it; any other kind of link of that
    name is refused.
options:
  name:
    description: The interface name (at most 15 bytes).
    type: str
    required: true
  state:
    description: Whether the tap should exist.
    type: str
    choices: [present, absent]
    default: present
  queues:
    description: Number of queues; more than one makes a multi-queue tap.
    type: int
    default: 1
  vnet_hdr:
    description: Give the tap a virtio-net header (IFF_VNET_HDR).
    type: bool
    default: true
  owner:
    description: User (name or uid) who may attach the tap. With neither O(owner) nor
      O(group), the user Ansible runs the module as.
    type: str
  group:
    description: Group (name or gid) that may attach the tap.
    type: str
  mtu:
    description: MTU (68 to 65521), or C(bridge) for the bridge's MTU.
    type: str
  mac:
    description: Link address; random (first octet fe) when not given, and then not compared.
    type: str
  bridge:
    description: Master bridge; it must exist and be a bridge.
    type: str
  txqueuelen:
    description: Transmit queue length.
    type: int
  offloads:
    description: tun offloads set at creation (csum, tso4, tso6, tso_ecn, ufo, uso4, uso6).
    type: list
    elements: str
requirements:
  - vhostctl (the Python library) and PyYAML on the managed host
author:
  - vhostctl developers (!UNKNOWN)
attributes:
  check_mode:
    description: Plans and reports what would change; makes no change.
    support: full
  diff_mode:
    description: Shows every attribute that changes, before and after.
    support: full
"""

EXAMPLES = r"""
- name: A multi-queue tap for QEMU on br0
  vhostctl.host.tap:
    name: web1-net0
    queues: 4
    owner: qemu
    bridge: br0
    mtu: bridge

- name: Gone
  vhostctl.host.tap:
    name: old-net0
    state: absent
"""

RETURN = r"""
items:
  description: What was (or, in check mode, would be) done, as C(vhostctl apply --json).
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


def _absent(module):
    """Delete the tap when it exists (a tap, unheld); changed only when it did."""
    from vhostctl import taps
    from vhostctl.errors import VhostctlError
    from vhostctl.netlink import Netlink

    name = module.params["name"]
    try:
        with Netlink() as nl:
            link = nl.find(name)
            if link is not None and not link.is_tun:
                kind = link.kind or "plain"
                module.fail_json(msg=f"vhostctl: {name} is a {kind} link, not a tap")
            if link is not None and not module.check_mode:
                taps.delete(name, nl)
    except VhostctlError as e:
        module.fail_json(msg=f"vhostctl: {e}")
    result = {"changed": link is not None, "items": []}
    if module._diff:
        result["diff"] = {"before": f"tap {name} exists\n" if link else "",
                          "after": ""}
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            queues=dict(type="int", default=1),
            vnet_hdr=dict(type="bool", default=True),
            owner=dict(type="str"),
            group=dict(type="str"),
            mtu=dict(type="str"),
            mac=dict(type="str"),
            bridge=dict(type="str"),
            txqueuelen=dict(type="int"),
            offloads=dict(type="list", elements="str"),
        ),
        supports_check_mode=True,
    )
    require(module)
    p = module.params
    if p["state"] == "absent":
        _absent(module)
    tap = {"name": p["name"], "queues": p["queues"], "vnet_hdr": p["vnet_hdr"]}
    for key in ("owner", "group", "mac", "bridge", "txqueuelen", "offloads"):
        if p[key] is not None:
            tap[key] = p[key]
    if p["mtu"] is not None:
        if p["mtu"] == "bridge":
            tap["mtu"] = {"inherit": "bridge"}
        elif p["mtu"].isdigit():
            tap["mtu"] = int(p["mtu"])
        else:
            module.fail_json(msg=f"vhostctl: mtu: expected a number or 'bridge', got {p['mtu']!r}")
    run(module, dump({"id": "ansible", "taps": [tap]}), f"<task {p['name']}>", False)


if __name__ == "__main__":
    main()
