"""docs/testing.md's CI table is what scripts/ci_times.py makes of the logs kept in benchmarks/results/ci/, each a
whole run of `.ci/run` (every step's line, every pytest summary)."""

from __future__ import annotations

import pytest

from conftest import REPO_ROOT, load_script


def test_the_ci_table_in_the_testing_guide_is_the_kept_logs():
    ci_times = load_script("scripts/ci_times.py")
    runs = ci_times.runs()
    assert runs, "no CI log kept in benchmarks/results/ci/"
    guide = (REPO_ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    begin, end = guide.index(ci_times.BEGIN) + len(ci_times.BEGIN), guide.index(ci_times.END)
    assert guide[begin:end].strip() == ci_times.table(runs)


def test_a_runs_total_is_its_foregrounds_steps_and_its_counts_every_pytest_summary(tmp_path):
    ci_times = load_script("scripts/ci_times.py")
    names = {"main env": "main environment (set-up and tests)", "oldest": "oldest transformers (5.16.1; tests)",
             "DeepSpeed": "DeepSpeed tests", "vLLM in the foreground": "the OpenAI servers' module (tests/test_vllm_chat.py)",
             "waiting": "waiting for the vLLM tests after the others", "vLLM env": "vLLM environment (set-up)",
             "vLLM tests": "vLLM tests (tests/test_vllm.py)", "families": "vLLM families (test_vllm_families.py)"}
    seconds = dict(zip(names, (1000, 100, 200, 300, 7, 170, 800, 600)))
    log = tmp_path / "run.log"
    log.write_text("\n".join([f"[ci step] {names[c]}: {seconds[c]} s" for c in names] + [
        "1 failed, 1533 passed, 72 skipped, 34 warnings in 1267.41s (0:21:07)",
        "============ 237 passed, 1 deselected in 837.08s (0:13:57) ============"]) + "\n")
    run = ci_times.read_log(log)
    assert run["total"] == 1000 + 100 + 200 + 300 + 7
    assert (run["passed"], run["failed"]) == (1533 + 237, 1)
    log.write_text(f"[ci step] {names['main env']}: 5 s\n")
    with pytest.raises(ValueError, match="no \\[ci step\\] line for"):
        ci_times.read_log(log)
