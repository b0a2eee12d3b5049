"""Rules every evaluation stage shares: which generation backend runs, the GPU memory vLLM may take, and the stderr
of an accuracy."""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import subprocess
import sys

from oplora.device import gpu_present

log = logging.getLogger(__name__)
BACKENDS = ("hf", "vllm")
VLLM_PROBE = "import vllm, vllm._C"  # vLLM and its compiled kernels (a CUDA build that fits the driver and torch)


@functools.cache
def vllm_unavailable() -> str | None:
    """None when vLLM really loads here, its kernels included, else why not. The probe runs in a subprocess: a vLLM
    that imports but cannot load its kernels (a CUDA 13 build on an older driver, a torch it was not built for) can
    abort the process that tries."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    try:
        probe = subprocess.run([sys.executable, "-c", VLLM_PROBE], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "vLLM is installed but importing it did not finish within 600 s"
    if probe.returncode != 0:
        lines = (probe.stderr.strip() or f"exit status {probe.returncode}").splitlines()
        return f"vLLM is installed but does not load ({lines[-1]})"
    return None if gpu_present() else "no GPU"


def generation_backend(name: str) -> str:
    """`auto` is vLLM when it really loads (`vllm_unavailable`) and a GPU is present, else HF `generate`, with a
    warning on a GPU machine (HF generation is several times slower: README "Running the paper's tables on a GPU
    cluster"). `vllm` asked for by name and unavailable is an error naming why."""
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"unknown generation backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    if name == "hf":
        return name
    reason = vllm_unavailable()
    if reason is None:
        return "vllm"
    if name == "vllm":
        raise RuntimeError(f"generation backend vllm: {reason}; choose backend=hf or auto (HF generate)")
    if gpu_present():
        log.warning("%s: generating with HF generate instead (slower)", reason)
    return "hf"


def vllm_memory_fraction(free: int, total: int, wanted: float = 0.9, margin: int = 1 << 30) -> float:
    """vLLM's `gpu_memory_utilization`: the share of the whole device its engine takes, which must be free when the
    engine starts (vLLM refuses otherwise). Its default, `wanted`, when that much is free; else what is free less
    `margin` bytes (CUDA context, fragmentation). Refused, naming the figures, when not even a tenth is free."""
    fraction = min(wanted, (free - margin) / total)
    if fraction < 0.1:
        raise RuntimeError(f"only {free / 2**30:.1f} of {total / 2**30:.1f} GiB of GPU memory are free: not enough "
                           "for vLLM (another process on this GPU?); backend=hf generates without it")
    return fraction


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
