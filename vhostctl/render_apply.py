"""Rendering of ``vhostctl apply``: one line per item, per-attribute before/after with
``--diff``, a closing count.  No logic, no kernel access."""

from __future__ import annotations

from typing import Any

from .render import print_line

_SIGN = {"none": "=", "create": "+", "update": "~", "recreate": "±", "delete": "-",
         "blocked": "!"}


def _value(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def print_plan(plan: Any, *, diff: bool) -> None:
    for item in plan.items:
        head = f"{_SIGN.get(item.action, '?')} {item.kind} {item.name}: {item.status}"
        if item.reason:
            head += f" ({item.reason})"
        print_line(head)
        if diff:
            for c in item.changes:
                print_line(f"    {c.attr}: {_value(c.before)} -> {_value(c.after)}")
    counts: dict[str, int] = {}
    for item in plan.items:
        counts[item.status] = counts.get(item.status, 0) + 1
    print_line("apply: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                            or "the spec lists nothing"))
