"""Export to plain PEFT adapters on the original base, merge, and the diagnose command line."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from helpers import adapt, load, logits, rel, settings, train
from oplora.diagnose import adapter_deltas, diagnose
from oplora.export import export_adapter, merge, save_initial
from oplora.methods import get_method
from test_methods import ALL, IDS


def trained_and_exported(directory, method, extra, svd, calibration_file, tmp_path, dtype=torch.float32, steps=8):
    s = settings(method, calibration_file, **extra)
    original, model = adapt(directory, s, svd, dtype=dtype)
    initial = save_initial(model, tmp_path / "initial_adapter") if get_method(method).mutates_base else None
    train(model, steps=steps, lr=1e-3)
    return original, model, export_adapter(model, method, tmp_path / "adapter", initial)


@pytest.mark.parametrize("method,extra", ALL, ids=IDS)
def test_vanilla_peft_reproduces_trained_model(tiny_dirs, arch, svd, calibration_file, tmp_path, method, extra):
    _, model, adapter = trained_and_exported(tiny_dirs[arch], method, extra, svd, calibration_file, tmp_path)
    vanilla = PeftModel.from_pretrained(load(tiny_dirs[arch]), str(adapter)).eval()
    assert rel(logits(vanilla), logits(model)) <= 1e-4
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == (16 if get_method(method).mutates_base else 8)
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert not any("parametrizations" in key for key in tensors)


def test_exported_oplora_loads_in_a_process_without_oplora(tiny_dirs, svd, calibration_file, tmp_path):
    _, model, adapter = trained_and_exported(tiny_dirs["qwen2"], "oplora", {"k": 8}, svd, calibration_file, tmp_path)
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(tiny_dirs["qwen2"])!r})
model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, {str(tmp_path / "vanilla.pt")!r})
assert not any(m.startswith("oplora") for m in sys.modules), "vanilla PEFT must not need oplora"
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert rel(torch.load(tmp_path / "vanilla.pt", weights_only=True), logits(model)) <= 1e-4


def test_merged_model_equals_adapted_model(tiny_dirs, svd, calibration_file, tmp_path):
    _, model, adapter = trained_and_exported(tiny_dirs["qwen2"], "pissa", {}, svd, calibration_file, tmp_path)
    merged = merge(tiny_dirs["qwen2"], adapter, tmp_path / "merged")
    assert not (merged / "adapter_config.json").exists()
    assert rel(logits(load(merged)), logits(model)) <= 1e-4


def test_bf16_merge_rounds_the_float32_merge_once(tiny_dirs, svd, calibration_file, tmp_path):
    _, _, adapter = trained_and_exported(tiny_dirs["llama"], "oplora", {"k": 8}, svd, calibration_file, tmp_path,
                                         steps=2)
    exact = load_file(merge(tiny_dirs["llama"], adapter, tmp_path / "f32", device="cpu") / "model.safetensors")
    bf16 = load_file(merge(tiny_dirs["llama"], adapter, tmp_path / "bf16", torch.bfloat16, "cpu")
                     / "model.safetensors")
    assert bf16.keys() == exact.keys() and all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[key], exact[key].to(torch.bfloat16)) for key in exact)


def test_oplora_bf16_export_is_exact_in_fp32(tiny_dirs, svd, calibration_file, tmp_path):
    original, _, adapter = trained_and_exported(tiny_dirs["llama"], "oplora", {"k": 8}, svd, calibration_file,
                                                tmp_path, dtype=torch.bfloat16)
    report = diagnose(original, adapter_deltas(adapter), [8], svd)
    assert report["aggregate"]["rho_max"]["8"] <= 1e-10
    assert report["aggregate"]["preservation_error_max"]["8"] <= 1e-6
    assert report["aggregate"]["triple_error_max"]["8"] <= 1e-6


def test_diagnose_cli_separates_lora_from_oplora(tiny_dirs, svd, calibration_file, tmp_path):
    base = tiny_dirs["llama"]
    reports = {}
    for method, extra in [("lora", {}), ("oplora", {"k": 16})]:
        _, _, adapter = trained_and_exported(base, method, extra, svd, calibration_file, tmp_path / method)
        out = tmp_path / f"{method}.json"
        subprocess.run([sys.executable, "-m", "oplora.diagnose", str(base), str(adapter), "--k", "8", "16",
                        "--out", str(out), "--cache", str(svd.dir.parent)], check=True)
        reports[method] = json.loads(out.read_text())
    assert reports["lora"]["aggregate"]["rho_mean"]["16"] > 1e-3
    assert reports["oplora"]["aggregate"]["rho_max"]["16"] <= 1e-10
    assert reports["oplora"]["aggregate"]["rho_max"]["8"] <= 1e-10
    assert set(reports["oplora"]["modules"]) == set(reports["lora"]["modules"])
    assert len(reports["lora"]["modules"]) == 2 * 5  # 2 layers × 5 target modules


def dense_report(W, delta, ks, svd):
    """The diagnostics from the dense ΔW (m×n, float64): the reference the factor form must equal."""
    U, S, V, _ = svd.top(W, max(ks))
    U, V, d = U.double(), V.double(), delta.double()
    dV, dTU, norm, sigma_1 = d @ V, d.T @ U, torch.linalg.matrix_norm(d), float(S[0])
    shift = torch.cummax((U * dV).sum(0).abs(), dim=0).values / sigma_1
    triple = torch.cummax(torch.maximum(dV.norm(dim=0), dTU.norm(dim=0)), dim=0).values / sigma_1
    leak = torch.cumsum((dV**2).sum(0), dim=0).sqrt() / norm
    rho_k = torch.cumsum(((U.T @ d) ** 2).sum(1), dim=0) / norm**2
    return {key: {str(k): float(v[k - 1]) for k in ks} for key, v in
            (("rho", rho_k), ("preservation_error", shift), ("triple_error", triple), ("delta_v_ratio", leak))}


def test_factor_form_diagnostics_equal_the_dense_form(tiny_dirs, svd, calibration_file, tmp_path):
    from oplora.diagnose import adapter_factors, diagnose_adapter
    from oplora.models import LazyWeights

    base, ks = tiny_dirs["llama"], [4, 8, 16]
    for (method, extra), name in zip(ALL, IDS, strict=True):
        if name in ("lora_null_v2", "oplora16"):  # the same exported form as lora_null_v1, oplora8
            continue
        _, _, adapter = trained_and_exported(base, method, extra, svd, calibration_file, tmp_path / name, steps=2)
        report = diagnose_adapter(base, adapter, ks, svd)
        factors, dense = adapter_factors(adapter), adapter_deltas(adapter)
        weights = LazyWeights(base, sorted(factors))
        assert set(report["modules"]) == set(dense)
        for module, delta in dense.items():
            reference = dense_report(weights[module], delta, ks, svd)
            for key, by_k in reference.items():
                for k, value in by_k.items():
                    got = report["modules"][module][key][k]  # all four are dimensionless (÷ σ₁ or ‖ΔW‖)
                    assert got == pytest.approx(value, rel=1e-10, abs=1e-14), (name, module, key, k)


def test_pissa_rho_of_the_trained_product_includes_its_initial_value(tiny_dirs, svd, calibration_file, tmp_path):
    from oplora.diagnose import diagnose_adapter, rho
    from oplora.methods.base import lora_layers

    base, ks = tiny_dirs["llama"], [4, 8]
    _, model, adapter = trained_and_exported(base, "pissa", {}, svd, calibration_file, tmp_path, steps=2)
    effective = diagnose_adapter(base, adapter, ks, svd)
    trained = diagnose_adapter(base, adapter, ks, svd, initial=tmp_path / "initial_adapter")
    assert (effective["delta"], trained["delta"]) == ("effective", "trained")
    original = load(base).state_dict()
    for name, layer in lora_layers(model):
        with torch.no_grad():
            product = layer.get_delta_weight("default").double()  # s·B A of the trained factors
        U = svd.top(original[f"{name}.weight"], max(ks)).U
        assert trained["modules"][name]["rho"]["8"] == pytest.approx(rho(product, U, ks)[8], rel=1e-9)
    rho_8 = lambda report: report["aggregate"]["rho_mean"]["8"]  # noqa: E731
    assert rho_8(trained) > 0.9 > rho_8(effective)  # PiSSA's s·B A starts as W's top-r part


def test_the_adapter_file_names_are_pefts():
    """oplora.rundir spells PEFT's adapter file names once (every module reads them there): they must stay PEFT's."""
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    from oplora.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    assert (ADAPTER_WEIGHTS, ADAPTER_CONFIG) == (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)
