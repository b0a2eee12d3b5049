"""oplora.slurm against a real single-node SLURM (slurm/local-cluster.sh starts it); no mocks."""

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import compose
from oplora.grid import Cell
from oplora.launch import pipeline_jobs, submit_pipeline
from oplora.slurm import NEVER_RUNS, Step, render, submit, wait

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"partition": None, "account": None, "gpus": 0, "cpus_per_task": 1, "mem": "500M",
            "time": "00:05:00", "max_parallel": None, "extra": [], "submit": True}


def headers(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_render_headers(tmp_path):
    step = Step("train", "python -m oplora.train cell=$SLURM_ARRAY_TASK_ID", array=6)
    cpu = headers(render(step, SETTINGS, tmp_path, "t2", Path("/work dir"), {"A": "x y"}))
    assert "--job-name=t2-train" in cpu and "--array=0-5" in cpu
    assert f"--output={tmp_path}/logs/%x-%A_%a.out" in cpu
    assert {"--cpus-per-task=1", "--mem=500M", "--time=00:05:00", "--requeue", "--open-mode=append"} <= set(cpu)
    assert not any(h.startswith(("--gres", "--partition", "--account")) for h in cpu)

    gpu = {**SETTINGS, "gpus": 1, "partition": "a6000", "max_parallel": 2, "extra": ["--qos=high"]}
    text = render(Step("collect", "true"), gpu, tmp_path, "t2", Path("/work dir"), {"A": "x y"})
    assert {"--gres=gpu:1", "--partition=a6000", "--qos=high", f"--output={tmp_path}/logs/%x-%j.out"} <= set(
        headers(text))
    assert "--gres=gpu:a6000:2" in headers(render(Step("train", "true"), {**gpu, "gpus": 2, "gpu_type": "a6000"},
                                                  tmp_path, "t2", tmp_path, {}))  # a typed GRES
    assert not any(h.startswith(("--array", "--account")) for h in headers(text))
    assert "cd '/work dir'" in text and "export A='x y'" in text and text.rstrip().endswith("true")
    assert "--array=0-5%2" in headers(render(step, gpu, tmp_path, "t2", tmp_path, {}))
    with pytest.raises(ValueError, match=r"launcher\.gpu_type = 'a6000 x'"):
        render(step, {**gpu, "gpu_type": "a6000 x"}, tmp_path, "t2", tmp_path, {})


def test_chain_runs_in_order(cluster, tmp_path):
    out = tmp_path / "out dir"  # a space: exercises the env quoting
    out.mkdir()
    steps = [
        Step("first", 'sleep 1; echo "$SLURM_ARRAY_TASK_ID $(date +%s.%N)" > "$OUT/first-$SLURM_ARRAY_TASK_ID"', 3),
        Step("second", 'date +%s.%N > "$OUT/second-start"; ls "$OUT" | grep -c ^first- > "$OUT/count"',
             after="first"),
        Step("third", 'touch "$OUT/third-$SLURM_ARRAY_TASK_ID"', 2, after="second"),
    ]
    ids = submit(steps, SETTINGS, tmp_path / "jobs", f"test-{tmp_path.name}", REPO, {"OUT": str(out)})
    assert json.loads((tmp_path / "jobs" / "jobs.json").read_text()) == ids and all(ids.values())
    states = wait(list(ids.values()), timeout=120, poll=1)
    assert len(states) == 3 + 1 + 2 and set(states.values()) == {"COMPLETED"}, states

    finished = [float((out / f"first-{i}").read_text().split()[1]) for i in range(3)]
    assert [(out / f"first-{i}").read_text().split()[0] for i in range(3)] == ["0", "1", "2"]
    assert float((out / "second-start").read_text()) > max(finished)
    assert (out / "count").read_text().strip() == "3"
    assert (out / "third-0").exists() and (out / "third-1").exists()
    assert (tmp_path / "jobs" / "logs" / f"test-{tmp_path.name}-second-{ids['second']}.out").exists()


def test_failed_array_task_blocks_dependent(cluster, tmp_path):
    steps = [Step("first", '[ "$SLURM_ARRAY_TASK_ID" != 1 ] || exit 3', 3),
             Step("second", f"touch {tmp_path}/second-ran", after="first")]
    ids = submit(steps, SETTINGS, tmp_path / "jobs", f"test-{tmp_path.name}", REPO)
    try:
        first = wait([ids["first"]], timeout=60, poll=1)
        assert first == {f"{ids['first']}_0": "COMPLETED", f"{ids['first']}_1": "FAILED",
                         f"{ids['first']}_2": "COMPLETED"}
        # SLURM 22.05 (no kill_invalid_depend) keeps the dependent PENDING, Reason=DependencyNeverSatisfied
        assert wait([ids["second"]], timeout=60, poll=1) == {ids["second"]: NEVER_RUNS}
        assert not (tmp_path / "second-ran").exists()
    finally:
        subprocess.run(["scancel", *ids.values()], check=False)
    assert wait([ids["second"]], timeout=30, poll=1) == {ids["second"]: "CANCELLED"}


def test_sbatch_error_names_the_script(cluster, tmp_path):
    with pytest.raises(RuntimeError, match=r"single\.sbatch.*(?i:partition)"):
        submit([Step("single", "true")], {**SETTINGS, "partition": "no-such-partition"}, tmp_path, "t", REPO)


def test_scripts_only(tmp_path):
    steps = [Step("train", "true", 4), Step("eval", "true", 4, after="train"), Step("collect", "true", after="eval")]
    ids = submit(steps, {**SETTINGS, "submit": False}, tmp_path, "t", REPO)
    assert ids == {"train": None, "eval": None, "collect": None}
    assert sorted(p.name for p in tmp_path.glob("*.sbatch")) == ["collect.sbatch", "eval.sbatch", "train.sbatch"]
    assert not (tmp_path / "jobs.json").exists()
    with pytest.raises(ValueError, match="not an earlier step"):
        submit([Step("eval", "true", after="train")], {**SETTINGS, "submit": False}, tmp_path, "t", REPO)


def cells(*methods: str) -> dict:
    """A grid of these methods' cells (seed 1), as the pipeline hands it to the SLURM launcher."""
    return {Cell(method, 1): compose(f"method={method}") for method in methods}


@pytest.mark.parametrize("name, setting", [("x\n#SBATCH --wrap=id", "job name"), ("my run", "job name"),
                                           ("x\r--wrap=id", "job name")])
def test_experiment_name_cannot_inject_header_lines(tmp_path, name, setting):
    """A newline in experiment_name once ran an injected command in the job; a space made an invalid directive."""
    cfg = compose("experiment=table2", "launcher=slurm", "launcher.submit=false")
    cfg.experiment_name = name
    cfg.pipeline.results_dir = str(tmp_path / "results" / "tables")
    with pytest.raises(ValueError, match=rf"{setting} \(from experiment_name\) = .*allowed are letters, digits, "
                                         r"'\.', '_' and '-'"):
        submit_pipeline(cfg, [f"experiment_name={name}"], cells("lora"))
    assert not (tmp_path / "results").exists(), "refused before anything is written"


@pytest.mark.parametrize("setting, value", [("partition", "gpu\n#SBATCH --wrap=id"), ("account", "lab x"),
                                            ("mem", "64G\n#SBATCH --uid=0"), ("time", "1:00 --wrap=id"),
                                            ("max_parallel", "2\n"), ("extra", ["--qos=high\n#SBATCH --wrap=id"]),
                                            ("extra", ["qos=high"])])
def test_launcher_settings_are_checked(tmp_path, setting, value):
    step = Step("train", "true", array=2)
    with pytest.raises(ValueError, match=rf"launcher\.{setting} = .*cannot go into an #SBATCH line"):
        submit([step], {**SETTINGS, setting: value, "submit": False}, tmp_path / "slurm", "t", REPO)
    assert not (tmp_path / "slurm").exists()
    with pytest.raises(ValueError, match=r"log path .* = .*whitespace"):
        render(step, SETTINGS, tmp_path / "my results", "t", REPO, {})


def test_normal_config_renders(tmp_path):
    cfg = compose("experiment=table2", "launcher=slurm", "launcher.submit=false", "launcher.partition='a6000,a100'",
                  "launcher.extra=['--qos=high']")
    cfg.pipeline.results_dir = str(tmp_path / "results" / "tables")
    submit_pipeline(cfg, ["experiment=table2"], cells("lora", "base"))
    text = (tmp_path / "results" / "slurm" / "train.sbatch").read_text()
    assert {"--job-name=oplora-table2-train", "--partition=a6000,a100", "--qos=high"} <= set(headers(text))
    svd = headers((tmp_path / "results" / "slurm" / "svd.sbatch").read_text())
    assert "--array=0-7" in svd  # sharded by default on SLURM: a 7B's float64 SVDs are hours in one job


def test_a_data_setting_cannot_inject_commands_into_a_job(tmp_path):
    """Every word of a job's command is quoted: a data setting with a pipe once ran `tee` in the train, diagnose and
    eval jobs. The launcher's own $SLURM_ARRAY_TASK_ID still expands (the cell index)."""
    pwned = tmp_path / "PWNED"
    query = f"data.query=x|tee {pwned}|$SLURM_ARRAY_TASK_ID"
    python = tmp_path / "python"  # stands in for the interpreter: writes the arguments the job gives it
    python.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGV"\n')
    python.chmod(0o755)
    cfg = compose("experiment=table2", "launcher=slurm", "launcher.submit=false", f"launcher.python={python}", query)
    cfg.pipeline.results_dir = str(tmp_path / "results" / "tables")
    submit_pipeline(cfg, ["experiment=table2", query], cells("lora", "base"))
    scripts = tmp_path / "results" / "slurm"
    expected = {"svd": None, "train": "0", "diagnose": "0", "eval": "0", "eval-base": "1", "collect": None}
    assert sorted(p.stem for p in scripts.glob("*.sbatch")) == sorted(expected)
    for step, cell in expected.items():
        argv = tmp_path / f"argv-{step}"
        done = subprocess.run(["bash", str(scripts / f"{step}.sbatch")], capture_output=True, text=True,
                              env={**os.environ, "SLURM_ARRAY_TASK_ID": "0", "ARGV": str(argv)})
        assert not pwned.exists(), f"{step}.sbatch ran the injected command"
        assert done.returncode == 0, done.stderr
        args = argv.read_text().splitlines()
        assert query in args and f"pipeline.step={step.removesuffix('-base')}" in args
        assert [a for a in args if a.startswith("pipeline.cell=")] == ([f"pipeline.cell={cell}"] if cell else [])


def test_job_scripts_carry_what_a_job_needs(tmp_path, monkeypatch):
    """The caches fetch filled and the W&B mode are written into each script (not left to sbatch's --export=ALL); a
    logged-in user's jobs log offline; the hub token, which offline jobs never read, is not written."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)  # `auto` would be online here
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_scripts")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("OPLORA_CACHE", str(tmp_path / "oplora cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    cfg = compose("experiment=table2", "launcher=slurm", "launcher.submit=false")
    cfg.pipeline.results_dir = str(tmp_path / "results" / "tables")
    submit_pipeline(cfg, ["experiment=table2"], cells("lora", "base"))
    from huggingface_hub import constants

    for script in (tmp_path / "results" / "slurm").glob("*.sbatch"):
        text = script.read_text()
        for line in ("export HF_HUB_OFFLINE=1", "export HF_DATASETS_OFFLINE=1", "export WANDB_MODE=offline",
                     f"export HF_HOME={constants.HF_HOME}", f"export XDG_CACHE_HOME={tmp_path}/xdg",
                     f"export OPLORA_CACHE='{tmp_path}/oplora cache'", f"export HF_DATASETS_CACHE={tmp_path}/datasets"):
            assert line in text.splitlines(), (script.name, line)
        assert "hf_not_for_scripts" not in text and "a" * 40 not in text
    monkeypatch.setenv("WANDB_MODE", "online")  # told otherwise
    submit_pipeline(cfg, ["experiment=table2"], cells("lora", "base"))
    assert "export WANDB_MODE=online" in (tmp_path / "results" / "slurm" / "train.sbatch").read_text()


def test_each_cell_is_evaluated_when_its_own_training_ends(cluster, tmp_path):
    """The launcher's chain on the real SLURM, each step's command replaced by a marker: cell i's diagnose and eval
    wait for training task i only (aftercorr), the base row's eval for no training at all; a failed training task
    cancels its cell's diagnose and eval, and collect still runs."""
    out = tmp_path / "out"
    out.mkdir()
    stamp = 'echo "$(date +%s.%N)" > "$OUT/{step}-${{SLURM_ARRAY_TASK_ID:-x}}"'
    # cell 0 trains until cell 1's eval and the base row's eval have run (at most 90 s), cell 2 fails
    slow = ('for i in $(seq 180); do [ -e "$OUT/eval-1" ] && [ -e "$OUT/eval-base-0" ] && break; sleep 0.5; done')
    commands = {"train": f'if [ "$SLURM_ARRAY_TASK_ID" = 0 ]; then {slow}; else sleep 1; fi; ' + stamp + '; '
                         '[ "$SLURM_ARRAY_TASK_ID" != 2 ]'}
    jobs = pipeline_jobs("python", [], cells("lora", "pissa", "milora", "base"), gpus=0)
    assert {j.name: (j.array, j.after, j.dependency) for j in jobs} == {
        "svd": (None, (), "afterany"), "train": (3, ("svd",), "afterany"), "diagnose": (3, ("train",), "aftercorr"),
        "eval": (3, ("train",), "aftercorr"), "eval-base": (1, (), "afterany"),
        "collect": (None, ("diagnose", "eval", "eval-base"), "afterany")}
    jobs = [replace(j, command=commands.get(j.name, stamp).format(step=j.name)) for j in jobs]
    assert "#SBATCH --kill-on-invalid-dep=yes" in render(jobs[3], SETTINGS, tmp_path, "t", REPO, {})
    ids = submit(jobs, SETTINGS, tmp_path / "jobs", f"test-{tmp_path.name}", REPO, {"OUT": str(out)})
    states = wait(list(ids.values()), timeout=180, poll=1)
    assert {k: v for k, v in states.items() if v != "COMPLETED"} == {
        f"{ids['train']}_2": "FAILED", f"{ids['diagnose']}_2": "CANCELLED", f"{ids['eval']}_2": "CANCELLED"}
    time_of = lambda name: float((out / name).read_text())  # noqa: E731
    assert time_of("eval-1") < time_of("train-0") and time_of("eval-base-0") < time_of("train-0")
    assert not (out / "eval-2").exists() and time_of("collect-x") > time_of("eval-0")
