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


def figure2(rho: dict[str, dict[int, float]], forgetting: dict[str, float | None], out_stem: str | Path,
            colors: dict[str, str | None] | None = None, module: str = "model.layers.0.self_attn.q_proj",
            title: str | None = None, errors: dict[str, float | None] | None = None,
            paper: tuple[dict[str, list[tuple[int, float, str]]], dict[str, float | None]] | None = None,
            delta: str = "effective", drift: tuple[str, dict[str, float | None], dict[str, float | None]] | None = None
            ) -> list[Path]:
    """Draw figure 2 and save `<out_stem>.png` and `<out_stem>.pdf` (atomically); returns both paths.

    rho: method display name -> {k: ρ_k = ‖U_kᵀ ΔW‖²_F / ‖ΔW‖²_F}; forgetting: method -> average forgetting
    score in percent, or None when missing (drawn as an absent bar labelled "missing", with a warning);
    colors: method -> colour (the method configs' `color`; a fallback colour where it is missing);
    errors: method -> standard error of that score over seeds, drawn as error bars (None or absent: no bar);
    paper: (the paper's quoted ρ_k, `paper_rho`; its forgetting average per method), drawn in black beside ours;
    delta: which ΔW the ρ_k were measured on (a key of DELTA_READINGS), named under panel (a)'s title;
    drift: (its label, method -> a drift score such as the KL stage's, method -> its standard error), drawn as black
    diamonds on a second axis of panel (b).
    """
    if not rho or not any(rho.values()):
        raise ValueError("figure2: `rho` is empty - need at least one method with ρ_k values to draw figure 2")
    methods = list(rho)
    colors = method_colors(methods, colors)
    ks = sorted({k for per_k in rho.values() for k in per_k})

    fig = Figure(figsize=(11, 4.5), dpi=150)
    ax_a, ax_b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    for m in methods:
        xs = sorted(rho[m])
        ys = [max(float(rho[m][k]), RHO_FLOOR) for k in xs]
        ax_a.plot(xs, ys, marker="o", lw=1.8, ms=5, color=colors[m], label=m)
    quoted_rho, quoted_forgetting = paper or ({}, {})
    for m, points in quoted_rho.items():
        for relation, marker, what in (("=", "D", "(svd_lowrank)"), ("<", "v", "upper bound")):
            chosen = [(k, value) for k, value, rel in points if rel == relation]
            if chosen:
                ax_a.scatter(*zip(*chosen, strict=True), marker=marker, s=36, facecolors="none", edgecolors="black",
                             label=f"paper: {m} {what}", zorder=3)
    ax_a.set_xscale("log", base=2)
    ax_a.set_yscale("log")
    ax_a.set_xticks(ks, [str(k) for k in ks])
    ax_a.minorticks_off()
    ax_a.set_ylim(RHO_FLOOR / 3, 1.5)
    ax_a.set_xlabel("k (top singular directions of W₀)")
    ax_a.set_ylabel(f"ρ_k  (log scale; clipped at {RHO_FLOOR:.0e})")
    ax_a.set_title(f"(a) ρ_k on {module}\n{DELTA_READINGS[delta]}", fontsize=9)
    ax_a.grid(True, which="major", alpha=0.3)
    ax_a.legend(fontsize=8, ncol=2, loc="best", framealpha=0.9)

    order = order_by_rho(rho, k=16)
    missing = [m for m in order if forgetting.get(m) is None]
    if missing:
        warnings.warn(f"figure2: no forgetting score for {', '.join(missing)}; drawn as missing", stacklevel=2)
    values = {m: float(forgetting[m]) for m in order if forgetting.get(m) is not None}
    published = {m: float(quoted_forgetting[m]) for m in order if quoted_forgetting.get(m) is not None}
    xs = range(len(order))
    spread = [(errors or {}).get(m) or 0.0 for m in order]
    ax_b.bar(xs, [values.get(m, 0.0) for m in order], color=[colors[m] for m in order], width=0.65,
             yerr=spread if any(spread) else None, capsize=4, error_kw={"elinewidth": 1.2})
    if published:
        ax_b.scatter([order.index(m) for m in published], list(published.values()), marker="_", s=400,
                     color="black", linewidths=2, label="paper", zorder=3)
        ax_b.legend(fontsize=8, loc="lower right")
    if values:
        lo = min([values[m] - e for m, e in zip(order, spread, strict=True) if m in values] + list(published.values()))
        hi = max([values[m] + e for m, e in zip(order, spread, strict=True) if m in values] + list(published.values()))
        pad = max(0.5, 0.15 * (hi - lo))
        ax_b.set_ylim(max(0.0, lo - 3 * pad), hi + 2 * pad)
    bottom, top = ax_b.get_ylim()
    for x, m in enumerate(order):
        if m in values:
            ax_b.text(x, values[m] + spread[x] + 0.02 * (top - bottom), f"{values[m]:.2f}", ha="center", va="bottom",
                      fontsize=8)
        else:
            ax_b.text(x, bottom + 0.05 * (top - bottom), "— missing", ha="center", va="bottom", fontsize=8,
                      rotation=90, color="0.4")
    if drift and any(v is not None for v in drift[1].values()):
        label, score, error = drift
        shown = [m for m in order if score.get(m) is not None]
        ax_k = ax_b.twinx()
        ax_k.errorbar([order.index(m) for m in shown], [score[m] for m in shown],
                      yerr=[(error or {}).get(m) or 0.0 for m in shown], fmt="D", color="black", ms=5, capsize=3,
                      label=label)
        ax_k.set_ylabel(label)
        ax_k.set_ylim(bottom=0)
        ax_k.legend(fontsize=8, loc="upper right")
    ax_b.set_xticks(list(xs), order, rotation=20, ha="right", fontsize=8)
    ax_b.set_ylabel("average forgetting score (%)")
    ax_b.set_title("(b) average forgetting score (sorted by ρ_16)"
                   + ("\nerror bars: ± one standard error over seeds" if any(spread) else ""), fontsize=10)
    ax_b.grid(True, axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()

    return save(fig, out_stem)


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
