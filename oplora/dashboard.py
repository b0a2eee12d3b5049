"""The W&B dashboard of an experiment, as code: a saved workspace built with `wandb-workspaces`.

    python -m oplora.dashboard experiment=table2 [model=qwen2.5-7b]     # make dashboard experiment=… [model=…]

One workspace per (project, experiment, model, data), selecting the runs whose config fields `experiment`,
`model_name` and `data_name` match (oplora.tracking.FIELDS) and grouping them by `method_label`, so every
bar is the mean over seeds with a standard-error bar: forgetting, fine-tuning and overall average; the
collect run's table and one bar chart per column; ρ_k against k (figure 2a) and the forgetting average
against ρ_16 (figure 2b); training loss by method. It is always written to
`<pipeline.results_dir>/dashboard.json`; when the W&B mode is online it is also saved (created, or updated in
place: its view name is derived from project, experiment, model and data) and its URL printed. `render` draws
the same panels from the local result files (`dashboard.png`, written by collect).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from matplotlib.figure import Figure
from omegaconf import DictConfig

from oplora import tracking
from oplora.config import CONFIG_DIR
from oplora.figures import RHO_FLOOR, method_colors
from oplora.figures import save as save_figure
from oplora.grid import is_sweep
from oplora.io import atomic_write_text, content_hash
from oplora.results import ResultsDir

AVERAGES = (("forget_avg", "average forgetting score"), ("finetune_avg", "average fine-tuning score"),
            ("avg", "average of all columns"))


def figure_k(ks) -> int:
    """The k of figure 2b: 16, as in the paper, when measured, else the smallest k measured."""
    return 16 if 16 in ks else min(ks)


def view_name(project: str, experiment: str, model: str, data: str) -> str:
    """W&B's internal view name (`nw-<id>-v`), fixed per experiment so that a second save updates the first."""
    return f"nw-oplora{content_hash([project, experiment, model, data])[:12]}-v"


def workspace(entity: str, project: str, experiment: str, model: str, data: str, columns: list[str], k: int = 16,
              frontier: bool = False):
    """The workspace (a `wandb_workspaces.workspaces.Workspace`); builds offline, saved by `save`."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    by_method = {"groupby": wr.Config("method_label"), "groupby_aggfunc": "mean", "groupby_rangefunc": "stderr"}

    def bars(key: str, title: str):
        return wr.BarPlot(title=title, metrics=[key], orientation="v", title_y="%", **by_method)

    sections = [
        ws.Section(name="Forgetting across methods (mean ± standard error over seeds)", is_open=True,
                   panels=[bars(f"eval/{key}", title) for key, title in AVERAGES]),
        ws.Section(name="Figure 2", is_open=True, panels=[
            wr.LinePlot(title="(a) ρ_k against k", x="rho_curve/k", y=["rho_curve/rho"], log_x=True, log_y=True,
                        title_x="k", title_y="ρ_k", **by_method),
            wr.ScatterPlot(title=f"(b) average forgetting score against ρ_{k}", x=wr.SummaryMetric(f"rho/k{k}"),
                           y=wr.SummaryMetric("eval/forget_avg"), log_x=True)]),
        ws.Section(name="The table", is_open=True, panels=[
            wr.WeavePanelSummaryTable(table_name="table", layout=wr.Layout(w=24, h=8)),
            *(bars(f"eval/{column}", column) for column in columns)]),
        ws.Section(name="Training", is_open=True, panels=[
            wr.LinePlot(title="training loss", x="train/global_step", y=["train/loss"], **by_method)]),
    ]
    if frontier:  # a sweep: every run's points, forgetting against learning, and the collect run's frontier figure
        sections.insert(0, ws.Section(name="Learning–forgetting frontier", is_open=True, panels=[
            wr.LinePlot(title="forgetting against learning: each run along its checkpoints", x="frontier/learning",
                        y=["frontier/forgetting"], log_y=True, title_x="learning", title_y="forgetting"),
            wr.MediaBrowser(title="the frontier and the matched-learning level (collect)", media_keys=["frontier"])]))
    selected = [expr.Config("experiment") == experiment, expr.Config("model_name") == model,
                expr.Config("data_name") == data]
    runs = ws.RunsetSettings(filters=selected,
                             groupby=[expr.Config("method_label")],
                             pinned_columns=["config:method_label", "config:seed", "summary:eval/forget_avg",
                                             "summary:eval/finetune_avg", f"summary:rho/k{k}"])
    view = ws.Workspace(entity=entity, project=project, name=f"oplora: {experiment} / {model} / {data}",
                        sections=sections, runset_settings=runs)
    view._internal_name = view_name(project, experiment, model, data)
    return view


def to_json(view) -> str:
    """The saved form of the workspace (what `save` sends to W&B), as JSON."""
    return view._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1)


def save(view) -> str:
    """Create the workspace on W&B, or update the one saved before under the same view name; its URL."""
    from wandb_workspaces.workspaces import internal

    try:
        view._internal_id = internal.View.from_name(view.entity, view.project, view._internal_name).id
    except ValueError:  # not saved yet
        pass
    return view.save().url


def publish(cfg: DictConfig) -> str | None:
    """Write `<results_dir>/dashboard.json`; online, save it too and return its URL."""
    online = tracking.effective_mode(cfg.wandb.mode) == "online"
    entity = cfg.wandb.entity or (tracking.default_entity() if online else "")
    view = workspace(entity, cfg.wandb.project, cfg.experiment_name, cfg.model.name, cfg.data.name,
                     [c.label for c in cfg.eval.columns], figure_k(cfg.pipeline.rho_ks), is_sweep(cfg))
    path = atomic_write_text(ResultsDir(cfg.pipeline.results_dir).dashboard.with_suffix(".json"), to_json(view))
    print(f"W&B dashboard definition written to {path}")
    if online:
        url = save(view)
        print(f"W&B dashboard: {url}")
        return url
    return None


def render(stats: dict[str, dict], losses: dict[str, dict[int, list]], columns: list[str], out_stem: str | Path,
           colors: dict[str, str | None], title: str) -> Path:
    """The dashboard's panels drawn from local results: `stats` from oplora.spread.summarize, `losses` per
    method and seed, `colors` the method configs' colours; bars and curves are means over seeds with
    standard-error bars. Returns the PNG."""
    fig = Figure(figsize=(16, 12), dpi=110)
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 0.55])
    axes = [fig.add_subplot(grid[i, j]) for i in range(2) for j in range(3)]
    names = list(stats)
    colors = method_colors(names, colors)

    def mean_err(name: str, key: str) -> tuple[float, float]:
        found = stats[name].get(key, {})
        return found.get("mean") or 0.0, found.get("stderr") or 0.0

    for ax, (key, label) in zip(axes[:3], AVERAGES, strict=True):
        means, errs = zip(*(mean_err(name, key) for name in names), strict=True)
        ax.bar(names, means, yerr=errs, capsize=4, color=[colors[n] for n in names])
        ax.set_title(f"eval/{key}: {label}", fontsize=10)
        ax.set_ylabel("%")
        ax.tick_params(axis="x", rotation=25, labelsize=8)

    rho_ax, scatter_ax, loss_ax = axes[3:]
    trained = [n for n in names if any(c.startswith("rho/k") for c in stats[n])]
    ks = sorted({int(c.removeprefix("rho/k")) for n in trained for c in stats[n] if c.startswith("rho/k")})
    k = figure_k(ks) if ks else None
    for name in trained:
        points = [(j, *mean_err(name, f"rho/k{j}")) for j in ks if f"rho/k{j}" in stats[name]]
        xs, ys, es = zip(*points, strict=True)
        rho_ax.errorbar(xs, [max(y, RHO_FLOOR) for y in ys], yerr=es, marker="o", capsize=3, color=colors[name],
                        label=name)
        seeds = stats[name]["forget_avg"]["seeds"]
        cells = [(rho, seeds.get(seed)) for seed, rho in stats[name].get(f"rho/k{k}", {}).get("seeds", {}).items()]
        cells = [(max(r, RHO_FLOOR), f) for r, f in cells if r is not None and f is not None]
        if cells:
            scatter_ax.scatter(*zip(*cells, strict=True), color=colors[name], label=name)
    if trained:
        rho_ax.set(yscale="log", xlabel="k", ylabel="ρ_k")
        rho_ax.set_xscale("log", base=2)
        rho_ax.set_xticks(ks, [str(j) for j in ks])
        rho_ax.minorticks_off()
        scatter_ax.set(xscale="log", xlabel=f"rho/k{k}", ylabel="eval/forget_avg (%)")
        rho_ax.legend(fontsize=7)
    rho_ax.set_title("(a) ρ_k against k", fontsize=10)
    scatter_ax.set_title("(b) average forgetting score against ρ_k, one point per run", fontsize=10)

    for name, seeds in losses.items():
        steps = sorted({step for curve in seeds.values() for step, _ in curve})
        per_step = [[dict(curve)[s] for curve in seeds.values() if s in dict(curve)] for s in steps]
        means = [sum(v) / len(v) for v in per_step]
        loss_ax.plot(steps, means, marker=".", color=colors.get(name), label=f"{name} ({len(seeds)} seeds)")
    loss_ax.set(title="train/loss by method (mean over seeds)", xlabel="train/global_step", ylabel="loss")
    loss_ax.legend(fontsize=7) if losses else None
    for ax in axes:
        ax.grid(True, alpha=0.3)
    table_ax = fig.add_subplot(grid[2, :])
    table_ax.axis("off")
    shown = [*columns, *(key for key, _ in AVERAGES)]

    def cell(found: dict) -> str:
        if found.get("mean") is None:
            return "—"
        return f"{found['mean']:.2f}" + (f" ± {found['stderr']:.2f}" if found.get("stderr") is not None else "")

    table_ax.table(cellText=[[cell(stats[name].get(c, {})) for c in shown] for name in names], rowLabels=names,
                   colLabels=shown, loc="center", cellLoc="center")
    table_ax.set_title("the table (collect run's `table`): mean ± standard error over seeds", fontsize=10)
    fig.suptitle(f"W&B dashboard panels, from local results — {title}", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_stem, ("png",))[0]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    publish(cfg)


if __name__ == "__main__":
    main()
