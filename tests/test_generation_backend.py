"""Generation on a GPU without a working vLLM: the backend is chosen by really loading vLLM (in a subprocess), a broken
one falls back to HF `generate` with a warning, vLLM's memory share is sized from what is free, and a stage builds its
generator once for all its tasks. (No GPU here: a vLLM package that cannot load its kernels, the GPU flag and memory
figures stand in for the device.)"""

import json
import logging

import pytest
import torch

from oplora.evaluation import common, math_eval
from oplora.evaluation.target import Target

GiB = 2**30


@pytest.fixture
def installed_vllm(tmp_path, monkeypatch):
    """`make(kernels_load)`: a `vllm` package on the path of this process and its children, whose compiled kernels
    (`vllm._C`) load or fail as a CUDA 13 build does on an older driver."""
    def make(kernels_load: bool) -> None:
        package = tmp_path / "site" / "vllm"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "_C.py").write_text("" if kernels_load else
                                       "raise ImportError('libcudart.so.13: cannot open shared object file')\n")
        monkeypatch.syspath_prepend(str(package.parent))
        monkeypatch.setenv("PYTHONPATH", str(package.parent))
        common.vllm_unavailable.cache_clear()

    yield make
    common.vllm_unavailable.cache_clear()


def test_vllm_that_cannot_load_its_kernels_falls_back_to_hf(installed_vllm, monkeypatch, caplog):
    installed_vllm(kernels_load=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    assert common.generation_backend("auto") == "hf"
    assert "vLLM is installed but does not load (ImportError: libcudart.so.13" in caplog.text
    assert "generating with HF generate instead" in caplog.text
    with pytest.raises(RuntimeError, match=r"generation backend vllm: vLLM is installed but does not load.*backend=hf"):
        common.generation_backend("vllm")
    assert common.generation_backend("hf") == "hf"


def test_vllm_that_loads_is_used_on_a_gpu_only(installed_vllm, monkeypatch, caplog):
    installed_vllm(kernels_load=True)
    with caplog.at_level(logging.WARNING):
        assert common.generation_backend("auto") == "hf"  # no GPU: HF, nothing to warn about
    assert caplog.text == ""
    common.vllm_unavailable.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.generation_backend("auto") == "vllm"
    with pytest.raises(ValueError, match="valid: auto, hf, vllm"):
        common.generation_backend("tgi")


def test_vllm_memory_share_is_what_is_free():
    assert common.vllm_memory_fraction(79.2 * GiB, 80 * GiB) == 0.9  # a free H100: vLLM's default
    merged_held = common.vllm_memory_fraction(65.5 * GiB, 80 * GiB)  # a 7B merge still held (13.5 GB)
    assert merged_held == pytest.approx((65.5 - 1) / 80) and merged_held * 80 * GiB < 65.5 * GiB
    with pytest.raises(RuntimeError, match=r"only 4\.0 of 48\.0 GiB of GPU memory are free"):
        common.vllm_memory_fraction(4 * GiB, 48 * GiB)


def test_the_math_stage_loads_its_generator_once_for_every_task(tiny_dirs, tmp_path, monkeypatch):
    """GSM8K and MATH share one engine (vLLM: one engine for the stage; HF: one model load)."""
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(3)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"path": str(tmp_path / "rows.jsonl"), "split": "test", "question": "question", "answer": "answer",
            "scorer": "gsm8k"}
    built = []
    real = math_eval.GENERATORS["hf"]
    monkeypatch.setitem(math_eval.GENERATORS, "hf", lambda *args: built.append(args) or real(*args))
    settings = {"backend": "auto", "batch_size": 2, "max_new_tokens": 4, "suffix": "", "tasks": {"a": spec, "b": spec}}
    stage = math_eval.Math(Target(str(tiny_dirs["llama"])), settings, None, tmp_path)
    results = [stage.run(task) for task in ("a", "b")]
    assert len(built) == 1 and [r["details"][t]["rows"] for r, t in zip(results, "ab", strict=True)] == [3, 3]
