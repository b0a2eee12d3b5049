"""The paper's protocol settings reach their stage: lm_eval's BOS, the paper-era RACE task, ..."""

import shutil
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from oplora.evaluation.harness import load_lm
from oplora.evaluation.target import Target
from oplora.resources import resolve


@pytest.fixture(scope="module")
def bos_model(tiny_dirs, tmp_path_factory):
    """The tiny Llama with a tokenizer that prepends BOS by default, as LLaMA-2's does."""
    directory = tmp_path_factory.mktemp("bos-model")
    shutil.copytree(tiny_dirs["llama"], directory, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    tokenizer.save_pretrained(directory)
    assert AutoTokenizer.from_pretrained(directory)("Question").input_ids[0] == tokenizer.bos_token_id
    return directory


@pytest.mark.parametrize("add_bos_token,first_is_bos", [(False, False), (None, True), (True, True)])
def test_lm_eval_sees_bos_only_when_set(bos_model, add_bos_token, first_is_bos):
    settings = {"batch_size": 1, "cpu_batch_size": 1, "add_bos_token": add_bos_token}
    lm = load_lm(Target(base=str(bos_model)), settings, merged=None)
    seen = []
    model_call = lm._model_call
    lm._model_call = lambda inps, *a, **kw: seen.append(inps[0].tolist()) or model_call(inps, *a, **kw)
    request = Instance(request_type="loglikelihood", doc={}, arguments=("Question: 2+2?\nAnswer:", " 4"), idx=0)
    lm.loglikelihood([request])
    bos = lm.tokenizer.bos_token_id
    assert (seen[0][0] == bos) == first_is_bos and bos not in seen[0][1:]
    assert lm.add_bos_token == add_bos_token


def race_doc():
    problems = [{"question": "The boy has a  _  .", "options": ["dog", "cat", "cow", "pig"], "answer": "A"},
                {"question": "Where does he live?", "options": ["Rome", "Oslo", "Lima", "Pisa"], "answer": "B"},
                {"question": "What is the article about?", "options": ["a", "b", "c", "d"], "answer": "C"}]
    return {"article": "A boy lives in Oslo with his dog.", "problems": str(problems)}


def test_race_v2_is_lm_eval_049s_race():
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.tasks.race import preprocess_race as installed  # version 3.0

    task = load_yaml(Path(resolve("oplora:paper-tasks")) / "race_v2.yaml")
    assert task["task"] == "race_v2" and task["metadata"]["version"] == 2.0
    doc = race_doc()
    text = task["doc_to_text"](doc)
    assert text == ("Article: A boy lives in Oslo with his dog.\n\n _  .dog\nQuestion: Where does he live?\n"
                    "Answer: Oslo\nWhat is the article about?")  # 0.4.9's rendering of the blank
    assert installed.doc_to_text(doc) != text and "The boy has a dog" in installed.doc_to_text(doc).replace("  ", " ")
    assert task["doc_to_choice"](doc) == installed.doc_to_choice(doc) and task["doc_to_target"](doc) == 2


def test_protocol_md_is_generated_from_the_configs_and_current():
    from oplora.protocol import markdown

    text = markdown()
    assert (Path(__file__).resolve().parents[1] / "PROTOCOL.md").read_text() == text, \
        "PROTOCOL.md is stale: run python -m oplora.protocol"
    for row in ("| `eval.lm_eval.add_bos_token` | `false` | paper: lm_eval 0.4.9",
                "| `eval.evalplus.prompt` | `evalplus` | paper:", "| `data.filter.lang` | `python` | reference: PiSSA",
                "| `eval.columns.RACE` | `lm_eval race_v2 (forget)` | paper:", "| `svd_mode` | `exact` | ours:"):
        assert row in text, row


def test_source_comments_follow_nesting_columns_and_group_choices(tmp_path):
    from oplora.protocol import source_of, sources

    (tmp_path / "x.yaml").write_text(
        "defaults:\n  - override /model: llama2-7b   # paper: table 2\n"
        "a:\n  b: 1        # ours: because\n  c:\n    d: 2   # reference: repo/file.py\n"
        "  e: {f: 3}    # paper: §4\nplain: 4   # a comment, not a source\n"
        "columns:\n  - {label: RACE, stage: lm_eval}   # paper: table 2's RACE\n")
    found = sources(tmp_path / "x.yaml", "eval.")
    assert found == {"model": "paper: table 2", "eval.a.b": "ours: because", "eval.a.c.d": "reference: repo/file.py",
                     "eval.a.e": "paper: §4", "eval.columns.RACE": "paper: table 2's RACE"}
    assert source_of(found, "eval.a.e.f") == "paper: §4" and source_of(found, "eval.plain") == "—"
