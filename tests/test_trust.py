"""Results you can trust: each test replays an attack that once got through (issue 15) and checks it no longer does."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_train import overrides
from transformers import AutoTokenizer

from helpers import compose
from oplora.cache import Cache
from oplora.data import tokenized
from oplora.diagnose import diagnose_step
from oplora.evaluation.cell import evaluate
from oplora.pipeline import run
from oplora.report import cell_rho, loss_curves
from oplora.train import finished, train
from test_pipeline import grid_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid(data_files, tasks, tmp_path_factory):
    """LoRA, OPLoRA-16 and the base row on tiny Llama, trained, diagnosed, evaluated and collected once."""
    root = tmp_path_factory.mktemp("grid")
    args = grid_overrides(data_files, tasks, root, "wandb=disabled")
    report = run(compose(*args), args)
    assert report["failed"] == {}
    return root, args


def collected(root: Path) -> dict:
    return json.loads((root / "tables" / "collect.json").read_text())


def test_an_exploding_run_is_stopped_before_export(data_files, calibration_file, tmp_path):
    """lr=1e30 for 2 steps: the last update explodes the weights after the last logged loss was computed."""
    args = overrides(data_files, calibration_file, tmp_path / "run", "lora", "tiny-llama", "train.lr=1e30",
                     "train.max_steps=2", "train.save_steps=1")
    with pytest.raises(FloatingPointError, match=r"(after the last step \(2\) the model is broken|became).*Last good "
                                                 r"checkpoint: .*checkpoint-1"):
        train(compose(*args))
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "adapter").exists()
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-2").exists()  # set aside: never resumed or exported
    with pytest.raises(FloatingPointError):  # a rerun resumes from the good checkpoint and explodes again
        train(compose(*args))


def test_a_bad_override_never_touches_a_finished_run(data_files, calibration_file, tmp_path):
    args = overrides(data_files, calibration_file, tmp_path / "run", "lora")
    out = train(compose(*args))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for bad, error in (
            (["train.micro_batch_size=3"], "not a multiple of micro_batch_size"),
            ([f"data.path={tmp_path / 'typo.jsonl'}"], "typo.jsonl does not exist"),
            (["train.lora_r=40"], r"rank r=40 exceeds min\(m, n\)=32"),
            (["seed=-1"], r"seed=-1 must lie in 0\.\.4294967295"),
            (["seed=4294967296"], r"seed=4294967296 must lie in 0\.\.4294967295"),
            (["data.max_length=4"], r"every example's labels are masked .*raise data\.max_length"),
            (["method=lora_null", f"calibration.source={calibration_file}", "calibration.n_samples=0"],
             r"calibration\.n_samples=0 must be a positive integer")):
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            train(compose(*args, *bad))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_model_directory_without_weights_and_a_truncated_record_are_named(grid, data_files, calibration_file,
                                                                          tiny_dirs, tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    shutil.copy(tiny_dirs["llama"] / "config.json", empty)
    with pytest.raises(FileNotFoundError, match=f"model directory {empty} holds no .*safetensors weights"):
        train(compose(*overrides(data_files, calibration_file, tmp_path / "run", "lora"), f"model.path={empty}"))
    root, args = grid
    record = root / "runs" / "lora" / "seed42" / "run.json"
    saved = record.read_text()
    record.write_text(saved[:100])
    try:
        with pytest.raises(ValueError, match=r"run\.json is not valid JSON .*delete it to recompute it"):
            evaluate(compose(*args, "method=lora"))
    finally:
        record.write_text(saved)


def test_resuming_the_final_checkpoint_takes_no_extra_step(data_files, calibration_file, tmp_path):
    """Killed after the last step, before the export: the rerun exports that checkpoint as it is."""
    args = lambda out: overrides(data_files, calibration_file, out, "oplora16", "tiny-llama",  # noqa: E731
                                 "train.max_steps=4", "train.save_steps=2", "train.scheduler=constant")
    whole = train(compose(*args(tmp_path / "whole")))
    killed = shutil.copytree(whole, tmp_path / "killed")
    (killed / "run.json").unlink()
    shutil.rmtree(killed / "adapter")
    (killed / ".adapter.tmp999999999").mkdir()  # what a kill during the export leaves behind
    (killed / ".config.json.tmp1").write_text("the file of a writer that still runs (pid 1)")
    train(compose(*args(killed)))
    a, b = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (whole, killed))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert json.loads((killed / "run.json").read_text())["log_history"][-1]["step"] == 4
    assert not (killed / ".adapter.tmp999999999").exists() and (killed / ".config.json.tmp1").exists()


def test_data_changed_in_place_retrains_and_retokenizes(data_files, calibration_file, tiny_dirs, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(data_files["metamath100k"], data)
    args = [*overrides(data_files, calibration_file, tmp_path / "run", "lora"), f"data.path={data}"]
    out = train(compose(*args))
    first = json.loads((out / "run.json").read_text())["config_hash"]
    stat = data.stat()
    text = data.read_text()
    data.write_text(text.replace("plus", "PLUS"))  # same size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    train(compose(*args))
    assert json.loads((out / "run.json").read_text())["config_hash"] != first
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    changed = tokenized(compose(*args).data, tokenizer, Cache(tmp_path / "cache"))
    data.write_text(text)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert tokenized(compose(*args).data, tokenizer, Cache(tmp_path / "cache"))["input_ids"] != changed["input_ids"]


def test_stale_corrupt_and_reevaluated_results_in_the_table(grid):
    root, args = grid
    lora = root / "runs" / "lora" / "seed42" / "eval" / "lm_eval.json"
    result = json.loads(lora.read_text())
    result["metrics"]["toy_capitals"]["value"] = 0.75  # a forced re-evaluation with the same stage hash
    lora.write_text(json.dumps(result))
    report = run(compose(*args, "pipeline.step=collect"), args)
    assert report["ran"]["collect"] == ["all"] and collected(root)["rows"]["LoRA"]["Capitals"] == 75.0

    with pytest.warns(UserWarning, match="stale"):  # the training config changed, the cell was not retrained
        run(compose(*args, "pipeline.step=collect", "train.lr=1e-2"), [*args, "train.lr=1e-2"])
    partial = root / "tables" / "partial"  # an incomplete table never replaces the complete one
    assert collected(root)["rows"]["LoRA"]["Capitals"] == 75.0
    assert json.loads((partial / "collect.json").read_text())["rows"]["LoRA"]["Capitals"] is None

    oplora = root / "runs" / "oplora16" / "seed42" / "eval" / "lm_eval.json"
    saved = oplora.read_text()
    oplora.write_text(saved[: len(saved) // 2])  # truncated
    with pytest.warns(UserWarning, match=r"lm_eval\.json is not valid JSON"):
        run(compose(*args, "pipeline.step=collect"), args)
    rows = json.loads((partial / "collect.json").read_text())["rows"]
    assert rows["OPLoRA-16"]["Capitals"] is None and rows["LoRA"]["Capitals"] == 75.0  # the others still shown
    oplora.write_text(saved.replace('"value": ', '"value": NaN, "was": ', 1))
    with pytest.warns(UserWarning, match="is not a number"):
        run(compose(*args, "pipeline.step=collect"), args)
    assert "nan" not in (partial / "table.md").read_text().lower()
    oplora.write_text(saved)
    run(compose(*args, "pipeline.step=collect"), args)  # complete again: written in place, partial/ removed
    assert collected(root)["rows"]["OPLoRA-16"]["Capitals"] is not None and not partial.exists()


def test_the_base_row_is_keyed_on_the_model_and_task_data_on_their_content(grid, tasks):
    root, args = grid
    again = run(compose(*args, "train.logging_steps=2", "pipeline.step=eval"), [*args, "train.logging_steps=2"])
    assert "base/seed42" in again["skipped"]["eval"]  # a training setting does not re-evaluate the base model
    task_file = tasks / "toy_sums.jsonl"
    saved = task_file.read_text()
    try:
        task_file.write_text(saved.replace("plus", "PLUS"))
        changed = run(compose(*args, "pipeline.step=eval"), args)
        assert sorted(changed["ran"]["eval"]) == ["base/seed42", "lora/seed42", "oplora16/seed42"]
    finally:
        task_file.write_text(saved)


def test_a_swapped_adapter_or_another_base_is_refused(grid, tiny_dirs):
    root, args = grid
    lora, oplora = root / "runs" / "lora" / "seed42", root / "runs" / "oplora16" / "seed42"
    saved = (lora / "adapter" / "adapter_model.safetensors").read_bytes()
    shutil.copy(oplora / "adapter" / "adapter_model.safetensors", lora / "adapter" / "adapter_model.safetensors")
    try:
        with pytest.raises(ValueError, match="is not the adapter .*run.json recorded at training"):
            evaluate(compose(*args, "method=lora", "eval.force=true"))
    finally:
        (lora / "adapter" / "adapter_model.safetensors").write_bytes(saved)
    other = root / "other-base"
    shutil.copytree(tiny_dirs["llama"], other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FileNotFoundError, match="holds no finished training of this config"):  # model.path is hashed
        diagnose_step(compose(*args, "method=lora", f"model.path={other}"))
    changed = root / "base-changed-since"  # the same model.path, whose weights are no longer those trained on
    shutil.copytree(lora, changed, ignore=shutil.ignore_patterns("eval", "diagnose.json"))
    record = json.loads((changed / "run.json").read_text())
    (changed / "run.json").write_text(json.dumps({**record, "base_digest": "0" * 32}))
    with pytest.raises(ValueError, match="is not the base model .* was trained on"):
        diagnose_step(compose(*(a for a in args if not a.startswith("output_dir=")), "method=lora",
                              f"output_dir={changed}"))


def test_a_broken_model_is_not_scored(grid, tasks):
    """Finite but exploded weights (×1e30): every log-likelihood is NaN; lm_eval alone would report 0.5."""
    root, args = grid
    cell = root / "runs" / "lora" / "seed42"
    broken = root / "broken"
    shutil.copytree(cell, broken, ignore=shutil.ignore_patterns("eval", "diagnose.json"))
    weights = broken / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 1e30 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    record = json.loads((broken / "run.json").read_text())
    from oplora.io import file_sha256

    record["adapter_sha256"] = file_sha256(weights)  # a consistent record: only the scoring can catch it
    (broken / "run.json").write_text(json.dumps(record))
    elsewhere = [a for a in args if not a.startswith("output_dir=")]
    with pytest.raises(FloatingPointError, match="log-likelihoods are not finite"):
        evaluate(compose(*elsewhere, "method=lora", f"output_dir={broken}"))
    assert not (broken / "eval" / "lm_eval.json").exists()


def test_two_pipelines_on_one_directory_do_the_work_once(grid):
    root, args = grid
    both = [*(a for a in args if a != "eval.limit=4"), "eval.limit=3", "pipeline.step=eval"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "oplora.pipeline", *both], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    summaries = sorted(line for out in outputs for line in out.splitlines() if line.startswith("eval: ran"))
    ran = sum(int(line.split()[2].rstrip(",")) for line in summaries)
    assert len(summaries) == 2 and ran == 3, summaries  # each cell evaluated once, by whichever pipeline got it first
    for cell in ("lora", "oplora16", "base"):
        assert json.loads((root / "runs" / cell / "seed42" / "eval" / "lm_eval.json").read_text())["limit"] == 3


def test_cells_sharing_a_run_directory_are_refused_before_any_work(data_files, tasks, tmp_path):
    """output_dir without ${method.label}: LoRA and OPLoRA would train into one directory, and collect would publish
    OPLoRA's ρ as LoRA's."""
    shared = tmp_path / "shared"
    args = [a for a in grid_overrides(data_files, tasks, tmp_path, "wandb=disabled") if not a.startswith("output_dir=")]
    args.append(f"output_dir={shared}")
    with pytest.raises(ValueError, match=r"cells share a run directory \(base/seed42, lora/seed42, oplora16/seed42 → "
                                         f"{shared}\).*output_dir"):
        run(compose(*args), args)
    assert not shared.exists()


def test_a_run_directory_is_read_only_by_the_cell_that_trained_it(grid):
    """OPLoRA-16's run directory read with LoRA's config: its ρ, loss curve and adapter are not LoRA's."""
    root, args = grid
    foreign = root / "foreign"
    shutil.copytree(root / "runs" / "oplora16" / "seed42", foreign, ignore=shutil.ignore_patterns("eval"))
    lora = compose(*(a for a in args if not a.startswith("output_dir=")), "method=lora", f"output_dir={foreign}")
    assert cell_rho(compose(*args, "method=oplora16")) is not None  # the owner reads it
    assert cell_rho(lora) is None and loss_curves({"lora": lora}) == {}
    with pytest.raises(FileNotFoundError, match=f"{foreign} holds no finished training of this config"):
        diagnose_step(lora)
    assert not finished(lora)


def test_an_unreadable_failure_record_is_named_and_the_pipeline_goes_on(grid):
    root, args = grid
    record = root / "runs" / "lora" / "seed42" / "failed" / "train.json"
    record.parent.mkdir(exist_ok=True)
    record.write_text('{"step": "train", "err')  # truncated
    try:
        report = run(compose(*args, "pipeline.step=diagnose"), args)
        assert report["blocked"]["diagnose"] == ["lora/seed42"] and report["skipped"]["diagnose"] == ["oplora16/seed42"]
        with pytest.warns(UserWarning, match="lora/seed42 failed"):
            run(compose(*args, "pipeline.step=collect"), args)
        why = json.loads((root / "tables" / "failed.json").read_text())["cells"]["lora/seed42"]
        assert f"train: its failure record {record} is unreadable" in why and "rerun the pipeline" in why
    finally:
        record.unlink()
