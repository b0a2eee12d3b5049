"""Figure 2 of the paper: subspace leakage ρ_k per method (a) against average forgetting (b).

ΔW is the effective update against the original W (for PiSSA, MiLoRA and LoRA-Null: s(B A − B₀A₀), see
`oplora.diagnose`). Beside our values the figure can show the paper's: the ρ_k it quotes for OPLoRA-128 with its
`torch.svd_lowrank` projection (`results/paper/figure2a.csv`: ρ_128 = 0.003, ρ_k < 1.4e-5 for k ≤ 64, drawn as a
value and as upper bounds) in (a), and the forgetting average of its table in (b).
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from oplora.config import PAPER_DIR
from oplora.io import atomic_file

RHO_FLOOR = 1e-16  # ρ below this (OPLoRA sits at ~1e-15) is drawn at the floor so the log axis stays finite
DELTA_READINGS = {  # which ΔW ρ_k measures (oplora.diagnose), named in panel (a)
    "effective": "ΔW = W′ − W₀, the effective update (PiSSA, MiLoRA, LoRA-Null: s(BA − B₀A₀))",
    "trained": "ΔW = s·BA, the trained product with its initial value (PiSSA, MiLoRA, LoRA-Null: s·BA)",
}
FALLBACK_COLORS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78")  # methods without a `color`


def method_colors(names: list[str], colors: dict[str, str | None] | None = None) -> dict[str, str]:
    """Each method's configured colour (`color` in its method config), else a fallback picked by position."""
    return {n: (colors or {}).get(n) or FALLBACK_COLORS[i % len(FALLBACK_COLORS)] for i, n in enumerate(names)}


def paper_rho(model: str, module: str, root: Path = PAPER_DIR) -> dict[str, list[tuple[int, float, str]]]:
    """The ρ_k the paper quotes for `model`'s `module`: method -> [(k, value, "=" or "<" for an upper bound)]."""
    with open(Path(root) / "figure2a.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == model and r["module"] == module]
    quoted: dict[str, list[tuple[int, float, str]]] = {}
    for row in rows:
        quoted.setdefault(row["method"], []).append((int(row["k"]), float(row["rho"]), row["relation"]))
    return quoted


def order_by_rho(rho: dict[str, dict[int, float]], k: int = 16) -> list[str]:
    """Method names sorted by ρ_k ascending (stable); methods without a finite ρ_k come last."""
    def key(name: str) -> tuple[bool, float]:
        value = rho[name].get(k)
        missing = value is None or not math.isfinite(value)
        return (missing, 0.0 if missing else float(value))
    return sorted(rho, key=key)


@dataclass(frozen=True)
class Drift:
    """A drift column (such as the KL stage's) drawn beside panel (b): its label, per method its mean and stderr."""

    label: str
    mean: dict[str, float | None]
    stderr: dict[str, float | None]


def figure2(rho: dict[str, dict[int, float]], forgetting: dict[str, float | None], out_stem: str | Path, *,
            colors: dict[str, str | None] | None = None, module: str = "model.layers.0.self_attn.q_proj",
            title: str | None = None, errors: dict[str, float | None] | None = None,
            paper_rho: dict[str, list[tuple[int, float, str]]] | None = None,
            paper_forgetting: dict[str, float | None] | None = None, delta: str = "effective",
            drift: Drift | None = None) -> list[Path]:
    """Draw figure 2 and save `<out_stem>.png` and `<out_stem>.pdf` (atomically); returns both paths.

    rho: method display name -> {k: ρ_k = ‖U_kᵀ ΔW‖²_F / ‖ΔW‖²_F}; forgetting: method -> average forgetting
    score in percent, or None when missing (drawn as an absent bar labelled "missing", with a warning);
    colors: method -> colour (the method configs' `color`; a fallback colour where it is missing);
    errors: method -> standard error of that score over seeds, drawn as error bars (None or absent: no bar);
    paper_rho, paper_forgetting: the paper's quoted ρ_k (`paper_rho`) and forgetting average per method, drawn in black
    beside ours; delta: which ΔW the ρ_k were measured on (a key of DELTA_READINGS), named under panel (a)'s title;
    drift: drawn as black diamonds on a second axis of panel (b).
    """
    if not rho or not any(rho.values()):
        raise ValueError("figure2: `rho` is empty - need at least one method with ρ_k values to draw figure 2")
    colors = method_colors(list(rho), colors)
    fig = Figure(figsize=(11, 4.5), dpi=150)
    ax_a, ax_b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    rho_panel(ax_a, rho, colors, module, delta, paper_rho or {})
    order = order_by_rho(rho, k=16)
    forgetting_panel(ax_b, order, forgetting, colors, errors or {}, paper_forgetting or {})
    if drift and any(v is not None for v in drift.mean.values()):
        drift_axis(ax_b, order, drift)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save(fig, out_stem)


def rho_panel(ax, rho: dict[str, dict[int, float]], colors: dict[str, str], module: str, delta: str,
              quoted: dict[str, list[tuple[int, float, str]]]) -> None:
    """(a): ρ_k against k per method, log-log, with the paper's quoted values (and upper bounds) in black."""
    ks = sorted({k for per_k in rho.values() for k in per_k})
    for m in rho:
        xs = sorted(rho[m])
        ys = [max(float(rho[m][k]), RHO_FLOOR) for k in xs]
        ax.plot(xs, ys, marker="o", lw=1.8, ms=5, color=colors[m], label=m)
    for m, points in quoted.items():
        for relation, marker, what in (("=", "D", "(svd_lowrank)"), ("<", "v", "upper bound")):
            chosen = [(k, value) for k, value, rel in points if rel == relation]
            if chosen:
                ax.scatter(*zip(*chosen, strict=True), marker=marker, s=36, facecolors="none", edgecolors="black",
                           label=f"paper: {m} {what}", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_ylim(RHO_FLOOR / 3, 1.5)
    ax.set_xlabel("k (top singular directions of W₀)")
    ax.set_ylabel(f"ρ_k  (log scale; clipped at {RHO_FLOOR:.0e})")
    ax.set_title(f"(a) ρ_k on {module}\n{DELTA_READINGS[delta]}", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="best", framealpha=0.9)


def forgetting_panel(ax, order: list[str], forgetting: dict[str, float | None], colors: dict[str, str],
                     errors: dict[str, float | None], quoted: dict[str, float | None]) -> None:
    """(b): the average forgetting score per method in `order` (by ρ_16), with standard errors over seeds and the
    paper's values in black; a missing score is drawn as an absent bar labelled so, with a warning."""
    missing = [m for m in order if forgetting.get(m) is None]
    if missing:
        warnings.warn(f"figure2: no forgetting score for {', '.join(missing)}; drawn as missing", stacklevel=3)
    values = {m: float(forgetting[m]) for m in order if forgetting.get(m) is not None}
    published = {m: float(quoted[m]) for m in order if quoted.get(m) is not None}
    xs = range(len(order))
    spread = [errors.get(m) or 0.0 for m in order]
    ax.bar(xs, [values.get(m, 0.0) for m in order], color=[colors[m] for m in order], width=0.65,
           yerr=spread if any(spread) else None, capsize=4, error_kw={"elinewidth": 1.2})
    if published:
        ax.scatter([order.index(m) for m in published], list(published.values()), marker="_", s=400,
                   color="black", linewidths=2, label="paper", zorder=3)
        ax.legend(fontsize=8, loc="lower right")
    if values:
        lo = min([values[m] - e for m, e in zip(order, spread, strict=True) if m in values] + list(published.values()))
        hi = max([values[m] + e for m, e in zip(order, spread, strict=True) if m in values] + list(published.values()))
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - 3 * pad), hi + 2 * pad)
    bottom, top = ax.get_ylim()
    for x, m in enumerate(order):
        if m in values:
            ax.text(x, values[m] + spread[x] + 0.02 * (top - bottom), f"{values[m]:.2f}", ha="center", va="bottom",
                    fontsize=8)
        else:
            ax.text(x, bottom + 0.05 * (top - bottom), "— missing", ha="center", va="bottom", fontsize=8,
                    rotation=90, color="0.4")
    ax.set_xticks(list(xs), order, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("average forgetting score (%)")
    ax.set_title("(b) average forgetting score (sorted by ρ_16)"
                 + ("\nerror bars: ± one standard error over seeds" if any(spread) else ""), fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)


def drift_axis(ax, order: list[str], drift: Drift) -> None:
    """The drift column on a second axis of panel (b): black diamonds with standard errors."""
    shown = [m for m in order if drift.mean.get(m) is not None]
    twin = ax.twinx()
    twin.errorbar([order.index(m) for m in shown], [drift.mean[m] for m in shown],
                  yerr=[drift.stderr.get(m) or 0.0 for m in shown], fmt="D", color="black", ms=5, capsize=3,
                  label=drift.label)
    twin.set_ylabel(drift.label)
    twin.set_ylim(bottom=0)
    twin.legend(fontsize=8, loc="upper right")


def save(fig: Figure, out_stem: str | Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Write `<out_stem>.<format>` for each format, atomically (a temporary file renamed into place)."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150)
        paths.append(path)
    return paths
