"""Impossible settings are refused with a clear message before any compute."""

import pytest

from helpers import adapt, settings
from oplora.methods import AdapterSettings
from oplora.svd import SVDCache


def refused(tiny_dirs, s, match, tmp_path):
    cache = SVDCache(tmp_path / "cache")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        adapt(tiny_dirs["llama"], s, cache)
    assert not cache.dir.exists(), "no SVD may run before the settings are checked"


def test_k_at_least_min_dimension(tiny_dirs, tmp_path):
    # v_proj of the tiny Llama is 32×64 (2 KV heads × 16)
    match = r"k=32 must be below min\(m, n\)=32 of model.layers.0.self_attn.v_proj"
    refused(tiny_dirs, settings("oplora", k=32), match, tmp_path)


def test_oplora_without_k(tiny_dirs, tmp_path):
    refused(tiny_dirs, settings("oplora"), "needs a projection rank k", tmp_path)


def test_rank_larger_than_matrix(tiny_dirs, tmp_path):
    refused(tiny_dirs, settings("pissa", r=33), r"rank r=33 exceeds min\(m, n\)=32", tmp_path)


def test_missing_target_module(tiny_dirs, tmp_path):
    s = settings("lora", target_modules=("q_proj", "c_attn"))
    refused(tiny_dirs, s, r"\['c_attn'\] not found in LlamaForCausalLM; its linear layers are: .*q_proj", tmp_path)


def test_lora_null_without_calibration(tiny_dirs, tmp_path):
    def lora_null(**calibration):
        return AdapterSettings(method="lora_null", r=8, options={"calibration": calibration})

    refused(tiny_dirs, AdapterSettings(method="lora_null", r=8), "lora_null needs calibration data", tmp_path)
    refused(tiny_dirs, lora_null(source=str(tmp_path / "nq.txt")), "nq.txt does not exist", tmp_path)
    (tmp_path / "empty.jsonl").write_text('{"question": ""}\n')
    refused(tiny_dirs, lora_null(source=str(tmp_path / "empty.jsonl"), field="question"), "empty.jsonl holds no text",
            tmp_path)
    refused(tiny_dirs, lora_null(source=str(tmp_path / "empty.jsonl")), "empty.jsonl: cannot read field 'text'",
            tmp_path)


def test_unknown_method_setting_lists_the_valid_ones(tiny_dirs, tmp_path):
    refused(tiny_dirs, settings("oplora", k=8, rank=4), r"method 'oplora' has no setting\(s\) \['rank'\]; its settings "
            r"are: k", tmp_path)
    refused(tiny_dirs, settings("pissa", k=8), r"method 'pissa' has no setting\(s\) \['k'\]; its settings are: none",
            tmp_path)


def test_unknown_method_and_svd_mode(tiny_dirs, tmp_path):
    refused(tiny_dirs, settings("dora"), "unknown method 'dora'; valid methods: lora, lora_null", tmp_path)
    with pytest.raises(ValueError, match="valid modes: exact, randomized"):
        SVDCache(tmp_path, mode="lanczos")
