"""Python mirror of the kernel's user API headers: one module per header, C names verbatim."""

from __future__ import annotations

from functools import cache


@cache
def _names() -> dict[int, str]:
    from . import if_tun, ioc, vhost

    names: dict[int, str] = {}
    for mod in (if_tun, vhost):
        names.update(ioc.collect_ioctls(vars(mod)))
    return names


def ioctl_name(request: int) -> str:
    """The C name of an ioctl request number, for error messages."""
    return _names().get(int(request), f"ioctl({int(request):#x})")
