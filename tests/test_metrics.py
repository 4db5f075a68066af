"""OP / BWT / FWT on matrices computed by hand, and per-task scoring of predictions."""

import math

import numpy as np
import pytest

from treelora.data import Example, Task, score
from treelora.evaluate import average_performance, backward_transfer, forward_transfer, per_task_final, summary

pytestmark = pytest.mark.unit

nan = math.nan
# R[i, j]: task i after training task j. Lower triangle: measured before task i was trained.
R = np.array([
    [0.80, 0.70, 0.60],
    [0.30, 0.90, 0.85],
    [0.20, 0.25, 0.75],
])


def test_op_bwt_fwt_by_hand():
    assert per_task_final(R).tolist() == [0.60, 0.85, 0.75]
    assert average_performance(R) == pytest.approx((0.60 + 0.85 + 0.75) / 3)  # 0.7333
    # (0.60 - 0.80) + (0.85 - 0.90) = -0.20 - 0.05 = -0.25, over 2 tasks
    assert backward_transfer(R) == pytest.approx(-0.125)
    # (R[1,0] - 0.20) + (R[2,1] - 0.15) = 0.10 + 0.10, over 2 tasks
    assert forward_transfer(R, np.array([0.10, 0.20, 0.15])) == pytest.approx(0.10)
    # only task 2 has a zero-shot reference: 0.25 - 0.05
    assert forward_transfer(R, np.array([nan, nan, 0.05])) == pytest.approx(0.20)
    assert math.isnan(forward_transfer(R, np.array([0.5, nan, nan])))  # task 0 has no R[0, -1]


def test_positive_transfer_is_kept_unless_the_clipped_variant_is_asked_for():
    # Lower triangle not measured (NaN) is allowed.
    gains = np.array([
        [0.50, 0.60, 0.70],
        [nan, 0.80, 0.70],
        [nan, nan, 0.90],
    ])
    # unclipped: (0.70 - 0.50) + (0.70 - 0.80) = 0.20 - 0.10 -> 0.05
    assert backward_transfer(gains) == pytest.approx(0.05)
    # authors' clip: min(0.20, 0) + min(-0.10, 0) = -0.10 -> -0.05
    assert backward_transfer(gains, clip=True) == pytest.approx(-0.05)
    plain, clipped = summary(gains), summary(gains, clip_bwt=True)
    assert plain["bwt"] == pytest.approx(0.05) and "bwt_clipped" not in plain
    assert clipped["bwt_clipped"] == pytest.approx(-0.05) and "bwt" not in clipped
    assert "fwt" not in plain  # no zero-shot reference given
    assert math.isnan(forward_transfer(gains, np.array([0.1, 0.2, 0.3])))  # no R[i, i-1] measured


def test_summary_by_hand():
    result = summary(R, zero_shot=np.array([0.10, 0.20, nan]))
    assert result["num_tasks"] == 3 and result["per_task_final"] == [0.60, 0.85, 0.75]
    assert result["op"] == pytest.approx(2.20 / 3) and result["bwt"] == pytest.approx(-0.125)
    assert result["fwt"] == pytest.approx(0.30 - 0.20) and result["fwt_tasks"] == 1


def test_one_task_stream():
    single = np.array([[0.70]])
    assert average_performance(single) == pytest.approx(0.70)
    assert math.isnan(backward_transfer(single)) and math.isnan(backward_transfer(single, clip=True))
    assert math.isnan(forward_transfer(single, np.array([0.1])))
    result = summary(single, zero_shot=np.array([0.1]))
    assert math.isnan(result["bwt"]) and result["fwt_tasks"] == 0


@pytest.mark.parametrize(
    "matrix, message",
    [
        (np.array([0.5, 0.6]), "square"),
        (np.zeros((2, 3)), "square"),
        (np.zeros((0, 0)), "square"),
        (np.array([[80.0, 70.0], [nan, 90.0]]), "divide points by 100"),
        (np.array([[0.8, 0.7], [0.3, nan]]), r"R\[i, j\] at \[\(1, 1\)\]"),
    ],
)
def test_bad_matrices_are_refused(matrix, message):
    with pytest.raises(ValueError, match=message):
        summary(matrix)


def test_zero_shot_must_match_the_matrix():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        forward_transfer(R, np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="divide points by 100"):
        forward_transfer(R, np.array([10.0, 20.0, 15.0]))


def task(metric: str, targets: list[str], kind: str = "generation", labels: tuple = ()) -> Task:
    examples = tuple(Example(f"prompt {i}", target) for i, target in enumerate(targets))
    return Task("t", kind, labels, metric, examples, (), examples, "code")


def test_exact_match_is_numeric_aware():
    references = task("exact_match", ["1", "1", "1000", "17.48", "June", "3"])
    assert score(references, ["15", "1.0", "1,000", "17.480", " june ", "3 moles"]) == pytest.approx(4 / 6)
    assert score(task("exact_match", ["1"]), ["15"]) == 0.0
    assert score(task("exact_match", ["1"]), ["1.0"]) == 1.0
    assert score(task("exact_match", ["-2"]), ["-2.00"]) == 1.0


def test_option_accuracy_compares_the_first_option_letter():
    references = task("option_accuracy", ["B\nBecause the text compares two things.", "A\nreason", "C\nreason", "D\nreason"])
    predictions = ["B\nsome reasoning", "Because of this, (A) is right", "The answer is B. Or C", "d"]
    # right, right (the B of "Because" is no option), wrong (B comes first), wrong (lower case)
    assert score(references, predictions) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="does not start with an option letter"):
        score(task("option_accuracy", ["no letter here"]), ["A"])


def test_accuracy_is_an_exact_label_match_after_strip():
    labels = task("accuracy", ["Good", "Bad", "Bad"], kind="classification", labels=("Good", "Bad"))
    assert score(labels, [" Good\n", "bad", "Bad"]) == pytest.approx(2 / 3)
    letters = task("accuracy", ["A", "C"])
    assert score(letters, ["A", "C."]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1 predictions for 2 test rows"):
        score(letters, ["A"])


# -- graded metrics, on worked examples ----------------------------------------------------------
def test_sari_on_worked_examples():
    from treelora.data.scoring import sari

    assert sari("a b c", "a b d", "a b d") == pytest.approx(1.0)  # the reference itself
    # copying the source "a b c" when the reference is "a b d":
    # n=1: keep P 2/3 R 1 -> F 0.8; nothing deleted -> P 1; nothing added but "d" wanted -> F 0
    # n=2: keep {ab} of {ab, bc}: P 1/2 R 1 -> F 2/3; del P 1; add F 0
    # n=3: keep {abc} vs none kept in the reference: P 0 -> F 0; del P 1; add F 0
    # n=4: no n-grams: keep 1, del 1, add 1
    expected = ((0.8 + 1 + 0) + (2 / 3 + 1 + 0) + (0 + 1 + 0) + (1 + 1 + 1)) / 12
    assert sari("a b c", "a b c", "a b d") == pytest.approx(expected)


def test_rouge_l_bleu_and_edit_similarity_on_worked_examples():
    from treelora.data.scoring import corpus_bleu, edit_similarity, rouge_l

    # LCS of "the cat sat" and "the cat sat down" is 3 tokens: P 3/3, R 3/4 -> F 6/7
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert rouge_l("completely different", "the cat sat") == 0.0
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert corpus_bleu(["dog"], ["the cat sat on the mat"]) == pytest.approx(0.0)
    # Indel similarity: "abcd" vs "abce" differ by one substitution = 2 indels over 8 chars
    assert edit_similarity("abcd", "abce") == pytest.approx(1 - 2 / 8)


def test_graded_metrics_score_a_task_as_the_mean_over_rows():
    t = task("edit_similarity", ["abcd", "xyz"])
    assert score(t, ["abce", "xyz"]) == pytest.approx((0.75 + 1.0) / 2)
    s = Task("s", "generation", (), "sari", (Example("a b c", "a b d"),), (), (Example("a b c", "a b d"),), "code")
    assert score(s, ["a b d"]) == pytest.approx(1.0)


def test_unknown_metric_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="rouge_l.*edit_similarity"):
        task("meteor", ["x"])
    with pytest.raises(ValueError, match="scored by accuracy"):
        task("rouge_l", ["pos"], kind="classification", labels=("pos", "neg"))
