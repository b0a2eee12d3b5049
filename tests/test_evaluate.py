"""Evaluation stages end to end on tiny models and SmolLM2: result files, skip/force/resume, exactness."""

import json

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer

from helpers import adapt, compose, eval_overrides, train
from helpers import settings as adapter_settings
from oplora.evaluation import harness, math_eval
from oplora.evaluation.cell import TasksFailed, current_result, evaluate
from oplora.evaluation.math_score import gsm8k_gold
from oplora.evaluation.stage import Stage, register
from oplora.export import export_adapter, save_initial
from oplora.record import config_hash
from oplora.train import train as train_cell


@pytest.fixture(scope="module")
def run(data_files, tiny_dirs, tmp_path_factory):
    """A 3-step LoRA cell on tiny Llama; returns its overrides."""
    out = tmp_path_factory.mktemp("run") / "cell"
    cell = ["model=tiny-llama", "data=metamath100k", f"data.path={data_files['metamath100k']}", "method=oplora16",
            "train=math", "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4", "train.lora_r=8",
            "train.lora_alpha=16", "wandb=disabled", f"output_dir={out}"]
    train_cell(compose(*cell))
    return cell


def test_lm_eval_stage_writes_a_complete_result(run, tasks):
    cfg = compose(*run, *eval_overrides(tasks, "eval.limit=6"))
    path = evaluate(cfg)["lm_eval"][0]
    result = json.loads(path.read_text())
    record = json.loads((path.parent.parent / "run.json").read_text())
    assert result["stage"] == "lm_eval" and result["tasks"] == ["toy_capitals", "toy_sums"]
    for task in ("toy_capitals", "toy_sums"):
        metric = result["metrics"][task]
        assert metric["metric"] == "acc_norm" and 0 <= metric["value"] <= 1 and metric["n"] == 6
        assert metric["value"] == result["details"][task]["results"]["acc_norm,none"]
        samples = [json.loads(x) for x in open(result["details"][task]["samples"])]
        assert len(samples) == 6 and sum(s["acc_norm"] for s in samples) / 6 == pytest.approx(metric["value"])
    assert result["train_config_hash"] == record["config_hash"] == config_hash(cfg)
    assert result["target"]["adapter"] == record["adapter"] and len(result["target"]["adapter_sha256"]) == 64
    assert result["versions"]["lm_eval"] and result["limit"] == 6 and result["settings"]["include_path"]
    assert not (path.parent.parent / "merged").exists()  # merged for the stage, removed after it


@register
class Probe(Stage):
    """A stage registered from a test file: one task scores, one fails; it records when it is closed."""

    name = "probe"
    closed: list = []

    def run(self, task: str) -> dict:
        if task == "broken":
            raise ValueError("this task's data is broken")
        return {"metrics": {task: {"metric": "m", "value": 0.5, "stderr": None, "n": 1}}, "details": {task: {}}}

    def close(self) -> None:
        Probe.closed.append(self.workdir)
        super().close()


def test_a_stage_is_closed_after_its_tasks_and_its_version_keys_its_results(run, monkeypatch):
    """The stage contract: registered by name, closed once when its tasks are done (a failed one included: the next
    stage of the process gets its GPU memory), and its `version` in the key of its results (a changed evaluator
    makes them stale)."""
    columns = "[{label:A,stage:probe,task:fine,role:finetune},{label:B,stage:probe,task:broken,role:forget}]"
    cfg = compose(*run, f"eval.columns={columns}", "+eval.probe={limit:null}")
    with pytest.raises(TasksFailed, match="probe/broken: ValueError: this task's data is broken"):
        evaluate(cfg)
    assert len(Probe.closed) == 1
    assert current_result(cfg, "probe")["metrics"]["fine"]["value"] == 0.5
    monkeypatch.setattr(Probe, "version", 2)  # the evaluator changed what it computes
    with pytest.warns(UserWarning, match="another version of the stage"):
        assert current_result(cfg, "probe") is None


def test_finished_stage_is_skipped_forced_or_rerun_on_change(run, tasks):
    path = evaluate(compose(*run, *eval_overrides(tasks, "eval.limit=4")))["lm_eval"][0]
    first = path.stat().st_mtime_ns
    assert evaluate(compose(*run, *eval_overrides(tasks, "eval.limit=4")))["lm_eval"] == (path, False)
    assert path.stat().st_mtime_ns == first
    evaluate(compose(*run, *eval_overrides(tasks, "eval.limit=4", "eval.force=true")))
    assert path.stat().st_mtime_ns > first
    second = path.stat().st_mtime_ns
    evaluate(compose(*run, *eval_overrides(tasks, "eval.limit=3")))
    assert path.stat().st_mtime_ns > second and json.loads(path.read_text())["metrics"]["toy_sums"]["n"] == 3


def test_interrupted_stage_resumes_after_finished_tasks(run, tasks, tmp_path):
    """A partial file from a killed run holds toy_capitals; the rerun must not evaluate it again (its samples file
    stays as it was) and must finish toy_sums."""
    path = evaluate(compose(*run, *eval_overrides(tasks, "eval.limit=5")))["lm_eval"][0]
    done = json.loads(path.read_text())
    partial = {"stage_hash": done["stage_hash"],
               "tasks": {"toy_capitals": {"metrics": {"toy_capitals": done["metrics"]["toy_capitals"]},
                                          "details": {"toy_capitals": done["details"]["toy_capitals"]}}}}
    path.unlink()
    path.with_name("lm_eval.partial.json").write_text(json.dumps(partial))
    samples = {task: path.parent / "lm_eval" / f"{task}.samples.jsonl" for task in ("toy_capitals", "toy_sums")}
    stamps = {task: file.stat().st_mtime_ns for task, file in samples.items()}
    resumed = json.loads(evaluate(compose(*run, *eval_overrides(tasks, "eval.limit=5")))["lm_eval"][0].read_text())
    assert resumed["metrics"] == done["metrics"]
    assert samples["toy_capitals"].stat().st_mtime_ns == stamps["toy_capitals"]  # not evaluated again
    assert samples["toy_sums"].stat().st_mtime_ns != stamps["toy_sums"]
    assert not path.with_name("lm_eval.partial.json").exists()


def loglikelihoods(samples_path) -> torch.Tensor:
    """Per document, the log-likelihood of every choice, from a stage's samples file."""
    return torch.tensor([[float(r[0]) for r in json.loads(line)["responses"]] for line in open(samples_path)])


@pytest.mark.parametrize("method", ["oplora", "pissa"])
def test_exported_adapter_scores_equal_the_in_memory_model(method, tiny_dirs, svd, tasks, tmp_path):
    base = tiny_dirs["llama"]
    _, model = adapt(base, adapter_settings(method, **({"k": 16} if method == "oplora" else {})), svd)
    initial = save_initial(model, tmp_path / "initial") if method == "pissa" else None
    train(model, steps=10, lr=5e-3)
    adapter = export_adapter(model, method, tmp_path / "adapter", initial)
    settings = {**compose(*eval_overrides(tasks)).eval.lm_eval, "num_fewshot": {}}
    tokenizer = AutoTokenizer.from_pretrained(base)
    in_memory = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    exported = HFLM(pretrained=str(base), peft=str(adapter), dtype="float32", batch_size=4, device="cpu")
    results = {name: harness.evaluate_task(lm, "toy_capitals", settings, None, tmp_path / f"{name}.jsonl")
               for name, lm in (("memory", in_memory), ("exported", exported))}
    assert results["memory"]["metrics"] == results["exported"]["metrics"]
    ll = loglikelihoods(tmp_path / "memory.jsonl")
    assert torch.allclose(ll, loglikelihoods(tmp_path / "exported.jsonl"), atol=1e-4)
    base_ll = harness.evaluate_task(HFLM(pretrained=str(base), dtype="float32", batch_size=4, device="cpu"),
                                    "toy_capitals", settings, None, tmp_path / "base.jsonl")
    assert not torch.allclose(ll, loglikelihoods(tmp_path / "base.jsonl"), atol=1e-4)  # training changed the scores
    assert base_ll["metrics"]["toy_capitals"]["n"] == 10  # every row of the task: no limit


@pytest.mark.slow
def test_math_stage_on_gsm8k_rows_from_the_registry(smollm2, tmp_path):
    cfg = compose("model=smollm2-135m", "method=base", "eval=math", "eval.only=[math]", "eval.limit=2",
                  "eval.math.max_new_tokens=24", "eval.math.batch_size=2",
                  f"output_dir={tmp_path}",
                  "eval.columns=[{label:GSM8K,stage:math,task:gsm8k,role:finetune}]")
    result = json.loads(evaluate(cfg)["math"][0].read_text())
    metric = result["metrics"]["gsm8k"]
    assert metric["metric"] == "exact_match" and metric["n"] == 2 and result["target"]["adapter"] is None
    samples = [json.loads(x) for x in open(result["details"]["gsm8k"]["samples"])]
    rows = [json.loads(x) for x in open(result["details"]["gsm8k"]["data"]).readlines()[:2]]
    assert [s["gold"] for s in samples] == [gsm8k_gold(r["answer"]) for r in rows]
    assert [s["question"] for s in samples] == [r["question"] for r in rows]
    assert any(s["completion"] for s in samples)  # greedy text was generated (an instruct model may stop at once)
    assert metric["value"] == sum(s["correct"] for s in samples) / 2
    assert [s["doc_id"] for s in samples] == [0, 1] and all(s["exact_match"] == s["correct"] for s in samples)
    from oplora.paired import items  # per question, as paired differences and a frontier read them

    assert items(cfg, cfg.eval.columns[0]) == {str(i): 100 * s["exact_match"] for i, s in enumerate(samples)}


def test_bad_evaluation_input_is_refused_with_the_reason(run, tasks, tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json does not exist: train this cell first"):
        evaluate(compose(*run[:-1], f"output_dir={tmp_path}", *eval_overrides(tasks)))
    with pytest.raises(ValueError, match="trained with another config"):
        evaluate(compose(*run, "train.lr=1e-5", *eval_overrides(tasks)))
    with pytest.raises(ValueError, match="valid: evalplus, kl, lm_eval, math"):
        evaluate(compose(*run, "eval.columns=[{label:X,stage:bleu,task:x,role:finetune}]"))
    with pytest.raises(ValueError, match="use the stages lm_eval"):
        evaluate(compose(*run, *eval_overrides(tasks, "eval.only=[math]")))
    with pytest.raises(TasksFailed, match="no task 'toy_missing'.*include_path"):  # only its column fails
        evaluate(compose(*run, *eval_overrides(tasks), "eval.force=true",
                         "eval.columns=[{label:X,stage:lm_eval,task:toy_missing,role:finetune}]"))
    with pytest.raises(ValueError, match="method=base is the untrained model"):
        train_cell(compose(*run, "method=base"))


@pytest.mark.parametrize("content, error", [(None, "does not exist"), ('{"question": "1+1?"}\n', "no field 'answer'"),
                                            ("{not json\n", "is not valid JSON")])
def test_math_data_errors_name_the_file(content, error, tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    if content is not None:
        path.write_text(content)
    spec = {"path": str(path), "split": "test", "question": "question", "answer": "answer", "scorer": "gsm8k"}
    with pytest.raises((FileNotFoundError, KeyError, ValueError), match=error) as info:
        math_eval.load_rows(spec, None)
    assert str(path) in str(info.value)
