"""GSM8K / MATH scoring: MetaMath's extraction and Hendrycks' equivalence, quirks included."""

import pytest

from oplora.evaluation.math_score import (
    gsm8k_correct,
    gsm8k_gold,
    gsm8k_prediction,
    last_boxed,
    math_correct,
    math_equiv,
    math_gold,
    math_prediction,
    normalize_math,
)


@pytest.mark.parametrize(
    "answer, gold",
    [("She pays 617 + 617 = <<617+617=1234>>1,234.\n#### 1,234", 1234.0), ("5 - 10 = -5\n#### -5", -5.0)],
)
def test_gsm8k_gold(answer, gold):
    assert gsm8k_gold(answer) == gold


def test_gsm8k_gold_without_mark_raises():
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("The answer is 12.")


@pytest.mark.parametrize(
    "completion, prediction",
    [
        ("6 * 3 = 18 eggs.\nThe answer is: 18", 18.0),
        ("The answer is: $1,234.", 1234.0),
        ("The answer is: 1,234,567", 1234.0),  # the regex allows one separator: only "1,234" is read
        ("The answer is: -5", -5.0),
        ("The answer is: 3/4", 1.0),  # Fraction(3, 4) = 0.75, then round() -> 1
        ("The answer is: 7/0", 7.0),  # zero denominator: the numerator is the answer
        ("The answer is: 2.5", 2.0),  # round() is half-to-even: 2.5 -> 2
        ("The answer is: 3.5", 4.0),
        ("The answer is: 3. Check: The answer is: 4", 4.0),  # the last mark wins
        ("The answer is: 18 apples", 18.0),
        ("So she has 18 apples.", None),  # no mark
        ("The answer is: eighteen", None),  # mark without a number
    ],
)
def test_gsm8k_prediction(completion, prediction):
    assert gsm8k_prediction(completion) == prediction


@pytest.mark.parametrize(
    "completion, gold, correct",
    [
        ("... The answer is: 18", 18, True),
        ("The answer is: $1,234.", 1234.0, True),
        ("The answer is: -5", -5.0, True),
        ("The answer is: -5", 5.0, False),
        ("The answer is: 3/4", 0.75, False),  # rounded to 1 before comparing
        ("The answer is: 2.5", 2.5, False),  # faithful MetaMath: 2.5 rounds to 2, so an exact 2.5 is marked wrong ...
        ("The answer is: 2.5", 2.0, True),  # ... and 2.5 passes for a gold of 2
        ("The answer is: 3 ... The answer is: 4", 3.0, False),
        ("The answer is: 3 ... The answer is: 4", 4.0, True),
        ("The total is 18.", 18.0, False),
        ("The answer is: none", 18.0, False),
    ],
)
def test_gsm8k_correct(completion, gold, correct):
    assert gsm8k_correct(completion, gold) is correct


@pytest.mark.parametrize(
    "solution, boxed",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1}, then \\boxed{\\{2, 3\\}}", "\\{2, 3\\}"),
        ("\\fbox{7} is it", "7"),
        ("\\fbox{7} or \\boxed{8}", "8"),  # \fbox counts only without any \boxed
        ("hence $\\boxed 5$.", "5"),
        ("unbalanced \\boxed{1", None),
        ("no box at all: 12", None),
    ],
)
def test_last_boxed(solution, boxed):
    assert last_boxed(solution) == boxed


def test_math_gold():
    assert math_gold("Adding, $2 + 2 = \\boxed{4}$.") == "4"
    with pytest.raises(ValueError, match="boxed"):
        math_gold("The answer is 4.")


@pytest.mark.parametrize(
    "completion, prediction",
    [
        ("Step 1.\nThe answer is: \\frac{1}{2}.\nExtra", "\\frac{1}{2}"),
        ("The answer is: 5.", "5"),
        ("The answer is: 3.14", "3.14"),
        ("The answer is: 1. The answer is:  (1,2) .", "(1,2)"),
        ("The final value is 5.", None),
    ],
)
def test_math_prediction(completion, prediction):
    assert math_prediction(completion) == prediction


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\dfrac{1}{2}", "\\frac12"),
        ("\\frac12", "0.5"),
        ("\\frac{1}{2}", "1/2"),
        ("\\tfrac{3}{4}", "3/4"),
        ("x = 5", "5"),
        ("10\\%", "10"),
        ("\\$5", "5"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("5 \\text{ cm}", "5"),
        (".5", "0.5"),
        ("\\frac{1}{.5}", "\\frac{1}{0.5}"),
        ("x/y", "x/y"),  # normalizing raises (int("x")): raw strings compared
        (None, None),
    ],
)
def test_math_equivalent(a, b):
    assert math_equiv(a, b) and math_equiv(b, a)


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\frac{1}{3}", "\\frac{1}{2}"),
        ("2", "-2"),
        ("(1,2)", "(2,1)"),
        ("10%", "10"),  # only "\%" is removed; a bare "%" stays
        ("xy = 5", "5"),  # the prefix before "=" must be at most 2 characters
        ("-1/2", "-\\frac{1}{2}"),  # "-1/2" becomes \frac{-1}{2}
        ("x/y", " x/y"),  # raw fallback: no normalization at all
        ("5", None),
        (None, "5"),
    ],
)
def test_math_not_equivalent(a, b):
    assert not math_equiv(a, b) and not math_equiv(b, a)


@pytest.mark.parametrize(
    "s, normalized",
    [
        ("k = \\dfrac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
        ("1\\\\2", "1\\2"),
        ("\\!3", "3"),
        ("5\\\\\\%%", "5"),  # "\%" is removed twice: the first pass leaves a new "\%"
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("", ""),
    ],
)
def test_normalize_math(s, normalized):
    assert normalize_math(s) == normalized


@pytest.mark.parametrize("s", ["x/2", "1\\text{ m}\\text{ s}", "2\\sqrt", "3\\frac"])
def test_normalize_math_raises_where_hendrycks_does(s):
    with pytest.raises((ValueError, IndexError)):
        normalize_math(s)


@pytest.mark.parametrize(
    "completion, gold, correct",
    [
        ("... The answer is: \\frac{1}{2}.\nExtra", "\\frac{1}{2}", True),
        ("The answer is: 0.5.", "\\dfrac{1}{2}", True),
        ("The answer is: x = 5.", "5", True),
        ("The answer is: 5.", "6", False),
        ("The answer is: \\frac{1}{3}", "\\frac{1}{2}", False),
        ("The answer is \\boxed{5}.", "5", False),  # no mark: MetaMath ignores boxes in completions
    ],
)
def test_math_correct(completion, gold, correct):
    assert math_correct(completion, gold) is correct
