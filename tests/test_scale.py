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
    assert gpu_check().main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-check-smoke.json").read_text())
    assert set(report["steps"]["variants"]) == {"lora", "oplora-16", "oplora-128", "per-token-128"}
    assert report["svd"]["max_residual"] <= 1e-6 and all(x["rho"] <= 1e-10 for x in report["svd"]["leakage"])
    oplora = report["training"]["cells"]["oplora16"]
    assert oplora["delta_norm_max"] > 0 and oplora["rho"] <= 1e-10 and oplora["preservation_error"] <= 1e-6
    assert report["merge"]["next_token_agreement"] >= 0.9
    assert "## 4. Merged vs unmerged (bf16)" in (tmp_path / "gpu-check-smoke.md").read_text()
