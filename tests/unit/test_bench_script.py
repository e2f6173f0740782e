"""scripts/bench's statistics: pairing runs by repetition, bootstrap intervals, verdicts."""

from __future__ import annotations

import pytest

from tests.unit.scriptload import load_script

bench = load_script("bench")


def run(impl: str, rep: int, pps: float, direction: str = "tx", size: int = 64, **kw: object
        ) -> dict:
    return {"impl": impl, "rep": rep, "direction": direction, "size": size, "pps": pps, **kw}


def test_paired_keeps_repetitions_that_have_both_sides() -> None:
    runs = [run("python", 0, 90.0), run("c", 0, 100.0),
            run("python", 1, 80.0), run("c", 1, 0.0, error="exit 1"),  # C failed: no pair
            run("c", 2, 120.0),                                        # Python missing
            run("python", 3, 70.0), run("c", 3, 75.0),
            run("python", 4, 1.0, direction="rx"), run("c", 4, 2.0, direction="rx"),
            run("python", 5, 1.0, size=1514), run("c", 5, 2.0, size=1514)]
    assert bench.paired(runs, ("python", "pps"), ("c", "pps"), "tx", 64) == [
        (90.0, 100.0), (70.0, 75.0)]


def test_paired_two_values_of_one_implementation() -> None:
    runs = [run("python", 0, 1.0, driver_us=3.0, worker_us=12.0),
            run("python", 1, 1.0, driver_us=None, worker_us=11.0),
            run("c", 1, 1.0, driver_us=1.0, worker_us=10.0)]
    assert bench.paired(runs, ("python", "driver_us"), ("python", "worker_us"), "tx", 64) == [
        (3.0, 12.0)]


def test_interval_of_a_constant_ratio_is_that_ratio() -> None:
    pairs = [(0.8 * b, b) for b in (50.0, 70.0, 90.0, 110.0, 130.0)]
    assert bench.ratio_interval(pairs) == pytest.approx((0.8, 0.8))


def test_interval_needs_three_repetitions() -> None:
    assert bench.ratio_interval([(1.0, 1.0), (2.0, 2.0)]) is None


def test_interval_brackets_the_median_ratio_and_widens_with_noise() -> None:
    quiet = [(90.0 + d, 100.0 - d) for d in (-2, -1, 0, 1, 2, 0, 1, -1)]
    noisy = [(90.0 + 10 * d, 100.0 - 10 * d) for d in (-2, -1, 0, 1, 2, 0, 1, -1)]
    lo_q, hi_q = bench.ratio_interval(quiet)
    lo_n, hi_n = bench.ratio_interval(noisy)
    assert lo_n < lo_q <= 0.9 <= hi_q < hi_n


def test_interval_is_the_middle_95_percent_not_the_extremes() -> None:
    # Ratios 0.80, 0.81 ... 0.99: of 2000 resampled medians the extremes reach 0.83 and 0.96.
    lo, hi = bench.ratio_interval([(80.0 + i, 100.0) for i in range(20)])
    assert 0.84 <= lo < 0.88 and 0.92 < hi <= 0.95


def test_interval_is_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "RESAMPLES", 7)  # few draws: an unseeded interval would move
    pairs = [(80.0 + i * 1.37 % 7, 100.0 + i % 5) for i in range(9)]
    assert len({bench.ratio_interval(pairs) for _ in range(5)}) == 1


@pytest.mark.parametrize(("got", "ci", "want", "word"), [
    (0.95, (0.92, 0.99), ">= 0.9", "met"),
    (0.93, (0.85, 0.99), ">= 0.9", "met (within the noise)"),
    (0.86, (0.75, 0.92), ">= 0.9", "MISSED (within the noise)"),
    (0.70, (0.65, 0.80), ">= 0.9", "MISSED"),
    (0.23, (0.20, 0.31), "<= 0.3", "met (within the noise)"),
    (0.40, None, "<= 0.3", "MISSED"),
])
def test_verdict(got: float, ci: tuple[float, float] | None, want: str, word: str) -> None:
    limit = float(want.split()[-1])
    ok = got >= limit if want.startswith(">=") else got <= limit
    assert bench.verdict({"got": got, "ok": ok, "want": want, "limit": limit, "ci95": ci}) == word


def test_summary_and_table_carry_the_intervals() -> None:
    runs = []
    for rep, (py, c) in enumerate([(85, 100), (95, 100), (88, 100), (91, 100), (90, 100)]):
        runs += [run("python", rep, py * 1000.0, driver_us=3.0, worker_us=12.0 + rep,
                     cpu_us=3.4),
                 run("c", rep, c * 1000.0, driver_us=1.2, worker_us=11.0, cpu_us=1.4)]
    summary = bench.summarise(runs)
    tx64 = summary["checks"][0]
    assert tx64["what"].startswith("TX 64 B packets/s")
    assert tx64["got"] == pytest.approx(0.90) and tx64["ok"]
    lo, hi = tx64["ci95"]
    assert 0.85 <= lo <= 0.9 <= hi <= 0.95
    assert summary["checks"][1]["ci95"] is None  # no TX 1514 B runs
    cpu = summary["checks"][-1]
    assert cpu["got"] == pytest.approx(3.0 / 14.0) and cpu["ci95"] is not None
    table = bench.markdown("6.1", summary, 5)
    assert f"| 0.90 | {lo:.2f} to {hi:.2f} | met (within the noise) |" in table
