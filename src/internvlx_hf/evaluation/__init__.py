"""Scoring InternVL-X checkpoints on held-out visual QA: `internvlx eval` and a Trainer callback.

    from internvlx_hf.evaluation import evaluate, format_run
    run = evaluate(model, processor, "heldout.json", metric="vqa")
    print(format_run(run)); run.dataset("textvqa").accuracy

Modules: `data` (the rows read by `internvlx_hf.data`, split into prompts and reference answers, checked before
anything runs), `runner` (batched greedy generation and the scores per dataset), `report` (tables, JSON, plot) and
`callback` (`EvaluationCallback`, behind `internvlx train --eval-data`). The metrics (exact match, VQA accuracy, ANLS,
relaxed accuracy) are defined in `internvlx_hf.metrics`, which `internvlx_hf.data` reads too (to check a meta file's
metric names); their names are re-exported here.
"""

from ..metrics import DEFAULT_METRIC, METRICS, anls, exact_match, normalize_vqa_answer, relaxed_accuracy, vqa_accuracy
from .callback import EvaluationCallback
from .data import AS_WRITTEN, EvalSample, EvalSet, read_eval_data
from .report import format_comparison, format_run, plot_runs, to_json, write_json
from .runner import DatasetResult, EvalRun, Prediction, evaluate


__all__ = [
    "AS_WRITTEN",
    "DEFAULT_METRIC",
    "METRICS",
    "DatasetResult",
    "EvalRun",
    "EvalSample",
    "EvalSet",
    "EvaluationCallback",
    "Prediction",
    "anls",
    "evaluate",
    "exact_match",
    "format_comparison",
    "format_run",
    "normalize_vqa_answer",
    "plot_runs",
    "read_eval_data",
    "relaxed_accuracy",
    "to_json",
    "vqa_accuracy",
    "write_json",
]
