"""internvlx_hf.bench's harness: what every benchmark's numbers pass through (exact values, no timings)."""

from __future__ import annotations

import json

import pytest

from internvlx_hf.bench.harness import (environment, format_table, results, time_call, time_interleaved, write_results,
                                        write_text)
from internvlx_hf.bench.serve import check_url, load_level, percentile


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
