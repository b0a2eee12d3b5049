"""The stage graph on a tiny grid: what runs the first time, the second time, after a change; failures; W&B."""

import json
from pathlib import Path

import pytest

from helpers import compose, eval_overrides
from oplora.pipeline import run, summary
from wandb_log import read_run


def grid_overrides(data_files, tasks, root: Path, *extra) -> list[str]:
    """LoRA and OPLoRA-16 (plus the base row) on tiny Llama, 2 steps each, two toy lm_eval columns."""
    return ["model=tiny-llama", "data=metamath100k", f"data.path={data_files['metamath100k']}", "train=math",
            "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4", "train.lora_r=8",
            "train.lora_alpha=16", "train.save_steps=2", "experiment_name=tinygrid",
            f"output_dir={root}/runs/${{method.label}}/seed${{seed}}", f"pipeline.results_dir={root}/tables",
            "pipeline.methods=[lora,oplora16]", "pipeline.rho_ks=[8,16]", "wandb=offline", f"wandb.dir={root}/wandb",
            f"cache_dir={root}/cache", *eval_overrides(tasks, "eval.limit=4"), *extra]


def pipeline(overrides):
    return run(compose(*overrides), overrides)


def wandb_runs(root: Path) -> dict[str, dict]:
    runs = [{**read_run(d), "dir": d} for d in sorted((root / "wandb").glob("wandb/offline-run-*"))]
    return {r["name"]: r for r in runs}


def test_graph_runs_once_skips_then_reruns_only_what_changed(data_files, tasks, tmp_path):
    overrides = grid_overrides(data_files, tasks, tmp_path)
    first = pipeline(overrides)
    assert first["failed"] == {}
    assert first["ran"] == {"fetch": [], "svd": ["all"], "train": ["lora/seed42", "oplora16/seed42"],
                            "diagnose": ["lora/seed42", "oplora16/seed42"],
                            "eval": ["lora/seed42", "oplora16/seed42", "base/seed42"], "collect": ["all"]}
    second = pipeline(overrides)
    assert all(not cells for cells in second["ran"].values()), summary(second)
    changed = pipeline([*overrides[:-1], "eval.limit=3"])  # an eval setting: eval and collect only
    assert changed["ran"] == {"fetch": [], "svd": [], "train": [], "diagnose": [],
                              "eval": ["lora/seed42", "oplora16/seed42", "base/seed42"], "collect": ["all"]}

    tables = tmp_path / "tables"
    for name in ("table.md", "table.tex", "table.csv", "figure2.png", "figure2.pdf", "collect.json"):
        assert (tables / name).exists(), name
    collected = json.loads((tables / "collect.json").read_text())
    assert list(collected["rows"]) == ["Base", "LoRA", "OPLoRA-16"]
    lora = json.loads((tmp_path / "runs/lora/seed42/eval/lm_eval.json").read_text())
    assert collected["rows"]["LoRA"]["Capitals"] == pytest.approx(100 * lora["metrics"]["toy_capitals"]["value"])
    assert lora["metrics"]["toy_capitals"]["n"] == 3
    assert collected["rho"]["OPLoRA-16"]["16"] < 1e-10 < collected["rho"]["LoRA"]["16"]

    runs = wandb_runs(tmp_path)
    cell = runs["tinygrid/tiny-llama/metamath100k/oplora16/seed42"]
    assert cell["group"] == "tinygrid"
    for key in ("eval/Capitals", "eval/Sums", "eval/finetune_avg", "eval/forget_avg", "eval/avg", "rho/k8", "rho/k16"):
        assert key in cell["summary"], key
    assert cell["summary"]["eval/forget_avg"] == pytest.approx(collected["rows"]["OPLoRA-16"]["Sums"])
    collect_run = runs["tinygrid/tiny-llama/collect"]
    logged = collect_run["history"][0]
    assert logged["table/nrows"] == 3 and logged["forget_avg_table/_type"] == "table-file"  # the bar chart's data
    assert logged["paired/nrows"] == 2 * 3  # OPLoRA-16 − LoRA and LoRA − Base: two columns and Forget avg each
    table = json.loads((collect_run["dir"] / "files" / logged["table/path"]).read_text())
    assert table["columns"] == ["method", "Capitals", "Sums", "finetune_avg", "forget_avg", "avg",
                                "finetune_avg_stderr", "forget_avg_stderr", "avg_stderr", "seeds"]
    assert table["data"][2][0] == "OPLoRA-16"
    assert table["data"][2][4] == pytest.approx(collected["rows"]["OPLoRA-16"]["Sums"])
    assert table["data"][2][7] is None and table["data"][2][9] == 1  # one seed: no standard error


def test_a_failed_cell_is_reported_and_shown_missing(data_files, tasks, tmp_path):
    overrides = grid_overrides(data_files, tasks, tmp_path, "pipeline.methods=[lora,lora_null]", "pipeline.base=false",
                               "wandb=disabled", f"calibration.source={tmp_path}/nq.txt")  # missing: cannot train
    with pytest.warns(UserWarning, match="LoRA-Null"):
        report = pipeline(overrides)
    assert list(report["failed"]) == ["lora_null/seed42"]
    assert "nq.txt does not exist" in report["failed"]["lora_null/seed42"]
    assert report["ran"]["eval"] == ["lora/seed42"]
    assert report["blocked"] == {"fetch": [], "svd": [], "train": [], "diagnose": ["lora_null/seed42"],
                                 "eval": ["lora_null/seed42"], "collect": []}
    failure = json.loads((tmp_path / "runs/lora_null/seed42/failed/train.json").read_text())
    assert failure["step"] == "train" and "nq.txt does not exist" in failure["error"]
    collected = json.loads((tmp_path / "tables" / "collect.json").read_text())
    assert "nq.txt does not exist" in collected["failed"]["lora_null/seed42"]
    table = (tmp_path / "tables" / "table.md").read_text()
    assert "LoRA-Null" in table and "—" in table
    assert "FAILED lora_null/seed42" in summary(report)


@pytest.mark.slow
def test_each_gpu_step_in_its_own_process_and_training_on_two(data_files, tasks, calibration_file, tmp_path, capfd):
    """launcher.isolate=true: train and eval of every cell in processes of their own (the GPU path: DeepSpeed
    and vLLM keep GPU memory within a process); launcher.gpus=2: LoRA-Null trained by two processes under
    torchrun (gloo here), the effective batch unchanged, rank 0 calibrating while the other rank waits and then
    reads the null spaces it cached."""
    overrides = [o.replace("train.micro_batch_size=4", "train.micro_batch_size=2") for o in grid_overrides(
        data_files, tasks, tmp_path, "wandb=disabled", "pipeline.methods=[lora_null]", "pipeline.compare_to=null",
        "deepspeed=zero2",
        f"calibration.source={calibration_file}", "calibration.n_samples=4", "calibration.seq_len=32")]
    report = run(compose(*overrides, "launcher.isolate=true", "launcher.gpus=2"), overrides)
    assert report["failed"] == {}, summary(report)
    assert report["ran"] == {"fetch": [], "svd": ["all"], "train": ["lora_null/seed42"],
                             "diagnose": ["lora_null/seed42"], "eval": ["lora_null/seed42", "base/seed42"],
                             "collect": ["all"]}
    record = json.loads((tmp_path / "runs" / "lora_null" / "seed42" / "run.json").read_text())
    assert record["world_size"] == 2 and record["log_history"][-1]["step"] == 2
    log = capfd.readouterr()
    assert (log.out + log.err).count("LoRA-Null calibration:") == 1  # rank 0 only
    assert "LoRA-Null null spaces read from" in log.out + log.err  # the other rank, after waiting
    again = run(compose(*overrides, "launcher.isolate=true", "launcher.gpus=2"), overrides)
    assert again["skipped"]["train"] == ["lora_null/seed42"]
    assert again["skipped"]["eval"] == ["lora_null/seed42", "base/seed42"]
