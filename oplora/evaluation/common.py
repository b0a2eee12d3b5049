"""Rules every evaluation stage shares: which generation backend runs, and the stderr of an accuracy."""

from __future__ import annotations

import importlib.util
import math

import torch

BACKENDS = ("hf", "vllm")


def generation_backend(name: str) -> str:
    """`auto` is vLLM when it is installed and a GPU is present, else HF `generate`."""
    if name == "auto":
        return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    return name


def check_generations(texts: list[str], what: str, minimum: int = 4) -> None:
    """Refuse a degenerate model: the same text generated for every one of at least `minimum` different prompts
    (what NaN or exploded weights produce), which would otherwise be scored like any answer."""
    if len(texts) >= minimum and len(set(texts)) == 1:
        raise FloatingPointError(f"{what}: all {len(texts)} generations are identical ({texts[0][:60]!r}): the model "
                                 "is degenerate (NaN or exploded weights?); not scored")


def check_loglikelihoods(values: list[float], what: str) -> None:
    """Refuse non-finite log-likelihoods: lm_eval would score NaNs as a coin flip (acc_norm 0.5)."""
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        raise FloatingPointError(f"{what}: {bad} of {len(values)} log-likelihoods are not finite: the model is broken "
                                 "(NaN or inf weights?); not scored")


def binomial_stderr(accuracy: float, n: int) -> float | None:
    """Sample standard error of a mean of n 0/1 outcomes (lm_eval's convention, n − 1 in the denominator)."""
    return math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else None
