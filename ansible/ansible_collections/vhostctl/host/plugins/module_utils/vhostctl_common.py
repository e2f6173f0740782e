# GNU General Public License v2.0+ (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
"""What both modules share: importing vhostctl, running an apply, turning its plan into
Ansible's result (changed, diff, items)."""

from __future__ import annotations

import traceback

try:
    import yaml

    from vhostctl import apply as vapply
    from vhostctl.errors import VhostctlError
    HAS_VHOSTCTL = True
    IMPORT_ERROR = None
except ImportError:
    HAS_VHOSTCTL = False
    IMPORT_ERROR = traceback.format_exc()


def require(module):
    if not HAS_VHOSTCTL:
        from ansible.module_utils.basic import missing_required_lib

        module.fail_json(msg=missing_required_lib("vhostctl and PyYAML"),
                         exception=IMPORT_ERROR)


def _lines(plan, side):
    out = []
    for item in plan.items:
        for c in item.changes:
            value = c.before if side == "before" else c.after
            out.append(f"{item.kind} {item.name} {c.attr}: {value}\n")
    return "".join(out)


def run(module, text, path, prune):
    """Apply a spec (its YAML text) as check mode says; exit the module with the result."""
    try:
        spec = vapply.load_spec(text, path)
        plan = vapply.apply(spec, check=module.check_mode, prune=prune)
    except vapply.ApplyError as e:
        module.fail_json(msg=f"vhostctl: {e}", items=e.plan.to_dict()["items"],
                         changed=any(i.status in ("created", "updated", "recreated", "deleted")
                                     for i in e.plan.items))
    except VhostctlError as e:
        module.fail_json(msg=f"vhostctl: {e}", changed=False)
    result = {"changed": plan.changes, "items": plan.to_dict()["items"]}
    if module._diff:
        result["diff"] = {"before": _lines(plan, "before"), "after": _lines(plan, "after"),
                          "before_header": path, "after_header": path}
    module.exit_json(**result)


def dump(data):
    return yaml.safe_dump(data, sort_keys=False)
