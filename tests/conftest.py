"""Shared test configuration: the ``kernel`` marker's fail-not-skip rule, and ``one_kernel``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).parent / "kernel"


def _kernel_missing() -> str:
    """Why kernel tests cannot run here, or '' when they can."""
    for dev, mod in (("/dev/vhost-net", "vhost_net"), ("/dev/net/tun", "tun")):
        if not os.path.exists(dev):
            return f"{dev} is absent (module {mod} not loaded or not built for this kernel)"
    if os.geteuid() != 0:
        return "kernel tests need root (CAP_NET_ADMIN for taps, access to /dev/vhost-net)"
    return ""


def require_kernel() -> bool:
    return os.environ.get("VHOSTCTL_REQUIRE_KERNEL") == "1"


def kernel_series(release: str) -> str:
    """'6.12.117+deb12-amd64' -> '6.12': the series a ``one_kernel`` mark names."""
    return ".".join(release.split(".")[:2])


def spread_out(item: pytest.Item, release: str, spread: str) -> bool:
    """Whether a ``one_kernel(series)`` test belongs to another kernel of this run.
    ``spread`` is the comma-separated series scripts/vmtest runs side by side
    (VHOSTCTL_SPREAD); a series outside it, or a run of one kernel, keeps the test."""
    mark = item.get_closest_marker("one_kernel")
    if mark is None or not spread:
        return False
    series = mark.args[0]
    return series in spread.split(",") and kernel_series(release) != series


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)
    spread = os.environ.get("VHOSTCTL_SPREAD", "")
    release = os.uname().release
    elsewhere = [item for item in items if spread_out(item, release, spread)]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if item not in elsewhere]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    why = _kernel_missing()
    if why:
        if require_kernel():
            pytest.fail(f"VHOSTCTL_REQUIRE_KERNEL=1 but {why}", pytrace=False)
        pytest.skip(f"no real kernel here: {why} (scripts/vmtest runs these in a VM)")
