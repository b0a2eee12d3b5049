"""Impossible settings and damaged inputs are refused with a clear message naming the setting or file."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from helpers import adapt, compose, settings
from oplora.cache import Cache
from oplora.data import tokenized
from oplora.diagnose import adapter_deltas
from oplora.methods import AdapterSettings
from oplora.models import base_weights
from oplora.svd import SVDCache
from oplora.train import check_config


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
    refused(tiny_dirs, settings("oplora"), "needs exactly one of k .the projection rank", tmp_path)


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
    refused(tiny_dirs, lora_null(source=str(tmp_path / "empty.jsonl"), field="text"),
            "empty.jsonl: cannot read field 'text'", tmp_path)
    refused(tiny_dirs, lora_null(source="no-such-org/corpus"), r"calibration corpus no-such-org/corpus .*make fetch",
            tmp_path)  # offline and not cached: named before any model loads


def test_unknown_method_setting_lists_the_valid_ones(tiny_dirs, tmp_path):
    refused(tiny_dirs, settings("oplora", k=8, rank=4), r"method 'oplora' has no setting\(s\) \['rank'\]; its settings "
            r"are: k", tmp_path)
    refused(tiny_dirs, settings("pissa", k=8), r"method 'pissa' has no setting\(s\) \['k'\]; its settings are: none",
            tmp_path)


def test_unknown_method_and_svd_mode(tiny_dirs, tmp_path):
    refused(tiny_dirs, settings("dora"), "unknown method 'dora'; valid methods: lora, lora_null", tmp_path)
    with pytest.raises(ValueError, match="valid modes: exact, randomized"):
        SVDCache(tmp_path, mode="lanczos")


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["llama"])


def data_refused(tokenizer, tmp_path, match, *overrides):
    with pytest.raises(ValueError, match=match):
        tokenized(compose("data=local", *overrides).data, tokenizer, Cache(tmp_path))


def test_data_file_errors_name_the_file_record_and_field(tokenizer, tmp_path):
    good = '{"query": "1+1?", "response": "2"}\n'
    (tmp_path / "latin1.jsonl").write_bytes((good + '{"query": "café?", "response": "oui"}\n').encode("latin-1"))
    offset = len(good) + len('{"query": "caf')
    data_refused(tokenizer, tmp_path, rf"latin1.jsonl is not UTF-8 \(byte 0xe9 at offset {offset}\): convert it",
                 f"data.path={tmp_path / 'latin1.jsonl'}")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    data_refused(tokenizer, tmp_path, "data file .*blank.jsonl is empty: data.path must name",
                 f"data.path={tmp_path / 'blank.jsonl'}")
    (tmp_path / "null.jsonl").write_text(good * 3 + '{"query": "2+2?", "response": null}\n')
    data_refused(tokenizer, tmp_path, r"null.jsonl: record 3 \(0-based\) has no value for field 'response' \(null "
                 "or missing\\); fix or drop", f"data.path={tmp_path / 'null.jsonl'}")
    (tmp_path / "missing.jsonl").write_text(good + '{"response": "4"}\n' + good)
    data_refused(tokenizer, tmp_path, r"missing.jsonl: record 1 \(0-based\) has no value for field 'query'",
                 f"data.path={tmp_path / 'missing.jsonl'}")
    (tmp_path / "ok.jsonl").write_text(good * 4)
    data_refused(tokenizer, tmp_path, r"data.limit=-5 must be a positive integer .* or null",
                 f"data.path={tmp_path / 'ok.jsonl'}", "data.limit=-5")
    ok = compose("data=local", f"data.path={tmp_path / 'ok.jsonl'}").data
    assert len(tokenized(ok, tokenizer, Cache(tmp_path))) == 4


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "seed='abc' must be an integer"),
    ("train.max_steps=0", r"train.max_steps=0 must be -1 \(train all epochs\) or a positive integer"),
    ("train.max_steps=-5", "train.max_steps=-5 must be -1"),
    ("data.limit=-5", r"data.limit=-5 must be a positive integer \(the first N records\) or null"),
    ("data.limit=0", "data.limit=0 must be a positive integer"),
])
def test_run_settings_are_refused_before_anything_loads(override, message):
    with pytest.raises(ValueError, match=message):
        check_config(compose("experiment=table4", override))
    check_config(compose("experiment=table4", "seed=3", "train.max_steps=5", "data.limit=10"))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_safetensors_name_the_file(tmp_path):
    weights = tmp_path / "base"
    weights.mkdir()
    save_file({"layer.q_proj.weight": torch.randn(8, 8)}, weights / "model.safetensors")
    truncate(weights / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read \(SafetensorError: .*\): the file is "
                                         "truncated or corrupt; re-download"):
        base_weights(weights, ["layer.q_proj"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.layer.q_proj.lora_A.weight": torch.randn(2, 8),
               "base_model.model.layer.q_proj.lora_B.weight": torch.randn(8, 2)}, adapter / "adapter_model.safetensors")
    assert list(adapter_deltas(adapter)) == ["layer.q_proj"]
    truncate(adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors cannot be read .* truncated or corrupt"):
        adapter_deltas(adapter)
    (adapter / "adapter_config.json").write_text('{"r": 2, "lora_')
    with pytest.raises(ValueError, match="adapter_config.json cannot be read .* truncated or corrupt"):
        adapter_deltas(adapter)


def test_a_bad_line_in_the_kl_prompts_names_the_file_and_line(tmp_path):
    from oplora.evaluation.drift import read_prompts

    prompts = tmp_path / "prompts.jsonl"
    for bad, what in (('{"text": "cut', "is not JSON"), ('"a bare string"', "is not a JSON object"),
                      ('{"id": 2}', "has no field 'text'")):
        prompts.write_text(f'{{"id": 0, "text": "The sky is blue."}}\n\n{bad}\n')
        with pytest.raises(ValueError, match=f"KL prompts {prompts} line 3 {what}.*: fix or remove that line"):
            read_prompts(str(prompts), None)


def test_a_full_disk_while_saving_the_tokenizer_names_the_directory(tiny_dirs, tmp_path, monkeypatch):
    """The tokenizers library reports ENOSPC as a bare `Exception('No space left on device (os error 28)')`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

    from oplora.export import merge

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    save = PreTrainedTokenizerBase.save_pretrained

    def onto_a_full_disk(self, directory, *args, **kwargs):
        (Path(directory) / "tokenizer.json").symlink_to("/dev/full")  # every write there fails with ENOSPC
        return save(self, directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", onto_a_full_disk)
    merged = tmp_path / "merged"
    with pytest.raises(OSError, match=f"no space left on the device while writing {merged}: free space on that file "
                                      "system"):
        merge(tiny_dirs["llama"], adapter, merged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the partial copy is gone
