"""GSM8K and MATH answer scoring, reproducing MetaMath's eval_gsm8k.py / eval_math.py and Hendrycks' is_equiv.

The quirks of the originals are kept on purpose so that accuracies stay comparable with PiSSA / MetaMath numbers.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

ANSWER_MARK = "The answer is: "

_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")
# strip_string's plain replacements, applied in Hendrycks' order ("\\\\" is a LaTeX linebreak, "\\!" a negative space).
_REPLACEMENTS = (
    ("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""), ("\\right", ""),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""),
)  # fmt: skip


def gsm8k_gold(answer: str) -> float:
    """The number after "#### " in a GSM8K answer field, thousands commas removed."""
    parts = answer.split("#### ")
    if len(parts) < 2:
        raise ValueError(f"GSM8K answer has no '#### ' final-answer line: {answer[-200:]!r}")
    return float(parts[1].strip().replace(",", ""))


def gsm8k_prediction(completion: str) -> float | None:
    """MetaMath's first number after the last ANSWER_MARK, through round() (half-to-even: 2.5 -> 2, 3/4 -> 1)."""
    parts = completion.split(ANSWER_MARK)
    match = _NUMBER.search(parts[-1].strip()) if len(parts) > 1 else None
    if match is None:
        return None
    text = match.group()  # one separator at most: "1,234,567" matches only "1,234"
    if "/" in text:
        numerator, denominator = text.split("/")
        try:  # a zero denominator scores the numerator; an empty or sign-only numerator is no answer
            value = float(numerator) if float(denominator) == 0 else float(Fraction(text))
        except (ValueError, OverflowError):
            return None
    else:
        value = float(text.replace(",", ""))
    return None if math.isinf(value) else float(round(value))


def gsm8k_correct(completion: str, gold: float) -> bool:
    """Whether the completion's MetaMath prediction equals the gold number."""
    prediction = gsm8k_prediction(completion)
    return prediction is not None and prediction == float(gold)


def last_boxed(solution: str) -> str | None:
    """Content of the last \\boxed{...} (\\fbox{...} only when no \\boxed), braces balanced; "\\boxed x" runs to "$"."""
    command = "\\boxed" if "\\boxed" in solution else "\\fbox"
    start = solution.rfind(command)
    if start < 0:
        return None
    rest = solution[start + len(command) :]
    if rest.startswith(" "):  # lm-eval's space form, e.g. "$\boxed 5$"
        return rest[1:].split("$")[0]
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return rest[1:i]
    return None


def math_gold(solution: str) -> str:
    """The last boxed answer of a MATH reference solution."""
    answer = last_boxed(solution)
    if answer is None:
        raise ValueError(f"MATH solution has no \\boxed answer: {solution[-200:]!r}")
    return answer


def math_prediction(completion: str) -> str | None:
    """MetaMath's answer: text after the last ANSWER_MARK up to the first ".\\n", stripped, one final "." dropped."""
    parts = completion.split(ANSWER_MARK)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    return answer.removesuffix(".").strip()


def _fix_sqrt(string: str) -> str:
    """Brace a one-character square root argument: \\sqrt3 -> \\sqrt{3} (IndexError on a trailing \\sqrt)."""
    head, *tails = string.split("\\sqrt")
    for tail in tails:
        head += "\\sqrt" + (tail if tail[0] == "{" else "{" + tail[0] + "}" + tail[1:])
    return head


def _fix_fracs(string: str) -> str:
    """Brace one-character fraction arguments: \\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}."""
    head, *tails = string.split("\\frac")
    for tail in tails:
        if tail[0] != "{":  # IndexError on a trailing \frac, as in Hendrycks
            if len(tail) < 2:
                return string
            tail = "{" + tail[0] + "}" + (tail[1:] if tail[1] == "{" else "{" + tail[1] + "}" + tail[2:])
        head += "\\frac" + tail
    return head


def _fix_a_slash_b(string: str) -> str:
    """Integer "a/b" -> \\frac{a}{b}; raises ValueError for non-integer parts, as Hendrycks' does."""
    parts = string.split("/")
    if len(parts) != 2:
        return string
    a, b = int(parts[0]), int(parts[1])
    return f"\\frac{{{a}}}{{{b}}}" if string == f"{a}/{b}" else string


def normalize_math(s: str) -> str:
    """Hendrycks' strip_string; raises (ValueError, IndexError) where the original does, for math_equiv to catch."""
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s, *units = s.split("\\text{ ")  # "\text{ " only ever introduces units on the right
    if len(units) > 1:
        raise ValueError(f"several '\\text{{ ' unit groups in {s!r}")
    s = s.replace("\\%", "").replace("\\%", "")  # twice, as in Hendrycks (both read "\%"): a bare "%" stays
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    left, *right = s.split("=")
    if len(right) == 1 and len(left) <= 2:  # drop a short "k = " prefix
        s = right[0]
    s = _fix_fracs(_fix_sqrt(s).replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def math_equiv(a: str | None, b: str | None) -> bool:
    """Hendrycks' is_equiv: normalized equality, raw equality when normalizing fails; None only matches None."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return normalize_math(a) == normalize_math(b)
    except Exception:
        return a == b


def math_correct(completion: str, gold: str) -> bool:
    """Whether the completion's MetaMath answer is equivalent to the gold MATH answer."""
    return math_equiv(math_prediction(completion), gold)
