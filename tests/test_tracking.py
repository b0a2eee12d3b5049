"""W&B, offline and for real: the mode, the config fields and keys of every run, artifacts, the spread over seeds,
and the dashboard definition checked against the runs of a two-seed tiny grid."""

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

import pytest
import wandb
from test_train import overrides

from helpers import compose
from oplora import tracking
from oplora.dashboard import view_name
from oplora.grid import grid
from oplora.train import start_wandb, train
from test_pipeline import grid_overrides, pipeline
from wandb_log import read_run

KEY = "a" * 40  # the shape of a W&B API key


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_auto_mode_is_online_only_with_credentials(no_credentials, monkeypatch):
    assert tracking.effective_mode("auto") == "offline"
    no_credentials.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")  # what `wandb login` writes
    assert tracking.effective_mode("auto") == "online"
    no_credentials.unlink()
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert tracking.effective_mode("auto") == "online"


@pytest.mark.parametrize("env, configured, expected", [
    ("offline", "auto", "offline"), ("offline", "online", "offline"), ("online", "offline", "online"),
    ("dryrun", "online", "offline"), ("disabled", "online", "disabled"), ("online", "disabled", "disabled"),
    (None, "offline", "offline"), (None, "online", "online"), (None, "disabled", "disabled")])
def test_a_set_wandb_mode_wins_over_the_config(no_credentials, monkeypatch, env, configured, expected):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    if env:
        monkeypatch.setenv("WANDB_MODE", env)
    assert tracking.effective_mode(configured) == expected


def test_an_unknown_mode_is_refused(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "onlin")
    with pytest.raises(ValueError, match="WANDB_MODE='onlin'.*auto, online, offline, disabled"):
        tracking.effective_mode("auto")


def test_a_batch_job_logs_offline_unless_told_otherwise(no_credentials, monkeypatch):
    """A compute node often has no internet: a logged-in user's `auto` is online here, offline in a job."""
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert tracking.effective_mode("auto") == "online" and tracking.job_mode("auto") == "offline"
    assert tracking.job_mode("online") == "online" and tracking.job_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.job_mode("auto") == "online"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_wandb_that_cannot_start_never_fails_training(no_credentials, monkeypatch, data_files, calibration_file,
                                                      tmp_path, caplog):
    """Online with an unreachable server (a closed port on loopback, as a compute node without internet sees W&B):
    the train run is logged offline for `wandb sync`, and training finishes. When not even an offline run can start
    (wandb.dir is a file), training goes on without W&B."""
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")  # seconds before wandb.init gives up (its default: 90)
    wandb.teardown()  # W&B reads the environment once per process: an earlier test's singleton would keep 90 s
    out = tmp_path / "online"
    cfg = compose(*overrides(data_files, calibration_file, out, "lora"), "wandb=online")
    train(cfg)
    assert (out / "run.json").exists()
    assert "W&B could not start the train run online (CommError" in caplog.text
    (offline,) = (out / "wandb").glob(f"offline-run-*-{tracking.run_id(cfg, 'train')}")
    assert [h["train/global_step"] for h in read_run(offline)["history"] if "train/loss" in h] == [1, 2, 3]

    (tmp_path / "a-file").write_text("")
    nowhere = compose(*overrides(data_files, calibration_file, tmp_path / "nowhere", "lora"), "wandb=online",
                      f"wandb.dir={tmp_path / 'a-file'}")
    assert start_wandb(nowhere) == []  # the Trainer gets no W&B callback, which would retry online
    assert "this run goes on without W&B" in caplog.text


SEEDS = (1, 2)


@pytest.fixture(scope="module")
def two_seeds(data_files, tasks, tmp_path_factory):
    """One pipeline run of the tiny grid (LoRA, OPLoRA-16 × seeds 1, 2, and the base row), W&B offline."""
    root = tmp_path_factory.mktemp("two-seeds")
    overrides = grid_overrides(data_files, tasks, root, f"pipeline.seeds=[{','.join(map(str, SEEDS))}]")
    report = pipeline(overrides)
    assert report["failed"] == {}
    cfg = compose(*overrides)
    runs = [{**read_run(d), "dir": d} for d in sorted((root / "wandb").glob("wandb/offline-run-*"))]
    return {"root": root, "overrides": overrides, "cfg": cfg, "runs": runs,
            "cells": list(grid(cfg, overrides).values())}


def cell_runs(runs: list[dict], job_type: str) -> list[dict]:
    return [r for r in runs if r["job_type"] == job_type]


def test_every_run_carries_the_documented_fields(two_seeds):
    runs = two_seeds["runs"]
    assert len(cell_runs(runs, "train")) == 4 and len(cell_runs(runs, "eval")) == 5
    assert len(cell_runs(runs, "collect")) == 1
    for run in runs:
        assert set(tracking.FIELDS) <= set(run["config"]), run["name"]
        assert run["config"]["experiment"] == "tinygrid" and run["config"]["model_name"] == "tiny-llama"
        assert run["config"]["data_name"] == "metamath100k" and run["group"] == "tinygrid"
        assert len(run["config"]["config_hash"]) == 64 and run["config"]["git_commit"]
    for run in cell_runs(runs, "train") + cell_runs(runs, "eval"):
        fields = run["config"]
        assert run["name"].endswith(f"/{fields['method_label']}/seed{fields['seed']}")
        assert fields.get("method_k") == (16 if fields["method_label"] == "oplora16" else None)  # Method.summary
        assert fields["lora_r"] == (None if fields["method_label"] == "base" else 8)
    # W&B groups by config field: eval runs per method_label carry both seeds
    groups = {}
    for run in cell_runs(runs, "eval"):
        groups.setdefault(run["config"]["method_label"], set()).add(run["config"]["seed"])
    assert groups == {"lora": {1, 2}, "oplora16": {1, 2}, "base": {1}}
    for run in cell_runs(runs, "train"):
        assert [h["train/global_step"] for h in run["history"] if "train/loss" in h] == [1, 2]


def test_adapters_results_and_tables_are_artifacts(two_seeds):
    runs, root = two_seeds["runs"], two_seeds["root"]
    for run in cell_runs(runs, "train"):
        (artifact,) = run["artifacts"]
        fields = run["config"]
        adapter = root / "runs" / fields["method_label"] / f"seed{fields['seed']}" / "adapter"
        assert artifact["type"] == "adapter" and artifact["metadata"]["seed"] == fields["seed"]
        assert artifact["entries"] == {p.name: p.resolve().as_uri() for p in adapter.iterdir()}  # by reference
    for run in cell_runs(runs, "eval"):
        (artifact,) = run["artifacts"]
        trained = run["config"]["method_label"] != "base"
        assert artifact["type"] == "results"
        assert set(artifact["entries"]) == {"eval/lm_eval.json", *(["diagnose.json"] if trained else [])}
        assert set(artifact["entries"].values()) == {None}  # small files: uploaded, not referenced
    (collect,) = cell_runs(runs, "collect")
    (artifact,) = [a for a in collect["artifacts"] if a["type"] == "tables"]  # beside wandb's own run_table
    assert artifact["name"] == "tables-tinygrid-tiny-llama"
    assert set(artifact["entries"]) == {"table.md", "table.tex", "table.csv", "long.csv", "collect.json",
                                        "figure2.png", "figure2.pdf", "dashboard.png", "paired.md", "paired.json"}


def test_collect_gives_the_spread_over_seeds_and_a_long_csv(two_seeds):
    root = two_seeds["root"]
    read = lambda seed, name: json.loads((root / f"runs/lora/seed{seed}/{name}").read_text())  # noqa: E731
    capitals = [100 * read(s, "eval/lm_eval.json")["metrics"]["toy_capitals"]["value"] for s in SEEDS]
    rho = [read(s, "diagnose.json")["modules"]["model.layers.0.self_attn.q_proj"]["rho"]["16"] for s in SEEDS]
    assert rho[0] != rho[1]  # the seeds differ: a spread to measure
    collected = json.loads((root / "tables" / "collect.json").read_text())
    stats = collected["stats"]["LoRA"]
    assert stats["Capitals"]["mean"] == pytest.approx(mean(capitals)) == collected["rows"]["LoRA"]["Capitals"]
    assert stats["rho/k16"]["seeds"] == {str(s): pytest.approx(v) for s, v in zip(SEEDS, rho, strict=True)}
    assert stats["rho/k16"]["mean"] == pytest.approx(mean(rho)) and stats["rho/k16"]["n"] == 2
    assert stats["rho/k16"]["std"] == pytest.approx(stdev(rho))
    assert stats["rho/k16"]["stderr"] == pytest.approx(stdev(rho) / 2 ** 0.5)
    assert collected["stats"]["Base"]["avg"]["n"] == 1 and collected["stats"]["Base"]["avg"]["stderr"] is None

    with open(root / "tables" / "long.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["experiment", "model", "data", "method", "label", "seed", "column", "role", "value"]
    assert len(rows) == 5 * (2 + 3) + 4 * 2  # cells × (columns + averages) + trained cells × ρ_k
    lora = {(r["seed"], r["column"]): r for r in rows if r["method"] == "lora"}
    assert float(lora["2", "Capitals"]["value"]) == pytest.approx(capitals[1])
    assert float(lora["2", "rho/k16"]["value"]) == pytest.approx(rho[1])
    assert lora["2", "Capitals"]["role"] == "finetune" and lora["1", "Sums"]["role"] == "forget"
    assert lora["1", "rho/k16"]["role"] == "rho" and lora["1", "forget_avg"]["role"] == "average"
    assert lora["1", "Capitals"]["label"] == "LoRA"


def referenced_keys(spec: dict) -> tuple[set[str], set[str]]:
    """(metric keys, config keys) that the saved workspace's panels and run set name."""
    metrics, config = set(), set()
    section = spec["spec"]["section"]
    for panel in (p for s in section["panelBankConfig"]["sections"] for p in s["panels"]):
        c = panel["config"]
        metrics.update(c.get("metrics", []))
        metrics.update(c[axis].removeprefix("summary:") for axis in ("xAxis", "yAxis") if axis in c)
        if "groupBy" in c:
            config.add(c["groupBy"].removesuffix(".value"))
        if panel["viewType"] == "Weave":  # runs.summary[<key>]: the pick op's key is the panel's one string literal
            metrics.update(re.findall(r'"val": "([^"]*)"', json.dumps(c)))
    (runset,) = section["runSets"]
    config.update(g["name"].removesuffix(".value") for g in runset["grouping"])
    config.update(f["key"]["name"] for f in runset["filters"]["filters"])
    return metrics - {"_step"}, config


def test_the_dashboard_names_only_keys_the_runs_carry(two_seeds):
    spec = json.loads((two_seeds["root"] / "tables" / "dashboard.json").read_text())
    metrics, config = referenced_keys(spec)
    runs = two_seeds["runs"]
    logged = {k for r in runs for k in [*r["summary"], *(k for h in r["history"] for k in h)]}
    assert {"eval/forget_avg", "eval/finetune_avg", "eval/avg", "eval/Capitals", "eval/Sums", "rho_curve/k",
            "rho_curve/rho", "rho/k16", "train/loss", "train/global_step", "table"} == metrics
    assert metrics - {"table"} <= logged
    assert [r["summary"]["table/_type"] for r in cell_runs(runs, "collect")] == ["table-file"]  # a wandb.Table
    assert config == {"method_label", "experiment", "model_name", "data_name"}
    assert all(config <= set(r["config"]) for r in runs)
    filters = {f["key"]["name"]: (f["op"], f["value"]) for f in spec["spec"]["section"]["runSets"][0]["filters"]
               ["filters"]}
    assert filters == {"experiment": ("=", "tinygrid"), "model_name": ("=", "tiny-llama"),
                       "data_name": ("=", "metamath100k")}
    assert all({f: r["config"][f] for f in ("experiment", "model_name", "data_name")} ==
               {f: value for f, (_, value) in filters.items()} for r in runs)  # the run set selects every run
    bars = [p["config"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]
            if p["viewType"] == "Bar Chart"]
    assert {b["metrics"][0] for b in bars} >= {"eval/forget_avg", "eval/finetune_avg"}
    assert all((b["groupBy"], b["groupAgg"], b["groupArea"]) == ("method_label.value", "mean", "stderr") for b in bars)
    assert spec["name"] == view_name("oplora", "tinygrid", "tiny-llama", "metamath100k")  # saved again: updated


def test_the_dashboard_command_writes_the_same_definition(two_seeds, tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "oplora.dashboard", *two_seeds["overrides"], f"pipeline.results_dir={out}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert f"written to {out / 'dashboard.json'}" in result.stdout
    made, collected = (referenced_keys(json.loads(p.read_text())) for p in
                       (out / "dashboard.json", two_seeds["root"] / "tables" / "dashboard.json"))
    assert made == collected


def test_sync_finds_every_offline_run_of_the_experiment(two_seeds):
    found = tracking.offline_runs(two_seeds["cfg"], two_seeds["cells"])
    assert sorted(found) == sorted(r["dir"] for r in two_seeds["runs"]) and len(found) == 10
