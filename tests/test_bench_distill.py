"""benchmarks/bench_distill.py's summary (issue 51): the distillation tables of docs/lvtc.md and docs/fine-tuning.md
are the ones its runs give, the target is judged against the supervised run of the same student, and runs from
another pretrained model or of another length are refused. Reads the committed run files only (no training)."""

import json
import shutil

import pytest

from conftest import REPO_ROOT, load_script


def _block(text, bench):
    return text.split(bench.DOC_BEGIN, 1)[1].split(bench.DOC_END, 1)[0].strip("\n").splitlines()


def _summarise(bench, tmp_path, results=None):
    json_path = tmp_path / "distill.json"
    argv = ["--summarise", "--json", str(json_path)]
    if results is not None:
        argv += ["--results-dir", str(results)]
    assert bench.main(argv) == 0
    return json.loads(json_path.read_text())


def test_docs_tables_are_the_runs(tmp_path, capsys):
    bench = load_script("benchmarks/bench_distill.py")
    summary = _summarise(bench, tmp_path)
    printed = capsys.readouterr().out
    rows = summary["rows"]
    assert {(r["student"], r["method"], r["teacher"]) for r in rows} == {
        (s, "supervised", None) for s in bench.STUDENTS} | {
        (s, "distilled", t) for s in bench.STUDENTS for t in bench.TEACHERS}
    for row in rows:
        assert set(row) >= {"student", "teacher", "method", "labels", "fine", "steps", "cost"}
        assert set(row["fine"]) >= {"mean", "sd", "seeds"} and row["fine"]["seeds"] == [0, 1, 2]
        assert row["labels"] == (row["method"] == "supervised") and row["steps"] == 1000
        if row["method"] == "distilled":
            supervised = next(r for r in rows if r["student"] == row["student"] and r["method"] == "supervised")
            gap = row["fine"]["mean"] - supervised["fine"]["mean"]
            assert row["vs_supervised"] == pytest.approx(gap) and row["target_met"] == (gap >= -bench.TARGET)
    expected = bench.docs_block(rows, summary["teachers"])
    assert any(line.startswith("| pvtc | distillation from plain-1024 | no |") for line in expected)
    assert "| pvtc | distillation from plain-1024 | no |" in printed
    for name in bench.DOC_FILES:
        text = (REPO_ROOT / name).read_text(encoding="utf-8")
        assert _block(text, bench) == expected, (
            f"{name}: run `python benchmarks/bench_distill.py --summarise --plot benchmarks/results/distill.png "
            "--docs`")


def test_runs_from_another_pretrained_model_are_refused(tmp_path, capsys):
    bench = load_script("benchmarks/bench_distill.py")
    results = tmp_path / "distill"
    shutil.copytree(REPO_ROOT / "benchmarks" / "results" / "distill", results)
    run = sorted((results / "runs").glob("*.json"))[0]
    row = json.loads(run.read_text())
    run.write_text(json.dumps({**row, "pretrained_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match=f"runs from another pretrained model .*{row['name']}"):
        bench.main(["--summarise", "--results-dir", str(results), "--json", str(tmp_path / "d.json")])
    run.write_text(json.dumps({**row, "steps": 10}))
    with pytest.raises(SystemExit, match=f"runs of another length than 1000 steps: \\['{row['name']}'\\]"):
        bench.main(["--summarise", "--results-dir", str(results), "--json", str(tmp_path / "d.json")])
