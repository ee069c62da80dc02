"""`internvlx eval` and `internvlx_hf.evaluation`: the metrics against their definitions' worked examples, the
held-out reader (prompts, references, file:line errors), the CLI on tiny models and on the demo model (the
learnability benchmark's numbers), and `internvlx train --eval-data` through the log, trainer_state.json and the
model card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import training_helpers as th
from internvlx_hf.cli import main
from internvlx_hf.demo import demo_model_dir
from internvlx_hf.evaluation import (
    METRICS,
    anls,
    evaluate,
    exact_match,
    normalize_vqa_answer,
    read_eval_data,
    relaxed_accuracy,
    vqa_accuracy,
)
from internvlx_hf.metrics import levenshtein
from internvlx_hf.training.synthetic_vqa import TASKS, combine_meta, generate_dataset

# Held-out synthetic sets use a seed of their own: the demo model was trained on seeds 1000 and 5000 (recipe) and
# scored on 999_999.
HELD_OUT_SEED = 4242
# The demo model as a complete checkpoint folder (its remote code written from the package).
DEMO_MODEL = demo_model_dir()


def _processor():
    from internvlx_hf import InternVLXProcessor

    return InternVLXProcessor.from_pretrained(str(DEMO_MODEL), trust_remote_code=True)


def _held_out(root: Path, tasks=TASKS, n: int = 40, sizes: str = "fixed") -> tuple[Path, list[Path]]:
    """One synthetic dataset per task (as the demo model was trained: 112 px, empty system block) and a meta JSON
    joining them."""
    metas = [generate_dataset(root / task, n=n, tasks=[task], seed=HELD_OUT_SEED, image_size=112, sizes=sizes,
                              system_message="", name=task) for task in tasks]
    return combine_meta(metas, root / "meta.json"), metas


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("internvlx eval: error: ") and err.count("\n") == 1, err
    return err


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "internvlx eval " in out.split("examples:")[1]
    assert all(f"  {metric} " in out for metric in METRICS)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "    eval " in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------- metrics


def test_metric_registry_matches_the_cli_choices():
    from internvlx_hf.cli.eval import METRIC_NAMES

    assert tuple(METRICS) == METRIC_NAMES


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match(" red\n", ["red"]) == 1.0
    assert exact_match("Red", ["red"]) == 0.0
    assert exact_match("red.", ["red"]) == 0.0
    assert exact_match("blue", ["red", "blue"]) == 1.0


@pytest.mark.parametrize("answer, normalized", [
    # the rules of the official VQA evaluation script (vqaEval.py: processPunctuation, processDigitArticle)
    ("Two", "2"),                      # number words become digits
    ("none", "0"),
    ("The red car", "red car"),        # articles are dropped
    ("a dog.", "dog"),                 # a period not followed by a digit goes
    ("3.5", "3.5"),                    # one followed by a digit stays
    ("yes!", "yes"),                   # punctuation at a word's end goes
    ("black/white", "black white"),    # punctuation inside a word splits it
    ("black / white", "black white"),  # punctuation next to a space goes
    ("1,000", "1000"),                 # a digit-comma-digit deletes every mark instead of splitting
    ("dont", "don't"),                 # contractions get their apostrophe back
    ("couldnt've", "couldn't've"),
    ("Im", "im"),                      # the table's "Im" never matches lower-cased text
    ("Yes\tsir\n", "yes sir"),         # tabs and line breaks are spaces
])
def test_vqa_answer_normalisation(answer, normalized):
    assert normalize_vqa_answer(answer) == normalized


@pytest.mark.parametrize("humans, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_of_ten_human_answers(humans, expected):
    """Antol et al. 2015: Acc(ans) = min(#humans that said ans / 3, 1), averaged over the 10 choose 9 subsets of
    the 10 answers. An answer given by 1 human scores 9/10 * 1/3 = 0.3, by 2: (8 * 2/3 + 2 * 1/3) / 10 = 0.6, by 3:
    (7 * 1 + 3 * 2/3) / 10 = 0.9, by 4 or more: 1."""
    references = ["2"] * humans + [f"other{i}" for i in range(10 - humans)]
    assert vqa_accuracy("two", references) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_both_sides_and_reduces_to_exact_match_for_one_reference():
    assert vqa_accuracy("Two dogs.", ["2 dogs"]) == 1.0
    assert vqa_accuracy("2 dogs", ["The two dogs!"]) == 1.0
    assert vqa_accuracy("3 dogs", ["2 dogs"]) == 0.0
    assert vqa_accuracy("Yes", ["yes", "yes", "yes", "no", "no", "no", "no", "no", "no", "no"]) == \
        pytest.approx(0.9, abs=1e-12)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2


def test_anls_worked_examples():
    """Biten et al. 2019 (ST-VQA): s = 1 - NL(a, o) when NL < tau = 0.5, else 0; the best reference counts."""
    assert anls("helo", ["hello"]) == 1 - 1 / 5       # one deletion in five characters: 0.8
    assert anls("DocVQA ", ["docvqa"]) == 1.0          # case and surrounding whitespace are ignored
    assert anls("a", ["ab"]) == 0.5                    # NL = 0.5: similarity 0.5 reaches tau (DocVQA's scripts)
    assert anls("a", ["abc"]) == 0.0                   # NL = 2/3: below
    assert anls("abcd", ["abce"]) == 0.75              # NL = 0.25
    assert anls("1989", ["1988", "in 1989"]) == 0.75   # max(1 - 1/4, 1 - 3/7)
    assert anls("anything", ["something else entirely"]) == 0.0
    assert anls("", [""]) == 1.0


def test_anls_boundary_matches_the_docvqa_scripts():
    """The DocVQA / InfographicVQA evaluation (`question_result = 1 - min(NL)`, zeroed when below the 0.5 threshold)
    counts a prediction at exactly NL = 0.5; the paper's Eq. 1 (NL < tau) is the strict option."""
    assert anls("2019", ["2020"]) == 0.5
    assert anls("2019", ["2020"], strict=True) == 0.0
    assert anls("ab", ["abcd"]) == 0.5 and anls("ab", ["abcd"], strict=True) == 0.0
    assert anls("abc", ["abcd"], strict=True) == anls("abc", ["abcd"]) == 0.75
    assert anls("2019", ["2020", "2019 "]) == 1.0


def test_relaxed_accuracy_worked_examples():
    """Methani et al. 2020 / Masry et al. 2022: numeric answers within 5% of the reference are right, any other
    answer needs an exact match."""
    assert relaxed_accuracy("104", ["100"]) == 1.0
    assert relaxed_accuracy("105", ["100"]) == 1.0     # exactly 5%
    assert relaxed_accuracy("95", ["100"]) == 1.0
    assert relaxed_accuracy("106", ["100"]) == 0.0
    assert relaxed_accuracy("94", ["100"]) == 0.0
    assert relaxed_accuracy("45%", ["0.46"]) == 1.0    # a percentage is a fraction: 0.45 is 2.2% off
    assert relaxed_accuracy("0.0", ["0"]) == 0.0       # no relative error to a zero: the strings must match
    assert relaxed_accuracy("0", ["0"]) == 1.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0     # non-numeric: exact match, case-insensitive
    assert relaxed_accuracy("No", ["yes"]) == 0.0
    assert relaxed_accuracy("120", ["1,000", "118"]) == 1.0


# -------------------------------------------------------------------------------------------------------- reader


def test_reader_prompt_is_the_conversation_up_to_the_last_reply(tmp_path):
    from internvlx_hf.demo.recipe import prompt_messages

    processor = _processor()
    th.draw(tmp_path / "a.png", "red")
    rows = [
        {"id": "q1", "image": "a.png", "conversations": [
            {"from": "system", "value": ""}, {"from": "human", "value": "<image>\nWhat colour is the circle?"},
            {"from": "gpt", "value": "red"}], "answers": ["red", "red", "dark red"]},
        {"image": "a.png", "conversations": [  # multi-turn; the <image> tag is added as InternVL's loader does
            {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "red"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]},
    ]
    th.write_jsonl(tmp_path / "set.jsonl", rows)
    (eval_set,) = read_eval_data(str(tmp_path / "set.jsonl"), processor)
    assert (eval_set.name, eval_set.metric, len(eval_set.samples)) == ("set", "exact_match", 3)
    first, second, third = eval_set.samples
    assert first.prompt == processor.apply_chat_template(prompt_messages("What colour is the circle?"),
                                                         tokenize=False, add_generation_prompt=True)
    assert (first.reference, first.answers, first.id, first.source) == ("red", ["red", "red", "dark red"], "q1",
                                                                        f"{tmp_path / 'set.jsonl'}:1")
    assert first.images == [str(tmp_path / "a.png")]
    assert second.prompt == processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A square."},
         {"role": "user", "content": "Which colour?"}], tokenize=False, add_generation_prompt=True)
    assert (second.reference, second.answers) == ("red", ["red"])
    assert (third.images, third.reference) == ([], "hi")
    assert [len(s.samples) for s in read_eval_data(str(tmp_path / "set.jsonl"), processor, limit=2)] == [2]


def test_reader_asks_under_another_system_block_and_keeps_the_group(tmp_path):
    """``system`` replaces each conversation's system turn ("" an empty one, None none: the template's default);
    ``group_by`` keeps a row field for scores per value, and a row without it is an error naming the row."""
    from internvlx_hf.demo.recipe import prompt_messages

    processor = _processor()
    th.draw(tmp_path / "a.png", "red")
    rows = [{"task": "colour", "image": "a.png", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nWhat colour is it?"},
        {"from": "gpt", "value": "red"}]},
        {"task": "count", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes?"}, {"from": "gpt", "value": "1"}]}]
    path = str(th.write_jsonl(tmp_path / "set.jsonl", rows))
    for system in ("", None, "Be brief."):
        (eval_set,) = read_eval_data(path, processor, system=system, group_by="task")
        assert [x.prompt for x in eval_set.samples] == [
            processor.apply_chat_template(prompt_messages(q, system), tokenize=False, add_generation_prompt=True)
            for q in ("What colour is it?", "How many shapes?")]
        assert [x.group for x in eval_set.samples] == ["colour", "count"]
    (as_written,) = read_eval_data(path, processor)
    assert as_written.samples[0].prompt.count("Be brief.") == 1 and as_written.samples[0].group is None
    del rows[1]["task"]
    th.write_jsonl(tmp_path / "set.jsonl", rows)
    with pytest.raises(ValueError, match=r"set.jsonl:2: the row has no 'task' field to group the scores by"):
        read_eval_data(path, processor, group_by="task")
    with pytest.raises(ValueError, match="system: the prompts of EvalSets are rendered already"):
        read_eval_data([as_written], processor, system="")


def test_meta_names_a_metric_per_dataset_and_the_flag_overrides_it(tmp_path):
    processor = _processor()
    for name in ("a", "b"):
        th.write_jsonl(tmp_path / f"{name}.jsonl", th.colour_rows(tmp_path / "images", 2))
    meta = {"a": {"annotation": str(tmp_path / "a.jsonl"), "root": str(tmp_path / "images"), "metric": "vqa"},
            "b": {"annotation": str(tmp_path / "b.jsonl"), "root": str(tmp_path / "images")}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert [(s.name, s.metric) for s in read_eval_data(str(tmp_path / "meta.json"), processor)] == \
        [("a", "vqa"), ("b", "exact_match")]
    assert [s.metric for s in read_eval_data(str(tmp_path / "meta.json"), processor, metric="anls")] == \
        ["anls", "anls"]


_GOOD = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                             {"from": "gpt", "value": "red"}]}


@pytest.mark.parametrize("row, message", [
    ('{"image": "a.png", "conversations": [', "invalid JSON"),
    ({**_GOOD, "image": "nope.png"}, "image '{tmp}/nope.png' not found"),
    ({**_GOOD, "conversations": _GOOD["conversations"][:1]},
     "the conversation must end with the reference answer (a gpt / assistant turn)"),
    ({**_GOOD, "answers": "red"}, "\"answers\" must be a non-empty list of strings"),
    ({**_GOOD, "image": ["a.png", "a.png"]}, "the conversation has 1 <image> tag(s) but 2 image(s)"),
    ({**_GOOD, "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "turn 'from' must be one of"),
    ({**_GOOD, "image": "https://example.com/a.png"}, "image 'https://example.com/a.png' is a URL"),
    ({"image": "a.png", "question": "Colour?", "answer": "red"}, "a row needs `conversations`"),
])
def test_bad_rows_stop_the_run_with_file_and_line(tmp_path, capsys, row, message):
    th.draw(tmp_path / "a.png", "red")
    data = th.write_jsonl(tmp_path / "set.jsonl", [_GOOD, row])
    message = f"{data}:2: " + message.replace("{tmp}", str(tmp_path))
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        read_eval_data(str(data), _processor())
    (tmp_path / "old.json").write_text("kept\n")
    err = _one_line_error(capsys, ["eval", str(DEMO_MODEL), str(data), "--json", str(tmp_path / "old.json"),
                                   "--no-progress"])
    assert message in err
    assert (tmp_path / "old.json").read_text() == "kept\n"  # nothing written, nothing half-written


def test_option_and_file_errors_are_one_line(tmp_path, capsys):
    th.draw(tmp_path / "a.png", "red")
    data = str(th.write_jsonl(tmp_path / "set.jsonl", [_GOOD]))
    (tmp_path / "meta.json").write_text(json.dumps({"x": {"annotation": data, "metric": "bleu"}}))
    th.write_jsonl(tmp_path / "empty.jsonl", [])
    demo = str(DEMO_MODEL)
    for argv, message in [
        ([demo, str(tmp_path / "meta.json")], "dataset 'x': metric 'bleu' is not a metric; use one of exact_match, "
                                              "vqa, anls, relaxed"),
        ([demo, str(tmp_path / "nope.json")], f"DATA {str(tmp_path / 'nope.json')!r}: no such file; give an "
                                              "InternVL meta JSON or a JSONL file (several: comma-separated)."),
        ([demo, str(tmp_path / "empty.jsonl")], "no samples to evaluate"),
        ([demo, data, "--tiling", "ratio,wide"], "--tiling 'ratio,wide': use one or more of ratio, area, edge, none"),
        ([demo, data, "--plot", str(tmp_path / "p.txt")], "--plot"),
        ([demo, data, "--compare", demo], "a checkpoint is given twice"),
        ([str(tmp_path), data], "config.json"),
    ]:
        assert message in _one_line_error(capsys, ["eval", *argv, "--no-progress"])
    assert not (tmp_path / "p.txt").exists()


def test_an_image_that_cannot_be_decoded_stops_the_run_at_its_row(tmp_path, capsys):
    """Headers are read before generating; pixels that turn out broken later still name the row, and no output
    file is written."""
    th.draw(tmp_path / "a.png", "red")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])  # the header is intact, the pixel data is not
    rows = [_GOOD] * 3 + [{**_GOOD, "image": "broken.png"}]
    path = th.write_jsonl(tmp_path / "set.jsonl", rows)
    err = _one_line_error(capsys, ["eval", str(DEMO_MODEL), str(path), "--batch-size", "2", "--json",
                                   str(tmp_path / "out.json"), "--no-progress"])
    assert f"{path}:4: image 0 ('{tmp_path / 'broken.png'}'): the image data could not be decoded" in err
    assert not (tmp_path / "out.json").exists()


# ------------------------------------------------------------------------------------------------ tiny models


def test_batches_give_each_prompt_its_answer_alone(tmp_path):
    """Left padding: a random tiny model's greedy answers in batches of 3 are those of batches of 1."""
    model, processor = th.load(th.converted("internvl2_qwen2"))
    rows = th.colour_rows(tmp_path, 5)
    rows[1]["conversations"][0]["value"] = "Tell me, in as many words as you like, what colour the square is."
    data = str(th.write_jsonl(tmp_path / "set.jsonl", rows))
    alone = evaluate(model, processor, data, batch_size=1, max_new_tokens=6, progress=False)
    batched = evaluate(model, processor, data, batch_size=3, max_new_tokens=6, progress=False)
    assert [p.prediction for p in batched.datasets[0].predictions] == \
        [p.prediction for p in alone.datasets[0].predictions]
    result = batched.datasets[0]
    assert (result.samples, result.tiles_per_sample, result.visual_tokens_per_sample) == (5, 1.0, [("layers 0-1",
                                                                                                    256.0)])
    assert result.accuracy == sum(exact_match(p.prediction, p.answers) for p in result.predictions) / 5


def test_cli_scores_with_each_datasets_metric_and_keeps_every_prediction(tmp_path, capsys):
    """The demo model on a meta JSON of two datasets with metrics of their own (VQA with 10 human answers, ANLS)."""
    meta, (colour, shape) = _held_out(tmp_path, tasks=("colour", "shape"), n=6)
    entries = json.loads(meta.read_text())
    rows = [json.loads(line) for line in Path(entries["colour"]["annotation"]).read_text().splitlines()]
    for row in rows:  # two humans gave the drawn colour, eight another answer: 0.6 when the model is right
        row["answers"] = [row["conversations"][-1]["value"]] * 2 + ["maroon"] * 8
    th.write_jsonl(Path(entries["colour"]["annotation"]), rows)
    entries["colour"]["metric"], entries["shape"]["metric"] = "vqa", "anls"
    meta.write_text(json.dumps(entries))

    out = tmp_path / "results" / "eval.json"
    assert main(["eval", str(DEMO_MODEL), str(meta), "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert (record["format"], record["data"], len(record["runs"])) == ("internvlx-eval", str(meta), 1)
    run = record["runs"][0]
    assert run["options"] | {"device": None} == {"tiling": "ratio", "max_tiles": 6, "max_new_tokens": 32,
                                                 "max_tiles_per_dataset": {"colour": 6, "shape": 6},
                                                 "num_beams": 1, "batch_size": 8, "dtype": "float32",
                                                 "device": None}
    for result, metric in zip(run["datasets"], ("vqa", "anls")):
        assert result["metric"] == metric and result["samples"] == 6 and len(result["predictions"]) == 6
        scores = [METRICS[metric](p["prediction"], p["answers"]) for p in result["predictions"]]
        assert [p["score"] for p in result["predictions"]] == scores
        assert result["accuracy"] == pytest.approx(sum(scores) / 6, abs=1e-12)
        assert result["visual_tokens_per_sample"] == {"layers 0-4": 16.0, "layer 5": 64.0}
        line = f"{result['name']:<7}  {metric:<6}  {result['accuracy']:.3f}        6          1.00           " \
               "16.0 | 64.0"
        assert line in printed, printed
    vqa_scores = [p["score"] for p in run["datasets"][0]["predictions"]]
    assert all(s == 0.0 or s == pytest.approx(0.6, abs=1e-12) for s in vqa_scores)
    assert run["datasets"][0]["accuracy"] > 0.5  # the model answers most right: 0.6 each
    assert "visual tokens per LLM layer group (LVTC): layers 0-4 | layer 5" in printed
    assert "all" not in printed.split()  # no overall row across different metrics

    # the record is a results file for the card
    assert main(["card", str(DEMO_MODEL), "--license", "mit", "--results", str(out), "--output", "-"]) == 0
    card = capsys.readouterr().out
    assert f"| colour | vqa | {run['datasets'][0]['accuracy']:g} | internvlx eval, 6 samples, greedy, tiling ratio |" \
        in card


def test_cli_compares_checkpoints_and_tiling_modes_side_by_side(tmp_path, capsys):
    meta, _ = _held_out(tmp_path, tasks=("colour",), n=16, sizes="mixed")
    other = th.converted("internvl2_qwen2")
    out, plot = tmp_path / "eval.json", tmp_path / "plot.png"
    assert main(["eval", str(DEMO_MODEL), str(meta), "--compare", str(other), "--tiling", "ratio,edge",
                 "--max-new-tokens", "4", "--json", str(out), "--plot", str(plot), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    labels = [f"{name} ({tiling})" for name in (DEMO_MODEL.name, other.name) for tiling in ("ratio", "edge")]
    assert [r["label"] for r in runs] == labels
    assert [r["checkpoint"] for r in runs] == [str(DEMO_MODEL)] * 2 + [str(other)] * 2
    header = printed.splitlines()[5]
    assert header.split("  ")[0] == "dataset" and all(f"{label} score" in header for label in labels)
    tiles = [r["datasets"][0]["tiles_per_sample"] for r in runs]
    assert tiles[0] > tiles[1]  # on small and banner images RVTC's edge cap spends fewer tiles than ratio matching
    for run in runs:
        result = run["datasets"][0]
        tokens_per_tile = 16 if run["checkpoint"] == str(DEMO_MODEL) else 256
        assert sum(p["visual_tokens"] for p in result["predictions"]) == \
            tokens_per_tile * sum(p["tiles"] for p in result["predictions"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Wrote {out}" in printed and f"Wrote {plot}" in printed

    # --json - prints the record alone on stdout
    assert main(["eval", str(DEMO_MODEL), str(meta), "--limit", "2", "--json", "-", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["runs"][0]["datasets"][0]["samples"] == 2


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    th.draw(tmp_path / "a.png", "red")
    data = str(th.write_jsonl(tmp_path / "set.jsonl", [_GOOD]))
    err = _one_line_error(capsys, ["eval", str(DEMO_MODEL), data, "--plot", str(tmp_path / "p.png")])
    assert "--plot needs matplotlib, which is not installed; install it with `pip install 'internvlx-hf[plot]'`" \
        in err


# ------------------------------------------------------------------------------------------------- demo model


def test_demo_model_scores_match_the_learnability_benchmark(tmp_path, capsys):
    """`internvlx eval` prints, per task, the held-out accuracy `recipe.evaluate` (the learnability benchmark's
    scorer) gives the demo model on the same samples."""
    from internvlx_hf.demo import load_demo_model
    from internvlx_hf.demo.recipe import evaluate as benchmark_evaluate

    meta, metas = _held_out(tmp_path)
    model, processor = load_demo_model()
    benchmark = {task: benchmark_evaluate(model, processor, task_meta, progress=False)["accuracy"][task]
                 for task, task_meta in zip(TASKS, metas)}
    out = tmp_path / "eval.json"
    assert main(["eval", str(DEMO_MODEL), str(meta), "--max-new-tokens", "8", "--json", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = {d["name"]: d for d in json.loads(out.read_text())["runs"][0]["datasets"]}
    assert list(results) == list(TASKS)
    for task in TASKS:
        assert results[task]["samples"] == 40
        assert abs(results[task]["accuracy"] - benchmark[task]) <= 0.02, (task, results[task]["accuracy"],
                                                                          benchmark[task])
        assert f"{task:<8}  exact_match  {results[task]['accuracy']:.3f}       40" in printed
    # the comparison is between two working scorers: the demo model's weakest task is shape (0.935 on its own
    # held-out set, demo_model.json; 36/40 here)
    assert min(benchmark.values()) >= 0.85


def test_the_recipe_scorer_reproduces_the_demo_models_recorded_held_out_scores(tmp_path):
    """`recipe.evaluate` (the learnability benchmark's numbers) runs on `evaluation.evaluate`; on the held-out set
    the demo model was scored on (scripts/make_demo_model.py: the recipe's 1,000 samples, an empty system block,
    batches of 50, 8 new tokens) it gives exactly the numbers recorded in demo_model.json."""
    from internvlx_hf.demo import demo_record, load_demo_model
    from internvlx_hf.demo.recipe import CONFIGS, DataSpec, make_datasets, read_records
    from internvlx_hf.demo.recipe import evaluate as benchmark_evaluate

    record = demo_record()
    assert record["data"]["n_test"] == DataSpec().n_test == 1000
    # the held-out set does not depend on the training sets' sizes (tiny ones here)
    _, test_meta = make_datasets(tmp_path, CONFIGS["pvtc+lvtc"], DataSpec(n_basic=1, n_fine=1, fine_repeat=1))
    model, processor = load_demo_model()
    expected = record["held_out"]
    got = benchmark_evaluate(model, processor, test_meta, limit=1000, system=expected["system"], progress=False)
    for key in ("accuracy", "basic_min", "n", "tiles_per_sample", "visual_tokens_per_sample"):
        assert got[key] == expected[key], (key, got[key], expected[key])
    # a task filter scores the samples of those tasks among the first `limit`
    shape = benchmark_evaluate(model, processor, test_meta, limit=100, tasks=["shape"], progress=False)
    assert list(shape["accuracy"]) == ["shape"]
    assert shape["n"] == [r["task"] for r in read_records(test_meta)[0][:100]].count("shape") > 0
    with pytest.raises(ValueError, match=r"tasks=\['colours'\]: no such sample in "):
        benchmark_evaluate(model, processor, test_meta, limit=100, tasks=["colours"], progress=False)


def test_the_demo_models_recorded_video_scores_are_reproduced(tmp_path):
    """The demo model's video stage was scored on 200 held-out clips through `internvlx eval`'s video rows (frame
    folders, every frame one tile); the same scorer on the same clips gives the recorded numbers exactly."""
    from internvlx_hf.demo import demo_record, load_demo_model
    from internvlx_hf.demo.recipe import CONFIGS, DataSpec, VideoSpec, make_video_datasets
    from internvlx_hf.demo.recipe import evaluate as benchmark_evaluate

    record = demo_record()
    video = VideoSpec(**{k: v for k, v in record["video"].items() if k in VideoSpec.__dataclass_fields__})
    assert video == VideoSpec()  # the recipe's defaults are what the shipped model was made with
    data = DataSpec(n_basic=1, n_fine=1, fine_repeat=1, n_test=1)  # the clips do not depend on the image sets
    _, clips = make_video_datasets(tmp_path, CONFIGS["pvtc+lvtc"], data, VideoSpec(n_train=1))
    model, processor = load_demo_model()
    expected = record["held_out_video"]["empty"]
    got = benchmark_evaluate(model, processor, clips, limit=video.n_test, system="", progress=False)
    for key in ("accuracy", "n", "tiles_per_sample", "visual_tokens_per_sample"):
        assert got[key] == expected[key], (key, got[key], expected[key])


# --------------------------------------------------------------------------------------------------- training


def test_train_eval_data_logs_scores_and_the_card_shows_them(tmp_path, capsys):
    """`internvlx train --eval-data` with --eval_strategy steps: the scores of every evaluation go to the printed
    log and trainer_state.json; the final folder's card shows the last ones, and `internvlx eval` on that folder
    gives the same numbers."""
    held_out, _ = _held_out(tmp_path / "heldout", tasks=("colour", "count"), n=8)
    train_meta = generate_dataset(tmp_path / "train", n=8, tasks=["colour"], seed=HELD_OUT_SEED + 1, image_size=112,
                                  system_message="", name="train")
    out = tmp_path / "out"
    assert main(["train", "--model", str(DEMO_MODEL), "--data", str(train_meta), "--eval-data", str(held_out),
                 "--preset", "full", "--output_dir", str(out), "--max_steps", "2", "--eval_strategy", "steps",
                 "--eval_steps", "1", "--save_steps", "2", "--learning_rate", "1e-6", *th_fast()]) == 0
    printed = capsys.readouterr().out
    assert "Held-out data (--eval-data): colour 8 samples (exact_match), count 8 samples (exact_match)" in printed
    assert "'eval_colour_accuracy'" in printed and "'eval_loss'" in printed

    for state_file in (out / "trainer_state.json", out / "checkpoint-2" / "trainer_state.json"):
        history = json.loads(state_file.read_text())["log_history"]
        scored = [entry for entry in history if "eval_colour_accuracy" in entry]
        assert [entry["step"] for entry in scored] == [1, 2]
        assert {"eval_count_accuracy", "eval_count_samples", "eval_count_visual_tokens",
                "eval_count_visual_tokens_long", "eval_count_seconds_per_sample"} <= set(scored[-1])
        assert scored[-1]["eval_count_samples"] == 8 and scored[-1]["eval_count_visual_tokens"] == 16.0
    last = scored[-1]

    from internvlx_hf.provenance import read_provenance

    evaluation = read_provenance(out)["training"][-1]["evaluation"]
    assert (evaluation["step"], evaluation["data"]) == (2, str(held_out))
    assert [(d["name"], d["accuracy"]) for d in evaluation["datasets"]] == \
        [("colour", last["eval_colour_accuracy"]), ("count", last["eval_count_accuracy"])]

    assert main(["card", str(out), "--license", "mit", "--output", "-"]) == 0
    card = capsys.readouterr().out
    assert "## Held-out evaluation" in card and "at step 2" in card
    assert f"| colour | exact_match | {last['eval_colour_accuracy']:.3f} | 8 | 16 (layers 0-4), 64 (layer 5) |" \
        in card
    assert f"| count | exact_match | {last['eval_count_accuracy']:.3f} | 8 |" in card
    assert "- evaluation:" not in card  # the run's bullets leave it to the table

    scores = tmp_path / "scores.json"
    assert main(["eval", str(out), str(held_out), "--json", str(scores), "--no-progress"]) == 0
    rescored = {d["name"]: d["accuracy"] for d in json.loads(scores.read_text())["runs"][0]["datasets"]}
    assert rescored == {"colour": last["eval_colour_accuracy"], "count": last["eval_count_accuracy"]}
    assert rescored["colour"] >= 0.75  # the demo model still answers after two tiny steps


def th_fast() -> list[str]:
    return ["--use_cpu", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true", "--logging_steps", "1",
            "--per_device_train_batch_size", "4"]


def test_lora_run_without_eval_strategy_is_scored_once_after_training(tmp_path):
    """With --eval_strategy no (the default) the held-out set is scored once, after the last step; a LoRA model is
    scored with its adapters in place."""
    from internvlx_hf.training import parse_train_args, train

    held_out, _ = _held_out(tmp_path / "heldout", tasks=("shape",), n=6)
    train_meta = generate_dataset(tmp_path / "train", n=8, tasks=["shape"], seed=HELD_OUT_SEED + 2, image_size=112,
                                  system_message="", name="train")
    result = train(*parse_train_args(dict(
        model=str(DEMO_MODEL), data=str(train_meta), eval_data=str(held_out), eval_metric="vqa",
        preset="lora", output_dir=str(tmp_path / "out"), max_steps=2, use_cpu=True, report_to="none",
        disable_tqdm=True, per_device_train_batch_size=4, learning_rate=1e-6, save_strategy="no")), print_fn=None)
    history = result.trainer.state.log_history
    scored = [entry for entry in history if "eval_shape_accuracy" in entry]
    assert [entry["step"] for entry in scored] == [2] and any("eval_loss" in entry for entry in history)
    (callback,) = [c for c in result.trainer.callback_handler.callbacks if type(c).__name__ == "EvaluationCallback"]
    predictions = callback.latest.datasets[0].predictions
    assert callback.latest.datasets[0].metric == "vqa"
    assert scored[0]["eval_shape_accuracy"] == sum(vqa_accuracy(p.prediction, p.answers) for p in predictions) / 6
    assert scored[0]["eval_shape_accuracy"] >= 4 / 6
    saved = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [e for e in saved if "eval_shape_accuracy" in e] == scored
    # evaluate() returns the scores too (for metric_for_best_model), without scoring the same step twice
    assert result.trainer.evaluate()["eval_shape_accuracy"] == scored[0]["eval_shape_accuracy"]
    assert len([e for e in result.trainer.state.log_history if "eval_shape_accuracy" in e]) == 1


def test_the_tile_limit_printed_is_the_one_applied(tmp_path, capsys):
    """A meta's max_dynamic_patch below the processor's max_tiles is what the report names; --max-tiles wins over it
    (the precedence of training)."""
    meta, _ = _held_out(tmp_path, tasks=("colour", "shape"), n=2, sizes="mixed")
    entries = json.loads(meta.read_text())
    entries["colour"]["max_dynamic_patch"] = 2
    meta.write_text(json.dumps(entries))
    assert main(["eval", str(DEMO_MODEL), str(meta), "--max-new-tokens", "2", "--no-progress"]) == 0
    assert "tiling ratio (max 2/6 tiles by dataset)" in capsys.readouterr().out
    entries["shape"]["max_dynamic_patch"] = 2
    meta.write_text(json.dumps(entries))
    assert main(["eval", str(DEMO_MODEL), str(meta), "--max-new-tokens", "2", "--no-progress"]) == 0
    assert "tiling ratio (max 2 tiles)" in capsys.readouterr().out
    run = evaluate(*th.load(DEMO_MODEL), str(meta), max_tiles=1, max_new_tokens=2, progress=False)
    assert run.options["max_tiles_per_dataset"] == {"colour": 1, "shape": 1}
    assert all(p.tiles == 1 for d in run.datasets for p in d.predictions)


def test_plot_of_compared_runs_keeps_every_label_readable():
    """Three runs with the same visual tokens: their names are in a legend of their own (one marker each), outside
    the axes, instead of text next to the points, which overlapped."""
    import matplotlib

    matplotlib.use("Agg")
    from internvlx_hf.evaluation.report import runs_figure
    from internvlx_hf.evaluation.runner import DatasetResult, EvalRun

    runs = [EvalRun(label=f"checkpoint-{i}", checkpoint=f"c{i}", options={}, datasets=[
        DatasetResult(name, "exact_match", 0.5 + 0.01 * i, 10, 1.0, [("layers 0-1", 256.0)], 0.1)
        for name in ("colour", "shape")]) for i in range(3)]
    figure = runs_figure(runs)
    axes = figure.axes[0]
    assert len(axes.texts) == 0  # no run names written next to the points
    legends = [child for child in axes.get_children() if isinstance(child, matplotlib.legend.Legend)]
    labels = [[text.get_text() for text in legend.get_texts()] for legend in legends]
    assert sorted(labels) == [["checkpoint-0", "checkpoint-1", "checkpoint-2"], ["colour", "shape"]]
    markers = {line.get_marker() for line in axes.get_lines() if line.get_marker() not in (None, "None", "")}
    assert len(markers) == 3
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [legend.get_window_extent(renderer) for legend in legends]
    assert not boxes[0].overlaps(boxes[1])
    assert all(not box.overlaps(axes.get_window_extent(renderer)) for box in boxes)  # beside the plot
