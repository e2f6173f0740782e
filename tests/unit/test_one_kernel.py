"""tests/conftest.py's ``one_kernel`` rule: which kernel of a side-by-side run keeps a test."""

from __future__ import annotations

import pytest

from tests.conftest import kernel_series, spread_out


class Item:
    def __init__(self, series: str | None) -> None:
        self.mark = pytest.mark.one_kernel(series).mark if series else None

    def get_closest_marker(self, name: str):
        return self.mark if name == "one_kernel" else None


@pytest.mark.parametrize("release, series", [
    ("6.12.117+deb12-amd64", "6.12"), ("6.1.0-57-amd64", "6.1"), ("6.18.44-fc-v1147", "6.18"),
])
def test_series_of_a_release(release, series):
    assert kernel_series(release) == series


@pytest.mark.parametrize("mark, release, spread, away", [
    ("6.12", "6.1.0-57-amd64", "6.1,6.12", True),         # the other kernel's test
    ("6.12", "6.12.117+deb12-amd64", "6.1,6.12", False),  # its own kernel
    ("6.1", "6.12.117+deb12-amd64", "6.1,6.12", True),    # 6.1 is not a prefix match of 6.12
    ("6.12", "6.1.0-57-amd64", "", False),                # one kernel, or native: runs
    ("6.12", "6.1.0-57-amd64", "6.1,6.6", False),         # its series is not in this run
    (None, "6.1.0-57-amd64", "6.1,6.12", False),          # unmarked: every kernel
])
def test_a_marked_test_runs_on_its_kernel_only(mark, release, spread, away):
    assert spread_out(Item(mark), release, spread) is away
