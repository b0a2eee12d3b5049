"""Everything W&B: the mode, run names and ids, the documented config fields, runs, artifacts and sync.

    python -m oplora.tracking experiment=table2 [model=…]   # `wandb sync` every offline run of the experiment

Mode (`wandb.mode`, default `auto`): WANDB_MODE when set, else `online` when an API key is configured
(WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or the netrc entry `wandb login` writes), else `offline`. A set
WANDB_MODE also wins over an explicit `wandb=online|offline`; `disabled` — from the config or from WANDB_MODE —
turns W&B off for the run. A batch job's `auto` is `offline` (`job_mode`: compute nodes often have no internet; the
SLURM launcher writes the mode into each job script). W&B never fails a run: when a run cannot start online it is
logged offline (`sync` uploads it later), and when it cannot start at all the run goes on without W&B.

Every run carries the config fields of FIELDS (a cell's run also its method's own, `method_<option>`, e.g. OPLoRA's
`method_k`: `Method.summary`) beside the resolved config, so W&B's own grouping by `method_label` gives per-method
means and error bars over `seed`. Metric keys:
- train runs: `train/loss`, `train/global_step` (the HF Trainer's callback);
- eval runs: `eval/<column>`, `eval/finetune_avg`, `eval/forget_avg`, `eval/avg`, `rho/k<k>` (summary), and one
  history row per k with `rho_curve/k`, `rho_curve/rho` (figure 2a); in a sweep, one history row per point (run ×
  checkpoint) with `frontier/step`, `frontier/learning`, `frontier/forgetting`, `frontier/nll_increase`,
  `frontier/forget_avg` (the frontier, oplora.sweep);
- the collect run: `table` (wandb.Table: means and standard errors over seeds), `forget_avg` (bar chart),
  `figure2` and `dashboard` (images).
Artifacts: `adapter-<cell>` (type adapter, logged by the train run, always a file:// reference: checksummed, never
uploaded), `results-<cell>` (type results: the cell's eval/*.json and diagnose.json, uploaded), and
`tables-<experiment>-<model>` (type tables: the collect step's files). Online, the eval run uses its adapter and
the collect run uses every cell's results, so W&B's lineage links them (wandb refuses `use_artifact` offline).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from oplora.config import CONFIG_DIR, trains
from oplora.grid import sweep_lr
from oplora.io import content_hash
from oplora.methods import adapter_settings, get_method
from oplora.record import as_dict, config_hash, git_commit
from oplora.rundir import RunDir

log = logging.getLogger("oplora.tracking")
FIELDS = ("experiment", "model_name", "data_name", "method_label", "learning_rate", "lora_r", "seed", "git_commit",
          "config_hash")
MODES = ("auto", "online", "offline", "disabled")
ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's older names for the two modes


def api_key_configured() -> bool:
    """Whether wandb would find credentials without prompting: the environment or a netrc entry for its host."""
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        return wbauth.read_netrc_auth(host=wandb_setup.singleton().settings.base_url) is not None
    except AuthenticationError:  # a malformed key: wandb would refuse it too
        return False


def effective_mode(configured: str) -> str:
    """online, offline or disabled: see the module docstring for the order."""
    env = os.environ.get("WANDB_MODE")
    env = ALIASES.get(env, env)
    for source, value in (("WANDB_MODE", env), ("wandb.mode", configured)):
        if value and value not in MODES:
            raise ValueError(f"{source}={value!r} is not valid; choose one of {', '.join(MODES)}")
    if "disabled" in (env, configured):
        return "disabled"
    mode = env or configured
    if mode == "auto":
        return "online" if api_key_configured() else "offline"
    return mode


def job_mode(configured: str) -> str:
    """The mode of a batch job: `effective_mode`, except that `auto` (WANDB_MODE unset) is offline."""
    if configured == "auto" and not os.environ.get("WANDB_MODE"):
        return "offline"
    return effective_mode(configured)


def is_cell(job_type: str) -> bool:
    return job_type != "collect"


def run_name(cfg: DictConfig, job_type: str) -> str:
    experiment, lr = f"{cfg.experiment_name}/{cfg.model.name}", sweep_lr(cfg)
    swept = f"lr{lr:g}/" if lr is not None else ""
    return f"{experiment}/{cfg.data.name}/{cfg.method.label}/{swept}seed{cfg.seed}" if is_cell(job_type) else \
        f"{experiment}/collect"


def run_id(cfg: DictConfig, job_type: str) -> str:
    """Deterministic, so a rerun resumes its run and `sync` can find an experiment's runs."""
    key = config_hash(cfg) if job_type == "train" else content_hash(run_name(cfg, job_type))
    return f"{job_type}-{key[:16]}"


def method_fields(cfg: DictConfig) -> dict:
    """A trained cell's method's own fields (`Method.summary`: `method_<option>`, e.g. OPLoRA's `method_k`)."""
    if not trains(cfg.method):
        return {}
    settings = adapter_settings(cfg)
    return get_method(settings.method).summary(settings)


def run_config(cfg: DictConfig, job_type: str) -> dict:
    """The resolved config plus FIELDS and the method's fields; the collect run has no method or seed of its own."""
    if not is_cell(job_type):
        config = {"pipeline": as_dict(cfg.pipeline), "eval": as_dict(cfg.eval)}
        return {**config, **dict.fromkeys(FIELDS), "experiment": cfg.experiment_name, "model_name": cfg.model.name,
                "data_name": cfg.data.name, "git_commit": git_commit(), "config_hash": content_hash(config)}
    trained = trains(cfg.method)
    return {**as_dict(cfg), "experiment": cfg.experiment_name, "model_name": cfg.model.name,
            "data_name": cfg.data.name, "method_label": cfg.method.label,
            "learning_rate": float(cfg.train.lr) if trained else None,
            "lora_r": cfg.train.lora_r if trained else None, "seed": cfg.seed, "git_commit": git_commit(),
            "config_hash": config_hash(cfg), **method_fields(cfg)}


def start(cfg: DictConfig, job_type: str, directory: str | Path):
    """Open a run (train, eval or collect) in the resolved mode; None when W&B is disabled or cannot start.

    W&B never fails the run it logs: an online run that cannot start (no internet on a compute node, a server error)
    is logged offline instead, for `sync`; when even that fails, a warning says so and the run goes on without W&B.
    """
    mode = effective_mode(cfg.wandb.mode)
    if mode == "disabled":
        return None
    import wandb

    tags = [cfg.model.name, cfg.data.name, *([cfg.method.label, f"seed{cfg.seed}"] if is_cell(job_type) else
                                            ["collect"])]
    directory = Path(cfg.wandb.dir or directory)
    for attempt in dict.fromkeys([mode, "offline"]):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=attempt, dir=str(directory),
                              group=cfg.experiment_name, job_type=job_type, name=run_name(cfg, job_type),
                              id=run_id(cfg, job_type), resume="allow", config=run_config(cfg, job_type), tags=tags)
        except Exception as err:  # W&B's own errors (CommError, UsageError, timeouts), or an unwritable wandb.dir
            log.warning("W&B could not start the %s run %s (%s: %s)%s", job_type, attempt, type(err).__name__,
                        str(err)[:300], "; logging it offline, `make wandb-sync` uploads it later"
                        if attempt == "online" else "; this run goes on without W&B")
            wandb.teardown()  # W&B's service keeps a failed run's id: the offline attempt would be refused
    return None


def artifact_name(kind: str, cfg: DictConfig, cell: bool = True) -> str:
    """`<kind>-<experiment>-<model>[-<data>-<method>-seed<N>]`, in the characters W&B allows."""
    parts = [kind, cfg.experiment_name, cfg.model.name]
    lr = sweep_lr(cfg) if cell else None
    parts += [cfg.data.name, cfg.method.label, *([f"lr{lr:g}"] if lr is not None else []), f"seed{cfg.seed}"] \
        if cell else []
    return re.sub(r"[^\w.-]", "-", "-".join(map(str, parts)))


def use(run, name: str) -> None:
    """Mark the artifact's latest version as an input of the (online) run, for lineage; a warning if W&B lacks it."""
    from wandb.errors import CommError

    try:
        run.use_artifact(f"{name}:latest")
    except (ValueError, CommError) as err:
        log.warning("no lineage link to %s: not on W&B (logged offline and not synced yet?): %s", name, err)


def finish_train(cfg: DictConfig, adapter: Path) -> None:
    """Log the exported adapter into the open train run and close it. The adapter is a reference artifact
    (file:// URIs, checksummed): nothing is uploaded twice. A W&B error is a warning: the cell is trained."""
    import wandb

    run = wandb.run
    try:
        metadata = {k: run.config[k] for k in FIELDS} | method_fields(cfg)
        artifact = wandb.Artifact(artifact_name("adapter", cfg), type="adapter", metadata=metadata)
        artifact.add_reference(adapter.resolve().as_uri())
        run.log_artifact(artifact)
        run.finish()
    except Exception as err:  # W&B's errors are many; none may fail a trained cell
        log.warning("W&B could not log the adapter of %s (%s: %s); the adapter is saved", run_name(cfg, "train"),
                    type(err).__name__, err)


def log_eval(cfg: DictConfig, values: dict[str, float | None], rho: dict[int, float], files: list[Path],
             history: list[dict] = ()) -> None:
    """One eval run per cell: summary keys, the ρ_k curve, its results artifact (`files`: the cell's current result
    files, as the table reads them), `history` rows (a sweep's points: `frontier/*`) and, online, its adapter."""
    import wandb

    run = start(cfg, "eval", cfg.output_dir)
    if run is None:
        return
    with run:
        summary = {f"eval/{k}": v for k, v in values.items() if v is not None}
        summary.update({f"rho/k{k}": v for k, v in rho.items()})
        run.log(summary)
        for k in sorted(rho):
            run.log({"rho_curve/k": k, "rho_curve/rho": rho[k]})
        for row in history:
            run.log(row)
        run.summary.update(summary)
        if trains(cfg.method) and not run.offline:
            use(run, artifact_name("adapter", cfg))
        cell = RunDir(cfg.output_dir)
        artifact = wandb.Artifact(artifact_name("results", cfg), type="results",
                                  metadata={k: run.config[k] for k in FIELDS} | method_fields(cfg))
        for path in files:
            artifact.add_file(str(path), name=str(path.relative_to(cell.root)))
        run.log_artifact(artifact)


def log_collect(cfg: DictConfig, cells: list[DictConfig], table: dict[str, list], files: list[Path],
                paired: dict[str, dict[str, dict]] | None = None) -> None:
    """The collect run: the table (with standard errors), the paired differences with their bootstrap intervals
    (oplora.paired), the bar chart, the figures, the tables artifact."""
    import wandb

    run = start(cfg, "collect", cfg.pipeline.results_dir)
    if run is None:
        return
    with run:
        logged = wandb.Table(columns=table["columns"], data=table["data"])
        logs = {path.stem: wandb.Image(str(path)) for path in files if path.suffix == ".png"}
        pairs = [[pair, column, r["diff"], r["low"], r["high"], r["seeds"], r["questions"]]
                 for pair, columns in (paired or {}).items() for column, r in columns.items()]
        if pairs:
            logs["paired"] = wandb.Table(columns=["pair", "column", "diff", "low", "high", "seeds", "questions"],
                                         data=pairs)
        run.log({"table": logged, **logs,
                 "forget_avg": wandb.plot.bar(logged, "method", "forget_avg", title="average forgetting score")})
        if not run.offline:
            for cell in cells:
                use(run, artifact_name("results", cell))
        artifact = wandb.Artifact(artifact_name("tables", cfg, cell=False), type="tables",
                                  metadata={k: run.config[k] for k in FIELDS})
        for path in files:
            artifact.add_file(str(path))
        run.log_artifact(artifact)


def default_entity() -> str:
    """The logged-in user's default entity (online only)."""
    import wandb

    return wandb.Api().default_entity


def offline_runs(cfg: DictConfig, cells: list[DictConfig]) -> list[Path]:
    """Every offline run directory of the experiment (train and eval runs of its cells, its collect run)."""
    wanted = {run_id(cfg, "collect"): Path(cfg.wandb.dir or cfg.pipeline.results_dir)}
    for cell in cells:
        for job_type in ("train", "eval"):
            wanted[run_id(cell, job_type)] = Path(cell.wandb.dir or cell.output_dir)
    found = set()
    for rid, directory in wanted.items():
        found.update(directory.glob(f"wandb/offline-run-*-{rid}"))
    return sorted(found)


def sync(cfg: DictConfig, cells: list[DictConfig]) -> list[Path]:
    """`wandb sync` of every offline run of the experiment (already synced runs are skipped by wandb)."""
    runs = offline_runs(cfg, cells)
    if not runs:
        raise FileNotFoundError(f"no offline W&B runs of {cfg.experiment_name}/{cfg.model.name}")
    subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", *map(str, runs)], check=True)
    return runs


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from oplora.grid import command_overrides, grid

    runs = sync(cfg, list(grid(cfg, command_overrides()).values()))
    print(f"synced {len(runs)} runs of {cfg.experiment_name}/{cfg.model.name}")


if __name__ == "__main__":
    main()
