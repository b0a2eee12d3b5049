"""A learning-rate sweep end to end (experiment=frontier, reduced): cells per method × lr × seed, each evaluated at a
point along its training from its exported checkpoint, the frontier and the matched-learning table."""

import csv
import json

import pytest

from helpers import compose
from oplora.config import compose as compose_list
from oplora.grid import grid
from oplora.methods.base import adapter_settings
from oplora.pipeline import run, summary
from oplora.rundir import RunDir
from oplora.train import point_steps


def test_point_steps_are_fractions_of_the_run_before_its_end():
    assert point_steps([0.3333, 0.6667], 22) == [8, 15]
    assert point_steps([0.5, 1.0, 0.01], 4) == [1, 2]  # the end is the cell's own adapter; at least step 1
    assert point_steps(None, 10) == []


def test_a_sweep_grid_has_a_cell_per_method_lr_and_seed():
    overrides = ["experiment=frontier", "pipeline.methods=[lora,pissa]", "pipeline.seeds=[1,2]"]
    cells = grid(compose(*overrides), overrides)
    names = [c.name for c in cells]
    assert names[:3] == ["lora/lr0.001/seed1", "lora/lr0.001/seed2", "lora/lr0.002/seed1"] and names[-1] == "base/seed1"
    assert len(names) == 2 * 3 * 2 + 1 and len({c.output_dir for c in cells.values()}) == len(names)
    assert {float(c.train.lr) for cell, c in cells.items() if cell.method == "pissa"} == {2e-4, 5e-4, 1e-3}
    with pytest.raises(ValueError, match="no learning rates for 'milora' and no default"):
        grid(compose(*overrides, "~pipeline.lrs.default", "pipeline.methods=[milora]"),
             [*overrides, "pipeline.methods=[milora]"])


def test_a_method_config_sets_its_own_dropout():
    assert adapter_settings(compose_list(["method=pissa_d0"])).dropout == 0.0
    assert adapter_settings(compose_list(["method=pissa"])).dropout == 0.05  # the paper's table 8, every method


@pytest.mark.slow
def test_a_reduced_frontier_runs_end_to_end_and_resumes(tmp_path):
    overrides = ["experiment=frontier", "model=tiny-llama", "pipeline.methods=[lora,oplora_w128]",
                 "pipeline.seeds=[1,2]", "pipeline.lrs={lora:[1e-3,1e-2],oplora_w128:[1e-3,1e-2]}",
                 "pipeline.rho_ks=[8]", "data.limit=16", "train.batch_size=4", "train.micro_batch_size=4",
                 "train.points=[0.5]", "eval.lm_eval.limit=8", "eval.kl.limit=6",
                 f"output_dir={tmp_path}/runs/${{method.label}}/lr${{train.lr}}/seed${{seed}}",
                 f"pipeline.results_dir={tmp_path}/t", "wandb=disabled"]
    report = run(compose(*overrides), overrides)
    assert report["failed"] == {}, summary(report)
    assert len(report["ran"]["train"]) == 8 and len(report["ran"]["eval"]) == 9  # 2 methods × 2 lrs × 2 seeds + base
    cell = RunDir(tmp_path / "runs" / "lora" / "lr0.01" / "seed2")
    record = json.loads(cell.record.read_text())
    assert record["points"] == [2] and record["steps"] == 4
    point = cell.point(2)
    assert json.loads(point.record.read_text())["config_hash"] == record["config_hash"]
    assert point.eval_result("lm_eval").exists() and point.eval_result("kl").exists()  # evaluated from there

    out = tmp_path / "t"
    rows = list(csv.DictReader(open(out / "points.csv")))
    assert len(rows) == 16 and {r["step"] for r in rows} == {"2", "4"}  # every run at its point and at its end
    assert {r["label"] for r in rows} == {"LoRA", "OPLoRA-3.1%"} and all(float(r["forgetting"]) > 0 for r in rows)
    found = json.loads((out / "frontier.json").read_text())
    matched = found["matched"]
    assert matched["reference"] == "LoRA" and matched["target"]["lr"] in (1e-3, 1e-2)
    other = matched["methods"]["OPLoRA-3.1%"]
    assert set(other["forgetting"]) == {"1", "2"} and set(other["per_seed"]) == {"1", "2"}
    assert (out / "frontier.png").stat().st_size > 10_000 and (out / "frontier.md").exists()
    table = (out / "table.md").read_text()
    assert "| LoRA (lr 0.001) |" in table and "| OPLoRA-3.1% (lr 0.01) |" in table  # a row per method × lr

    again = run(compose(*overrides), overrides)  # a rerun resumes: nothing is trained or evaluated twice
    assert not again["ran"]["train"] and not again["ran"]["eval"] and again["skipped"]["collect"] == ["all"]


def test_sweep_cells_have_their_own_wandb_runs_and_the_dashboard_draws_the_frontier():
    from oplora.dashboard import to_json, workspace
    from oplora.tracking import artifact_name, run_config, run_id, run_name

    overrides = ["experiment=frontier", "pipeline.methods=[lora]", "pipeline.seeds=[1]"]
    cells = list(grid(compose(*overrides), overrides).values())
    assert len({run_id(c, "eval") for c in cells}) == len({artifact_name("results", c) for c in cells}) == len(cells)
    assert run_name(cells[0], "eval").endswith("/lora/lr0.001/seed1")
    assert run_config(cells[0], "eval")["learning_rate"] == 1e-3 and run_config(cells[-1], "eval")["learning_rate"] \
        is None  # the base row
    view = to_json(workspace("", "oplora", "frontier", "smollm2-135m", "demo-continents", ["KL ×100"], frontier=True))
    assert "frontier/learning" in view and "frontier/forgetting" in view and '"frontier"' in view
    assert "frontier/learning" not in to_json(workspace("", "oplora", "demo", "m", "d", ["KL ×100"]))
