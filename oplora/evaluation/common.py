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


def binomial_stderr(accuracy: float, n: int) -> float | None:
    """Sample standard error of a mean of n 0/1 outcomes (lm_eval's convention, n − 1 in the denominator)."""
    return math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else None
