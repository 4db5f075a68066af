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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from .tasks import Metric, Task

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


def score(task: Task, predictions: Sequence[str], split: str = "test") -> float:
    """Fraction in [0, 1] of ``predictions`` (one per row of ``split``) that are correct."""
    references = task.split(split)
    if len(predictions) != len(references):
        raise ValueError(f"task {task.name!r}: {len(predictions)} predictions for {len(references)} {split} rows")
    correct = sum(is_correct(task.metric, prediction, example.target) for prediction, example in zip(predictions, references))
    return correct / len(references)
