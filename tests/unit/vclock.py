"""A virtual clock for unit tests of bounded waits: no test depends on wall time.

:meth:`VirtualClock.install` replaces ``time`` and ``select`` inside one module: ``monotonic()``
reads the virtual clock, and a ``select()`` that would block returns at once as a timeout after
moving the clock by its whole timeout.  What is already readable is returned as it is (a real
``select`` with timeout 0).  A test then asserts how long, in virtual seconds, a wait took.
"""

from __future__ import annotations

import select
import types


class VirtualClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def select(self, r, w, x, timeout=None):
        ready = select.select(r, w, x, 0)
        if any(ready):
            return ready
        if timeout is None:
            raise AssertionError("an unbounded wait")
        self.waits.append(timeout)
        self.now += timeout
        return [], [], []

    def install(self, monkeypatch, module) -> VirtualClock:
        monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=self.monotonic))
        monkeypatch.setattr(module, "select", types.SimpleNamespace(select=self.select))
        return self
