"""Score a task's predictions against its references with the task's metric. Pure: decoding
(greedy) happens in the evaluation loop; this only compares strings.

* ``accuracy`` - the prediction equals the reference after stripping whitespace (a label of a
  classification task, or an answer letter such as C-STANCE's and FOMC's).
* ``option_accuracy`` - the first standalone option letter A-E of the prediction equals the one
  the reference starts with (ScienceQA references are "B\\n<reasoning>"). "Standalone" means a
  capital letter with no letter or digit beside it, so the "B" of "Because" is not an answer.
* ``exact_match`` - numeric-aware: when both sides parse as numbers they are compared as exact
  decimals ("1.0" == "1", "1" != "15", "1,000" == "1000"); otherwise the stripped, lower-cased
  strings must be equal (NumGLUE-cm has a few answers such as "June").

Graded metrics for free-text answers (TRACE's own for summaries, simplification and code),
each a mean over rows in [0, 1] except BLEU, which is corpus-level as usual:

* ``rouge_l`` - ROUGE-L F-measure (Google's rouge-score, with stemming; its tokenizer keeps
  only a-z and 0-9, so it suits English such as MeetingBank);
* ``bleu`` - corpus BLEU of sacrebleu (its default 13a tokenisation), divided by 100;
* ``sari`` - SARI (Xu et al., 2016) against the source text, one reference, n-grams 1-4, in
  tensor2tensor's formulation: F1 of kept and of added n-grams, precision of deleted ones;
* ``edit_similarity`` - rapidfuzz's normalised Indel similarity (``fuzz.ratio``) / 100, what
  TRACE uses for Py150 code completion.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from .tasks import Example, Metric, Task

_OPTION = re.compile(r"(?<![A-Za-z0-9])[A-E](?![A-Za-z0-9])")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")


def option_letter(text: str) -> str | None:
    """The first standalone option letter A-E in ``text``, or None."""
    found = _OPTION.search(text)
    return found.group(0) if found else None


def as_number(text: str) -> Decimal | None:
    """``text`` as an exact finite decimal, or None when it is not just a number."""
    text = text.strip()
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None  # "nan" / "inf" are words here, not answers


def is_correct(metric: Metric, prediction: str, reference: str) -> bool:
    if metric == "accuracy":
        return prediction.strip() == reference.strip()
    if metric == "option_accuracy":
        expected = reference.strip()[:1]
        if not expected or expected not in "ABCDE":
            raise ValueError(f"option_accuracy: reference {reference[:40]!r} does not start with an option letter A-E")
        return option_letter(prediction) == expected
    if metric == "exact_match":
        predicted, expected = as_number(prediction), as_number(reference)
        if predicted is not None and expected is not None:
            return predicted == expected
        return prediction.strip().lower() == reference.strip().lower()
    raise ValueError(f"unknown metric {metric!r}")


GRADED = ("rouge_l", "bleu", "sari", "edit_similarity")


def rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100


def edit_similarity(prediction: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(prediction, reference) / 100


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _fbeta(true_positives: int, selected: int, relevant: int, precision_only: bool = False) -> float:
    precision = true_positives / selected if selected else 1.0
    if precision_only:
        return precision
    recall = true_positives / relevant if relevant else 1.0
    return 2 * precision * recall / (precision + recall) if precision > 0 and recall > 0 else 0.0


def sari(source: str, prediction: str, reference: str, max_n: int = 4) -> float:
    """SARI of one simplification against its source and one reference, in [0, 1]."""
    src, pred, ref = source.lower().split(), prediction.lower().split(), reference.lower().split()
    keep = delete = add = 0.0
    for n in range(1, max_n + 1):
        s, p, r = _ngrams(src, n), _ngrams(pred, n), _ngrams(ref, n)
        kept_sys, kept_ref = s & p, s & r
        keep += _fbeta(sum((kept_sys & kept_ref).values()), sum(kept_sys.values()), sum(kept_ref.values()))
        deleted_sys, deleted_ref = s - p, s - r
        delete += _fbeta(sum((deleted_sys & deleted_ref).values()), sum(deleted_sys.values()), sum(deleted_ref.values()), True)
        added_sys = p - s
        add += _fbeta(sum((added_sys & r).values()), sum(added_sys.values()), sum((r - s).values()))
    return (keep + delete + add) / (3 * max_n)


def example_score(metric: Metric, prediction: str, example: Example) -> float:
    """One row's score in [0, 1] (BLEU is corpus-level: see ``score``)."""
    if metric == "rouge_l":
        return rouge_l(prediction, example.target)
    if metric == "sari":
        return sari(example.text, prediction, example.target)
    if metric == "edit_similarity":
        return edit_similarity(prediction, example.target)
    return float(is_correct(metric, prediction, example.target))


def score(task: Task, predictions: Sequence[str], split: str = "test") -> float:
    """The task's metric over ``predictions`` (one per row of ``split``), in [0, 1]: the share
    correct for accuracy-like metrics, the mean (corpus BLEU) for graded ones."""
    references = task.split(split)
    if len(predictions) != len(references):
        raise ValueError(f"task {task.name!r}: {len(predictions)} predictions for {len(references)} {split} rows")
    if task.metric == "bleu":
        return corpus_bleu(predictions, [e.target for e in references])
    return sum(example_score(task.metric, p, e) for p, e in zip(predictions, references)) / len(references)
