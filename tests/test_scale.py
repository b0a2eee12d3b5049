"""The GPU check (`make gpu-check`) refuses without a GPU and runs end to end at toy sizes on the CPU."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_check_refuses_without_a_gpu(tmp_path, capsys):
    assert gpu_check().main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_gpu_check_smoke_runs_every_part_on_cpu(tmp_path):
    """Every part at toy sizes: the environment report, LoRA and OPLoRA training cells in their own processes,
    the checkpointed cell stopped by SIGUSR1 and resumed, the SVD figures, the merge and HF generation."""
    assert gpu_check().main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    environment = report["environment"]
    assert environment["vllm"] == "vLLM is not installed" and environment["generation_backend"] == "hf"
    assert environment["wandb"]["auto_in_a_job"] == "offline" and environment["deepspeed_accelerator"] == "cpu"
    llama = environment["llama2_7b_offline"]
    assert llama["cached"] is False and "make fetch" in llama["fix"]  # nothing fetched here: said, not crashed
    training = report["training"]
    assert len(training["cells"]["lora"]["steps"]) == len(training["cells"]["oplora"]["steps"]) == 3
    assert training["oplora_over_lora"] > 0 and training["cells"]["lora"]["peak_rss_gib"] > 0
    signal = training["signal"]
    assert signal["preempted"] and signal["resumed_from"] == signal["stopped_at"] >= 1
    assert signal["finished"] and signal["final_step"] == 8
    assert all(row["rho_refined"] <= 1e-10 and row["exact_s"] > 0 for row in report["svd"]["rows"])
    assert report["eval"]["hf_tokens_per_s"] > 0 and report["eval"]["vllm"] == {"skipped": "vLLM is not installed"}
    text = (tmp_path / "gpu-cpu-smoke.md").read_text()
    assert "## 2. Training at the 7B shapes" in text and "## Not exercised by this run" in text
    assert "vLLM's kernels and engine" in text
