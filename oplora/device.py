"""GPU or CPU: the one place that decides where and in which dtype a step runs.

A GPU is used when torch sees one (`gpu_present`), except that a `model.device: cuda` model (the 7B models of the
tables) requires one (`check_gpu`). The dtype a model trains and is evaluated in follows from that (`compute_dtype`,
`eval_dtype`); a stage's batch size is its `batch_size` setting on a GPU and its `cpu_batch_size` on a CPU.
"""

from __future__ import annotations

import gc
import os

import torch

DEVICES = ("auto", "cuda")  # model.device


def gpu_present() -> bool:
    return torch.cuda.is_available()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": this process's GPU when there is one (LOCAL_RANK under a distributed launcher), else the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if not gpu_present():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def batch_size(settings: dict):
    """A stage's batch size here: `batch_size` on a GPU, `cpu_batch_size` on a CPU."""
    return settings["batch_size"] if gpu_present() else settings["cpu_batch_size"]


def default_dtype(device: str | torch.device) -> str:
    """The dtype of a model without a config of its own (the benchmarks): bfloat16 on a GPU, float32 on a CPU."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def release_gpu_memory() -> None:
    """Give the GPU memory of freed tensors back to the device (torch keeps it cached otherwise): a merged model or an
    earlier stage's model would hold it while vLLM, in this process or a child, asks for its share."""
    gc.collect()
    if gpu_present():
        torch.cuda.empty_cache()


def require_gpu(model_cfg) -> bool:
    """Whether the model must run on a GPU (`model.device: cuda`, the 7B models of the tables): then every stage
    uses its configured dtype, on whichever node it runs, and a GPU step without a GPU fails (`check_gpu`)."""
    device = model_cfg.get("device", "auto")
    if device not in DEVICES:
        raise ValueError(f"model.device={device!r} is not valid; choose one of {', '.join(DEVICES)}")
    return device == "cuda"


def check_gpu(model_cfg) -> None:
    """Refuse to train or evaluate a `model.device: cuda` model without a visible GPU, instead of quietly running
    a 7B model in float32 on the CPU."""
    if require_gpu(model_cfg) and not gpu_present():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
        raise RuntimeError(
            f"model.device=cuda ({model_cfg.name} trains in {model_cfg.dtype} on a GPU) but torch sees no GPU: torch "
            f"{torch.__version__} is built for {build}. Check `nvidia-smi` on this node (the driver must support that "
            "CUDA version), or install the torch wheel that matches the driver, e.g. `pip install torch==2.13.0 "
            "--index-url https://download.pytorch.org/whl/cu126` (README: GPU install). model.device=auto runs on the "
            "CPU in float32 instead (slow; tests and rehearsals)")


def runs_on_gpu(model_cfg) -> bool:
    """Whether the model's steps run on a GPU: `model.device: cuda`, or `auto` with a GPU present."""
    return require_gpu(model_cfg) or gpu_present()


def compute_dtype(model_cfg) -> str:
    """The dtype a model trains and is evaluated in: its configured dtype for a `model.device: cuda` model (on every
    node, GPU or not: the CPU steps of a GPU run read the weights as training does) and, with `device: auto`, on a
    GPU; float32 on the CPU.

    The SVD cache is keyed on the weights in this dtype, so every stage must use this one rule.
    """
    return model_cfg.dtype if runs_on_gpu(model_cfg) else "float32"


def eval_dtype(model_cfg, cpu_dtype: str | None) -> str:
    """The dtype the evaluation stages run in: `compute_dtype`'s, or `eval.cpu_dtype` when set and the model runs
    on a CPU (bfloat16 scores twice as fast as float32 on a CPU with AVX512-BF16; the demo's choice)."""
    return cpu_dtype if cpu_dtype and not runs_on_gpu(model_cfg) else compute_dtype(model_cfg)
