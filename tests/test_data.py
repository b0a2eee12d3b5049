"""Prompt formatting, label masking and data errors on real-schema records of the three training sets."""

import json

import pytest
from transformers import AutoTokenizer

from helpers import compose
from oplora import data
from oplora.cache import Cache
from oplora.data import IGNORE, PROMPT, encode, tokenized


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
    encoded = tokenized(cfg, tokenizer, Cache(tmp_path))
    first = json.loads(data_files[name].read_text().splitlines()[0])
    ids, labels = encoded[0]["input_ids"], encoded[0]["labels"]
    prompt = PROMPT.format(query=first[query_field])
    n_prompt = len(tokenizer(prompt).input_ids)
    assert tokenizer.decode(ids[:n_prompt], skip_special_tokens=True) == prompt
    assert prompt.startswith("Below is an instruction that describes a task.") and prompt.endswith("### Response:")
    assert labels[:n_prompt] == [IGNORE] * n_prompt  # the prompt is not learned
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labels[n_prompt:-1]) == first[response_field] + "\n"  # PiSSA: response, newline, EOS
    assert ids == tokenizer(prompt + first[response_field] + "\n" + tokenizer.eos_token).input_ids  # one text
    assert len(encoded) == (36 if name == "codefeedback" else 48) and encoded.column_names == ["input_ids", "labels"]


def test_metamath_slice_truncation_and_cache(data_files, tokenizer, tmp_path, caplog):
    longest_prompt = max(len(tokenizer(PROMPT.format(query=f"What is {i} plus {2 * i}?")).input_ids) for i in range(10))
    max_length = longest_prompt + 3  # every response is cut, no prompt is
    cfg = compose("data=metamath100k", f"data.path={data_files['metamath100k']}", "data.limit=10",
                  f"data.max_length={max_length}").data
    with caplog.at_level("INFO"):
        encoded = tokenized(cfg, tokenizer, Cache(tmp_path))
    assert len(encoded) == 10 and max(len(x) for x in encoded["input_ids"]) == max_length
    assert f"10 examples, 10 truncated to {max_length} tokens, 0 dropped" in caplog.text
    assert len(list((tmp_path / "data").glob("metamath100k-*.arrow"))) == 1  # tokenized once, reused
    again = tokenized(cfg, tokenizer, Cache(tmp_path))
    assert again["input_ids"] == encoded["input_ids"]


def test_data_errors_name_the_file_and_field(data_files, tokenizer, tmp_path):
    def fails(match, *overrides):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            tokenized(compose("data=local", *overrides).data, tokenizer, Cache(tmp_path))

    fails("data file .*missing.jsonl does not exist", f"data.path={tmp_path / 'missing.jsonl'}")
    (tmp_path / "empty.jsonl").write_text("")
    fails("empty.jsonl", f"data.path={tmp_path / 'empty.jsonl'}")
    (tmp_path / "broken.jsonl").write_text('{"query": "1+1?", "response": \n')
    fails("broken.jsonl is not valid json", f"data.path={tmp_path / 'broken.jsonl'}")
    fails(r"codefeedback.jsonl has no field\(s\) \['response'\]; its fields are \['query', 'answer', 'lang'\]",
          f"data.path={data_files['codefeedback']}")
    fails("every example's labels are masked .* raise data.max_length", f"data.path={data_files['metamath100k']}",
          "data.max_length=16")


def test_codefeedback_python_subset_is_the_default(data_files, tokenizer, tmp_path, caplog):
    path = f"data.path={data_files['codefeedback']}"
    with caplog.at_level("INFO"):
        python = tokenized(compose("data=codefeedback", path).data, tokenizer, Cache(tmp_path))
    assert len(python) == 36 and "36 of 48 records match data.filter={'lang': 'python'}" in caplog.text
    assert len(tokenized(compose("data=codefeedback", path, "data.filter=null").data, tokenizer, Cache(tmp_path))) == 48
    limited = tokenized(compose("data=codefeedback", path, "data.limit=4").data, tokenizer, Cache(tmp_path))
    assert "times_4(" in tokenizer.decode(limited[3]["input_ids"])  # filtered (3 is JavaScript), then limited
    with pytest.raises(ValueError, match=r"no record matches .*'lang': \['javascript', 'python'\]"):
        tokenized(compose("data=codefeedback", path, "data.filter={lang:Python}").data, tokenizer, Cache(tmp_path))


def test_sentencepiece_response_has_no_word_start_token_of_its_own():
    """As with LLaMA-2's SentencePiece: "…Response:" + "the" as one text, not the prompt's tokens + "▁the" (PiSSA)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.train_from_iterator([PROMPT.format(query="x"), "the cat", "Response:the"] * 4,
                                trainers.BpeTrainer(special_tokens=["<unk>", "</s>"], vocab_size=120))
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    assert sp.convert_ids_to_tokens(sp("the", add_special_tokens=False).input_ids)[0].startswith("▁")  # alone
    encoded = encode({"q": "x", "r": "the"}, sp, "{q}", "{r}", 512)
    response = sp.convert_ids_to_tokens([t for t in encoded["labels"] if t != IGNORE])
    assert not response[0].startswith("▁") and response[-1] == "</s>"


def test_cache_key_follows_the_tokenizer_content_and_the_encoding_code(data_files, tiny_dirs, tmp_path, monkeypatch):
    cfg = compose("data=metamath100k", f"data.path={data_files['metamath100k']}", "data.limit=4").data
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    tokenized(cfg, tokenizer, Cache(tmp_path))
    tokenizer.add_tokens(["plus"])  # same name and a known length change aside, the content differs
    tokenized(cfg, tokenizer, Cache(tmp_path))
    monkeypatch.setattr(data, "encode", lambda record, **kw: encode(record, **kw))  # other encoding code
    tokenized(cfg, tokenizer, Cache(tmp_path))
    assert len(list((tmp_path / "data").glob("metamath100k-*.arrow"))) == 3


@pytest.mark.parametrize("damage", ["truncated", "short"])
def test_a_damaged_tokenized_cache_is_named_and_rebuilt(damage, data_files, tokenizer, tmp_path, caplog):
    cfg = compose("data=metamath100k", f"data.path={data_files['metamath100k']}").data
    first = tokenized(cfg, tokenizer, Cache(tmp_path)).to_dict()
    (cache,) = (tmp_path / "data").glob(f"metamath100k-{'?' * 16}.arrow")
    if damage == "truncated":
        damaged = cache.read_bytes()[: cache.stat().st_size // 2]
    else:  # a complete arrow file of fewer examples (the first 10 records): it reads without error
        tokenized(compose("data=metamath100k", f"data.path={data_files['metamath100k']}", "data.limit=10").data,
                  tokenizer, Cache(tmp_path / "ten"))
        (ten,) = (tmp_path / "ten" / "data").glob(f"metamath100k-{'?' * 16}.arrow")
        damaged = ten.read_bytes()
    (tmp_path / "damaged").write_bytes(damaged)
    (tmp_path / "damaged").replace(cache)  # a new file: the cached dataset above still maps the old one
    assert tokenized(cfg, tokenizer, Cache(tmp_path)).to_dict() == first
    assert f"tokenized data cache {cache} is damaged" in caplog.text and "rebuilding it" in caplog.text
    caplog.clear()
    assert tokenized(cfg, tokenizer, Cache(tmp_path)).to_dict() == first and "damaged" not in caplog.text
