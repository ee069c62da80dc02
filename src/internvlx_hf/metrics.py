"""The answer metrics of the benchmarks InternVL reports, each from its paper's definition.

Standard library only, importing nothing of the package: `internvlx_hf.data` checks a meta file's metric names with
it and `internvlx_hf.evaluation` scores with it.

Every metric scores one prediction against a sample's reference answers, from 0 to 1; a dataset's score is the
mean over its samples.

- ``exact_match``: 1 when the prediction equals a reference (leading and trailing whitespace ignored).
- ``vqa``: VQA accuracy (Antol et al., "VQA: Visual Question Answering", ICCV 2015; the VQAv2 evaluation,
  Goyal et al., CVPR 2017): ``min(#humans that gave the answer / 3, 1)``, averaged over the 10 subsets of 9 of the
  10 human answers, after the official answer normalisation (`normalize_vqa_answer`). A sample with one reference
  scores its exact match after normalisation.
- ``anls``: Average Normalized Levenshtein Similarity (Biten et al., "Scene Text Visual Question Answering", ICCV
  2019; used by DocVQA and InfographicVQA): ``1 - NL(a, o)`` when that similarity is at least ``tau = 0.5`` (``NL``:
  the normalised Levenshtein distance), else 0, as the official DocVQA scripts count (``NL = 0.5`` scores 0.5; the
  paper's strict ``NL < tau`` is ``anls(..., strict=True)``); the best reference counts. Case and surrounding
  whitespace are ignored, as in the ST-VQA / DocVQA evaluation.
- ``relaxed``: relaxed accuracy (Methani et al., "PlotQA", WACV 2020; Masry et al., "ChartQA", Findings of ACL
  2022, Sec. 5.1): a numeric answer is right within 5% relative error of a numeric reference, anything else needs
  an exact match (case-insensitive). A trailing ``%`` marks a percentage (``"45%"`` is 0.45), and a reference of 0
  needs an exact match (no relative error exists), as the implementation most ChartQA numbers come from
  (Pix2Struct's ``relaxed_correctness``) does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# --- VQA answer normalisation (the official VQA evaluation script's rules) ---------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The punctuation list of the VQAv2 / EvalAI evaluation; apostrophes and periods have their own rules.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern `(?!<=\d)(\.)(?!\d)` was meant as a look-behind but is a look-ahead that never fails, so it
# drops every period not followed by a digit ("3.5" keeps its period, "dog." loses it); the same rule here.
_PERIOD = re.compile(r"\.(?!\d)")
# The contractions the official table restores, written with their apostrophes. The table maps each spelling with
# exactly one apostrophe left out back to the full form ("dont" -> "don't", "couldnt've" -> "couldn't've"); the
# first-person forms keep the table's capital I, so (the text being lower-cased first) they never match, as there.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "I'd've", "I'm", "I've",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've",
    "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've", "shouldn't",
    "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll",
    "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're",
    "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've",
    "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
    "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)


def _contraction_table() -> dict[str, str]:
    table = {}
    for full in _CONTRACTIONS:
        for index, char in enumerate(full):
            if char == "'":
                table[full[:index] + full[index + 1:]] = full
    return table


_CONTRACTION_TABLE = _contraction_table()


def _strip_punctuation(text: str) -> str:
    # A mark next to a space (or any mark, once a digit-comma-digit appears: "1,000") is deleted; a mark inside a
    # word becomes a space ("black/white" -> "black white").
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTION_TABLE.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the VQA evaluation compares it: line breaks and tabs become spaces, punctuation is removed (or
    split words), letters are lower-cased, number words become digits (``"two"`` -> ``"2"``), articles go, and
    contractions get their apostrophes back (``"dont"`` -> ``"don't"``)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_strip_punctuation(text))


# --- metrics -------------------------------------------------------------------------------------------------------


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when ``prediction`` equals one of ``references`` (surrounding whitespace ignored), else 0.0."""
    answer = prediction.strip()
    return float(any(answer == reference.strip() for reference in references))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of ``prediction`` against the human ``references`` (10 in VQAv2, TextVQA, VizWiz).

    Each reference is left out in turn and the prediction scores ``min(matches among the others / 3, 1)``; the score
    is the mean of those. Both sides are normalised with `normalize_vqa_answer` (the official script normalises
    the human answers only when they disagree, as its annotations were normalised when collected; normalising them
    always gives the same scores on those annotations and also works for references that were not). With a single
    reference there is nothing to leave out, and the score is exact match after normalisation.
    """
    answer = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(reference) for reference in references]
    if len(humans) == 1:
        return float(answer == humans[0])
    matches = sum(1 for human in humans if human == answer)
    # Leaving out a matching answer leaves matches - 1 others that match; leaving out any other leaves all of them.
    scores = [min((matches - (human == answer)) / 3, 1.0) for human in humans]
    return sum(scores) / len(scores)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], tau: float = 0.5, strict: bool = False) -> float:
    """ANLS of one prediction: ``max over references of s(a, o)``, ``s = 1 - NL(a, o)``, with ``NL`` the Levenshtein
    distance divided by the longer string's length (Biten et al. 2019); ``s`` is kept when it is at least ``tau``,
    else 0, as the DocVQA / InfographicVQA evaluation scripts (`question_result < threshold` becomes 0) that the
    leaderboards and InternVL's evaluation run: ``anls("2019", ["2020"])`` is 0.5. ``strict=True`` is the paper's
    Eq. 1 (and Pix2Struct's ``anls_metric``): kept only when ``NL < tau``, so that example scores 0.
    Compared lower-cased, with surrounding whitespace stripped and inner runs of whitespace as one space."""
    answer = " ".join(prediction.lower().split())
    best = 0.0
    for reference in references:
        truth = " ".join(reference.lower().split())
        longest = max(len(answer), len(truth))
        distance = levenshtein(answer, truth) / longest if longest else 0.0
        kept = distance < tau if strict else 1.0 - distance >= tau
        best = max(best, 1.0 - distance if kept else 0.0)
    return best


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: Sequence[str], tolerance: float = 0.05) -> float:
    """1.0 when a numeric ``prediction`` lies within ``tolerance`` relative error of a numeric reference, or (for
    anything else) equals a reference ignoring case and surrounding whitespace; else 0.0."""
    value = _number(prediction)
    for reference in references:
        target = _number(reference)
        if value is not None and target:  # target 0: no relative error exists, so the strings must match
            if abs(value - target) / abs(target) <= tolerance:
                return 1.0
        elif prediction.strip().lower() == reference.strip().lower():
            return 1.0
    return 0.0


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "vqa": vqa_accuracy,
    "anls": anls,
    "relaxed": relaxed_accuracy,
}
DEFAULT_METRIC = "exact_match"


def get_metric(name: str, where: str = "metric") -> Callable[[str, Sequence[str]], float]:
    """The metric function called ``name``; ``where`` names the option or file that asked for it in the error."""
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{where} {name!r} is not a metric; use one of {', '.join(METRICS)}") from None


__all__ = ["DEFAULT_METRIC", "METRICS", "anls", "exact_match", "get_metric", "levenshtein", "normalize_vqa_answer",
           "relaxed_accuracy", "vqa_accuracy"]
