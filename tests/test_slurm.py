"""oplora.slurm against a real single-node SLURM (slurm/local-cluster.sh starts it); no mocks."""

import json
import subprocess
from pathlib import Path

import pytest

from helpers import compose
from oplora.grid import Cell
from oplora.launch import submit_pipeline
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
    assert not any(h.startswith(("--array", "--account")) for h in headers(text))
    assert "cd '/work dir'" in text and "export A='x y'" in text and text.rstrip().endswith("true")
    assert "--array=0-5%2" in headers(render(step, gpu, tmp_path, "t2", tmp_path, {}))


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
