"""Real training runs on tiny models: every method, DeepSpeed ZeRO-2 with 1 and 2 processes, resume, W&B."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from helpers import TINY, compose, load, logits, method_configs, one_config_per_method, rel
from oplora import tracking
from oplora.cache import Cache
from oplora.data import content_key
from oplora.methods import get_method
from oplora.train import train
from wandb_log import read_run

METHODS = one_config_per_method()


def overrides(data_files, calibration_file, out, method="oplora16", model="tiny-llama", *extra):
    """A 3-step run on a tiny model; a method setting that does not fit it (OPLoRA-128's k) is resized (TINY)."""
    method_args = [f"method.{key}={value}" for key, value in TINY.get(method, {}).items()]  # fit the tiny models
    method_args += {"lora_null": [f"calibration.source={calibration_file}", "calibration.n_samples=4",
                                  "calibration.seq_len=32"]}.get(method, [])
    return [f"model={model}", "data=metamath100k", f"data.path={data_files['metamath100k']}", f"method={method}",
            *method_args, "train=math", "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4",
            "train.lora_r=8", "train.lora_alpha=16", "train.save_steps=2", "wandb=disabled", f"output_dir={out}",
            *extra]


def check_run(out: Path, model_dir, method: str):
    """run.json carries config, hash, versions, commit, metrics; the adapter loads in vanilla PEFT."""
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["method"]["label"] == method and len(record["config_hash"]) == 64
    assert record["versions"]["peft"] and record["versions"]["torch"] and "git_commit" in record
    assert record["metrics"]["train_loss"] > 0
    assert record["log_history"][-1]["step"] == record["config"]["train"]["max_steps"]
    assert json.loads((out / "config.json").read_text())["config_hash"] == record["config_hash"]
    adapted = PeftModel.from_pretrained(load(model_dir), str(out / "adapter")).eval()
    assert rel(logits(adapted), logits(load(model_dir))) > 1e-7  # it learned something
    return adapted


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_exports(method, data_files, calibration_file, tiny_dirs, tmp_path):
    out = train(compose(*overrides(data_files, calibration_file, tmp_path / "run", method, "tiny-qwen2")))
    check_run(out, tiny_dirs["qwen2"], method)
    assert (out / "initial_adapter").exists() == get_method(method_configs()[method][0]).mutates_base
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int, **kwargs) -> subprocess.Popen:
    """`python -m oplora.train` alone (RANK/WORLD_SIZE set) or under the deepspeed launcher."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        command = [sys.executable, "-m", "oplora.train", *args]
    else:
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        command = [deepspeed, "--num_gpus", str(processes), "--master_port", str(free_port()), "--module",
                   "oplora.train", *args]
    return subprocess.Popen(command, env=env, **kwargs)


@pytest.mark.parametrize("method, processes", [(m, 2) for m in METHODS] + [("oplora16", 1)])  # alone: any method
def test_deepspeed_zero2(method, processes, data_files, calibration_file, tiny_dirs, tmp_path):
    out = tmp_path / "run"
    args = overrides(data_files, calibration_file, out, method, "tiny-llama", "deepspeed=zero2")
    assert launch(args, processes).wait(timeout=900) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["deepspeed"]["config"]["zero_optimization"]["stage"] == 2
    check_run(out, tiny_dirs["llama"], method)
    assert any((out / "checkpoints" / "checkpoint-3").glob("global_step*"))  # DeepSpeed's own checkpoint


def test_kill_and_resume_gives_the_uninterrupted_adapter(data_files, calibration_file, tmp_path):
    slow = ["train.max_steps=8", "train.batch_size=16", "train.micro_batch_size=1"]  # ~16 micro-steps per step
    args = lambda out: overrides(data_files, calibration_file, out, "oplora16", "tiny-llama", *slow)  # noqa: E731
    whole = train(compose(*args(tmp_path / "whole")))

    out = tmp_path / "killed"
    proc = launch(args(out), 1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "run.json").exists() and not (out / "checkpoints" / "checkpoint-8").exists()

    train(compose(*args(out)))
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (whole, out))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_finished_run_is_skipped_unless_forced_or_changed(data_files, calibration_file, tmp_path, caplog):
    args = overrides(data_files, calibration_file, tmp_path / "run", "lora")
    out = train(compose(*args))
    stamp = (out / "run.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        train(compose(*args))
    assert "already finished with this config" in caplog.text
    assert (out / "run.json").stat().st_mtime_ns == stamp
    train(compose(*args, "force=true"))
    assert (out / "run.json").stat().st_mtime_ns != stamp
    changed = train(compose(*args, "train.lr=1e-3"))
    assert json.loads((changed / "run.json").read_text())["config"]["train"]["lr"] == 1e-3


def test_cache_dir_holds_what_the_run_computes(data_files, calibration_file, tmp_path):
    """`cache_dir` moves every cache a run computes (oplora.cache): LoRA-Null's null spaces, the tokenized data and
    datasets' own cache of the local data file; none of it lands in the default cache."""
    records = data_files["metamath100k"].read_text().splitlines()
    unique = tmp_path / "data.jsonl"  # content of its own: its datasets cache is this run's alone
    unique.write_text("\n".join([*records, records[0].replace("What is", f"In {tmp_path.name}, what is")]) + "\n")
    train(compose(*overrides({"metamath100k": unique}, calibration_file, tmp_path / "run", "lora_null", "tiny-qwen2"),
                  f"cache_dir={tmp_path / 'cache'}"))
    assert {"calibration", "data", "datasets"} <= {p.name for p in (tmp_path / "cache").iterdir()}
    assert not (Cache.default().datasets / content_key(str(unique))[:16]).exists()


def test_nan_loss_stops_with_the_last_good_checkpoint(data_files, calibration_file, tmp_path):
    args = overrides(data_files, calibration_file, tmp_path / "run", "lora", "tiny-llama",
                     "train.lr=1e30", "train.warmup_ratio=0", "train.save_steps=1", "train.max_steps=20")
    with pytest.raises(FloatingPointError, match=r"(training loss became nan|the adapter's weights became non-finite) "
                                                  r"at step (\d+); stopped. Last good checkpoint: .*checkpoint-\d+"):
        train(compose(*args))
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "adapter").exists()
    kept = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert kept and all(torch.isfinite(t).all() for t in load_file(kept[-1] / "adapter_model.safetensors").values())


def test_wandb_offline_run_has_config_tags_metrics_and_the_adapter(data_files, calibration_file, tmp_path):
    out = train(compose(*overrides(data_files, calibration_file, tmp_path / "run", "oplora16"), "wandb=offline",
                        "experiment_name=wbtest", "seed=7"))
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run["group"] == "wbtest" and run["name"] == "wbtest/tiny-llama/metamath100k/oplora16/seed7"
    assert run["job_type"] == "train"
    assert set(run["tags"]) == {"tiny-llama", "metamath100k", "oplora16", "seed7"}
    assert run["config"]["method"] == {"name": "oplora", "label": "oplora16", "display": "OPLoRA-16",
                                       "color": "#d62728", "k": 16}
    record = json.loads((out / "run.json").read_text())
    assert {k: run["config"][k] for k in tracking.FIELDS} == {
        "experiment": "wbtest", "model_name": "tiny-llama", "data_name": "metamath100k", "method_label": "oplora16",
        "learning_rate": 3e-4, "lora_r": 8, "seed": 7, "git_commit": record["git_commit"],
        "config_hash": record["config_hash"]}
    assert run["config"]["method_k"] == 16  # the method's own fields (Method.summary)
    assert [h["train/global_step"] for h in run["history"] if "train/loss" in h] == [1, 2, 3]
    assert run["summary"]["train/global_step"] == 3 and run["summary"]["train_loss"] > 0
    (artifact,) = run["artifacts"]
    assert artifact["name"] == "adapter-wbtest-tiny-llama-metamath100k-oplora16-seed7" and artifact["type"] == "adapter"
    adapter = (out / "adapter").resolve()
    assert artifact["entries"]["adapter_model.safetensors"] == f"file://{adapter}/adapter_model.safetensors"


def test_wandb_disabled_writes_nothing(data_files, calibration_file, tmp_path):
    out = train(compose(*overrides(data_files, calibration_file, tmp_path / "run", "lora")))
    assert not (out / "wandb").exists()


@pytest.mark.slow
def test_short_smollm2_run(data_files, calibration_file, smollm2, tmp_path):
    out = train(compose(*overrides(data_files, calibration_file, tmp_path / "run", "oplora16", "smollm2-135m"),
                        "train.max_steps=2"))
    adapted = check_run(out, smollm2, "oplora16")
    assert len([m for m in adapted.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]) == 5 * 30
    shutil.rmtree(out / "checkpoints")
