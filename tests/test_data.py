"""Prompt formatting, label masking and data errors on real-schema records of the three training sets."""

import json

import pytest
from transformers import AutoTokenizer

from helpers import compose
from oplora.data import IGNORE, PROMPT, tokenized


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["llama"])


@pytest.mark.parametrize("name,query_field,response_field", [
    ("commonsense170k", "instruction", "output"),
    ("metamath100k", "query", "response"),
    ("codefeedback", "query", "answer"),
])
def test_alpaca_prompt_masked_response_and_eos(name, query_field, response_field, data_files, tokenizer, tmp_path):
    cfg = compose(f"data={name}", f"data.path={data_files[name]}").data
    encoded = tokenized(cfg, tokenizer, tmp_path)
    first = json.loads(data_files[name].read_text().splitlines()[0])
    ids, labels = encoded[0]["input_ids"], encoded[0]["labels"]
    prompt = PROMPT.format(query=first[query_field])
    n_prompt = len(tokenizer(prompt).input_ids)
    assert tokenizer.decode(ids[:n_prompt], skip_special_tokens=True) == prompt
    assert prompt.startswith("Below is an instruction that describes a task.") and prompt.endswith("### Response:")
    assert labels[:n_prompt] == [IGNORE] * n_prompt  # the prompt is not learned
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labels[n_prompt:-1]).strip() == first[response_field]
    assert len(encoded) == 48 and encoded.column_names == ["input_ids", "labels"]


def test_metamath_slice_truncation_and_cache(data_files, tokenizer, tmp_path, caplog):
    longest_prompt = max(len(tokenizer(PROMPT.format(query=f"What is {i} plus {2 * i}?")).input_ids) for i in range(10))
    max_length = longest_prompt + 3  # every response is cut, no prompt is
    cfg = compose("data=metamath100k", f"data.path={data_files['metamath100k']}", "data.limit=10",
                  f"data.max_length={max_length}").data
    with caplog.at_level("INFO"):
        encoded = tokenized(cfg, tokenizer, tmp_path)
    assert len(encoded) == 10 and max(len(x) for x in encoded["input_ids"]) == max_length
    assert f"10 examples, 10 truncated to {max_length} tokens, 0 dropped" in caplog.text
    assert len(list((tmp_path / "data").glob("metamath100k-*.arrow"))) == 2  # tokenized + filtered, reused
    again = tokenized(cfg, tokenizer, tmp_path)
    assert again["input_ids"] == encoded["input_ids"]


def test_data_errors_name_the_file_and_field(data_files, tokenizer, tmp_path):
    def fails(match, *overrides):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            tokenized(compose("data=local", *overrides).data, tokenizer, tmp_path)

    fails("data file .*missing.jsonl does not exist", f"data.path={tmp_path / 'missing.jsonl'}")
    (tmp_path / "empty.jsonl").write_text("")
    fails("empty.jsonl", f"data.path={tmp_path / 'empty.jsonl'}")
    (tmp_path / "broken.jsonl").write_text('{"query": "1+1?", "response": \n')
    fails("broken.jsonl is not valid json", f"data.path={tmp_path / 'broken.jsonl'}")
    fails(r"codefeedback.jsonl has no field\(s\) \['response'\]; its fields are \['query', 'answer'\]",
          f"data.path={data_files['codefeedback']}")
    fails("every example's labels are masked .* raise data.max_length", f"data.path={data_files['metamath100k']}",
          "data.max_length=16")
