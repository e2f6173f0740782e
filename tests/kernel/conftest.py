"""Fixtures for tests that run against a real kernel (scripts/vmtest boots one)."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess

import pytest

_seq = itertools.count()


@pytest.fixture
def ifname() -> str:
    """A tap name unique to this test run (pid + counter), 15 bytes at most."""
    return f"vt{os.getpid() % 100000}x{next(_seq)}"


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak():
    """Fail the test if it leaves an fd open (the listdir's own fd closes before we compare)."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"leaked fds: {sorted(leaked)}"


def link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def json(self):
        import json

        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


def run_cli(*args: str) -> CliResult:
    """Run vhostctl in-process (a Python start costs seconds in the VM)."""
    from typer.testing import CliRunner

    from vhostctl.cli import (
        app,
        commands,  # noqa: F401
    )

    r = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return CliResult(r.exit_code, r.stdout, r.stderr)


@pytest.fixture
def cli():
    return run_cli
