"""The cluster path rehearsed offline (`make rehearse`; `make test` runs tables 2, 5 and the table-4 frontier of
it): the paper's table experiments 2–7 with their real configs and hub ids, served by a local fake Hugging Face Hub
(tests/fakehub.py, tests/hub_fixtures.py) that holds a few rows of every data set in its real schema and tiny random
models of the tables' architectures under the real model ids.

Each experiment runs as a user runs it, `python -m oplora.pipeline experiment=tableN`, in a process whose only link
to the "hub" is HF_ENDPOINT: its fetch step downloads through snapshot_download / load_dataset / lm_eval's loaders
into a fresh HF cache, and every later step runs offline from that cache. The only overrides are sizes (steps,
limits, calibration windows), paths, and `model.device=auto` (no GPU here). Table 5 goes through `launcher=slurm` on
the local cluster with LoRA-Null made to fail: the other cells' evaluations and the table still appear; fixed and
rerun, only that cell runs.
"""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fakehub import hub_env, serve
from hub_fixtures import mbpp_plus_release, paper_repos

from helpers import start_cluster
from oplora.models import tiny_dir

REPO = Path(__file__).resolve().parents[1]
# big enough for the tables' ranks: OPLoRA-128 needs k = 128 < min(m, n), math's r = 64 ≤ min(m, n)
LLAMA = dict(hidden_size=192, intermediate_size=384, num_attention_heads=4, num_key_value_heads=4)  # no GQA, as 7B
QWEN2 = dict(hidden_size=384, intermediate_size=768, num_attention_heads=6, num_key_value_heads=3)  # GQA, as 7B
# table5 goes through SLURM; `make test` runs table 2 (commonsense) beside it and the table-4 frontier (math; the code
# evaluation runs end to end in test_code_eval), `make rehearse` (OPLORA_REHEARSE=all) every table
LOCAL = ["table2", "table3", "table4", "table6", "table7"] if os.environ.get("OPLORA_REHEARSE") == "all" \
    else ["table2"]
ROWS = ["Base", "LoRA", "PiSSA", "MiLoRA", "LoRA-Null", "OPLoRA-16", "OPLoRA-128"]
SIZES = ["model.device=auto", "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=2",
         "train.save_steps=2", "eval.limit=2", "eval.math.max_new_tokens=8", "eval.math.batch_size=2",
         "eval.evalplus.max_new_tokens=16", "calibration.n_samples=4", "calibration.seq_len=64", "wandb=disabled"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The fake hub with every repo of tables 2–7; the environment of a user's shell on a login node."""
    from evalplus.data.mbpp import MBPP_PLUS_VERSION

    root = tmp_path_factory.mktemp("rehearsal")
    models = {"llama": tiny_dir("llama", **LLAMA), "qwen2": tiny_dir("qwen2", **QWEN2)}
    # MBPP+ is evalplus's GitHub release file, not a hub repo: it sits in evalplus's cache, where fetch looks for it
    evalplus = root / "xdg" / "evalplus"
    evalplus.mkdir(parents=True)
    (evalplus / f"MbppPlus-{MBPP_PLUS_VERSION}.jsonl").write_bytes(mbpp_plus_release())
    with serve(paper_repos(models)) as endpoint:
        # the experiments run at once (runs): one thread each, or OpenMP's spinning threads crowd out the others
        yield {"root": root, "endpoint": endpoint,
               "env": {**hub_env(root / "hf", endpoint), "XDG_CACHE_HOME": str(root / "xdg"), "OMP_NUM_THREADS": "1"}}


def pipeline(hub, experiment: str, *extra: str, env: dict | None = None,
             cell_dir: str = "${method.label}/seed${seed}") -> tuple[subprocess.CompletedProcess, Path]:
    out = hub["root"] / experiment
    command = [sys.executable, "-m", "oplora.pipeline", f"experiment={experiment}", *SIZES,
               f"output_dir={out}/runs/{cell_dir}", f"pipeline.results_dir={out}/tables",
               f"cache_dir={hub['root']}/cache", *extra]
    done = subprocess.run(command, env=env or hub["env"], cwd=REPO, capture_output=True, text=True)
    return done, out


def complete_table(out: Path, rows: list[str] = ROWS) -> dict:
    collected = json.loads((out / "tables" / "collect.json").read_text())
    assert list(collected["rows"]) == rows and collected["failed"] == {}
    missing = {row: [c for c, v in values.items() if v is None] for row, values in collected["rows"].items()}
    assert not any(missing.values()), missing
    assert "—" not in (out / "tables" / "table.md").read_text()
    return collected


def test_a_gated_model_without_a_token_stops_fetch_naming_the_login(hub, tmp_path):
    env = hub_env(tmp_path / "hf", hub["endpoint"], token=None)
    done, _ = pipeline(hub, "table2", "pipeline.step=fetch", env=env)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert "FAILED fetch: PermissionError: meta-llama/Llama-2-7b-hf is a gated model" in log
    assert "huggingface-cli login" in log and "HF_TOKEN" in log


def test_offline_without_a_fetch_names_every_missing_hub_id(hub, tmp_path):
    env = {**hub_env(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}  # offline, empty caches
    done, _ = pipeline(hub, "table6", "pipeline.step=fetch", env=env)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    for hub_id in ("meta-llama/Llama-2-7b-hf", "m-a-p/CodeFeedback-Filtered-Instruction", "hellaswag",
                   "openbookqa", "social_iqa", "MBPP+", "google-research-datasets/nq_open"):
        assert hub_id in log, hub_id
    assert "make fetch" in log


TABLE5 = "pipeline.methods=[lora,lora_null,oplora128]"  # three of the six methods: each SLURM job is a process
SLURM_ROWS = ["Base", "LoRA", "LoRA-Null", "OPLoRA-128"]
SLURM = ["launcher=slurm", "launcher.gpus=0", "launcher.mem=3G", "launcher.cpus_per_task=1", "launcher.time=00:30:00",
         "launcher.wait=true", "pipeline.svd_shards=2", TABLE5]


def slurm_table5(hub) -> dict:
    """Table 5 through launcher=slurm with LoRA-Null's corpus missing, then rerun locally with the default corpus."""
    failing, out = pipeline(hub, "table5", *SLURM, f"calibration.source={hub['root']}/no-corpus.txt")
    collected = json.loads((out / "tables" / "collect.json").read_text())
    fixed, _ = pipeline(hub, "table5", TABLE5)
    return {"failing": failing, "collected": collected, "fixed": fixed, "out": out}


@pytest.fixture(scope="module")
def runs(hub):
    """Every experiment as a process of its own, at once: the local tables and the table-4 frontier three at a time
    (two cores, one thread each), and table 5 on the local SLURM (its jobs wait on the scheduler more than they
    compute)."""
    no_cluster = start_cluster()
    with ThreadPoolExecutor(3) as local, ThreadPoolExecutor(1) as slurm:
        table5 = None if no_cluster else slurm.submit(slurm_table5, hub)
        sweep = local.submit(pipeline, hub, "frontier_table4", *SWEEP,
                             cell_dir="${method.label}/lr${train.lr}/seed${seed}")
        tables = dict(zip(LOCAL, local.map(lambda e: pipeline(hub, e), LOCAL), strict=True))
        return {**tables, "frontier_table4": sweep.result(), "table5": table5.result() if table5 else no_cluster}


@pytest.mark.parametrize("experiment", LOCAL)
def test_table_from_the_hub_end_to_end(hub, runs, experiment):
    done, out = runs[experiment]
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert re.search(r"fetch: \d+ items, \d+ downloaded", log)  # what the other tables fetched is not fetched again
    complete_table(out)
    assert (out / "tables" / "paper.md").exists()  # compared with the paper's own table
    snapshots = hub["root"] / "hf" / "hub"
    assert not list(snapshots.glob("models--*/snapshots/*/*.bin"))  # only the safetensors weights are fetched


SWEEP = ["pipeline.seeds=[1]", "pipeline.methods=[lora,pissa]", "pipeline.lrs.lora=[1e-4,3e-4]",  # and PiSSA's one lr
         "eval.kl.limit=4"]


def test_the_table4_frontier_from_the_hub_end_to_end(runs):
    """experiment=frontier_table4 with its real config (LLaMA-2 7B's id, MetaMathQA, GSM8K as the learning axis, the KL
    on held-out text), two of its methods and one seed: every run evaluated at its point and at its end."""
    done, out = runs["frontier_table4"]
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    points = (out / "tables" / "points.csv").read_text().splitlines()
    assert len(points) == 1 + (2 + 1) * 2  # header; LoRA at 2 lrs and PiSSA at its reference lr, each at 2 points
    matched = json.loads((out / "tables" / "frontier.json").read_text())["matched"]
    assert matched["reference"] == "LoRA" and matched["target"]["lr"] in (1e-4, 3e-4)
    assert (out / "tables" / "frontier.png").exists()


def test_a_second_fetch_downloads_nothing(hub, runs):
    again, _ = pipeline(hub, "table2", "pipeline.step=fetch")
    log = again.stdout + again.stderr
    assert again.returncode == 0 and ", 0 downloaded" in log, log[-3000:]
    assert "fetch: base model meta-llama/Llama-2-7b-hf is cached" in log


def test_table5_on_slurm_with_a_failing_cell(hub, runs):
    """launcher=slurm: fetch here, then svd (2 shards) → train/diagnose/eval arrays → collect, all offline. LoRA-Null's
    corpus is missing: its training task fails, every other cell is evaluated, the table appears with "—" for it
    and names the failure; with the corpus back, a local rerun trains and evaluates that cell only."""
    if isinstance(runs["table5"], str):
        pytest.skip(runs["table5"])
    failing, collected, fixed, out = (runs["table5"][k] for k in ("failing", "collected", "fixed", "out"))
    assert failing.returncode != 0  # a job failed: wait reports it
    assert "SLURM jobs did not complete" in failing.stdout + failing.stderr
    assert list(collected["failed"]) == ["lora_null/seed42"]
    assert "no-corpus.txt does not exist" in collected["failed"]["lora_null/seed42"]
    assert all(v is not None for row in SLURM_ROWS if row != "LoRA-Null" for v in collected["rows"][row].values())
    scripts = out / "slurm"
    assert "HF_HUB_OFFLINE=1" in (scripts / "train.sbatch").read_text()
    assert "#SBATCH --array=0-1" in (scripts / "svd.sbatch").read_text()
    log = fixed.stdout + fixed.stderr
    assert fixed.returncode == 0, log[-4000:]
    assert "train: ran 1, skipped 2" in log and "eval: ran 1, skipped 3" in log
    complete_table(out, SLURM_ROWS)
    corpora = [json.loads(p.read_text()) for p in (hub["root"] / "cache" / "calibration").glob("*.json")]
    nq = [c for c in corpora if c["source"] == "google-research-datasets/nq_open"]
    assert nq and nq[0]["split"] == "train" and nq[0]["field"] == "question" and "bos_starts_each_window" in nq[0]
