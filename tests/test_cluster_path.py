"""The GPU-cluster path's own guards: no silent CPU fallback, SIGUSR1 checkpoints and requeues, final states from
sacct, resources per step. (The whole path end to end is rehearsed in test_rehearse.py.)"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sandbox import CODE_TASK, CODE_UTILS
from test_slurm import SETTINGS
from test_train import overrides

from helpers import compose
from oplora import sandbox
from oplora.device import check_gpu, compute_dtype
from oplora.evaluation.code_eval import sandboxed_code_eval
from oplora.evaluation.harness import task_manager
from oplora.fetch import lm_eval_items
from oplora.graph import GRAPH
from oplora.grid import Cell
from oplora.launch import pipeline_jobs
from oplora.pipeline import run
from oplora.slurm import Step, parse_sacct, render, submit, wait

REPO = Path(__file__).resolve().parents[1]


def test_a_gpu_model_without_a_gpu_fails_at_once_naming_the_driver(tmp_path):
    overrides = ["experiment=table2", f"output_dir={tmp_path}/run/${{method.label}}",
                 f"pipeline.results_dir={tmp_path}/tables"]
    cfg = compose(*overrides)
    with pytest.raises(RuntimeError, match=r"(?s)torch sees no GPU.*nvidia-smi.*index-url"):
        check_gpu(cfg.model)
    assert compute_dtype(cfg.model) == "bfloat16"  # the CPU steps of a GPU run read the weights as training does
    with pytest.raises(RuntimeError, match="torch sees no GPU"):
        run(cfg, overrides)
    assert not any(tmp_path.iterdir())  # refused before fetch, svd or any run directory
    rehearsal = compose("experiment=table2", "model.device=auto")
    check_gpu(rehearsal.model)
    assert compute_dtype(rehearsal.model) == "float32"
    with pytest.raises(ValueError, match="model.device='gpu' is not valid; choose one of auto, cuda"):
        check_gpu(compose("model.device=gpu").model)


def test_sigusr1_saves_a_checkpoint_and_the_rerun_resumes(data_files, calibration_file, tmp_path):
    """SLURM's warning before the time limit: training checkpoints at the end of the step it is in and stops
    (Preempted, nothing exported); the same command (the requeued job) resumes from that checkpoint."""
    out = tmp_path / "run"
    args = [a.replace("train.max_steps=3", "train.max_steps=20") for a in overrides(
        data_files, calibration_file, out, "oplora16", "tiny-llama", "train.save_steps=1000")]
    command = [sys.executable, "-m", "oplora.train", *args]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in child.stdout:
        lines.append(line)
        if "'loss'" in line:  # logging_steps=1: training has started
            child.send_signal(signal.SIGUSR1)
            break
    lines += child.stdout.readlines()
    log = "".join(lines)
    assert child.wait() != 0 and "Preempted: stopped on SIGUSR1 at step" in log, log[-3000:]
    (checkpoint,) = (out / "checkpoints").glob("checkpoint-*")
    assert 0 < int(checkpoint.name.rsplit("-", 1)[1]) < 20 and not (out / "run.json").exists()
    resumed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stdout + resumed.stderr
    assert json.loads((out / "run.json").read_text())["log_history"][-1]["step"] == 20


# A step's process (python -c PROGRAM DIR): it marks its start; on its first run it waits for SIGUSR1, marks it
# received and stops; run again (requeued), it ends at once. Under torchrun it runs once per worker (RANK).
PROGRAM = """import os, pathlib, signal, sys, time
d, rank = pathlib.Path(sys.argv[1]), os.environ.get("RANK", "")
first = not (d / f"started{rank}").exists()
(d / f"started{rank}").write_text("x")
signal.signal(signal.SIGUSR1, lambda *a: ((d / f"signalled{rank}").write_text("x"), sys.exit(0)))
time.sleep(120 if first else 0)
"""


def requeued_on_sigusr1(steps: list[Step], started: dict[str, list[Path]], tmp_path: Path) -> dict[str, str]:
    """Submit `steps`, send SIGUSR1 to each batch shell (what --signal=B:USR1@N sends near the time limit) once its
    processes started, and check that each job requeued itself and its second run finished; {step: its log}."""
    settings = {**SETTINGS, "signal_seconds": 60}
    ids = submit(steps, settings, tmp_path, "sig", tmp_path)
    deadline = time.monotonic() + 90
    while not all(p.exists() for paths in started.values() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", *ids.values()], check=True)
    requeued = ("Restarts=1", "JobState=PENDING")  # the count rises while the job still shows REQUEUED
    for job in ids.values():
        while time.monotonic() < deadline + 60:
            shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            if all(s in shown for s in requeued):
                break
            time.sleep(0.5)
        assert all(s in shown for s in requeued), shown  # requeued by its own script
        # skip the requeue delay, but not into the second of the kill: slurmd refuses a credential issued in the
        # second it revoked the job's last one ("Job credential revoked"), and the job ends FAILED
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], check=True)
    assert wait(list(ids.values()), timeout=120, poll=1) == dict.fromkeys(ids.values(), "COMPLETED")
    logs = {step.name: next((tmp_path / "logs").glob(f"sig-{step.name}-*.out")).read_text() for step in steps}
    assert all(log.count("host=") == 2 for log in logs.values()), logs
    return logs


def test_the_job_script_requeues_on_sigusr1(cluster, tmp_path):
    """A real job: SIGUSR1 reaches the training process (it checkpoints and stops), the job requeues itself and its
    second run finishes: COMPLETED. A step without a handler (an evaluation) is not signalled: it would die of it;
    the job requeues at once and the step resumes from what it finished."""
    program = shlex.quote(PROGRAM)
    train, evaluation = tmp_path / "train", tmp_path / "eval"
    for d in (train, evaluation):
        d.mkdir()
    steps = [Step("train", f"{sys.executable} -c {program} {train}", checkpoint="process"),
             Step("eval", f"{sys.executable} -c {program} {evaluation}")]
    assert "#SBATCH --signal=B:USR1@60" in render(steps[0], {**SETTINGS, "signal_seconds": 60}, tmp_path, "sig",
                                                  tmp_path, {})
    logs = requeued_on_sigusr1(steps, {"train": [train / "started"], "eval": [evaluation / "started"]}, tmp_path)
    assert "time limit near: checkpointing, then requeueing" in logs["train"]
    assert "the step stopped with exit status 0" in logs["train"] and (train / "signalled").exists()
    assert "time limit near: requeueing (not signalled" in logs["eval"] and not (evaluation / "signalled").exists()


def test_multi_gpu_training_checkpoints_on_sigusr1(cluster, tmp_path):
    """Training on N GPUs runs under torchrun, whose agent has no SIGUSR1 handler (the signal would kill it and leave
    the workers to the requeue): SIGUSR1 goes to the workers only; both stop, the agent exits 0, the job requeues."""
    (tmp_path / "worker.py").write_text(PROGRAM)
    command = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 {tmp_path / 'worker.py'} " \
              f"{tmp_path}"
    logs = requeued_on_sigusr1([Step("train", command, checkpoint="workers")],
                               {"train": [tmp_path / "started0", tmp_path / "started1"]}, tmp_path)
    assert (tmp_path / "signalled0").exists() and (tmp_path / "signalled1").exists()
    assert "the step stopped with exit status 0" in logs["train"]


def test_final_states_from_sacct_lines():
    # `sacct -n -P -X -o JobID,State` as SLURM prints it for a job array and a cancelled job
    assert parse_sacct("120_0|COMPLETED\n120_1|FAILED\n121|CANCELLED by 0\n") == {
        "120_0": "COMPLETED", "120_1": "FAILED", "121": "CANCELLED"}


def test_resources_per_step():
    cells = {Cell("lora", 1): compose("method=lora"), Cell("base", 1): compose("method=base")}
    jobs = {j.name: j for j in pipeline_jobs("python", [], cells, gpus=1)}
    assert "fetch" not in jobs and jobs["svd"].after == ()  # fetch runs where the pipeline is launched
    assert {n: j.gpus for n, j in jobs.items()} == {"svd": 0, "train": None, "diagnose": 0, "eval": None,
                                                    "eval-base": None, "collect": 0}
    assert {n: j.checkpoint for n, j in jobs.items() if j.checkpoint} == {"train": "process"}  # SIGUSR1's handler
    assert jobs["svd"].array is None and "pipeline.shard" not in jobs["svd"].command
    two = {j.name: j for j in pipeline_jobs("python", [], cells, gpus=2, svd_shards=8)}
    assert two["train"].checkpoint == "workers" and "torch.distributed.run" in two["train"].command
    assert two["svd"].array == 8
    assert two["svd"].command.endswith('pipeline.svd_shards=8 pipeline.shard="$SLURM_ARRAY_TASK_ID"')
    moved = {j.name: j.gpus for j in pipeline_jobs("python", [], cells, gpus=1, resources={"svd": "gpu"})}
    assert moved["svd"] is None
    with pytest.raises(ValueError, match="step_resources=.*'fetcher'"):
        pipeline_jobs("python", [], cells, gpus=1, resources={"fetcher": "cpu"})
    assert [s.name for s in GRAPH][0] == "fetch"


def test_fetch_loads_code_tasks_without_the_sandbox(tmp_path, monkeypatch, caplog):
    """A login node without bubblewrap: fetch loads a code task (built like lm_eval's mbpp, whose metric module loads
    code_eval and runs a fixed self-test at import) without asking for the sandbox, and says nothing of unsandboxed
    generated code; the eval stage still refuses to run generated code there."""
    from lm_eval.tasks import get_task_dict

    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "def f():", "test": "assert True"}) + "\n")
    (tmp_path / "toy_code.yaml").write_text(CODE_TASK.format(data=tmp_path / "rows.jsonl"))
    self_test = 'pass_at_k.compute(references=["assert add(2, 3)==5"], predictions=[["def add(a,b): return a*b"]])\n'
    (tmp_path / "utils.py").write_text(CODE_UTILS + self_test)
    tools = tmp_path / "bin"  # a login node: util-linux (prlimit) but no bwrap
    tools.mkdir()
    (tools / "prlimit").symlink_to(shutil.which("prlimit"))
    monkeypatch.setenv("PATH", str(tools))
    sandbox._probe.cache_clear()
    try:
        (item,) = lm_eval_items({"toy_code": ("Code",)}, [str(tmp_path)], "bwrap")
        assert "toy_code" in item.load()
        assert "UNSANDBOXED" not in caplog.text
        manager = task_manager([str(tmp_path)])
        with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
            with sandboxed_code_eval("bwrap", manager):  # as the eval stage loads it (harness.evaluate_task)
                get_task_dict(["toy_code"], manager)
    finally:
        sandbox._probe.cache_clear()
    with pytest.raises(ValueError, match="valid: bwrap, none"):
        lm_eval_items({"toy_code": ("Code",)}, [str(tmp_path)], "docker")


def test_the_svd_uses_the_cores_of_the_job_not_of_the_node():
    """A SLURM job (or `taskset`) may run on some of the node's cores only: the SVD's threads follow the affinity."""
    script = ("import torch; from oplora.svd import all_cores\n"
              "with all_cores(torch.device('cpu')): print(torch.get_num_threads())")
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert pinned.stdout.split() == ["1"], pinned.stderr[-2000:]
    unbound = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True,
                             env={**os.environ, "SLURM_CPUS_PER_TASK": "1"})  # a cluster without core binding
    assert unbound.stdout.split() == ["1"], unbound.stderr[-2000:]


def test_calibration_windows_are_built_as_the_official_code_builds_them(smollm2):
    """LoRA-Null's get_calib_data: random.seed(seed); per window a character offset randint(0, len − seq_len − 1),
    the next 10·seq_len characters tokenized with the tokenizer's default special tokens, the first seq_len kept."""
    import random

    from transformers import AutoTokenizer

    from oplora.calibration import windows

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = "\n\n".join(f"who wrote the anthem of country number {i}?" for i in range(300))
    draw = random.Random(233)
    expected = []
    for _ in range(5):
        start = draw.randint(0, len(text) - 16 - 1)
        expected.append(tokenizer(text[start:start + 160], return_tensors="pt").input_ids[0][:16].tolist())
    assert [w.tolist() for w in windows(tokenizer, text, 5, 16, 233)] == expected
