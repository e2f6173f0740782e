"""requirements/lock.txt is the lock of pyproject.toml as it is now (scripts/lockcheck)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.scriptload import load_script

REPO = Path(__file__).resolve().parents[2]


lockcheck = load_script("lockcheck")
REQS = lockcheck.requirements()
LOCK = (REPO / "requirements" / "lock.txt").read_text()


def test_the_committed_lock_is_current() -> None:
    assert lockcheck.problems(REQS, LOCK) == []


def test_every_requirement_group_is_read() -> None:
    names = {r.split(">")[0].split("=")[0].strip() for g in REQS.values() for r in g}
    assert {"typer", "pyroute2", "pytest", "virtme-ng", "setuptools"} <= names


def _pin_line(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"{name}=="))


def test_a_requirement_without_a_locked_version_is_named() -> None:
    without = LOCK.replace(_pin_line(LOCK, "pyroute2"), "")
    assert lockcheck.problems(REQS, without) == ["pyroute2 (dependencies) has no locked version"]


def test_a_version_outside_the_range_is_named() -> None:
    reqs = {**REQS, "dependencies": ["typer>=999"]}
    # The digest is of these requirements, so only the range is wrong.
    text = LOCK.replace(lockcheck.digest(REQS), lockcheck.digest(reqs))
    (problem,) = lockcheck.problems(reqs, text)
    assert problem.startswith("typer==") and "outside 'typer>=999'" in problem


def test_a_lock_older_than_the_requirements_fails() -> None:
    newer = {**REQS, "dependencies": [*REQS["dependencies"], "psutil>=5"]}
    found = lockcheck.problems(newer, LOCK)
    assert "made from other requirements than pyproject.toml's (run scripts/lock)" in found
    assert "psutil (dependencies) has no locked version" in found


def test_a_lock_not_made_by_the_lock_script_fails() -> None:
    body = "\n".join(ln for ln in LOCK.splitlines() if "requirements-digest" not in ln)
    assert lockcheck.problems(REQS, body) == [
        "no '# requirements-digest:' line (not made by scripts/lock)"]


def test_an_entry_without_hashes_is_named() -> None:
    pin = _pin_line(LOCK, "rich")
    start = LOCK.index(pin)
    end = LOCK.index("    # via", start)
    unhashed = LOCK[:start] + pin.rstrip(" \\") + "\n" + LOCK[end:]
    assert lockcheck.problems(REQS, unhashed) == [f"{pin.split()[0]} has no hash"]


@pytest.mark.parametrize("order", [["a>=1", "b"], ["b", "a>=1"]])
def test_the_digest_ignores_order_but_not_content(order: list[str]) -> None:
    base = {"dependencies": ["a>=1", "b"]}
    assert lockcheck.digest({"dependencies": order}) == lockcheck.digest(base)
    assert lockcheck.digest({"dependencies": ["a>=2", "b"]}) != lockcheck.digest(base)
