"""internvlx_hf.bench's harness: what every benchmark's numbers pass through (exact values, no timings)."""

from __future__ import annotations

import json

import pytest

from internvlx_hf.bench import harness
from internvlx_hf.bench.harness import (environment, format_table, results, time_call, time_interleaved, write_results,
                                        write_text)
from internvlx_hf.bench.server_load import check_url, load_level, percentile


def test_time_call_runs_warmup_then_repeats_and_takes_the_median():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(timing["times_s"]) == 5
    assert timing["min_s"] <= timing["median_s"] <= timing["max_s"]
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_call(lambda: None, repeats=0)


def test_time_interleaved_calls_round_robin():
    calls = []
    timings = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], warmup=1, repeats=2)
    assert calls == ["a", "b"] * 3 and [len(t["times_s"]) for t in timings] == [2, 2]


def test_time_interleaved_gives_each_round_its_inputs_before_it():
    calls, batch = [], [None]
    rounds = iter(range(10))

    def new_batch() -> None:
        batch[0] = next(rounds)

    time_interleaved([lambda: calls.append(("a", batch[0])), lambda: calls.append(("b", batch[0]))], warmup=1,
                     repeats=2, before_round=new_batch)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_median_interval_is_order_statistics_with_their_coverage():
    # 10 values: x_(2) .. x_(9) covers 1 - 2 * 11 / 1024; x_(3) .. x_(8) would cover only 0.891
    assert harness.median_interval([float(v) for v in range(10, 0, -1)]) == (2.0, 9.0, 1 - 2 * 11 / 1024)
    assert harness.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)  # below 6 values: the range, its coverage
    assert harness.median_interval([1.0] * 6)[2] == 1 - 2 / 64
    assert harness.median_interval(list(range(1000)))[:2] == (468, 531)  # the normal approximation beyond 300


def _rounds(ratios: list[float], base: float = 2.0) -> list[list[float]]:
    """Per-round times of a candidate and of the reference (second), the reference's times varying by round."""
    reference = [base * (1 + 0.1 * (i % 3)) for i in range(len(ratios))]
    return [[r * b for r, b in zip(ratios, reference)], reference]


def test_spread_flags_a_ratio_whose_interval_holds_one():
    noisy = harness.spread(_rounds([0.9, 1.1, 0.95, 1.05, 0.98, 1.02, 0.97, 1.03]), reference=1)
    assert noisy[0]["within_noise"] is True and noisy[1]["within_noise"] is None
    assert noisy[0]["ratio"] == pytest.approx(1.0) and (noisy[0]["ratio_min"], noisy[0]["ratio_max"]) == \
        pytest.approx((0.9, 1.1))
    assert (noisy[0]["ratio_low"], noisy[0]["ratio_high"]) == pytest.approx((0.9, 1.1))  # 8 rounds: the range
    assert noisy[1]["ratio"] == 1.0 and noisy[1]["rounds"] == 8
    clear = harness.spread(_rounds([0.5, 0.6, 0.55, 0.52, 0.58, 0.54, 0.56, 0.53, 0.57, 0.51]), reference=1)
    assert clear[0]["within_noise"] is False
    assert clear[0]["ratio"] == pytest.approx(0.545)
    assert (clear[0]["ratio_low"], clear[0]["ratio_high"]) == pytest.approx((0.51, 0.58))  # x_(2) .. x_(9)
    # the seconds' own figures: median, range and interval of each candidate's times
    reference = clear[1]
    assert (reference["median_s"], reference["min_s"], reference["max_s"]) == pytest.approx((2.2, 2.0, 2.4))
    assert (reference["low_s"], reference["high_s"]) == pytest.approx((2.0, 2.4))
    # a ratio just above 1 in every round is not noise: the interval, not the range of the medians, decides
    assert harness.spread(_rounds([1.04, 1.05, 1.06, 1.05, 1.04, 1.06]), reference=1)[0]["within_noise"] is False


class _FakeClock:
    """A clock that moves only when a candidate runs: call i of the run takes ``durations[i % len]`` seconds."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, durations, 0

    def __call__(self) -> float:
        return self.now

    def candidate(self):
        def run():
            self.now += self.durations[self.calls % len(self.durations)]
            self.calls += 1
        return run


def test_time_rounds_auto_stops_at_the_time_budget():
    # calls take 1, 3, 2, 1, 3, 2, ... s, so each candidate's times never settle; with two candidates the warm-up
    # round takes 4 s and the rounds 3, 5, 4, 3, 5, 4, ... s: the clock reads 7, 12, 16, 19, 24, 28, 31, 36, 40, ...
    clock = _FakeClock([1.0, 3.0, 2.0])
    out = harness.time_rounds([clock.candidate(), clock.candidate()], warmup=1, time_budget=20.0, reference=1,
                              timer=clock)
    # the minimum wins over the budget
    assert (out["stopped"], out["rounds"], out["elapsed_s"]) == ("time budget", harness.MIN_ROUNDS, 28.0)
    clock = _FakeClock([1.0, 3.0, 2.0])
    out = harness.time_rounds([clock.candidate(), clock.candidate()], warmup=1, time_budget=40.0, reference=1,
                              timer=clock)
    # after round 8 the clock reads 36 and round 8 took 5 s: one more would pass 40 s
    assert (out["stopped"], out["rounds"], out["elapsed_s"]) == ("time budget", 8, 36.0)
    assert [len(t) for t in out["times"]] == [8, 8] and out["spread"] > 0.02  # never precise


def test_time_rounds_auto_stops_when_precise_and_repeats_are_exact():
    clock = _FakeClock([1.0, 2.0])  # the same two durations every round: precise from the first
    out = harness.time_rounds([clock.candidate(), clock.candidate()], warmup=0, reference=1, timer=clock)
    assert (out["stopped"], out["rounds"], out["spread"]) == ("precision", harness.MIN_ROUNDS, 0.0)
    assert out["times"] == [[1.0] * harness.MIN_ROUNDS, [2.0] * harness.MIN_ROUNDS]
    assert harness.relative_spread(harness.spread(out["times"], reference=1)) == 0.0
    clock = _FakeClock([1.0, 2.0])
    out = harness.time_rounds([clock.candidate(), clock.candidate()], warmup=2, repeats=3, timer=clock)
    assert (out["stopped"], out["rounds"], clock.calls) == ("repeats", 3, 10)
    with pytest.raises(ValueError, match="precision > 0"):
        harness.time_rounds([lambda: None], precision=0)


def test_percentile_is_nearest_rank_and_load_level_keeps_order():
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values[::-1], 0.95) == 19.0  # index round(0.95 * 19) = 18
    assert percentile(values, 0.5) == 11.0 and percentile([3.0], 0.95) == 3.0
    wall, out = load_level(lambda x: x * x, range(6), 3)
    assert out == [0, 1, 4, 9, 16, 25] and wall >= 0


def test_table_aligns_numbers_right_and_marks_missing():
    text = format_table([{"name": "a", "s": 1.23456, "n": None}, {"name": "bb", "s": 10, "n": 3}])
    assert text.splitlines() == ["name      s  n", "----  -----  -", "a     1.235  -", "bb       10  3"]


def test_results_json_is_whole_and_refuses_a_missing_folder(tmp_path):
    data = results("demo", [{"x": 1}], {"device": "cpu", "dtype": "float32"})
    assert data["environment"]["device"] == "cpu" and data["environment"]["dtype"] == "float32"
    assert set(environment()) >= {"python", "platform", "commit", "torch", "threads", "transformers", "internvlx_hf"}
    path = write_results(tmp_path / "r.json", data)
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        write_results(tmp_path / "missing" / "r.json", data)
    assert write_text(tmp_path / "made" / "t.md", "x\n").read_text() == "x\n"  # benchmarks' files: folder made


@pytest.mark.parametrize("url, base", [("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
                                       ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000")])
def test_check_url(url, base):
    assert check_url(url) == base
    with pytest.raises(ValueError, match="give the server's base address"):
        check_url("127.0.0.1:8000")
